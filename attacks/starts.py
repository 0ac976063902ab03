"""Start policies: where each run of an attack begins, drawn from the example's own generators.

``start(x, threat, generators) -> x0`` inside the threat set. The generators (one per example, seeded by
(seed, example id, run)) are then handed to the optimizer, which may keep drawing from them (Square's
random windows), so every random choice of an example depends on nothing but its id and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UniformStart:
    """``x + U(−ε, ε)``, projected (IBP ``random_init=1``; the PGD presets)."""

    def __call__(self, x: torch.Tensor, threat, generators) -> torch.Tensor:
        return threat.sample(x, generators)


@dataclass(frozen=True)
class NoStart:
    """The clean input itself."""

    def __call__(self, x: torch.Tensor, threat, generators) -> torch.Tensor:
        return x.clone()


@dataclass(frozen=True)
class StripeStart:
    """Square's L∞ initialisation (Andriushchenko et al. 2020): vertical stripes — one random sign per
    channel and image column, ``x ± ε`` along the whole column — projected onto the threat set."""

    def __call__(self, x: torch.Tensor, threat, generators) -> torch.Tensor:
        if len(generators) != x.shape[0]:
            raise ValueError("one generator per example is required")
        if x.ndim != 4:
            raise ValueError(f"stripe starts need images [N, C, H, W], got shape {tuple(x.shape)}")
        c, w = x.shape[1], x.shape[3]
        signs = [torch.rand((c, 1, w), generator=g) < 0.5 for g in generators]
        s = torch.stack(signs).to(x.device) if signs else torch.zeros((0, c, 1, w), dtype=torch.bool)
        return threat.project(x + torch.where(s, -threat.eps, threat.eps).to(x.dtype), x)


StartPolicy = UniformStart | NoStart | StripeStart
