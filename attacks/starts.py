"""Start policies: where each run of an attack begins, drawn from the example's own generators.

``start(x, threat, generators, model) -> x0`` inside the threat set (``model``: what is attacked, for
starts that look at its outputs). The generators (one per example, seeded by
(seed, example id, run)) are then handed to the optimizer, which may keep drawing from them (Square's
random windows), so every random choice of an example depends on nothing but its id and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UniformStart:
    """``x + U(−ε, ε)``, projected (IBP ``random_init=1``; the PGD presets)."""

    def __call__(self, x: torch.Tensor, threat, generators, model=None) -> torch.Tensor:
        return threat.sample(x, generators)


@dataclass(frozen=True)
class NoStart:
    """The clean input itself."""

    def __call__(self, x: torch.Tensor, threat, generators, model=None) -> torch.Tensor:
        return x.clone()


@dataclass(frozen=True)
class StripeStart:
    """Square's L∞ initialisation (Andriushchenko et al. 2020): vertical stripes — one random sign per
    channel and image column, ``x ± ε`` along the whole column — projected onto the threat set."""

    def __call__(self, x: torch.Tensor, threat, generators, model=None) -> torch.Tensor:
        if len(generators) != x.shape[0]:
            raise ValueError("one generator per example is required")
        if x.ndim != 4:
            raise ValueError(f"stripe starts need images [N, C, H, W], got shape {tuple(x.shape)}")
        c, w = x.shape[1], x.shape[3]
        signs = [torch.rand((c, 1, w), generator=g) < 0.5 for g in generators]
        s = torch.stack(signs).to(x.device) if signs else torch.zeros((0, c, 1, w), dtype=torch.bool)
        return threat.project(x + torch.where(s, -threat.eps, threat.eps).to(x.dtype), x)


@dataclass(frozen=True)
class DiverseStart:
    """Output-diversified initialisation (ODI; Tashiro et al., NeurIPS 2020): from a uniform random start,
    ``steps`` steepest-ascent steps of size ε in the threat's norm (sign steps in L∞) that maximise
    ``w · z(x)`` for a random direction ``w ∈ [−1, 1]^C`` in
    the output space, drawn from the example's own generator. Restarts then begin on different faces of
    the ball rather than in the basin nearest the clean point. Costs ``steps`` forward+backward passes."""

    steps: int = 2

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("diverse starts need at least one step")

    def __call__(self, x: torch.Tensor, threat, generators, model=None) -> torch.Tensor:
        if model is None:
            raise ValueError("diverse starts need the model")
        x0 = threat.sample(x, generators)
        box = threat.box(x)
        w = None
        for _ in range(self.steps):
            with torch.enable_grad():
                leaf = x0.detach().requires_grad_(True)
                z = model(leaf)
                if w is None:
                    rows = [torch.rand(z.shape[1], generator=g) for g in generators]
                    w = (torch.stack(rows) * 2 - 1).to(z.device, z.dtype) if rows else z.new_zeros(z.shape)
                (grad,) = torch.autograd.grad((z * w).sum(), leaf, allow_unused=True)
            if grad is None:
                break
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # as the engine's steps
            x0 = threat.project(x0 + threat.eps * threat.steepest(grad), x, box)
        return x0.detach()


@dataclass(frozen=True)
class GaussianStart:
    """``x + N(0, I)`` projected onto the ball ∩ box: a point on the ball's boundary (the Gaussian is far
    outside it). In L1 the projection soft-thresholds, so the start is sparse — the shape of L1 optima,
    where a dense start inside the ball spends the first steps undoing coordinates the box clips
    (AutoAttack starts its L1 APGD this way; measured in benchmarks/RESULTS.md)."""

    def __call__(self, x: torch.Tensor, threat, generators, model=None) -> torch.Tensor:
        if len(generators) != x.shape[0]:
            raise ValueError("one generator per example is required")
        rows = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]
        noise = torch.stack(rows) if rows else torch.empty((0, *x.shape[1:]))
        return threat.project(x + noise.to(device=x.device, dtype=x.dtype), x)


@dataclass(frozen=True)
class AttackStart:
    """The point a fixed-radius attack finds, run first at the threat's radius with its own budget and
    seeds: an adversarial point where it breaks the example (else its best), for a minimum-norm search
    to shrink. A minimum-norm search from the clean input grows its ball until it meets the boundary
    and, for examples far from it, can stop at a local boundary further out than the one a fixed-radius
    attack reaches; started from that attack's point it only has to shrink. The engine calls it with the
    labels and its own ``run`` (``needs_labels``) and counts the passes it makes."""

    attack: object  # an attacks.Attack; its radius is replaced by the threat's at every call

    needs_labels = True

    def __call__(self, x, threat, generators, model=None, *, y=None, ids=None, seed: int = 0, run=None):
        if model is None or y is None or run is None:
            raise ValueError("an attack start needs the model, the labels and the engine's run")
        res = run(self.attack.replace(threat=threat), model, x, y, ids=ids, seed=seed, allow_train_mode=True)
        return res.x_adv.detach(), res.forward_rows


@dataclass(frozen=True)
class StartsByRestart:
    """Restart ``r`` starts with ``starts[r % len(starts)]``: e.g. a minimum-norm search once from the
    clean input and once from a fixed-radius attack's point, keeping each example's nearer result."""

    starts: tuple

    def __post_init__(self):
        if not self.starts or any(isinstance(s, StartsByRestart) or not callable(s) for s in self.starts):
            raise ValueError("StartsByRestart needs a non-empty tuple of start policies")

    def of(self, restart: int):
        return self.starts[restart % len(self.starts)]


StartPolicy = (UniformStart | NoStart | StripeStart | DiverseStart | GaussianStart | AttackStart
               | StartsByRestart)
