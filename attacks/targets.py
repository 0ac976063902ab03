"""Target policies: which runs an attack makes and which class each run aims at.

A policy is a small frozen value. :meth:`trials` lists the runs as ``(restart, slot)`` pairs, in run
order (the run index seeds the random start, :mod:`attacks.seeding`); :meth:`assign` gives each example
its target classes, one column per slot (``None``: untargeted). Restarts and targets only ever run on
the survivors of the runs before them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import seeding


@dataclass(frozen=True)
class Untargeted:
    """Every restart runs untargeted."""

    def slots(self, num_classes: int) -> int:
        return 0

    def trials(self, restarts: int, num_classes: int) -> list[tuple[int, int | None]]:
        return [(r, None) for r in range(restarts)]

    def assign(self, z0, y, ids, seed: int, num_classes: int, model=None, x=None, threat=None):
        return None


@dataclass(frozen=True)
class RandomTarget:
    """One random wrong class per example, drawn from its own generator and shared by its restarts."""

    def slots(self, num_classes: int) -> int:
        return 1

    def trials(self, restarts: int, num_classes: int) -> list[tuple[int, int | None]]:
        return [(r, 0) for r in range(restarts)]

    def assign(self, z0, y, ids, seed: int, num_classes: int, model=None, x=None, threat=None):
        gens = seeding.generators(seed, ids.tolist(), seeding.TARGET)
        offs = torch.tensor([int(torch.randint(1, num_classes, (1,), generator=g)) for g in gens],
                            dtype=torch.long)
        return ((y + offs.to(y.device)) % num_classes)[:, None]


@dataclass(frozen=True)
class RankedTargets:
    """The wrong classes ranked at the clean point, the first ``k`` of them (all when ``None``).
    Restarts cycle over them round-robin, or, with ``all=True``, every restart runs every target
    (DeepMind's IBP semantics, R·K runs).

    ``by="logit"``: highest clean logit first. ``by="linearised"``: smallest linearised distance to the
    class boundary first, ``(z_y − z_t) / ‖∇ₓ(z_y − z_t)‖₁`` — the L∞ distance at which the first-order
    model of the pair margin reaches 0 (MALT, Melamed et al. 2024); it needs one forward and C backward
    passes per example, once. ``by="linearised-box"``: the same first-order model, its distance taken
    inside the threat's box (:func:`boxed_l1_distance`; L1 only, where one coordinate cannot carry the
    radius and the box decides which coordinates can). Ties (e.g. zero gradients) keep the logit order.
    """

    k: int | None = None
    all: bool = False
    by: str = "logit"

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError("the number of targets must be ≥ 1")
        if self.by not in ("logit", "linearised", "linearised-box"):
            raise ValueError("targets are ranked by 'logit', 'linearised' or 'linearised-box'")

    @property
    def needs_model(self) -> bool:
        return self.by != "logit"

    def slots(self, num_classes: int) -> int:
        return min(self.k or num_classes - 1, num_classes - 1)

    def trials(self, restarts: int, num_classes: int) -> list[tuple[int, int | None]]:
        k = self.slots(num_classes)
        if self.all:
            return [(r, s) for r in range(restarts) for s in range(k)]
        return [(r, r % k) for r in range(restarts)]

    def assign(self, z0, y, ids, seed: int, num_classes: int, model=None, x=None, threat=None):
        true = torch.nn.functional.one_hot(y, num_classes).bool()
        order = torch.sort(z0.masked_fill(true, float("-inf")), dim=1, descending=True, stable=True).indices
        if self.by != "logit":
            if model is None or x is None:
                raise ValueError("ranking targets by linearised distance needs the model and the inputs")
            dual = {2: 2, 1: math.inf}.get(getattr(threat, "p", math.inf), 1)  # ‖·‖ dual to the threat's
            if self.by == "linearised-box" and dual != math.inf:
                raise ValueError("ranking by the boxed linearised distance is defined for the L1 threat "
                                 "model")
            box = threat.box(x) if self.by == "linearised-box" else None
            dist = linearised_distance(model, x, y, dual, box).masked_fill(true, float("inf"))
            order = order.gather(1, torch.sort(dist.gather(1, order), dim=1, stable=True).indices)
        return order[:, :self.slots(num_classes)]


def l1_knapsack(g: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """The smallest ``δ`` in L1 with ``g · δ = c`` and ``lo ≤ δ ≤ hi`` (``lo ≤ 0 ≤ hi``), per flat row, and
    whether the box reaches ``c`` at all: ``([N, D], [N] bool)``. Each coordinate ``i`` moved by ``t ≥ 0``
    in the direction ``d_i = sign(c)·sign(g_i)`` adds ``|g_i|·t`` towards ``|c|`` at an L1 cost of ``t``, up
    to the room the box leaves it, so the cheapest ``δ`` fills coordinates in decreasing ``|g_i|``, each to
    its room, until ``|c|`` is reached, the last one partly — a fractional knapsack, exact (a linear
    programme with one equality and box constraints). Where even every coordinate full falls short, all
    are full: the box corner that comes nearest. A stable sort resolves ties (equal ``|g_i|``) by
    coordinate index, so a row's answer depends on that row alone."""
    d = torch.sign(c)[:, None] * torch.sign(g)
    room = torch.where(d > 0, hi, torch.where(d < 0, -lo, torch.zeros_like(d))).clamp_min(0)
    rate, order = g.abs().sort(dim=1, descending=True, stable=True)
    room = room.gather(1, order)
    gain = rate * room
    total = gain.cumsum(1)
    need = (c.abs()[:, None] - (total - gain)).clamp_min(0)  # what is left when each coordinate's turn comes
    amount = torch.where(rate > 0, torch.minimum(need / rate.clamp_min(1e-30), room), torch.zeros_like(rate))
    return torch.zeros_like(g).scatter(1, order, amount) * d, total[:, -1] >= c.abs()


