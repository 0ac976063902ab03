"""The one attack loop. Every named attack, the γ(ε, x) search and the LLR trainer's inner
maximisation are configurations of :func:`run` (ARCHITECTURE principle 1).

An :class:`Attack` is *objective × optimizer × schedule × threat × restarts* (the Optax / DeepMind
decomposition). :func:`run` executes it with AutoAttack's evaluation semantics:

* a clean forward pass first; with ``goal="misclassify"`` an example the model already gets wrong is
  counted as broken (``x_adv = x``) and never attacked;
* restarts (and, for multi-targeted, targets) run on the survivors of the previous ones only;
* within a run, the first iterate that misclassifies an example is kept — a found adversarial example
  is proof and is never thrown away — and the example leaves the active batch (compaction), so cost
  follows the robust fraction (project decisions 4 and 5). ``final_iterate=True`` reproduces DeepMind's
  keep-the-final-iterate rule exactly instead;
* every iterate is projected by the threat model before it is evaluated, so the returned ``x_adv`` is
  exactly the point whose logits decided success;
* randomness comes from one ``torch.Generator`` per (seed, example id, run), so results do not depend on
  batch size, example order or device (project decision 6);
* the model is never modified: no ``train()``/``eval()`` call, gradients are taken with respect to the
  input only (``torch.autograd.grad``), so parameters' ``.grad``, buffers and mode are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

from .objectives import Margin, margin_of
from .optimizers import Adam, Sign, select
from .schedules import Piecewise
from .threats import LinfBall

_MASK64 = (1 << 64) - 1
TARGET_STREAM = 1 << 40


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def example_seed(seed: int, example_id: int, stream: int) -> int:
    """A 63-bit seed for one (seed, example id, stream) triple; stream = run index or a tag."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(example_id) & _MASK64))
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    return h & ((1 << 63) - 1)


def generators(seed: int, ids, stream: int) -> list[torch.Generator]:
    """One CPU generator per example id, seeded by :func:`example_seed`."""
    return [torch.Generator().manual_seed(example_seed(seed, int(i), stream)) for i in ids]


def stable_repr(value) -> str:
    """``repr`` for configurations: dataclasses field by field, functions by qualified name, recursively."""
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={stable_repr(getattr(value, f.name))}" for f in fields(value) if f.repr)
        return f"{type(value).__name__}({inner})"
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


@dataclass(frozen=True)
class Attack:
    """A complete attack configuration; its ``repr`` is stored with every result.

    ``targets``: ``None`` (untargeted), ``"random"`` (one random wrong class per example, shared by its
    restarts) or ``"ranked"`` (wrong classes by clean margin ``z_t − z_y``, highest first; the first
    ``num_targets`` are used). With ``"ranked"``, restarts cycle over targets round-robin, or every
    restart runs every target with ``all_targets=True`` (DeepMind's IBP semantics, R·K runs).

    ``goal``: ``"misclassify"`` (evasion: success = strict untargeted margin > 0, locked and compacted)
    or ``"maximize"`` (no success notion; every example runs every step and the highest objective wins —
    the γ search and training-time attacks).
    """

    name: str
    objective: Any
    optimizer: Adam | Sign
    schedule: Piecewise
    threat: LinfBall
    steps: int
    restarts: int = 1
    targets: str | None = None
    num_targets: int | None = None
    all_targets: bool = False
    goal: str = "misclassify"
    final_iterate: bool = False
    random_start: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.restarts < 1:
            raise ValueError("steps must be ≥ 0 and restarts ≥ 1")
        if self.targets not in (None, "random", "ranked"):
            raise ValueError("targets must be None, 'random' or 'ranked'")
        if self.goal not in ("misclassify", "maximize"):
            raise ValueError("goal must be 'misclassify' or 'maximize'")
        if getattr(self.objective, "needs_target", False) and self.targets is None:
            raise ValueError(f"objective {self.objective!r} needs targets ('random' or 'ranked')")
        if self.num_targets is not None and self.num_targets < 1:
            raise ValueError("num_targets must be ≥ 1")

    @property
    def eps(self) -> float:
        return self.threat.eps

    def replace(self, **changes) -> "Attack":
        """A copy with some fields changed (``eps=`` replaces the threat's radius)."""
        if "eps" in changes:
            changes["threat"] = replace(changes.get("threat", self.threat), eps=changes.pop("eps"))
        return replace(self, **changes)

    def config(self) -> str:
        """A one-line description of every field, stored with each record.

        Stable from run to run (a function is written by its qualified name, never its address) and
        round-trips: ``attacks.from_config(atk.config()) == atk``.
        """
        return ", ".join(f"{f.name}={stable_repr(getattr(self, f.name))}" for f in fields(self))


