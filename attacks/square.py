"""Square (Andriushchenko et al., ECCV 2020), L∞: a score-based random search, as an optimizer of the one
engine — no gradient, one forward per query per active example.

Each query changes one square window of the current best point, in every channel, to a corner of the
ε-ball (``x ± ε``, a random sign per channel), and the engine evaluates it; :meth:`RandomSquares.step`
keeps it when the objective (the margin) improved, then proposes the next window. The window's area is
a fraction ``p`` of the image that shrinks over the run (:class:`WindowSchedule`, from ``p_init`` = 0.8);
the first point is Square's stripe initialisation (:class:`attacks.starts.StripeStart`). Proposals put
±∞ in the window and let the engine's projection clamp them to ``x ± ε`` inside the box, so the
optimizer needs neither ε nor the clean input.

Randomness: the example's own generators (after the start's draws), consumed in fixed blocks per
example, so results do not depend on the batch or on which examples are still active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

#: Where the window fraction halves, in ten-thousandths of the run (Square's published schedule).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_BLOCK = 64  # queries' worth of uniforms drawn per example at a time


@dataclass(frozen=True)
class WindowSchedule:
    """The fraction of the image a window covers at query ``step`` of ``steps``: ``p_init``, halved at
    each of Square's breakpoints (0.1%, 0.5%, 2%, 5%, 10%, 20%, 40%, 60%, 80% of the run)."""

    p_init: float = 0.8

    def __post_init__(self):
        if not 0 < self.p_init <= 1:
            raise ValueError("p_init must be in (0, 1]")

    def __call__(self, step: int, steps: int, eps: float = 1.0) -> float:
        position = int(step / max(steps + 1, 1) * 10000)  # step ``step`` proposes query step + 2
        return self.p_init / 2 ** sum(1 for b in _HALVINGS if position > b)

    def scaled_to(self, first: float, relative: bool | None = None) -> WindowSchedule:
        return WindowSchedule(float(first))


class SquareState(NamedTuple):
    best: torch.Tensor  # the incumbent point per example
    value: torch.Tensor  # its objective (−inf before the first evaluation)
    draws: torch.Tensor  # [N, _BLOCK, 2 + C] uniforms for the coming queries
    used: int  # how many of the block's queries have been used
    generators: list  # one per example


def window_side(p: float, height: int, width: int) -> int:
    """Side of a square window covering a fraction ``p`` of an ``height × width`` image (≥ 1, < height)."""
    side = int(round(math.sqrt(p * height * width)))
    return max(1, min(side, height - 1)) if height > 1 else 1


@dataclass(frozen=True)
class RandomSquares:
    """The Square search step (see the module docstring). ``uses_gradient = False``."""

    uses_gradient = False
    name = "random-squares"

    def init(self, x: torch.Tensor, generators=None, **run) -> SquareState:
        if generators is None or len(generators) != x.shape[0]:
            raise ValueError("Square needs one generator per example")
        if x.ndim != 4:
            raise ValueError(f"Square needs images [N, C, H, W], got shape {tuple(x.shape)}")
        value = torch.full((x.shape[0],), float("-inf"), device=x.device)
        return SquareState(x.clone(), value, self._draw(generators, x), 0, list(generators))

    @staticmethod
    def _draw(generators, x) -> torch.Tensor:
        k = 2 + x.shape[1]
        rows = [torch.rand((_BLOCK, k), generator=g) for g in generators]
        return (torch.stack(rows) if rows else torch.zeros((0, _BLOCK, k))).to(x.device)

    def step(self, x, grad, value, state: SquareState, lr: float):
        """Keep ``x`` where ``value`` improved on the incumbent; propose the next window (area ``lr``)."""
        better = value > state.value
        best = torch.where(better.view(-1, *([1] * (x.ndim - 1))), x, state.best)
        best_value = torch.where(better, value, state.value)
        draws, used = state.draws, state.used
        if used == _BLOCK:
            draws, used = self._draw(state.generators, x), 0
        u = draws[:, used]
        n, c, h, w = x.shape
        side = window_side(lr, h, w)
        top = (u[:, 0] * (h - side + 1)).floor().clamp(max=h - side).long()
        left = (u[:, 1] * (w - side + 1)).floor().clamp(max=w - side).long()
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [N, 1, H, W]
        corner = torch.where(u[:, 2:] < 0.5, -math.inf, math.inf).to(x.dtype)[:, :, None, None]  # N,C,1,1
        proposal = torch.where(window, corner, best)
        return proposal, SquareState(best, best_value, draws, used + 1, state.generators)
