"""Ascent optimizers on the adversarial input, as ``(init, update)`` pairs with explicit state.

Shaped after Optax: ``state = opt.init(x_adv)``; ``step, state = opt.update(grad, state, lr)``;
the caller adds ``step`` and projects. Updates *ascend* (``grad`` is the gradient of the objective
to maximise). Every state field with a leading batch dimension is a tensor, so the engine can drop
solved examples from the active batch by indexing the state (:func:`select`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


class AdamState(NamedTuple):
    m: torch.Tensor
    v: torch.Tensor
    t: int


class SignState(NamedTuple):
    t: int


def select(state, index: torch.Tensor):
    """The state restricted to rows ``index``: tensor fields are indexed, lists (one object per row, e.g.
    per-example generators) are picked from, scalars are kept."""
    rows = index.tolist() if any(isinstance(f, list) for f in state) else None
    return type(state)(*[f[index] if isinstance(f, torch.Tensor) else [f[i] for i in rows]
                         if isinstance(f, list) else f for f in state])


class GradientStep:
    """The :class:`~attacks.protocols.Optimizer` ``step`` of an ``(init, update)`` gradient rule:
    ``x + update(grad)`` (the engine projects it)."""

    uses_gradient = True

    def step(self, x, grad, value, state, lr):
        update, state = self.update(grad, state, lr)
        return x + update, state


@dataclass(frozen=True)
class Adam(GradientStep):
    """Adam on the perturbation: β = (0.9, 0.999), ε = 1e-9, bias-corrected, fresh state per restart.

    DeepMind's ``UnrolledAdam`` (IBP ``attacks.py``; LLR supplementary F.1: "we do the update steps
    using Adam"); ALGORITHMS.md §1. The arithmetic follows ``torch.optim.Adam``'s single-tensor path
    operation for operation, so it matches ``torch.optim.Adam(eps=1e-9)`` step for step (tested).
    The moments are not reset when the iterate is clipped.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-9
    name = "adam"

    def init(self, x: torch.Tensor, generators=None) -> AdamState:
        return AdamState(torch.zeros_like(x), torch.zeros_like(x), 0)

    def update(self, grad: torch.Tensor, state: AdamState, lr: float):
        """Returns ``(step, state)``. The moment tensors are updated in place (the engine owns them)."""
        t = state.t + 1
        m = state.m.lerp_(grad, 1 - self.beta1)
        v = state.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1 = 1 - self.beta1 ** t
        bias2_sqrt = math.sqrt(1 - self.beta2 ** t)
        denom = v.sqrt().div_(bias2_sqrt).add_(self.eps)
        # torch.optim.Adam adds -lr/bias1 · m/denom; we ascend, so the sign flips.
        step = torch.div(m, denom).mul_(lr / bias1)
        return step, AdamState(m, v, t)


@dataclass(frozen=True)
class Sign(GradientStep):
    """Signed-gradient steps ``lr · sign(∇)`` (FGSM / BIM; Goodfellow et al. 2015, FGSM-20 in F.1)."""

    name = "sign"

    def init(self, x: torch.Tensor, generators=None) -> SignState:
        return SignState(0)

    def update(self, grad: torch.Tensor, state: SignState, lr: float):
        return grad.sign() * lr, SignState(state.t + 1)


def adam(beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-9) -> Adam:
    """DeepMind's attack Adam (ε = 1e-9, not PyTorch's default 1e-8)."""
    return Adam(beta1, beta2, eps)


def sign() -> Sign:
    """Sign-gradient ascent."""
    return Sign()