def boxed_l1_distance(margin: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, box) -> torch.Tensor:
    """``[N]``: the smallest ‖δ‖₁ with ``x + δ`` in the box ``(lo, hi)`` at which the first-order model
    ``margin + grad·δ`` reaches zero (:func:`l1_knapsack`); ``inf`` when the whole box cannot. A
    misclassified ``x`` (margin ≤ 0) gets the unboxed value ``margin / ‖grad‖∞`` (≤ 0)."""
    g = grad.flatten(1)
    lo, hi = (b.flatten(1) - x.flatten(1) for b in box)
    step, reach = l1_knapsack(g, -margin, lo, hi)
    dist = torch.where(reach, step.abs().sum(1), torch.full_like(margin, math.inf))
    unboxed = margin / g.abs().amax(1).clamp_min(1e-12)
    return torch.where(margin > 0, dist, unboxed)


def linearised_distance(model, x: torch.Tensor, y: torch.Tensor, dual: float = 1, box=None) -> torch.Tensor:
    """``[N, C]``: ``(z_y − z_c) / ‖∇ₓ(z_y − z_c)‖_q`` at ``x`` for every class ``c`` (0 for ``c = y``),
    with ``q = dual`` the norm dual to the threat's (1 for L∞, 2 for L2, ∞ for L1): the distance, in
    the threat's norm, at which the first-order model of the pair margin reaches zero. With ``box``
    (L1 only), that distance inside the box (:func:`boxed_l1_distance`).

    One forward pass and one backward pass per class over the batch; each row depends on its own
    example only (the model is in eval mode)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        z = model(leaf)
        zy = z.gather(1, y[:, None])
        dist = torch.zeros(z.shape, device=x.device, dtype=z.dtype)
        for c in range(z.shape[1]):
            diff = zy[:, 0] - z[:, c]
            if not diff.requires_grad:
                dist[:, c] = float("inf")
                continue
            (grad,) = torch.autograd.grad(diff.sum(), leaf, retain_graph=c < z.shape[1] - 1,
                                          allow_unused=True)
            if box is not None:
                g = torch.zeros_like(leaf) if grad is None else grad
                dist[:, c] = boxed_l1_distance(diff.detach(), g, x.detach(), box)
                continue
            flat = grad.flatten(1).abs() if grad is not None else None
            norm = torch.zeros_like(diff) if flat is None else (
                flat.sum(1) if dual == 1 else flat.amax(1) if dual == math.inf else flat.pow(2).sum(1).sqrt())
            dist[:, c] = diff.detach() / norm.clamp_min(1e-12)
    return dist.detach()


TargetPolicy = Untargeted | RandomTarget | RankedTargets


def closeness(model, x: torch.Tensor, y: torch.Tensor, threat) -> torch.Tensor:
    """``[N]``: how far the decision boundary is from ``x`` by the first-order model of each pair margin,
    in units of the threat's radius: ``min_{c≠y} (z_y − z_c) / (‖∇ₓ(z_y − z_c)‖_q · ε)`` with ``q`` dual
    to the threat's norm (:func:`linearised_distance`). Scale-free (rescaling the logits changes nothing),
    per example, and for a linear model exactly the distance from ``x`` to the nearest other class's
    region over ε (the box aside); below 0 for a misclassified ``x``; ``inf`` where no pair margin has a
    gradient. One forward and one backward pass per class."""
    dual = {2: 2, 1: math.inf}.get(getattr(threat, "p", math.inf), 1)
    dist = linearised_distance(model, x, y, dual)
    true = torch.nn.functional.one_hot(y, dist.shape[1]).bool()
    return dist.masked_fill(true, math.inf).amin(1) / float(threat.eps)
