"""Step-size schedules, indexed by the 0-based step *before* the update.

Boundaries are fractions of the run, so the paper's "0.1 until step 100, 0.01 until 150, 0.001 until
200" (LLR supplementary F.1; IBP step-size string ``.1:.01@100:.001@150``) keeps its shape when the
number of steps changes (docs/methods.md, "Schedules"). A schedule may be *relative*: its values
are then multiplied by ε (FGSM-20's ε/10, or ``--step-size 0.25eps``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Piecewise:
    """Piecewise-constant step size: ``values[i]`` from step ``ceil(boundaries[i-1]·steps)`` on.

    ``values`` has one more entry than ``boundaries``; boundaries are increasing fractions in (0, 1).
    ``relative=True`` means the values are multiples of ε.
    """

    values: tuple[float, ...]
    boundaries: tuple[float, ...] = ()
    relative: bool = False

    def __post_init__(self):
        values = tuple(float(v) for v in self.values)
        bounds = tuple(float(b) for b in self.boundaries)
        if len(values) != len(bounds) + 1:
            raise ValueError("a piecewise schedule needs exactly one more value than boundaries")
        if any(v < 0 for v in values):
            raise ValueError("step sizes must be non-negative")
        if any(not 0.0 < b < 1.0 for b in bounds) or list(bounds) != sorted(bounds):
            raise ValueError("boundaries must be increasing fractions of the run in (0, 1)")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "boundaries", bounds)

    def __call__(self, step: int, steps: int, eps: float = 1.0) -> float:
        """Step size at 0-based ``step`` of a run of ``steps`` steps (ε multiplies relative values)."""
        i = sum(1 for b in self.boundaries if step >= b * steps)
        value = self.values[i]
        return value * eps if self.relative else value

    def scaled_to(self, first: float, relative: bool | None = None) -> "Piecewise":
        """The same shape with its first value set to ``first`` (later values keep their ratios)."""
        if self.values[0] == 0:
            raise ValueError("cannot rescale a schedule that starts at 0")
        k = float(first) / self.values[0]
        return replace(self, values=tuple(v * k for v in self.values),
                       relative=self.relative if relative is None else relative)


def constant(value: float, relative: bool = False) -> Piecewise:
    """A constant step size (MultiTargeted and γ: Adam lr 0.1, LLR supplementary F.1/F.4)."""
    return Piecewise((value,), (), relative)


def piecewise(values, boundaries, relative: bool = False) -> Piecewise:
    """Piecewise-constant step size with ``boundaries`` as fractions of the run."""
    return Piecewise(tuple(values), tuple(boundaries), relative)


def paper_decay(base: float = 0.1) -> Piecewise:
    """The Untargeted / Random-Targeted schedule of the LLR paper (F.1): base, base/10 @50%, base/100 @75%."""
    return Piecewise((base, base / 10, base / 100), (0.5, 0.75))


@dataclass(frozen=True)
class Cosine:
    """Cosine annealing from ``first`` to ``first · last`` over the run (the fast minimum-norm attack's
    step size, Pintor et al. 2021); ``relative=True`` multiplies by ε."""

    first: float
    last: float = 0.01
    relative: bool = False

    def __post_init__(self):
        if not (self.first > 0 and 0 <= self.last <= 1):
            raise ValueError("a cosine schedule needs first > 0 and 0 ≤ last ≤ 1")

    def __call__(self, step: int, steps: int, eps: float = 1.0) -> float:
        import math

        frac = step / max(steps - 1, 1)
        value = self.first * (self.last + (1 - self.last) * (1 + math.cos(math.pi * frac)) / 2)
        return value * eps if self.relative else value

    def scaled_to(self, first: float, relative: bool | None = None) -> Cosine:
        return replace(self, first=float(first), relative=self.relative if relative is None else relative)
