"""Objectives: per-example values that an attack *maximises* (docs/methods.md, "Objectives").

Every objective is a small frozen value called as ``objective(logits, y, delta, aux) -> [N]``:
``logits`` at the current iterate, true labels ``y``, the current perturbation ``delta = x_adv − x``
(attached to the graph, for objectives that depend on it) and ``aux``, a dict of per-example tensors
(``"target"`` for targeted objectives; ``"loss0"`` and ``"grad0"`` for the linearity gap). Success is
never decided here; the engine decides it from the logits (docs/protocol.md).

Definitions follow DeepMind's IBP library (``_maximize_margin`` etc.).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def per_example_cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``−log softmax(z)_y`` per example (the ℓ of the LLR paper); the one definition."""
    return F.cross_entropy(z, y, reduction="none")


class ObjectiveBase:
    """Defaults of the :class:`~attacks.protocols.Objective` interface: the perturbation is passed, no
    target is needed, nothing is prepared, and the margin is computed from the logits."""

    needs_delta = True
    needs_target = False

    def prepare(self, model, x, y, aux):
        return aux

    def untargeted_margin(self, z, y, value):
        return margin_of(z, y)


def _other_max(z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """max_{j ≠ cls} z_j per row."""
    mask = F.one_hot(cls, z.shape[1]).bool()
    return z.masked_fill(mask, float("-inf")).amax(1)


def margin_of(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted margin ``max_{j≠y} z_j − z_y``; an example is misclassified iff it is > 0."""
    return _other_max(z, y) - z.gather(1, y[:, None])[:, 0]


@dataclass(frozen=True)
class Margin(ObjectiveBase):
    """Untargeted margin ``max_{j≠y} z_j − z_y`` (IBP ``UntargetedPGDAttack``; unclipped).

    ``clip`` caps it from above (LLR-DM's monitoring attack uses ``min(M, 30)``).
    """

    clip: float | None = None
    name = "margin"
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        m = margin_of(z, y)
        return m.clamp(max=self.clip) if self.clip is not None else m

    def untargeted_margin(self, z, y, value):
        return value if self.clip is None else margin_of(z, y)  # unclipped, the value is the margin


@dataclass(frozen=True)
class CrossEntropy(ObjectiveBase):
    """Cross-entropy ``−log softmax(z)_y`` (IBP's "Xent" variants)."""

    name = "cross-entropy"
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        return per_example_cross_entropy(z, y)


@dataclass(frozen=True)
class TargetedMargin(ObjectiveBase):
    """Pair margin ``z_t − z_y`` towards ``aux["target"]`` (IBP ``MultiTargetedPGDAttack``)."""

    name = "targeted-margin"
    needs_target = True
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        t = aux["target"]
        return z.gather(1, t[:, None])[:, 0] - z.gather(1, y[:, None])[:, 0]


@dataclass(frozen=True)
class MostLikelyTarget(ObjectiveBase):
    """``z_t − max_{j≠t} z_j``: make ``t`` the arg-max (IBP ``RandomMostLikelyPGDAttack``)."""

    name = "most-likely-target"
    needs_target = True
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        t = aux["target"]
        return z.gather(1, t[:, None])[:, 0] - _other_max(z, t)


@dataclass(frozen=True)
class LinearityGap(ObjectiveBase):
    """The local-linearity gap ``g(δ; x) = |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)|``.

    Qin et al. 2019, Eq. (5); γ(ε, x) = max_{δ∈B(ε)} g(δ; x). ℓ is the per-example ``loss(logits, y)``,
    cross-entropy by default (the paper's); other losses serve closed-form tests. ``ℓ(x)`` and
    ``∇ₓℓ(x)`` are computed once per batch by :meth:`prepare`, or supplied by the caller in ``aux``
    (``loss0``, ``grad0``), as the LLR trainer does with its nominal-batch quantities.
    ``grad_mode="deepmind"`` stops the gradient through δ in the linear term, as DeepMind's
    ``local_linearity`` does; ``"exact"`` keeps it.
    """

    grad_mode: str = "deepmind"
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_cross_entropy
    name = "linearity-gap"

    def __post_init__(self):
        if self.grad_mode not in ("deepmind", "exact"):
            raise ValueError("grad_mode must be 'deepmind' or 'exact'")

    def loss_and_grad(self, model, x, y):
        """Per-example ``ℓ(x)`` and ``∇ₓℓ(x)`` (the gradient of the *sum*: the gradient of a mean would
        shrink δᵀ∇ℓ by the batch size), detached."""
        with torch.enable_grad():
            x0 = x.detach().requires_grad_(True)
            loss = self.loss(model(x0), y)
            (grad,) = torch.autograd.grad(loss.sum(), x0)
        return loss.detach(), grad.detach()

    def prepare(self, model, x, y, aux):
        """Add ``loss0`` = ℓ(x) and ``grad0`` = ∇ₓℓ(x) unless the caller supplied them."""
        if "loss0" in aux and "grad0" in aux:
            return aux
        loss, grad = self.loss_and_grad(model, x, y)
        return {**aux, "loss0": loss, "grad0": grad}

    @staticmethod
    def terms(loss_adv: torch.Tensor, loss0: torch.Tensor, delta: torch.Tensor,
              grad0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(δ; x), δᵀ∇ₓℓ(x))`` per example from ℓ(x+δ), ℓ(x), δ and ∇ₓℓ(x) — the one definition of
        the gap, used by the search, the γ measurement, Proposition 4.1's check and the LLR loss."""
        lin = (delta * grad0).flatten(1).sum(1)
        return (loss_adv - loss0 - lin).abs(), lin

    def __call__(self, z, y, delta, aux):
        d = delta.detach() if self.grad_mode == "deepmind" else delta
        return self.terms(self.loss(z, y), aux["loss0"], d, aux["grad0"])[0]


_DLR_EPS = 1e-12


@dataclass(frozen=True)
class DLR(ObjectiveBase):
    """Difference of logits ratio (Croce & Hein 2020), maximised: ``(max_{j≠y} z_j − z_y) / (z_π1 − z_π3)``
    with ``π`` the logits sorted in decreasing order. Invariant to shifting and scaling the logits, so a
    rescaled output cannot flatten it. Needs 3 classes; with fewer it falls back to the margin (and
    warns once)."""

    name = "dlr"
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        if z.shape[1] < 3:
            warnings.warn("DLR needs at least 3 classes; using the margin instead", RuntimeWarning,
                          stacklevel=2)
            return margin_of(z, y)
        top = z.sort(dim=1, descending=True).values
        return margin_of(z, y) / (top[:, 0] - top[:, 2] + _DLR_EPS)


@dataclass(frozen=True)
class TargetedDLR(ObjectiveBase):
    """Targeted DLR (Croce & Hein 2020), maximised: ``(z_t − z_y) / (z_π1 − (z_π3 + z_π4) / 2)`` towards
    ``aux["target"]``. Needs 4 classes; with fewer it falls back to the pair margin ``z_t − z_y`` (and
    warns once)."""

    name = "targeted-dlr"
    needs_target = True
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        t = aux["target"]
        pair = z.gather(1, t[:, None])[:, 0] - z.gather(1, y[:, None])[:, 0]
        if z.shape[1] < 4:
            warnings.warn("targeted DLR needs at least 4 classes; using z_t − z_y instead", RuntimeWarning,
                          stacklevel=2)
            return pair
        top = z.sort(dim=1, descending=True).values
        return pair / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + _DLR_EPS)


@dataclass(frozen=True)
class ProbabilityMargin(ObjectiveBase):
    """Probability margin ``max_{j≠y} p_j − p_y`` with ``p = softmax(z)`` (the objective of PMA, Xie et al.,
    CVPR 2025), maximised. In (−1, 1), positive exactly when the example is misclassified (softmax keeps
    the logits' order), unchanged by shifting the logits. Its gradient weighs the pair margin towards the
    most likely wrong class by both probabilities and the rest of the classes by theirs, so it pulls
    towards the nearest wrong class like a targeted objective while the others still count. Like every
    softmax quantity it saturates: with a logit gap beyond about 100 the gradient is zero in float32, where
    the cross-entropy's is not. Computed in float32 at least. Measured as a first pass and as a
    diverse-restart round beside the battery's members (docs/methods.md, "Objectives")."""

    name = "probability-margin"
    needs_delta = False

    def __call__(self, z, y, delta=None, aux=None):
        p = torch.softmax(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, 1)
        return _other_max(p, y) - p.gather(1, y[:, None])[:, 0]


margin = Margin()
cross_entropy = CrossEntropy()
targeted_margin = TargetedMargin()
most_likely_target = MostLikelyTarget()
linearity_gap = LinearityGap()

OBJECTIVES = {
    "margin": Margin,
    "cross-entropy": CrossEntropy,
    "ce": CrossEntropy,
    "targeted-margin": TargetedMargin,
    "most-likely-target": MostLikelyTarget,
    "linearity-gap": LinearityGap,
    "dlr": DLR,
    "targeted-dlr": TargetedDLR,
    "probability-margin": ProbabilityMargin,
    "pma": ProbabilityMargin,
}
