"""Target policies: which runs an attack makes and which class each run aims at.

A policy is a small frozen value. :meth:`trials` lists the runs as ``(restart, slot)`` pairs, in run
order (the run index seeds the random start, project decision 6); :meth:`assign` gives each example
its target classes, one column per slot (``None``: untargeted). Restarts and targets only ever run on
the survivors of the runs before them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Generator stream of the random target draw (far from any run index).
TARGET_STREAM = 1 << 40


@dataclass(frozen=True)
class Untargeted:
    """Every restart runs untargeted."""

    def slots(self, num_classes: int) -> int:
        return 0

    def trials(self, restarts: int, num_classes: int) -> list[tuple[int, int | None]]:
        return [(r, None) for r in range(restarts)]

    def assign(self, z0, y, ids, seed: int, num_classes: int):
        return None


@dataclass(frozen=True)
class RandomTarget:
    """One random wrong class per example, drawn from its own generator and shared by its restarts."""

    def slots(self, num_classes: int) -> int:
        return 1

    def trials(self, restarts: int, num_classes: int) -> list[tuple[int, int | None]]:
        return [(r, 0) for r in range(restarts)]

    def assign(self, z0, y, ids, seed: int, num_classes: int):
        from .engine import generators

        offs = torch.tensor([int(torch.randint(1, num_classes, (1,), generator=g))
                             for g in generators(seed, ids.tolist(), TARGET_STREAM)], dtype=torch.long)
        return ((y + offs.to(y.device)) % num_classes)[:, None]


@dataclass(frozen=True)
class RankedTargets:
    """The wrong classes ranked by clean logit (highest first), the first ``k`` of them (all when
    ``None``). Restarts cycle over them round-robin, or, with ``all=True``, every restart runs every
    target (DeepMind's IBP semantics, R·K runs)."""

    k: int | None = None
    all: bool = False

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError("the number of targets must be ≥ 1")

    def slots(self, num_classes: int) -> int:
        return min(self.k or num_classes - 1, num_classes - 1)

    def trials(self, restarts: int, num_classes: int) -> list[tuple[int, int | None]]:
        k = self.slots(num_classes)
        if self.all:
            return [(r, s) for r in range(restarts) for s in range(k)]
        return [(r, r % k) for r in range(restarts)]

    def assign(self, z0, y, ids, seed: int, num_classes: int):
        others = z0.masked_fill(torch.nn.functional.one_hot(y, num_classes).bool(), float("-inf"))
        return torch.sort(others, dim=1, descending=True, stable=True).indices[:, :self.slots(num_classes)]


TargetPolicy = Untargeted | RandomTarget | RankedTargets
