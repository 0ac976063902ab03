"""An evaluation is a value: what to attack, with what, on which examples, validated once, here.

:class:`Evaluation` is the one description of a run of :func:`robusteval.runner.evaluate`. The command
line maps each of its options to one field; the Python API builds the same value. Every field is
checked in ``__post_init__``, so nothing downstream re-validates ε, budgets, the seed or the shard, and
a bad value is one :class:`~robusteval.errors.UserError` before any model is loaded or file written.

ε and the norm become threat values (:meth:`Evaluation.threats`) that are handed to the presets when the
battery is built (:func:`build_battery`), once per radius.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import attacks
from robusteval.errors import UserError

#: The norms a threat model can have (the names used on the command line and in records).
NORMS = tuple(attacks.BALLS)
PRECISIONS = tuple(attacks.engine.PRECISIONS)
#: ε below one grey level of 8-bit images is almost always a units mistake.
SMALLEST_EPS = 1 / 255

# Upper bounds on budgets: far above any published evaluation (AutoAttack: 100 steps, 5,000 queries;
# the LLR paper: 20 × 200), low enough that a typo cannot allocate a trial list larger than memory or
# run for years.
MAX_STEPS = 100_000
MAX_RESTARTS = 10_000
MAX_QUERIES = 1_000_000
MAX_BATCH = 1_000_000


def check_count(value, what: str, upper: int, minimum: int = 1) -> int | None:
    """A count given by a user (steps, restarts, queries, a batch size, a number of examples): an integer
    in ``minimum..upper``; ``None`` passes (not given). Anything else is one :class:`UserError` line —
    the one check of every budget of every command, so a typo never allocates a trial list larger than
    memory or runs for years."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"`{what}` must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(f"`{what}` must be ≥ {minimum}, got {value}")
    if value > upper:
        raise UserError(f"`{what}` = {value} is above the supported maximum {upper:,}")
    return value


