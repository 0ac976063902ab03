"""Square (Andriushchenko et al., ECCV 2020): a score-based random search, as an optimizer of the one
engine — no gradient, one forward per query per active example.

Each query changes one square window of the current best point, in every channel, to a corner of the
ε-ball (``x ± ε``, a random sign per channel), and the engine evaluates it; :meth:`RandomSquares.step`
keeps it when the objective (the margin) improved, then proposes the next window. The window's area is
a fraction ``p`` of the image that shrinks over the run (:class:`WindowSchedule`, from ``p_init`` = 0.8);
the first point is Square's stripe initialisation (:class:`attacks.starts.StripeStart`). Proposals put
±∞ in the window and let the engine's projection clamp them to ``x ± ε`` inside the box, so the
optimizer needs neither ε nor the clean input. In L2 and L1 (:class:`RandomSquaresL2`,
:class:`RandomSquaresL1`) a query moves the perturbation's mass between two windows instead, and the
engine's projection onto the ball ∩ box keeps it feasible.

Randomness: the example's own generators (after the start's draws), consumed in fixed blocks per
example, so results do not depend on the batch or on which examples are still active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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


def _uniforms(generators, x, k: int) -> torch.Tensor:
    """``[N, _BLOCK, k]`` uniforms for the coming queries, each example's from its own generator."""
    rows = [torch.rand((_BLOCK, k), generator=g) for g in generators]
    return (torch.stack(rows) if rows else torch.zeros((0, _BLOCK, k))).to(x.device)


def _advance(x, value, state, k: int):
    """Keep ``x`` where ``value`` improved on the incumbent; the next query's uniforms (a new block of ``k``
    per example when the current one is used up). Returns ``(best, best_value, draws, used, u)``."""
    better = value > state.value
    best = torch.where(better.view(-1, *([1] * (x.ndim - 1))), x, state.best)
    best_value = torch.where(better, value, state.value)
    draws, used = state.draws, state.used
    if used == _BLOCK:
        draws, used = _uniforms(state.generators, x, k), 0
    return best, best_value, draws, used, draws[:, used]


def _window(u_top, u_left, side: int, h: int, w: int, device):
    """``[N, 1, H, W]`` masks of ``side × side`` windows placed by two uniforms, and their corners."""
    top = (u_top * (h - side + 1)).floor().clamp(max=h - side).long()
    left = (u_left * (w - side + 1)).floor().clamp(max=w - side).long()
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None], top, left


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
        return SquareState(x.clone(), value, _uniforms(generators, x, 2 + x.shape[1]), 0, list(generators))

    def step(self, x, grad, value, state: SquareState, lr: float):
        """Keep ``x`` where ``value`` improved on the incumbent; propose the next window (area ``lr``)."""
        best, best_value, draws, used, u = _advance(x, value, state, 2 + x.shape[1])
        n, c, h, w = x.shape
        window, _, _ = _window(u[:, 0], u[:, 1], window_side(lr, h, w), h, w, x.device)
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


def _bump(side: int, device, power: int = 2, order: int = 2) -> torch.Tensor:
    """Square's meta-pattern on a ``side × side`` window: concentric squares whose weight falls as the
    ring's ``power`` (2 in L2, 4 in L1: most of the mass in the middle, none at a hard edge), unit
    L``order`` norm."""
    idx = torch.arange(side, device=device, dtype=torch.float32)
    centre = (side - 1) / 2
    ring = torch.maximum((idx[:, None] - centre).abs(), (idx[None, :] - centre).abs())
    pattern = 1.0 / (ring + 1) ** power
    return pattern / (pattern.norm() if order == 2 else pattern.abs().sum())


def _channel_norm(v: torch.Tensor, q: int) -> torch.Tensor:
    """``[N, C, 1, 1]``: the Lq norm of each channel of ``v``."""
    return v.abs().pow(q).sum(dim=(2, 3), keepdim=True).pow(1.0 / q)


