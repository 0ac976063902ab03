"""The one attack loop. Every named attack, the γ(ε, x) search and the LLR trainer's inner
maximisation are configurations of :func:`run` (docs/design.md, "One loop").

An :class:`Attack` is *objective × optimizer × schedule × threat × restarts* (the Optax / DeepMind
decomposition). :func:`run` executes it with AutoAttack's evaluation semantics:

* a clean forward pass first; under evasion tracking an example the model already gets wrong is
  counted as broken (``x_adv = x``) and never attacked;
* restarts (and, for multi-targeted, targets) run on the survivors of the previous ones only;
* within a run, the first iterate that misclassifies an example is kept — a found adversarial example
  is proof and is never thrown away — and the example leaves the active batch (compaction), so cost
  follows the robust fraction (docs/protocol.md, "Success and the best iterate"). ``FinalIterate``
  tracking reproduces DeepMind's keep-the-final-iterate rule exactly instead;
* every iterate is projected by the threat model before it is evaluated, so the returned ``x_adv`` is
  exactly the point whose logits decided success;
* randomness comes from one ``torch.Generator`` per (seed, example id, run), so results do not depend on
  batch size, example order or device (:mod:`attacks.seeding`);
* the model is never modified: no ``train()``/``eval()`` call, gradients are taken with respect to the
  input only (``torch.autograd.grad``), so parameters' ``.grad``, buffers and mode are untouched.

Shape: :func:`run` is a loop over *trials* — ``(restart, target slot)`` pairs from the attack's target
policy (:mod:`attacks.targets`) — each an ascent (:func:`_ascend`) on the survivors; what is kept from
each iterate is the attack's tracking policy (:class:`Evasion`, :class:`Maximize`,
:class:`FinalIterate`). Objective, optimizer, schedule and threat are the protocols of
:mod:`attacks.protocols`; a gradient-free optimizer (``uses_gradient = False``) runs in the same loop.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields, replace

import torch

from .objectives import Margin, margin_of
from .optimizers import apgd, select
from .protocols import Objective, Optimizer, Schedule, Threat
from .schedules import constant
from .seeding import generators
from .starts import (
    AttackStart,
    DiverseStart,
    GaussianStart,
    NoStart,
    StartPolicy,
    StartsByRestart,
    StripeStart,
    UniformStart,
)
from .targets import RandomTarget, RankedTargets, TargetPolicy, Untargeted


def _fields_repr(value) -> str:
    """``name=stable_repr(value)`` for each shown field of a dataclass, comma-separated (the inside of
    :func:`stable_repr`; :meth:`Attack.config` is this for the attack itself)."""
    shown = [f for f in fields(value) if f.repr
             and not (f.metadata.get("omit_default") and getattr(value, f.name) == f.default)]
    return ", ".join(f"{f.name}={stable_repr(getattr(value, f.name))}" for f in shown)


def stable_repr(value) -> str:
    """``repr`` for configurations: dataclasses field by field, functions by qualified name, recursively.
    A field marked ``omit_default`` (one added after its type was first released) is written only when it
    differs from its default, so the configurations of earlier runs keep their text."""
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return f"{type(value).__name__}({_fields_repr(value)})"
    if callable(value) and hasattr(value, "__qualname__") and hasattr(value, "__module__"):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, tuple):
        items = [stable_repr(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return repr(value)


class NonFiniteLogits(ValueError):
    """The model returned NaN or inf logits; ``example_ids`` are the examples where it happened.

    A model that is non-finite somewhere in the threat set cannot be evaluated: an attack cannot rank
    NaN points, so reporting such examples as robust would be a false verdict.
    """

    def __init__(self, message: str, example_ids: torch.Tensor):
        super().__init__(message)
        self.example_ids = example_ids


# ------------------------------------------------------------------------------------------- tracking


@dataclass
class _Best:
    """Best point found so far per example (global) or per active row (a run's local copy).

    Within a run the local copy is updated with ``torch.where`` (one pass over the batch per step);
    rows are written back to the global copy when they leave the active batch or the run ends.
    ``score`` ranks candidates: the untargeted margin for evasion (so multi-targeted picks its copy by
    the untargeted margin, docs/methods.md, "Targets"), the objective for maximisation.
    """

    x: torch.Tensor
    logits: torch.Tensor
    margin: torch.Tensor
    value: torch.Tensor
    score: torch.Tensor
    success: torch.Tensor
    run: torch.Tensor
    target: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def initial(cls, x, z0, margin0, evades: bool):
        n, dev = x.shape[0], x.device
        return cls(
            x=x.clone(), logits=z0.clone(), margin=margin0.clone(),
            value=torch.full((n,), float("nan"), device=dev, dtype=margin0.dtype),
            score=torch.full((n,), float("-inf"), device=dev, dtype=margin0.dtype),
            success=(margin0 > 0) if evades else torch.zeros(n, dtype=torch.bool, device=dev),
            run=torch.full((n,), -1, dtype=torch.long, device=dev),
            target=torch.full((n,), -1, dtype=torch.long, device=dev),
            steps=torch.zeros(n, dtype=torch.long, device=dev),
        )

    def gather(self, rows) -> _Best:
        """A local copy for ``rows`` (its ``steps`` count this run only)."""
        local = _Best(*(getattr(self, f.name)[rows] for f in fields(self)))
        local.steps = torch.zeros_like(local.steps)
        return local

    def select(self, keep) -> _Best:
        return _Best(*(getattr(self, f.name)[keep] for f in fields(self)))

    def scatter(self, rows, local: _Best, which=None) -> None:
        """Write the local rows (all, or those where ``which``) back to the global copy."""
        if which is not None:
            idx = which.nonzero()[:, 0]
            rows, local = rows[idx], local.select(idx)
        for f in fields(self):
            if f.name == "steps":
                self.steps[rows] += local.steps
            else:
                getattr(self, f.name)[rows] = getattr(local, f.name)

    def update(self, mask, it: _Iterate, by_margin: bool) -> None:
        """Take the current iterate where ``mask``."""
        col = mask.view(-1, *([1] * (it.x.ndim - 1)))
        self.x = torch.where(col, it.x, self.x)
        self.logits = torch.where(mask[:, None], it.z, self.logits)
        self.margin = torch.where(mask, it.margin, self.margin)
        self.value = torch.where(mask, it.value, self.value)
        self.score = torch.where(mask, it.margin if by_margin else it.value, self.score)
        self.run = torch.where(mask, it.run, self.run)
        if it.target is not None:
            self.target = torch.where(mask, it.target, self.target)


@dataclass
class _Iterate:
    """One evaluated iterate of the active rows: point, logits, objective, margin, run and target."""

    x: torch.Tensor
    z: torch.Tensor
    value: torch.Tensor
    margin: torch.Tensor
    run: int | torch.Tensor  # the run index, per row when runs are tiled
    target: torch.Tensor | None
    dist: torch.Tensor | None = None  # the distance to the clean input (for MinDistance only)


@dataclass(frozen=True)
class Evasion:
    """Success is a strict untargeted margin > 0; the first successful iterate is kept (a found example
    is proof), otherwise the highest margin; solved examples leave the batch (docs/protocol.md)."""

    evades = True

    def observe(self, best: _Best, it: _Iterate, last: bool) -> None:
        solved = (it.margin > 0) & ~best.success
        best.update(solved | ((it.margin > best.score) & ~best.success), it, by_margin=True)
        best.success |= solved


@dataclass(frozen=True)
class Maximize:
    """No notion of success: every example runs every step and the highest objective wins (the γ search
    and training-time attacks)."""

    evades = False

    def observe(self, best: _Best, it: _Iterate, last: bool) -> None:
        best.update(it.value > best.score, it, by_margin=False)


@dataclass(frozen=True)
class FinalIterate:
    """DeepMind's rule: keep each run's final iterate — the first run's always, a later run's when it
    misclassifies (``evades``) or has a higher objective (otherwise)."""

    evades: bool = True

    def observe(self, best: _Best, it: _Iterate, last: bool) -> None:
        if not last:
            return None
        better = (it.margin > 0) if self.evades else (it.value > best.score)
        best.update((best.run < 0) | better, it, by_margin=self.evades)  # run < 0: no run kept yet
        if self.evades:
            best.success |= it.margin > 0


@dataclass(frozen=True)
class MinDistance:
    """The minimum-norm rule: an example's kept point is its adversarial iterate nearest to the clean
    input (else the highest margin); solved examples keep stepping, since a nearer point may come."""

    evades = True
    compacts = False
    needs_distance = True

    def observe(self, best: _Best, it: _Iterate, last: bool) -> None:
        adv = it.margin > 0
        nearer = adv & (~best.success | (-it.dist > best.score))
        closer_to_boundary = ~adv & ~best.success & (it.margin > best.score)
        take = nearer | closer_to_boundary
        best.update(take, it, by_margin=True)
        best.score = torch.where(nearer, -it.dist, best.score)  # adversarial rows rank by −distance
        best.success |= adv


Tracking = Evasion | Maximize | FinalIterate | MinDistance


def _check_rule(rule, what: str, lowest_floor: float) -> None:
    """The fields an early-stopping rule (:class:`Stall`, :class:`SearchStall`) shares, validated."""
    if not (0 < rule.window <= rule.start < 1) or not (0 < rule.every < 1) or \
            not (rule.factor > 0 and math.isfinite(rule.factor)) or \
            not (rule.floor >= lowest_floor and math.isfinite(rule.floor)):
        raise ValueError(f"{what} needs 0 < window ≤ start < 1, 0 < every < 1, a finite factor > 0 and a "
                         f"finite floor ≥ {lowest_floor}, got {rule!r}")


@dataclass(frozen=True)
class Stall:
    """The early end of a run that is far from the boundary and not getting nearer
    (docs/methods.md, "Runs that stall"): at step ``s`` of the tracked stage (from ``start``·K, then
    every ``every``·K, of its K steps), a row the run has not broken stops, and the example goes on to
    its next run, when

        r̂(s) < −floor   and   r̂(s) + factor · (r̂(s) − r̂(s − W)) / W · (K − s) < 0,   W = ``window``·K,

    where ``r̂(s)`` is the highest *relative margin* ``r = (max_{j≠y} z_j − z_y) / (z₍₁₎ − z₍₃₎)`` its
    iterates reached up to step ``s`` (the untargeted margin over the spread of the top three logits:
    scale-free like DLR, 0 on the boundary). It says: the run is still far from the boundary, and at
    ``factor`` times the pace of its last ``W`` steps it would end short of it. A run within ``floor`` of
    the boundary always takes every step: runs there were measured flat for 40 to 70 steps, while APGD's
    step size was too large, and then breaking (benchmarks/RESULTS.md). Each decision uses the row's own
    iterates only, so a run's records do not depend on the batch, its order or the compaction cadence;
    a stopped row keeps its best point and the steps it took."""

    start: float = 0.4
    window: float = 0.2
    every: float = 0.1
    factor: float = 5.0
    floor: float = 0.5

    def __post_init__(self):
        _check_rule(self, "a stall rule", lowest_floor=0)

    def checkpoints(self, steps: int) -> tuple[int, set[int]]:
        """``(W, decision steps)`` for a tracked stage of ``steps`` steps (none when it is too short to
        have a window)."""
        w, first, every = (max(1, round(f * steps)) for f in (self.window, self.start, self.every))
        if steps < 5 or first >= steps:
            return w, set()
        return w, set(range(first, steps, every))

    @staticmethod
    def relative_margin(z: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """``margin / (z₍₁₎ − z₍₃₎)`` per row (the lowest logit for fewer than 3 classes)."""
        top = z.float().topk(min(3, z.shape[1]), dim=1).values
        return margin.float() / (top[:, 0] - top[:, -1]).clamp_min(1e-12)


@dataclass(frozen=True)
class SearchStall:
    """The early end of a minimum-norm search that will not come within the radius (docs/methods.md,
    "Runs that stall"): in a search stage (an annealing stage whose step rule keeps its nearest adversarial
    point, as FAB's does) of K steps, at step ``s`` (from ``start``·K, then every ``every``·K), a row stops
    and hands its nearest adversarial point on to the ε-ball, as if its steps had run out, when

        d(s) is infinite (no adversarial point yet), or
        d(s) > floor   and   d(s) · (d(s) / d(s − W))^(factor · (K − s) / W) > 1,   W = ``window``·K,

    where ``d(s)`` is the distance of the nearest adversarial point it has found up to step ``s``, in
    units of ε. A search that converges shrinks ``d`` by a roughly constant factor per step, so the second
    condition says: at ``factor`` times its recent geometric pace, the search would still end outside the
    ε-ball. Rows within ``floor``·ε always take every step. Each decision reads the row's own iterates
    only, so records do not depend on the batch, its order or the compaction cadence."""

    start: float = 0.3
    window: float = 0.2
    every: float = 0.1
    factor: float = 2.0
    floor: float = 1.5

    def __post_init__(self):
        _check_rule(self, "a search stall rule", lowest_floor=1)

    def checkpoints(self, steps: int) -> tuple[int, set[int]]:
        """``(W, decision steps)`` for a search stage of ``steps`` steps (:meth:`Stall.checkpoints`)."""
        return Stall.checkpoints(self, steps)

    def stops(self, d: torch.Tensor, before: torch.Tensor, left: int, window: int) -> torch.Tensor:
        """Which rows stop, from their nearest distances now (``d``) and ``window`` steps ago
        (``before``), in units of ε, with ``left`` steps of the stage to go."""
        rate = torch.where(torch.isinf(before), torch.zeros_like(d), d / before)
        ahead = d * rate.pow(self.factor * left / window)
        return torch.isinf(d) | ((d > self.floor) & (ahead > 1))


#: The streams an attack's runs may take lie below this (:attr:`Attack.stream` plus the run index): far
#: below the named streams of :mod:`attacks.seeding`, which start at 2⁴⁰.
MAX_STREAM = 1 << 32
_STARTS = (UniformStart, NoStart, StripeStart, DiverseStart, GaussianStart, AttackStart)
# --------------------------------------------------------------------------------------------- attack


@dataclass(frozen=True)
class Attack:
    """A complete attack configuration; its :meth:`config` is stored with every result.

    ``targets``: a target policy (:class:`~attacks.targets.Untargeted`, ``RandomTarget`` — one random
    wrong class per example, shared by its restarts — or ``RankedTargets(k, all)`` — wrong classes by
    clean logit, restarts round-robin or every restart every target). ``tracking``: what is kept from the
    iterates (:class:`Evasion`, :class:`Maximize`, :class:`FinalIterate`). ``start``: where each run
    begins (:mod:`attacks.starts`).
    """

    name: str
    objective: Objective
    optimizer: Optimizer
    schedule: Schedule
    threat: Threat
    steps: int
    restarts: int = 1
    targets: TargetPolicy = Untargeted()
    tracking: Tracking = Evasion()
    start: StartPolicy = UniformStart()
    #: EoT: draws of a randomised model's output averaged at every evaluation (1: a deterministic model).
    draws: int = field(default=1, metadata={"omit_default": True})
    #: Radius annealing: ``((multiple, share), ...)`` — each run first spends ``floor(share · steps)``
    #: steps in the ball of radius ``multiple · ε`` (untracked: those iterates are outside the threat
    #: set), each stage from the previous one's end point with a fresh optimizer state, then the rest of
    #: ``steps`` in the ε-ball from the last stage's point projected onto it (``()``: none). APGD's L1 form
    #: in AutoAttack anneals 3ε → 2ε → ε over 30/30/40% (Croce & Hein 2021); docs/methods.md.
    anneal: tuple = field(default=(), metadata={"omit_default": True})
    #: The early end of runs that stall (:class:`Stall`; ``None``: every run takes all its steps).
    stall: Stall | None = field(default=None, metadata={"omit_default": True})
    #: Probes during radius annealing: every ``probe`` steps of an annealing stage (from its first point
    #: to its last), each row's iterate projected onto the ε-ball ∩ box is evaluated, and a row whose
    #: projection is misclassified ends its run there with that point (``0``: no probes). A probe never
    #: changes a row's iterates, so the rows it does not end run exactly as without it
    #: (docs/methods.md, "Radius annealing").
    probe: int = field(default=0, metadata={"omit_default": True})
    #: The early end of a minimum-norm search stage that will not come within ε (:class:`SearchStall`;
    #: ``None``: the search takes all its steps).
    search_stall: SearchStall | None = field(default=None, metadata={"omit_default": True})
    #: The first generator stream of the runs' random draws: run ``j`` draws its start (and anything its
    #: step rule draws) from stream ``stream + j`` of each example (:mod:`attacks.seeding`). Two attacks
    #: run on the same examples with the same seed draw the same starts unless their streams differ: a
    #: battery's members take disjoint streams so that no member repeats another's start
    #: (docs/methods.md, "The standard battery by version", v13).
    stream: int = field(default=0, metadata={"omit_default": True})
    #: The last approach: after every run, each example still unbroken takes ``polish`` steps of APGD on
    #: the untargeted margin with a step of ε/10, from the best point the runs found (``0``: none). A
    #: run's best point for an unbroken example can be a hair from the boundary towards a class its
    #: objective was not following; the margin is the quantity that decides success, and a short ascent
    #: on it from there crosses where fresh runs do not. Only a success is taken from it: an example it
    #: does not break keeps the runs' point, score and step count but for the steps spent
    #: (docs/methods.md, "The last approach").
    polish: int = field(default=0, metadata={"omit_default": True})

    def __post_init__(self):
        if self.steps < 0 or self.restarts < 1:
            raise ValueError("steps must be ≥ 0 and restarts ≥ 1")
        if not isinstance(self.polish, int) or isinstance(self.polish, bool) or self.polish < 0:
            raise ValueError(f"polish must be an integer ≥ 0, got {self.polish!r}")
        if not isinstance(self.draws, int) or isinstance(self.draws, bool) or self.draws < 1:
            raise ValueError(f"draws must be an integer ≥ 1, got {self.draws!r}")
        if not isinstance(self.targets, (Untargeted, RandomTarget, RankedTargets)):
            raise ValueError(f"targets must be a target policy, got {self.targets!r}")
        starts = self.start.starts if isinstance(self.start, StartsByRestart) else (self.start,)
        if not all(isinstance(s, _STARTS) for s in starts):
            raise ValueError(f"start must be a start policy, got {self.start!r}")
        if self.stall is not None and not isinstance(self.stall, Stall):
            raise ValueError(f"stall must be a Stall rule or None, got {self.stall!r}")
        if self.stall is not None and not isinstance(self.tracking, Evasion):
            raise ValueError("a stall rule ends runs that cannot break an example: it needs Evasion() "
                             "tracking")
        if any(isinstance(s, AttackStart) and not isinstance(s.attack, Attack) for s in starts):
            raise ValueError("an attack start needs an Attack")
        if not isinstance(self.tracking, (Evasion, Maximize, FinalIterate, MinDistance)):
            raise ValueError("tracking must be Evasion(), Maximize(), FinalIterate() or MinDistance(), "
                             f"got {self.tracking!r}")
        if self.objective.needs_target and isinstance(self.targets, Untargeted):
            raise ValueError(f"objective {self.objective!r} needs targets ('random' or 'ranked')")
        if not isinstance(self.anneal, tuple) or not all(
                isinstance(st, tuple) and len(st) == 2 and all(isinstance(v, (int, float)) and
                                                               not isinstance(v, bool) for v in st)
                for st in self.anneal):
            raise ValueError(f"anneal must be a tuple of (multiple, share) pairs, got {self.anneal!r}")
        if self.anneal:
            if not self.optimizer.uses_gradient:
                raise ValueError("radius annealing is for gradient attacks")
            if any(not (m >= 1 and math.isfinite(m)) or not (0 < f <= 1) for m, f in self.anneal) or \
                    sum(f for _, f in self.anneal) > 1:
                raise ValueError("anneal stages need multiples ≥ 1 and shares in (0, 1] that sum to at most "
                                 f"1, got {self.anneal!r}")
        if not isinstance(self.probe, int) or isinstance(self.probe, bool) or self.probe < 0:
            raise ValueError(f"probe must be an integer ≥ 0, got {self.probe!r}")
        if not isinstance(self.stream, int) or isinstance(self.stream, bool) or \
                not 0 <= self.stream < MAX_STREAM:
            raise ValueError(f"stream must be an integer in 0..{MAX_STREAM - 1}, got {self.stream!r}")
        if self.search_stall is not None and (
                not isinstance(self.search_stall, SearchStall) or not self.anneal or
                getattr(self.optimizer, "stage_keeps", "objective") != "nearest"):
            raise ValueError("a search stall rule (SearchStall) ends a minimum-norm search stage: it needs "
                             "radius annealing (anneal) and a step rule that keeps its nearest point, got "
                             f"{self.search_stall!r}")
        if self.probe and (not self.anneal or not isinstance(self.tracking, Evasion)):
            raise ValueError("probes evaluate the ε-ball's projection of annealing-stage iterates: they need "
                             "radius annealing (anneal) and Evasion() tracking")

    def stages(self) -> list[tuple[float, int]]:
        """The annealing stages that take steps, as ``(multiple, steps)``, then ``(1.0, rest)``: the
        tracked stage in the ε-ball (all ``steps`` when there is no annealing; none when the shares sum
        to 1, and then the tracked stage only evaluates the last stage's point projected onto the
        ε-ball)."""
        warm = [(float(m), int(f * self.steps)) for m, f in self.anneal]
        warm = [(m, k) for m, k in warm if k > 0]
        return [*warm, (1.0, self.steps - sum(k for _, k in warm))]

    @property
    def eps(self) -> float:
        return self.threat.eps

    def replace(self, **changes) -> Attack:
        """A copy with some fields changed (``eps=`` replaces the threat's radius, keeping its norm)."""
        if "eps" in changes:
            changes["threat"] = replace(changes.get("threat", self.threat), eps=changes.pop("eps"))
        return replace(self, **changes)

    def config(self) -> str:
        """A one-line description of every field, stored with each record.

        Stable from run to run (a function is written by its qualified name, never its address) and
        round-trips: ``attacks.from_config(atk.config()) == atk``. A field added after the first release
        (``draws``) is written only when it differs from its default, which reproduces the behaviour from
        before it existed: the configurations of earlier runs keep their text.
        """
        return _fields_repr(self)


@dataclass
class Result:
    """Per-example outcome of :func:`run` (all tensors on the input's device, length B).

    ``x_adv``: the chosen point (inside the threat set); ``success``: it is misclassified (strict margin
    > 0; always False without evasion); ``value``: the objective there; ``margin``: the untargeted
    margin there; ``logits``: the model's logits there; ``run``: index of the run that produced it
    (-1: the clean input itself); ``steps``: steps spent on the example over all runs; ``target``: the
    target class of the chosen run (-1 if untargeted); ``forward_rows``: number of example-forward
    passes the attack made (clean pass included).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    value: torch.Tensor
    margin: torch.Tensor
    logits: torch.Tensor
    run: torch.Tensor
    steps: torch.Tensor
    target: torch.Tensor
    clean_logits: torch.Tensor
    forward_rows: int = 0


# ------------------------------------------------------------------------------------------------ run


def _check_mode(model, allow_train_mode: bool) -> None:
    if allow_train_mode or not isinstance(model, torch.nn.Module):
        return
    if any(m.training for m in model.modules()):
        raise ValueError(
            "the model is in training mode: attacks run on a model in eval mode (batch-norm statistics "
            "would otherwise change and couple examples); call model.eval() or pass allow_train_mode=True"
        )


def _check_inputs(attack: Attack, x, y, ids):
    x = x.detach()
    y = y.detach().to(x.device).long()
    n = x.shape[0]
    ids = torch.arange(n) if ids is None else torch.as_tensor(ids).long().cpu()
    if ids.shape[0] != n or y.shape[0] != n:
        raise ValueError("x, y and ids must have the same length")
    lo, hi = attack.threat.bounds
    if n and (x.min() < lo or x.max() > hi):
        raise ValueError(f"inputs must lie in the threat model's box {attack.threat.bounds}; got values in "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}] (normalise inside the model)")
    return x, y, ids


def expected_logits(model, x: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """``model(x)``, or with ``draws`` > 1 its mean over that many draws of a randomised model's output:
    every example repeated ``draws`` times in one batch (EoT; Athalye et al. 2018)."""
    if draws == 1:
        return model(x)
    z = model(x.repeat_interleave(draws, 0))
    return z.view(x.shape[0], draws, *z.shape[1:]).mean(1)


def eot_value(objective, model, x: torch.Tensor, xs: torch.Tensor, y: torch.Tensor, data: dict,
              draws: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the objective at ``x`` (clean inputs ``xs``), averaged over ``draws`` draws of the
    model: with every example repeated ``draws`` times in one batch, the gradient of the mean value is
    the mean of the draws' gradients — the expectation over transformation (EoT) of the objective's
    gradient. The logits returned are the draws' mean (they decide success)."""
    if draws == 1:
        z = model(x).float()
        return z, objective(z, y, x - xs if objective.needs_delta else None, data)
    rep = lambda t: t.repeat_interleave(draws, 0)
    zk = model(rep(x)).float()
    delta = rep(x - xs) if objective.needs_delta else None
    vk = objective(zk, rep(y), delta, {k: rep(v) for k, v in data.items()})
    n = x.shape[0]
    return zk.view(n, draws, -1).mean(1), vk.view(n, draws).mean(1)


def _clean_logits(model, x, ids, draws: int = 1) -> torch.Tensor:
    with torch.no_grad():
        z0 = expected_logits(model, x, draws).detach()
    if z0.ndim != 2 or z0.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return logits of shape [batch, classes]; got {tuple(z0.shape)}")
    bad = ~torch.isfinite(z0).all(1)
    if bool(bad.any()):
        raise NonFiniteLogits("the model returned non-finite logits (NaN or inf) on the clean inputs, first "
                              f"for example id {int(ids[bad.cpu()][0])}", ids[bad.cpu()])
    return z0


@dataclass
class _Rows:
    """The active rows of one trial and everything indexed by them (dropped together on compaction)."""

    act: torch.Tensor
    xs: torch.Tensor
    ys: torch.Tensor
    x: torch.Tensor
    box: tuple[torch.Tensor, torch.Tensor]
    aux: dict
    target: torch.Tensor | None
    state: object
    best: _Best
    run: int | torch.Tensor  # the run index (per row when runs are tiled)
    peaks: torch.Tensor | None = None  # [rows, steps + 1]: the highest relative margin so far (Stall)

    def keep(self, keep: torch.Tensor) -> _Rows:
        return _Rows(self.act[keep], self.xs[keep], self.ys[keep], self.x[keep],
                     (self.box[0][keep], self.box[1][keep]), {k: v[keep] for k, v in self.aux.items()},
                     None if self.target is None else self.target[keep], select(self.state, keep),
                     self.best.select(keep),
                     self.run[keep] if isinstance(self.run, torch.Tensor) else self.run,
                     None if self.peaks is None else self.peaks[keep])


#: Compaction cadence on a GPU: deciding whether any row was solved is a host synchronisation.
COMPACT_EVERY_GPU = 8
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _low_precision(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def run(
    attack: Attack,
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    seed: int = 0,
    aux: dict | None = None,
    compact: bool | int = True,
    allow_train_mode: bool = False,
    on_run=None,
    precision: str = "fp32",
    tile: bool | int | None = None,
) -> Result:
    """Run ``attack`` on the batch ``(x, y)`` and return the per-example :class:`Result`.

    ``ids`` are stable example ids (default ``0..B-1``) that, with ``seed``, fix every random choice.
    ``aux`` supplies per-example tensors to the objective (e.g. ``loss0``/``grad0`` for the linearity gap).
    ``compact``: solved examples leave the active batch — every step on the CPU, every
    :data:`COMPACT_EVERY_GPU` steps on a GPU (where deciding it costs a host synchronisation), every
    ``k`` steps with ``compact=k``, never with ``False`` (for overhead benchmarks). The result is the
    same whatever the cadence (a solved example's point and step count are locked when it is solved).
    ``precision``: ``"fp32"``, or ``"bf16"``/``"fp16"`` to run the attack's forward and backward passes
    under autocast; the clean pass and every success decision stay fp32 (an iterate is adversarial only
    if the fp32 model misclassifies it). ``tile``: when survivors fill less than the batch, run
    several restarts (or targets) side by side in one batch; each keeps its own generator stream and the
    result is exactly the sequential one (see :func:`_tiled`). Default: on a GPU only; ``tile=k``
    tiles ``k`` runs at a time.
    ``on_run(run_index, num_runs, num_unbroken)`` is called after each run (progress reporting).

    Algorithm: docs/methods.md (the shared engine, targets) and docs/protocol.md (success, survivors,
    seeding).
    """
    _check_mode(model, allow_train_mode)
    x, y, ids = _check_inputs(attack, x, y, ids)
    low = _low_precision(precision)
    if isinstance(compact, bool):
        every = (1 if x.device.type == "cpu" else COMPACT_EVERY_GPU) if compact else 0
    else:
        every = int(compact)
    n, track = x.shape[0], attack.tracking
    z0 = _clean_logits(model, x, ids, attack.draws)
    counter = {"rows": n * attack.draws, "nonfinite": torch.zeros(n, dtype=torch.bool, device=x.device)}
    aux = {k: torch.as_tensor(v).to(x.device) for k, v in (aux or {}).items()}
    prepared = attack.objective.prepare(model, x, y, aux)
    counter["rows"] += n if set(prepared) != set(aux) else 0
    num_classes = z0.shape[1]
    trials = attack.targets.trials(attack.restarts, num_classes)
    targets = attack.targets.assign(z0, y, ids, seed, num_classes, model=model, x=x, threat=attack.threat)
    counter["rows"] += n if getattr(attack.targets, "needs_model", False) else 0
    best = _Best.initial(x, z0, margin_of(z0, y), track.evades)
    # a minimum-norm search runs every restart on every example its clean point does not break (a nearer
    # point may come); otherwise each restart runs on the survivors of the ones before it
    searched = (~best.success).nonzero()[:, 0] if not getattr(track, "compacts", True) else None
    j = 0
    while j < len(trials):
        act = searched if searched is not None else (~best.success).nonzero()[:, 0] if track.evades else \
            torch.arange(n, device=x.device)
        if act.numel() == 0:
            break
        m = _tile_count(tile, x.device, n, act.numel(), len(trials) - j) if isinstance(track, Evasion) else 1
        if m > 1:
            _tiled(attack, model, x, y, ids, seed, prepared, targets, trials, range(j, j + m), act, best,
                   counter, every, low, z0)
            for k in range(j, j + m):
                if on_run is not None:
                    on_run(k, len(trials), int((~best.success).sum()))
            j += m
            continue
        rows = _start(attack, model, x, y, ids, seed, prepared, targets, trials, [j], act, act,
                      best.gather(act), counter, low, z0)
        rows = _ascend(attack, model, rows, every, best, counter, low)
        best.scatter(rows.act, rows.best)
        if on_run is not None:
            on_run(j, len(trials), int((~best.success).sum()))
        j += 1
    if attack.polish and track.evades:
        _polish(attack, model, x, y, ids, seed, best, counter, precision, tile, len(trials))
    return _result(attack, x, ids, z0, best, counter)


@dataclass(frozen=True, eq=False)
class _FromPoints:
    """The start of :func:`_polish`'s run: row ``i`` of its batch (its id there) starts at ``points[i]``."""

    points: torch.Tensor
    needs_labels = True

    def __call__(self, x, threat, generators, model=None, *, y=None, ids=None, seed: int = 0, run=None):
        return self.points[ids.to(self.points.device)].clone(), 0


_STARTS = (*_STARTS, _FromPoints)


def _polish(attack: Attack, model, x, y, ids, seed, best: _Best, counter: dict, precision, tile,
            runs: int) -> None:
    """:attr:`Attack.polish`: the unbroken examples' last approach from their best points, as one run of
    its own (deterministic: no random draw, so its rows' ids are their positions); a success replaces the
    example's result (run index ``runs``: after the attack's own; its value is the margin), and every
    polished example's steps count the polish's."""
    rows = (~best.success).nonzero()[:, 0]
    if rows.numel() == 0:
        return
    k = rows.numel()
    sub = Attack(f"{attack.name}-polish", Margin(), apgd(), constant(0.1, relative=True), attack.threat,
                 attack.polish, 1, start=_FromPoints(best.x[rows]), draws=attack.draws)
    try:
        res = run(sub, model, x[rows], y[rows], ids=torch.arange(k), seed=seed, allow_train_mode=True,
                  precision=precision, tile=tile)
    except NonFiniteLogits as exc:  # its rows' ids are positions: name the examples
        real = ids[rows.cpu()][exc.example_ids]
        raise NonFiniteLogits(f"the model returned non-finite logits (NaN or inf) at {len(real)} "
                              f"example(s)' points inside the threat set, first for example id "
                              f"{int(real[0])}", real) from None
    counter["rows"] += res.forward_rows
    best.steps[rows] += res.steps
    won = res.success.nonzero()[:, 0]
    if won.numel():
        at = rows[won]
        best.x[at], best.logits[at], best.margin[at] = res.x_adv[won], res.logits[won], res.margin[won]
        best.value[at], best.score[at], best.success[at] = res.value[won], res.margin[won], True
        best.run[at], best.target[at] = runs, -1


def _tile_count(tile, device, n: int, active: int, left: int) -> int:
    """How many runs to tile side by side: enough to refill the batch of ``n`` rows when ``tile`` is on
    (auto: on a GPU only — on a CPU a larger batch buys nothing, and the tiled runs of examples that an
    earlier run would have broken are wasted work); ``tile=k`` (an int): ``k`` runs at a time."""
    if not isinstance(tile, bool) and isinstance(tile, int):
        return max(1, min(left, tile))
    on = (device.type != "cpu") if tile is None else tile
    return max(1, min(left, n // max(active, 1))) if on else 1


def _start(attack: Attack, model, x, y, ids, seed, prepared, targets, trials, js, act, index, local: _Best,
           counter: dict, low=None, z0=None) -> _Rows:
    """The rows of runs ``js`` on the examples ``act``, one block per run (one block unless tiled): each
    run's starts from its own generator stream (which the optimizer may keep drawing from), its target
    slot, a fresh optimizer state. ``index`` names the rows in the copy of the best points they write
    back to, ``local`` is their own copy."""
    *warm, (_, final) = attack.stages()
    first = _scaled(attack.threat, warm[0][0]) if warm else attack.threat  # the start is in the first ball
    starts, gens, tgts = [], [], []
    for j in js:
        g = generators(seed, ids[act.cpu()].tolist(), attack.stream + j)
        policy = attack.start.of(trials[j][0]) if isinstance(attack.start, StartsByRestart) else attack.start
        if getattr(policy, "needs_labels", False):
            # ``run`` here is this module's entry point: an attack start runs its attack through the engine
            x0, rows = policy(x[act], first, g, model=model, y=y[act], ids=ids[act.cpu()], seed=seed, run=run)
            counter["rows"] += rows
        else:
            x0 = policy(x[act], first, g, model=model)
            counter["rows"] += act.numel() * getattr(policy, "steps", 0)
        starts.append(x0)
        gens += g
        slot = trials[j][1]
        tgts.append(None if slot is None else targets[act, slot])
    rep = act.repeat(len(js))
    xs, start = x[rep], torch.cat(starts)
    box = attack.threat.box(xs)
    aux = {k: v[rep] for k, v in prepared.items()}
    target = None if tgts[0] is None else torch.cat(tgts)
    index_of_run = js[0] if len(js) == 1 else \
        torch.tensor(list(js), device=x.device).repeat_interleave(act.numel())
    alive, found, taken, ended = torch.arange(len(xs), device=x.device), [], 0, []
    for i, (multiple, steps) in enumerate(warm):
        # an annealing stage (Attack.anneal): the same loop in a larger ball, untracked (its points are
        # outside the threat set); the next stage starts from its highest-objective point. With probes,
        # rows whose ε-ball projection a probe found misclassified leave (``found``) and skip the rest
        threat = _scaled(attack.threat, multiple)
        stage_box = threat.box(xs)
        state = attack.optimizer.init(start, gens, steps=steps, box=stage_box, threat=threat, center=xs,
                                      resumed=i > 0)
        z = z0[rep]
        rows = _Rows(torch.arange(len(xs), device=x.device), xs, y[rep], start, stage_box, aux, target, state,
                     _Best.initial(start, z, margin_of(z, y[rep]), evades=False), index_of_run)
        if alive.numel() < len(xs):
            rows = rows.keep(alive)
        probe = (box, found, taken) if attack.probe else None
        rows = _ascend(attack, model, rows, 0, None, counter, low, stage=(threat, steps), probe=probe,
                       ended=(ended, taken))
        start = start.index_copy(0, rows.act, rows.best.x)
        alive, taken = rows.act, taken + steps
        if alive.numel() == 0:
            break
    for pos, point, _ in ended:  # a stalled search hands its point on as if its steps had run out
        start = start.index_copy(0, pos, point)
    if warm:
        start = attack.threat.project(start, xs, box)
        local.steps += sum(k for _, k in warm)
    for pos, _, step in ended:
        local.steps[pos] = step
    for pos, point, z, val, margin, step in found:  # success at a probe: the run ends there for the row
        local.x[pos], local.logits[pos], local.value[pos] = point, z, val
        local.margin[pos], local.score[pos], local.success[pos] = margin, margin, True
        local.run[pos] = index_of_run[pos] if isinstance(index_of_run, torch.Tensor) else index_of_run
        if target is not None:
            local.target[pos] = target[pos]
        local.steps[pos] = step
        start[pos] = point
    state = attack.optimizer.init(start, gens, steps=final, box=box, threat=attack.threat, center=xs,
                                  resumed=bool(warm))
    return _Rows(index, xs, y[rep], start, box, aux, target, state, local, index_of_run)


def _scaled(threat, multiple: float):
    return replace(threat, eps=threat.eps * multiple)


def _tiled(attack: Attack, model, x, y, ids, seed, prepared, targets, trials, js, act, best: _Best,
           counter: dict, every: int, low, z0=None) -> None:
    """Runs ``js`` side by side on the survivors ``act``, one block of rows per run, each with the
    generator stream of its run; then folded into ``best`` in run order exactly as if they had run one
    after another: a run counts for an example only if no earlier run broke it (its steps too), a broken
    example keeps the first run's point, an unbroken one the strictly best score in run order."""
    a, m = act.numel(), len(js)
    tile = best.gather(act.repeat(m))  # the tile's own copy of the best points: one row per (run, example)
    local = {"rows": 0, "nonfinite": torch.zeros(a * m, dtype=torch.bool, device=x.device)}
    virtual = torch.arange(a * m, device=x.device)
    rows = _start(attack, model, x, y, ids, seed, prepared, targets, trials, js, act, virtual,
                  tile.gather(virtual), counter, low, z0)
    rows = _ascend(attack, model, rows, every, tile, local, low)
    tile.scatter(rows.act, rows.best)
    counter["rows"] += local["rows"]
    for k in range(m):
        part = tile.select(torch.arange(k * a, (k + 1) * a, device=x.device))
        open_ = ~best.success[act]  # run js[k] would have run on these, one after another
        counter["nonfinite"][act] |= local["nonfinite"][k * a:(k + 1) * a] & open_
        take = open_ & (part.success | (part.score > best.score[act]))
        best.steps[act] += part.steps * open_.long()
        for f in fields(best):
            if f.name != "steps":
                cur = getattr(best, f.name)[act]
                new = getattr(part, f.name)
                col = take.view(-1, *([1] * (new.ndim - 1)))
                getattr(best, f.name)[act] = torch.where(col, new, cur)


def _ascend(attack: Attack, model, rows: _Rows, every: int, best: _Best, counter: dict,
            low: torch.dtype | None = None, stage=None, probe=None, ended=None) -> _Rows:
    """One trial: ``steps`` optimizer steps on the active rows, every iterate evaluated and tracked.

    Solved rows leave the batch every ``every`` steps (0: never); until then they keep stepping, but
    nothing of theirs is recorded (their best point is locked, their step count stops). ``low``: the
    dtype the model runs in under autocast; an iterate that looks adversarial there is re-evaluated in
    fp32, and only the fp32 logits decide success (finding those rows costs one host synchronisation
    per step under low precision; fp32 runs have none but the compaction's).
    ``stage=(threat, steps)``: an annealing stage in that larger ball — the highest objective is kept
    (``Maximize``; the nearest adversarial iterate for a minimum-norm step rule, :func:`_stage_tracking`),
    nothing decides success, and its points are nobody's result (outside the threat set, so their logits
    are not checked either); pass ``every=0``. ``probe=(box, found, taken)`` in such a stage: every
    ``attack.probe`` steps the rows' iterates projected onto the ε-ball ∩ ``box`` are evaluated in fp32
    (:func:`_probe`); a misclassified projection is appended to ``found`` and its row leaves the stage
    (``taken``: the steps of the stages before this one). ``ended=(ended, taken)`` in a minimum-norm
    search stage with ``attack.search_stall``: a row the rule stops leaves the stage and
    ``(rows, nearest points, steps taken)`` is appended to ``ended`` (:class:`SearchStall`).
    """
    obj, opt = attack.objective, attack.optimizer
    if stage is None:  # the tracked stage (all the steps without annealing)
        threat, steps, tracking = attack.threat, attack.stages()[-1][1], attack.tracking
    else:
        (threat, steps), tracking = stage, _stage_tracking(opt)
    precision = torch.autocast(rows.x.device.type, dtype=low) if low is not None else contextlib.nullcontext()
    stall = attack.stall if stage is None else None
    window, decide = stall.checkpoints(steps) if stall is not None else (0, set())
    if stage is None and attack.probe and every and bool(rows.best.success.any()):
        # rows a probe of the annealing stages broke (probes need Evasion tracking): done already
        best.scatter(rows.act, rows.best, rows.best.success)
        rows = rows.keep((~rows.best.success).nonzero()[:, 0])
        if rows.act.numel() == 0:
            return rows
    search = attack.search_stall if stage is not None and isinstance(tracking, MinDistance) else None
    reach, verdicts = search.checkpoints(steps) if search is not None and ended is not None else (0, set())
    if decide:
        rows.peaks = torch.full((rows.act.numel(), steps + 1), -math.inf, device=rows.x.device)
    if verdicts:  # the nearest adversarial distance so far, in units of ε, step by step
        rows.peaks = torch.full((rows.act.numel(), steps + 1), math.inf, device=rows.x.device)
    for step in range(steps + 1):
        last = step == steps
        grad_on = opt.uses_gradient and not last
        # rows whose result can still change (a minimum-norm search goes on after a success)
        live = ~rows.best.success if getattr(tracking, "compacts", True) else \
            torch.ones_like(rows.best.success)
        with torch.enable_grad() if grad_on else torch.no_grad(), precision:
            leaf = rows.x.detach().requires_grad_(grad_on)
            data = rows.aux if rows.target is None else {**rows.aux, "target": rows.target}
            z, val = eot_value(obj, model, leaf, rows.xs, rows.ys, data, attack.draws)
            grad = _input_gradient(val, leaf) if grad_on else None
        counter["rows"] += rows.act.numel() * attack.draws
        z, val = z.detach(), val.detach()
        margin = obj.untargeted_margin(z, rows.ys, val)
        if low is not None and stage is None:
            z, val, margin = _confirm_in_fp32(obj, model, rows, leaf.detach(), z, val, margin, data, counter,
                                              attack.draws)
        if stage is None:
            counter["nonfinite"][rows.act] |= ~torch.isfinite(z).all(1) & live
        dist = threat.distance(leaf.detach(), rows.xs) if getattr(tracking, "needs_distance", False) else None
        it = _Iterate(leaf.detach(), z, val, margin, rows.run, rows.target, dist)
        tracking.observe(rows.best, it, last)
        if probe is not None and step % attack.probe == 0:
            hit = _probe(attack, model, rows, it.x, probe, counter, step)
            if hit is not None:
                rows, live, val, grad, it = _drop(rows, hit, live, val, grad, it)
                if rows.act.numel() == 0:
                    break
        if verdicts and not last:
            d = torch.where(rows.best.success, -rows.best.score / attack.threat.eps, math.inf)
            rows.peaks[:, step] = d
            if step in verdicts:
                stop = search.stops(d, rows.peaks[:, step - reach], steps - step, reach)
                if bool(stop.any()):  # a host synchronisation at each decision step only
                    idx = stop.nonzero()[:, 0]
                    ended[0].append((rows.act[idx], rows.best.x[idx], ended[1] + step))
                    rows, live, val, grad, it = _drop(rows, stop, live, val, grad, it)
                    if rows.act.numel() == 0:
                        break
        if last:
            break
        if decide:
            r = Stall.relative_margin(z, margin)
            rows.peaks[:, step] = r if step == 0 else torch.maximum(rows.peaks[:, step - 1], r)
            if step in decide:
                top = rows.peaks[:, step]
                pace = (top - rows.peaks[:, step - window]) / window
                stop = ~rows.best.success & (top < -stall.floor) & \
                    (top + stall.factor * pace * (steps - step) < 0)
                if bool(stop.any()):  # a host synchronisation at each decision step only
                    best.scatter(rows.act, rows.best, stop)
                    rows, live, val, grad, it = _drop(rows, stop, live, val, grad, it)
                    if rows.act.numel() == 0:
                        break
        rows.best.steps += live.long()
        lr = attack.schedule(step, steps, threat.eps)
        proposal, rows.state = opt.step(it.x, grad, val, rows.state, lr)
        done_already = getattr(opt, "projected", None)
        rows.x = proposal if done_already is not None and done_already(rows.state, threat) else \
            threat.project(proposal, rows.xs, rows.box)
        if every and getattr(tracking, "compacts", tracking.evades) and (step + 1) % every == 0:
            done = rows.best.success
            if bool(done.any()):  # in fp32 the loop's only host synchronisation, once per ``every`` steps
                best.scatter(rows.act, rows.best, done)
                rows = rows.keep((~done).nonzero()[:, 0])
                if rows.act.numel() == 0:
                    break
    return rows


def _drop(rows: _Rows, gone: torch.Tensor, live, val, grad, it: _Iterate):
    """``rows`` without those where ``gone``, and this step's per-row values (``live``, the objective, the
    gradient, the iterate) kept in line with them."""
    kept = (~gone).nonzero()[:, 0]
    return (rows.keep(kept), live[kept], val[kept], grad[kept] if grad is not None else None,
            replace(it, x=it.x[kept]))


def _probe(attack: Attack, model, rows: _Rows, x: torch.Tensor, probe, counter: dict, step: int):
    """Evaluate in fp32 the ε-ball ∩ box projections of an annealing stage's iterates ``x``; record the
    misclassified ones in ``found`` as ``(rows, points, logits, objective, margin, steps taken)`` and
    return which rows they are (``None`` when none is)."""
    box, found, taken = probe
    point = attack.threat.project(x, rows.xs, (box[0][rows.act], box[1][rows.act]))
    data = rows.aux if rows.target is None else {**rows.aux, "target": rows.target}
    with torch.no_grad():
        z, val = eot_value(attack.objective, model, point, rows.xs, rows.ys, data, attack.draws)
        margin = attack.objective.untargeted_margin(z, rows.ys, val)
    counter["rows"] += rows.act.numel() * attack.draws
    hit = margin > 0
    if not bool(hit.any()):  # a host synchronisation at each probe only
        return None
    idx = hit.nonzero()[:, 0]
    found.append((rows.act[idx], point[idx], z[idx], val[idx], margin[idx], taken + step))
    return hit


def _stage_tracking(opt):
    """What an annealing stage keeps: the highest objective (an ascent), or, for a step rule that is a
    minimum-norm search in the larger ball (``opt.stage_keeps == "nearest"``: it steps back from the
    adversarial points it finds, so its highest objective is not where its search ends), the adversarial
    iterate nearest the clean input."""
    return MinDistance() if getattr(opt, "stage_keeps", "objective") == "nearest" else Maximize()


def _confirm_in_fp32(obj, model, rows: _Rows, x, z, val, margin, data, counter, draws: int = 1):
    """Re-evaluate in fp32 the rows whose low-precision margin says "adversarial"; their fp32 logits,
    objective and margin replace the low-precision ones, so success is always an fp32 verdict."""
    cand = ((margin > 0) & ~rows.best.success).nonzero()[:, 0]
    if cand.numel() == 0:
        return z, val, margin
    with torch.no_grad():
        sub = {k: v[cand] for k, v in data.items()}
        z32, v32 = eot_value(obj, model, x[cand], rows.xs[cand], rows.ys[cand], sub, draws)
        m32 = obj.untargeted_margin(z32, rows.ys[cand], v32)
    counter["rows"] += cand.numel() * draws
    return z.index_copy(0, cand, z32), val.index_copy(0, cand, v32), margin.index_copy(0, cand, m32)


def _input_gradient(value: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """∇ of ``value.sum()`` w.r.t. ``leaf``; zero where the model's graph does not reach its input (a
    detached or thresholded input) and where it is NaN or infinite (finite logits can have a non-finite
    gradient): masked gradients are for the alarms to report, and a NaN step would poison the iterate and
    be misread as non-finite logits. Finite gradients pass unchanged."""
    if not value.requires_grad:
        return torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    if grad is None:
        return torch.zeros_like(leaf)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def _result(attack: Attack, x, ids, z0, best: _Best, counter: dict) -> Result:
    bad = counter["nonfinite"]
    if bool(bad.any()):
        bad_ids = ids[bad.cpu()]
        raise NonFiniteLogits(f"the model returned non-finite logits (NaN or inf) at {len(bad_ids)} "
                              f"example(s)' points inside the threat set, first for example id "
                              f"{int(bad_ids[0])}", bad_ids)
    if x.shape[0] and not bool(attack.threat.contains(best.x, x).all()):
        raise RuntimeError("internal error: an attack iterate left the threat set")
    success = best.success if attack.tracking.evades else torch.zeros_like(best.success)
    return Result(x_adv=best.x, success=success, value=best.value, margin=best.margin, logits=best.logits,
                  run=best.run, steps=best.steps, target=best.target, clean_logits=z0,
                  forward_rows=counter["rows"])
