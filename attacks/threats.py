"""Threat models: the set of allowed adversarial inputs around a clean input.

The threat model owns everything geometric — random starts, projection and the membership check —
so the engine never clips anything itself (Foolbox 3's rule: every iterate is projected into the
threat set before it is evaluated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinfBall:
    """The L∞ ball of radius ``eps`` around ``x``, intersected with the box ``bounds``.

    Iterates are kept in input space (``x_adv``, not ``delta``) so that the point the model sees is
    exactly the point that is checked and reported: ``x_adv`` is clamped into the box last, hence
    lies in ``bounds`` exactly, and ``|x_adv - x| ≤ eps`` up to one rounding of ``x ± eps``.

    Projection order (clip to ±ε, then to the box) follows DeepMind's IBP ``_project_perturbation``
    (docs/methods.md, "Threat models and projection"). Units: [0, 1] pixel space.
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        eps = float(self.eps)
        lo, hi = (float(b) for b in self.bounds)
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite non-negative number, got {self.eps!r}")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"bounds must be finite with low < high, got {self.bounds!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", (lo, hi))

    norm = "linf"

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate interval of the ball ∩ box: ``[max(x−ε, lo), min(x+ε, hi)]``.

        It is never empty because ``x`` lies in both sets, so clamping to it equals clamping to the ball
        and then to the box — exactly, since clamping does no arithmetic. The engine computes it once per
        run and projects with a single ``clamp`` per step.
        """
        lo, hi = self.bounds
        return (x - self.eps).clamp_(min=lo), (x + self.eps).clamp_(max=hi)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, box=None) -> torch.Tensor:
        """Nearest point of the ball ∩ box: clamp to ``x ± eps``, then to ``bounds``."""
        low, high = self.box(x) if box is None else box
        return torch.clamp(x_adv, low, high)

    def sample(self, x: torch.Tensor, generators) -> torch.Tensor:
        """Uniform random start ``x + U(-eps, eps)``, projected (IBP ``random_init=1``).

        ``generators`` holds one CPU ``torch.Generator`` per row of ``x``: each example's noise depends
        only on its own generator, never on the batch it is in (:mod:`attacks.seeding`). The noise is drawn
        on the CPU and moved, so starts are identical on every device.
        """
        if len(generators) != x.shape[0]:
            raise ValueError("one generator per example is required")
        shape = x.shape[1:]
        noise = torch.stack([torch.rand(shape, generator=g, dtype=torch.float32) for g in generators]) \
            if len(generators) else torch.empty((0, *shape))
        noise = noise.to(device=x.device, dtype=x.dtype)
        return self.project(x + (2.0 * noise - 1.0) * self.eps, x)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example ‖x_adv − x‖∞."""
        if x.shape[0] == 0:
            return x.new_zeros(0)
        return (x_adv - x).flatten(1).abs().amax(1)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-example membership: ‖x_adv − x‖∞ ≤ eps + tol and x_adv inside the box (exactly)."""
        lo, hi = self.bounds
        flat = x_adv.flatten(1)
        inside_box = (flat >= lo).all(1) & (flat <= hi).all(1) & torch.isfinite(flat).all(1)
        return inside_box & (self.distance(x_adv, x) <= self.eps + tol)