@dataclass(frozen=True)
class RandomSquaresL2:
    """Square's L2 search step (Andriushchenko et al., ECCV 2020): each query takes a window W1 and a
    window W2 of the incumbent's perturbation, removes the perturbation in both and puts their L2 mass —
    plus what the ball still has room for — into W1 as the meta-pattern (:func:`_bump`) with a random
    sign per channel; the engine projects onto the ball ∩ box and the proposal is kept when the margin
    improved. Draws come from the example's own generators in blocks, as :class:`RandomSquares`.

    ``blend``: the pattern is added to W1's old perturbation (both at unit norm per channel), as the
    published algorithm does, rather than written over it (``False``, the form before this field existed:
    written into a configuration only when true, so earlier records reproduce)."""

    uses_gradient = False
    name = "random-squares-l2"
    order = 2  # the norm whose mass moves between windows (class constants, not configuration)
    power = 2  # the meta-pattern's fall-off
    blend: bool = field(default=False, metadata={"omit_default": True})

    def init(self, x: torch.Tensor, generators=None, *, threat=None, center=None, **run) -> SquareL2State:
        if generators is None or len(generators) != x.shape[0]:
            raise ValueError("Square needs one generator per example")
        if x.ndim != 4 or threat is None or center is None:
            raise ValueError(f"Square L{self.order} needs images [N, C, H, W], the threat and the clean "
                             f"inputs; got shape {tuple(x.shape)}")
        value = torch.full((x.shape[0],), float("-inf"), device=x.device)
        return SquareL2State(x.clone(), value, _uniforms(generators, x, 4 + x.shape[1]), 0, list(generators),
                             center, threat)

    def step(self, x, grad, value, state: SquareL2State, lr: float):
        best, best_value, draws, used, u = _advance(x, value, state, 4 + x.shape[1])
        n, c, h, w = x.shape
        side = window_side(lr, h, w)
        delta = best - state.center
        w1, top, left = _window(u[:, 0], u[:, 1], side, h, w, x.device)
        w2, _, _ = _window(u[:, 2], u[:, 3], side, h, w, x.device)
        both = w1 | w2
        kept = torch.where(both, torch.zeros_like(delta), delta)
        q = self.order
        freed = (delta * both).abs().flatten(1).pow(q).sum(1)
        room = (state.threat.eps ** q - delta.abs().flatten(1).pow(q).sum(1)).clamp_min(0)
        # per channel: the channels together carry the freed mass plus the room left
        mass = (freed + room).sqrt() / math.sqrt(c) if q == 2 else (freed + room) / c
        bump = _bump(side, x.device, self.power, q)
        rel_r = (torch.arange(h, device=x.device)[None, :] - top[:, None]).clamp(0, side - 1)
        rel_c = (torch.arange(w, device=x.device)[None, :] - left[:, None]).clamp(0, side - 1)
        placed = bump[rel_r[:, :, None], rel_c[:, None, :]][:, None]  # the meta-pattern at each window
        pattern = torch.where(w1, placed, torch.zeros_like(placed)).to(delta.dtype)
        signs = torch.where(u[:, 4:] < 0.5, -1.0, 1.0).to(x.dtype)[:, :, None, None]
        new = pattern * signs  # unit Lq per channel inside W1
        if self.blend:  # keep W1's old direction: the pattern is added to it, not written over it
            old = torch.where(w1, delta, torch.zeros_like(delta))
            new = new + old / _channel_norm(old, q).clamp_min(1e-12)
            new = new / _channel_norm(new, q).clamp_min(1e-12)
        proposal = state.center + kept + new * mass.view(-1, 1, 1, 1)
        return proposal, SquareL2State(best, best_value, draws, used + 1, state.generators, state.center,
                                       state.threat)


@dataclass(frozen=True)
class RandomSquaresL1(RandomSquaresL2):
    """Square's search step in L1 (the L1 Square of Croce & Hein, ICCV 2021): :class:`RandomSquaresL2`'s
    moves with L1 mass — the perturbation's L1 mass in both windows plus the ball's unused radius goes
    into W1 — and a meta-pattern falling as the fourth power of the ring, so most of a window's mass sits
    on a few central pixels (an L1 budget buys more by being sparse). The pattern is added to W1's old
    perturbation (both at unit L1 per channel) rather than written over it, so a query refines what the
    search had there. The engine's projection onto the L1 ball ∩ box keeps every proposal feasible."""

    name = "random-squares-l1"
    order = 1
    power = 4
    blend: bool = field(default=True, metadata={"omit_default": True})