@dataclass
class Result:
    """Per-example outcome of :func:`run` (all tensors on the input's device, length B).

    ``x_adv``: the chosen point (inside the threat set); ``success``: it is misclassified (strict margin
    > 0; always False for ``goal="maximize"``); ``value``: the objective there; ``margin``: the untargeted
    margin there; ``logits``: the model's logits there; ``run``: index of the run that produced it
    (-1: the clean input itself); ``steps``: gradient steps spent on the example over all runs;
    ``target``: the target class of the chosen run (-1 if untargeted); ``forward_rows``: number of
    example-forward passes the attack made (clean pass included).
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


@dataclass
class _Best:
    """Best point found so far per example (global) or per active row (a run's local copy).

    Within a run the local copy is updated with ``torch.where`` (one pass over the batch per step);
    rows are written back to the global copy when they leave the active batch or the run ends.
    ``score`` ranks candidates: the untargeted margin for evasion (so multi-targeted picks its copy by
    the untargeted margin, ALGORITHMS §4.3), the objective for ``goal="maximize"``.
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
    def initial(cls, x, z0, margin0, misclassify):
        n, dev = x.shape[0], x.device
        return cls(
            x=x.clone(), logits=z0.clone(), margin=margin0.clone(),
            value=torch.full((n,), float("nan"), device=dev, dtype=margin0.dtype),
            score=torch.full((n,), float("-inf"), device=dev, dtype=margin0.dtype),
            success=(margin0 > 0) if misclassify else torch.zeros(n, dtype=torch.bool, device=dev),
            run=torch.full((n,), -1, dtype=torch.long, device=dev),
            target=torch.full((n,), -1, dtype=torch.long, device=dev),
            steps=torch.zeros(n, dtype=torch.long, device=dev),
        )

    def gather(self, rows) -> "_Best":
        """A local copy for ``rows`` (its ``steps`` count this run only)."""
        local = _Best(*(getattr(self, f.name)[rows] for f in fields(self)))
        local.steps = torch.zeros_like(local.steps)
        return local

    def select(self, keep) -> "_Best":
        return _Best(*(getattr(self, f.name)[keep] for f in fields(self)))

    def scatter(self, rows, local: "_Best", which=None) -> None:
        """Write the local rows (all, or those where ``which``) back to the global copy."""
        if which is not None:
            idx = which.nonzero()[:, 0]
            rows, local = rows[idx], local.select(idx)
        for f in fields(self):
            if f.name == "steps":
                self.steps[rows] += local.steps
            else:
                getattr(self, f.name)[rows] = getattr(local, f.name)

    def update(self, mask, xa, z, val, mg, by_margin, j, tgt) -> None:
        """Take the current iterate where ``mask``."""
        col = mask.view(-1, *([1] * (xa.ndim - 1)))
        self.x = torch.where(col, xa, self.x)
        self.logits = torch.where(mask[:, None], z, self.logits)
        self.margin = torch.where(mask, mg, self.margin)
        self.value = torch.where(mask, val, self.value)
        self.score = torch.where(mask, mg if by_margin else val, self.score)
        self.run = torch.where(mask, j, self.run)
        if tgt is not None:
            self.target = torch.where(mask, tgt, self.target)


def _plan(attack: Attack, num_classes: int) -> tuple[list[tuple[int, int | None]], int]:
    """The runs as (restart, target slot) pairs, and the number of target slots K."""
    if attack.targets != "ranked":
        return [(r, None) for r in range(attack.restarts)], 0
    k = min(attack.num_targets or num_classes - 1, num_classes - 1)
    if attack.all_targets:
        return [(r, s) for r in range(attack.restarts) for s in range(k)], k
    return [(r, r % k) for r in range(attack.restarts)], k


def _check_mode(model: torch.nn.Module, allow_train_mode: bool) -> None:
    if allow_train_mode or not isinstance(model, torch.nn.Module):
        return
    if any(m.training for m in model.modules()):
        raise ValueError(
            "the model is in training mode: attacks run on a model in eval mode (batch-norm statistics "
            "would otherwise change and couple examples); call model.eval() or pass allow_train_mode=True"
        )


def run(
    attack: Attack,
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    seed: int = 0,
    aux: dict | None = None,
    compact: bool = True,
    allow_train_mode: bool = False,
    on_run: Callable[[int, int, int], None] | None = None,
) -> Result:
    """Run ``attack`` on the batch ``(x, y)`` and return the per-example :class:`Result`.

    ``ids`` are stable example ids (default ``0..B-1``) that, with ``seed``, fix every random choice.
    ``aux`` supplies per-example tensors to the objective (e.g. ``loss0``/``grad0`` for the linearity gap).
    ``compact=False`` keeps solved examples in the active batch (for overhead benchmarks; same result).
    ``on_run(run_index, num_runs, num_unbroken)`` is called after each run (progress reporting).

    Algorithm: ALGORITHMS.md §3 (shared PGD engine) with the project decisions 3-7 and §4 for targets.
    """
    _check_mode(model, allow_train_mode)
    threat, objective, opt = attack.threat, attack.objective, attack.optimizer
    x = x.detach()
    y = y.detach().to(x.device).long()
    n = x.shape[0]
    ids = torch.arange(n) if ids is None else torch.as_tensor(ids).long().cpu()
    if ids.shape[0] != n or y.shape[0] != n:
        raise ValueError("x, y and ids must have the same length")
    lo, hi = threat.bounds
    if n and (x.min() < lo or x.max() > hi):
        raise ValueError(f"inputs must lie in the threat model's box {threat.bounds}; got values in "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}] (normalise inside the model)")
    misclassify = attack.goal == "misclassify"

    with torch.no_grad():
        z0 = model(x).detach()
    if z0.ndim != 2 or z0.shape[0] != n:
        raise ValueError(f"the model must return logits of shape [batch, classes]; got {tuple(z0.shape)}")
    clean_bad = ~torch.isfinite(z0).all(1)
    if bool(clean_bad.any()):
        raise NonFiniteLogits("the model returned non-finite logits (NaN or inf) on the clean inputs, first "
                              f"for example id {int(ids[clean_bad.cpu()][0])}", ids[clean_bad.cpu()])
    forward_rows = n
    num_classes = z0.shape[1]
    margin0 = margin_of(z0, y)

    aux = {k: torch.as_tensor(v).to(x.device) for k, v in (aux or {}).items()}
    if hasattr(objective, "prepare"):
        before = set(aux)
        aux = objective.prepare(model, x, y, aux)
        forward_rows += n if set(aux) != before else 0
    runs, k_targets = _plan(attack, num_classes)
    ranked = None
    if attack.targets == "ranked":
        others = z0.masked_fill(torch.nn.functional.one_hot(y, num_classes).bool(), float("-inf"))
        ranked = torch.sort(others, dim=1, descending=True, stable=True).indices[:, :k_targets]
    elif attack.targets == "random":
        offs = torch.tensor([int(torch.randint(1, num_classes, (1,), generator=g))
                             for g in generators(seed, ids.tolist(), TARGET_STREAM)], dtype=torch.long)
        aux["target"] = (y + offs.to(x.device)) % num_classes

    best = _Best.initial(x, z0, margin0, misclassify)
    seen = torch.zeros(n, dtype=torch.bool, device=x.device)
    nonfinite = torch.zeros(n, dtype=torch.bool, device=x.device)  # checked once at the end: no sync
    margin_is_objective = isinstance(objective, Margin) and objective.clip is None
    needs_delta = getattr(objective, "needs_delta", True)

    for j, (_, slot) in enumerate(runs):
        act = (~best.success).nonzero()[:, 0] if misclassify else torch.arange(n, device=x.device)
        if act.numel() == 0:
            break
        xs, ys = x[act], y[act]
        aux_a = {k: v[act] for k, v in aux.items()}
        if ranked is not None:
            aux_a["target"] = ranked[act, slot]
        tgt = aux_a.get("target")
        box = threat.box(xs)
        xa = threat.sample(xs, generators(seed, ids[act.cpu()].tolist(), j)) if attack.random_start \
            else xs.clone()
        state = opt.init(xa)
        local = best.gather(act)
        for step in range(attack.steps + 1):
            last = step == attack.steps
            with torch.enable_grad() if not last else torch.no_grad():
                leaf = xa.detach().requires_grad_(not last)
                z = model(leaf)
                val = objective(z, ys, leaf - xs if needs_delta else None, aux_a)
                grad = None if last else torch.autograd.grad(val.sum(), leaf)[0]
            forward_rows += act.numel()
            z, val = z.detach(), val.detach()
            nonfinite[act] |= ~torch.isfinite(z).all(1)
            mg = val if margin_is_objective else margin_of(z, ys)
            xa = leaf.detach()
            solved = None
            if attack.final_iterate:
                if last:
                    first = ~seen[act]
                    keep = first | (mg > 0) if misclassify else first | (val > local.score)
                    local.update(keep, xa, z, val, mg, misclassify, j, tgt)
                    seen[act] = True
                    if misclassify:
                        local.success |= mg > 0
            elif misclassify:
                solved = (mg > 0) & ~local.success
                local.update(solved | ((mg > local.score) & ~local.success), xa, z, val, mg, True, j, tgt)
                local.success |= solved
            else:
                local.update(val > local.score, xa, z, val, mg, False, j, tgt)
            if last:
                break
            local.steps += 1
            upd, state = opt.update(grad, state, attack.schedule(step, attack.steps, threat.eps))
            xa = threat.project(xa + upd, xs, box)
            if compact and solved is not None and bool(solved.any()):
                best.scatter(act, local, solved)
                keep = (~solved).nonzero()[:, 0]
                act, xs, ys, xa, local = act[keep], xs[keep], ys[keep], xa[keep], local.select(keep)
                box = (box[0][keep], box[1][keep])
                aux_a = {k: v[keep] for k, v in aux_a.items()}
                tgt = aux_a.get("target")
                state = select(state, keep)
                if act.numel() == 0:
                    break
        best.scatter(act, local)
        if on_run is not None:
            on_run(j, len(runs), int((~best.success).sum()))

    if bool(nonfinite.any()):
        bad = ids[nonfinite.cpu()]
        raise NonFiniteLogits(f"the model returned non-finite logits (NaN or inf) at {len(bad)} example(s)' "
                              f"points inside the threat set, first for example id {int(bad[0])}", bad)
    best_x, success = best.x, best.success
    if n and not bool(threat.contains(best_x, x).all()):
        raise RuntimeError("internal error: an attack iterate left the threat set")
    return Result(
        x_adv=best_x, success=success if misclassify else torch.zeros_like(success),
        value=best.value, margin=best.margin, logits=best.logits, run=best.run, steps=best.steps,
        target=best.target, clean_logits=z0, forward_rows=forward_rows,
    )