def check_seed(value, what: str = "seed") -> int:
    """A seed: an integer in 0..2⁶³ − 1 (seeds are reduced to 64 bits, so a larger one would alias a
    smaller one, and records store it as a 64-bit integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= attacks.seeding.MAX_SEED:
        raise UserError(f"`{what}` must be an integer in 0..{attacks.seeding.MAX_SEED} (2^63 − 1), got "
                        f"{value!r}")
    return value


@dataclass(frozen=True)
class Budget:
    """Overrides of the presets' budgets (``None``: the preset's own). ``steps``/``restarts``/
    ``step_size``/``relative_step`` apply to gradient attacks, ``queries`` to gradient-free ones (Square,
    whose budget is also that of the black-box check)."""

    steps: int | None = None
    restarts: int | None = None
    step_size: float | None = None
    relative_step: bool | None = None
    queries: int | None = None

    def __post_init__(self):
        check_count(self.steps, "steps", MAX_STEPS)
        check_count(self.restarts, "restarts", MAX_RESTARTS)
        check_count(self.queries, "queries", MAX_QUERIES)
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise UserError(f"`step_size` must be a positive number, got {self.step_size!r}")

    def gradient(self) -> dict:
        """The overrides for a gradient attack, as :func:`attacks.get` keywords."""
        keys = ("steps", "restarts", "step_size", "relative_step")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _radii(eps, norm: str = "linf") -> tuple[float, ...]:
    values = eps if isinstance(eps, (list, tuple)) else [eps]
    out: dict[float, float] = {}
    for e in values:
        try:
            e = float(e)
        except (TypeError, ValueError):
            raise UserError(f"ε must be a number in [0, 1] pixel units, got {e!r}") from None
        if not math.isfinite(e) or e < 0 or (e > 1 and norm == "linf"):
            raise UserError(f"ε must be in [0, 1] pixel units, got {e!r}" if norm == "linf" else
                            f"ε must be a finite non-negative {norm.upper()} radius, got {e!r}")
        out.setdefault(round(e, 12), e)  # a radius given twice (8/255 typed two ways) runs once
    return tuple(out.values())


def warn_small_eps(eps_list: Sequence[float]) -> None:
    """Warn (one line each) about ε = 0 and ε below the data's quantisation step 1/255."""
    for e in eps_list:
        if e == 0:
            warnings.warn("ε = 0: no attack can change an input, robust accuracy will equal clean accuracy",
                          UserWarning, stacklevel=3)
        elif e < SMALLEST_EPS * (1 - 1e-9):
            warnings.warn(f"ε = {e:.6g} is below one grey level of 8-bit images (1/255 ≈ 0.00392); ε is in "
                          "[0, 1] pixel units — was it divided by 255 twice?", UserWarning, stacklevel=3)


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Models × battery × threats on a data selection; every field validated on construction.

    ``models``: checkpoint paths, ``zoo:NAME``, ``robustbench:DATASET/THREAT/NAME`` (found under
    ``model_dir``) or ``timm:NAME`` (with ``weights``) specs (loaded with ``arch`` on ``device``),
    :class:`~robusteval.models.LoadedModel`\\ s, or ``(name, nn.Module)`` pairs (used on their own
    device). ``battery``: preset or battery names (``standard``, ``paper``, ``apgd-ce``, ...) or
    :class:`attacks.Attack` values, in battery order. ``eps``: radii in [0, 1] pixel units (empty: the
    dataset's usual radius, :data:`robusteval.data.DEFAULT_EPS`). ``dataset``: a name for
    :func:`robusteval.data.load_dataset` or a :class:`~robusteval.data.Dataset` (``None``: the
    checkpoints' dataset, else Fashion-MNIST); the first ``n`` examples are used (an error if there are
    fewer), or the first ``limit`` (fewer if there are fewer; the command line's default), or all of
    them. ``checks``: the
    masking checks of :mod:`robusteval.alarms` (Square ends the battery as the black-box check).
    ``no_skip``: every attack on every clean-correct example (else each only on the survivors of the
    ones before it). ``precision``: the attacks' passes under autocast (verification stays fp32).
    ``randomized``: the randomised protocol (:mod:`robusteval.randomness`: EoT gradients with at most
    ``eot_max`` samples, every point judged over ``draws`` draws) — ``None``: when the randomness check
    finds random outputs. ``shard=(i, n)``: only the examples at positions ``i, i + n, ...``. ``out``:
    the run directory (records, plan, alarms; a rerun resumes), ``None`` keeps everything in memory.
    """

    models: tuple
    battery: tuple = ("standard",)
    eps: tuple[float, ...] = ()
    norm: str = "linf"
    dataset: object = None
    data_dir: str | os.PathLike | None = None
    download: bool = False
    n: int | None = None
    limit: int | None = None
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False
    bpda: bool = False
    no_skip: bool = False
    checks: bool = True
    randomized: bool | None = None
    draws: int = 20
    eot_max: int = 32
    shard: tuple[int, int] | None = None
    batch_size: int = 128
    device: str = "auto"
    arch: str | None = None
    model_dir: str | None = None  # where robustbench: models are found (default ./models)
    weights: str | None = None  # the weights of timm: models
    out: Path | None = None
    progress: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        models = self.models if isinstance(self.models, (list, tuple)) else [self.models]
        if not models:
            raise UserError("no model given")
        set_("models", tuple(models))
        battery = (self.battery,) if isinstance(self.battery, (str, attacks.Attack)) else tuple(self.battery)
        if not battery:
            raise UserError("no attack given")
        set_("battery", battery)
        if self.norm not in NORMS:
            raise UserError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        set_("eps", _radii(self.eps, self.norm) if self.eps != () else ())
        check_count(self.n, "n", 1 << 62)
        check_count(self.limit, "limit", 1 << 62)
        if not isinstance(self.budget, Budget):
            raise UserError(f"`budget` must be a Budget, got {self.budget!r}")
        check_seed(self.seed)
        if self.precision not in PRECISIONS:
            raise UserError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.shard is not None:
            i, k = self.shard
            if not (isinstance(i, int) and isinstance(k, int) and k >= 1 and 0 <= i < k):
                raise UserError(f"`shard` must be I/N with 0 ≤ I < N, got {i}/{k}")
            set_("shard", (int(i), int(k)))
        check_count(self.batch_size, "batch_size", MAX_BATCH)
        check_count(self.draws, "draws", 10_000)
        check_count(self.eot_max, "eot_max", 4_096, minimum=2)
        if self.randomized not in (None, True, False):
            raise UserError(f"`randomized` must be true, false or unset, got {self.randomized!r}")
        if self.out is not None:
            set_("out", Path(self.out))
        self.build(attacks.threat_of(self.eps[0] if self.eps else 0.1, norm=self.norm))  # bad names fail here
        if self.norm == "linf":
            warn_small_eps(self.eps)

    def replace(self, **changes) -> Evaluation:
        return replace(self, **changes)

    def radii(self, dataset: str) -> tuple[float, ...]:
        """The radii of this evaluation, or the usual one for ``dataset`` when none was given."""
        from robusteval.data import default_eps

        return self.eps or (default_eps(dataset, self.norm),)

    def threats(self, dataset: str) -> list:
        """One threat value per radius: the ``norm`` ball of that radius intersected with [0, 1]."""
        return [attacks.threat_of(e, norm=self.norm) for e in self.radii(dataset)]

    def build(self, threat, full_check: bool = False, draws: int = 1) -> Battery:
        """The battery for one threat (see :func:`build_battery`), every attack with ``draws`` EoT samples."""
        battery = build_battery(self.battery, threat, self.budget, self.checks, full_check)
        if draws == 1:
            return battery
        members = tuple(a.replace(draws=draws) for a in battery.members)
        return Battery(members, battery.check.replace(draws=draws) if battery.check is not None else None,
                       battery.gates)


@dataclass(frozen=True)
class Battery:
    """The attacks of one threat, in order, each run on the survivors of those before it; ``check``
    (Square, the black-box check of the masking alarms) ends it and always runs on the survivors."""

    members: tuple[attacks.Attack, ...]
    check: attacks.Attack | None = None
    #: Per member, the closeness above which a survivor skips it (``None``: every survivor runs it);
    #: every member before a gated one scores its survivors (:func:`attacks.closeness`).
    gates: tuple[float | None, ...] = ()

    @property
    def attacks(self) -> tuple[attacks.Attack, ...]:
        return self.members + ((self.check,) if self.check is not None else ())

    def gate(self, atk: attacks.Attack) -> float | None:
        i = self.members.index(atk) if atk in self.members else None
        return self.gates[i] if i is not None and i < len(self.gates) else None

    def scores(self, atk: attacks.Attack) -> bool:
        """Whether ``atk``'s survivors get a closeness score: a gated member comes after it."""
        gated = [i for i, g in enumerate(self.gates) if g is not None]
        return bool(gated) and atk in self.members and self.members.index(atk) < gated[-1]

    def role(self, atk: attacks.Attack) -> str:
        return "check" if atk is self.check else "member"


def build_battery(names: Sequence, threat, budget: Budget = Budget(), checks: bool = False,
                  full_check: bool = False) -> Battery:
    """Presets by name (or ready :class:`attacks.Attack` values) for ``threat``, with ``budget`` applied.

    A battery name (``standard``, ``paper``) stands for its members. With ``checks``, Square ends the
    battery as the black-box check unless it is in it already: :data:`robusteval.alarms.CHECK_QUERIES`
    queries (``budget.queries`` if given), or its full :data:`robusteval.alarms.FULL_QUERIES` with
    ``full_check`` (a pre-check already doubts the model's gradients). An unknown name, a budget that
    would not attack at all, or an attack without a notion of success is a :class:`UserError`.
    """
    from robusteval import alarms

    threat = attacks.threat_of(threat)
    members, seen = [], set()
    gates = attacks.gates(list(names), threat.norm)
    for item, form in attacks.presets.members(list(names), threat.norm):
        atk = form(_member(item, threat, budget))
        if atk.name not in seen:
            seen.add(atk.name)
            members.append(atk)
    check = None
    if checks and not any(not a.optimizer.uses_gradient for a in members):
        queries = budget.queries or (alarms.FULL_QUERIES if full_check else alarms.CHECK_QUERIES)
        check = attacks.get("square", threat, queries=queries)
    gated = tuple(gates.get(a.name) for a in members)
    return Battery(tuple(members), check, gated if any(g is not None for g in gated) else ())


def _member(item, threat, budget: Budget) -> attacks.Attack:
    if isinstance(item, attacks.Attack):
        atk = item.replace(threat=threat)
    else:
        try:
            preset = attacks.get(str(item), threat)
            changes = budget.gradient() if preset.optimizer.uses_gradient else (
                {"queries": budget.queries} if budget.queries else {})
            atk = attacks.get(str(item), threat, **changes)
        except KeyError as exc:
            raise UserError(exc.args[0]) from None
        except ValueError as exc:
            raise UserError(f"attack {item!r}: {exc}") from None
    if atk.steps < 1 and atk.optimizer.uses_gradient:
        raise UserError(f"attack {atk.name!r} has {atk.steps} steps: it would not attack at all and report "
                        "clean accuracy as robust accuracy; use at least 1 step")
    if not atk.tracking.evades:
        raise UserError(f"{atk.name!r} maximises an objective without a notion of success; it cannot give "
                        "robust accuracy (use `robusteval gamma` for local linearity)")
    return atk
