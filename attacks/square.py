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


class SquareL2State(NamedTuple):
    best: torch.Tensor
    value: torch.Tensor
    draws: torch.Tensor  # [N, _BLOCK, 4 + C] uniforms for the coming queries
    used: int
    generators: list
    center: torch.Tensor
    threat: object


def _bump(side: int, device) -> torch.Tensor:
    """Square-L2's meta-pattern on a ``side × side`` window: concentric squares whose weight falls as the
    inverse square of the ring, unit L2 norm (most of the mass in the middle, none at a hard edge)."""
    idx = torch.arange(side, device=device, dtype=torch.float32)
    centre = (side - 1) / 2
    ring = torch.maximum((idx[:, None] - centre).abs(), (idx[None, :] - centre).abs())
    pattern = 1.0 / (ring + 1) ** 2
    return pattern / pattern.norm()


@dataclass(frozen=True)
class RandomSquaresL2:
    """Square's L2 search step (Andriushchenko et al., ECCV 2020): each query takes a window W1 and a
    window W2 of the incumbent's perturbation, removes the perturbation in both and puts their L2 mass —
    plus what the ball still has room for — into W1 as the meta-pattern (:func:`_bump`) with a random
    sign per channel; the engine projects onto the ball ∩ box and the proposal is kept when the margin
    improved. Draws come from the example's own generators in blocks, as :class:`RandomSquares`."""

    uses_gradient = False
    name = "random-squares-l2"

    def init(self, x: torch.Tensor, generators=None, *, threat=None, center=None, **run) -> SquareL2State:
        if generators is None or len(generators) != x.shape[0]:
            raise ValueError("Square needs one generator per example")
        if x.ndim != 4 or threat is None or center is None:
            raise ValueError(f"Square L2 needs images [N, C, H, W], the threat and the clean inputs; got "
                             f"shape {tuple(x.shape)}")
        value = torch.full((x.shape[0],), float("-inf"), device=x.device)
        return SquareL2State(x.clone(), value, self._draw(generators, x), 0, list(generators), center, threat)

    @staticmethod
    def _draw(generators, x) -> torch.Tensor:
        k = 4 + x.shape[1]
        rows = [torch.rand((_BLOCK, k), generator=g) for g in generators]
        return (torch.stack(rows) if rows else torch.zeros((0, _BLOCK, k))).to(x.device)

    def step(self, x, grad, value, state: SquareL2State, lr: float):
        better = value > state.value
        best = torch.where(better.view(-1, 1, 1, 1), x, state.best)
        best_value = torch.where(better, value, state.value)
        draws, used = state.draws, state.used
        if used == _BLOCK:
            draws, used = self._draw(state.generators, x), 0
        u = draws[:, used]
        n, c, h, w = x.shape
        side = window_side(lr, h, w)
        delta = best - state.center
        windows = []
        for a, b in ((0, 1), (2, 3)):
            top = (u[:, a] * (h - side + 1)).floor().clamp(max=h - side).long()
            left = (u[:, b] * (w - side + 1)).floor().clamp(max=w - side).long()
            rows = torch.arange(h, device=x.device)[None, :]
            cols = torch.arange(w, device=x.device)[None, :]
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
            windows.append(((in_rows[:, :, None] & in_cols[:, None, :])[:, None], top, left))
        (w1, top, left), (w2, _, _) = windows
        both = w1 | w2
        kept = torch.where(both, torch.zeros_like(delta), delta)
        freed = (delta * both).flatten(1).pow(2).sum(1)
        room = (state.threat.eps ** 2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0)
        mass = (freed + room).sqrt() / math.sqrt(c)  # per channel
        bump = _bump(side, x.device)
        rel_r = (torch.arange(h, device=x.device)[None, :] - top[:, None]).clamp(0, side - 1)
        rel_c = (torch.arange(w, device=x.device)[None, :] - left[:, None]).clamp(0, side - 1)
        placed = bump[rel_r[:, :, None], rel_c[:, None, :]][:, None]  # the meta-pattern at each window
        pattern = torch.where(w1, placed, torch.zeros_like(placed)).to(delta.dtype)
        signs = torch.where(u[:, 4:] < 0.5, -1.0, 1.0).to(x.dtype)[:, :, None, None]
        proposal = state.center + kept + pattern * signs * mass.view(-1, 1, 1, 1)
        return proposal, SquareL2State(best, best_value, draws, used + 1, state.generators, state.center,
                                       state.threat)
