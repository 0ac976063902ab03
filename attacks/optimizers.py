"""Ascent optimizers on the adversarial input, as ``(init, update)`` pairs with explicit state.

Shaped after Optax: ``state = opt.init(x_adv)``; ``step, state = opt.update(grad, state, lr)``;
the caller adds ``step`` and projects. Updates *ascend* (``grad`` is the gradient of the objective
to maximise). Every state field with a leading batch dimension is a tensor, so the engine can drop
solved examples from the active batch by indexing the state (:func:`select`).

``init(x, generators, *, steps, box)``: the engine also tells an optimizer the length of the run and the
feasible interval ``box = (lo, hi)`` of each coordinate; rules that need them (:class:`APGD`'s
checkpoints and its inner projection) keep them in their state, the others ignore them.
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
    using Adam"). The arithmetic follows ``torch.optim.Adam``'s single-tensor path
    operation for operation, so it matches ``torch.optim.Adam(eps=1e-9)`` step for step (tested).
    The moments are not reset when the iterate is clipped.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-9
    name = "adam"

    def init(self, x: torch.Tensor, generators=None, **run) -> AdamState:
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

    def init(self, x: torch.Tensor, generators=None, **run) -> SignState:
        return SignState(0)

    def update(self, grad: torch.Tensor, state: SignState, lr: float):
        return grad.sign() * lr, SignState(state.t + 1)


class APGDState(NamedTuple):
    eta: torch.Tensor  # [N] current step size per example
    x_prev: torch.Tensor  # the iterate before the current one (momentum)
    best_x: torch.Tensor  # highest-objective iterate so far, its gradient and value
    best_grad: torch.Tensor
    best_value: torch.Tensor
    prev_value: torch.Tensor  # objective at the previous iterate
    rises: torch.Tensor  # [N] iterates since the last checkpoint whose objective rose
    best_at_check: torch.Tensor  # best value at the last checkpoint
    halved: torch.Tensor  # [N] bool: the step was halved at the last checkpoint
    lo: torch.Tensor  # the feasible interval of each coordinate (for the inner projection)
    hi: torch.Tensor
    t: int  # index of the iterate the next step starts from
    checkpoints: tuple  # iterate indices where the step-size rule is applied


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
    """Where APGD applies its step-size rule in a run of ``steps`` steps (Croce & Hein 2020, §3.2).

    Fractions ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` while ≤ 1;
    checkpoint ``j`` is iterate ``ceil(p_j · steps)``. For 100 steps: 22, 41, 57, 70, 80, 87, 93, 99.
    """
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1 + 1e-12:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = sorted({math.ceil(q * steps - 1e-9) for q in p[1:]})
    return tuple(w for w in points if 0 < w < steps)


@dataclass(frozen=True)
class APGD(GradientStep):
    """Auto-PGD's step-size rule (Croce & Hein, ICML 2020) as an optimizer with explicit state.

    * sign steps of a per-example size ``η`` that starts at the schedule's value (``2ε`` in the presets);
    * momentum: ``z = P(x + η·sign ∇)``, next ``= P(x + α(z − x) + (1 − α)(x − x_prev))`` with
      ``α = momentum`` (0.75; the first step has none). ``P`` is the projection on the feasible box;
      the engine applies the outer one;
    * at each checkpoint (:func:`apgd_checkpoints`) an example's ``η`` is halved when fewer than
      ``rho`` (75%) of the iterates since the last checkpoint raised its objective, or when its step
      was not halved at the last checkpoint and its best objective has not improved since; a halved
      example restarts from its best point (with that point's gradient and no momentum).

    Everything is per example, so the rule does not depend on the batch. The schedule is read once, at
    the first step; the rule sets ``η`` after that.
    """

    momentum: float = 0.75
    rho: float = 0.75
    name = "apgd"

    def init(self, x: torch.Tensor, generators=None, *, steps: int = 0, box=None, **run) -> APGDState:
        n = x.shape[0]
        lo, hi = box if box is not None else (torch.full_like(x, -math.inf), torch.full_like(x, math.inf))
        empty = torch.zeros(n, device=x.device, dtype=x.dtype)
        return APGDState(empty, x, x, torch.zeros_like(x), empty, empty, empty.long(), empty,
                         empty.bool(), lo, hi, 0, apgd_checkpoints(steps))

    def step(self, x, grad, value, state: APGDState, lr):
        s, t = state, state.t
        if t == 0:
            eta = torch.full_like(value, float(lr))
            s = s._replace(eta=eta, x_prev=x, best_x=x, best_grad=grad, best_value=value, prev_value=value,
                           rises=torch.zeros_like(s.rises), best_at_check=value)
        else:
            better = value > s.best_value
            col = better.view(-1, *([1] * (x.ndim - 1)))
            s = s._replace(best_x=torch.where(col, x, s.best_x),
                           best_grad=torch.where(col, grad, s.best_grad),
                           best_value=torch.where(better, value, s.best_value),
                           rises=s.rises + (value > s.prev_value).long(), prev_value=value)
        x_prev = s.x_prev
        if t in s.checkpoints:
            since = t - max([0, *(w for w in s.checkpoints if w < t)])
            halve = (s.rises < self.rho * since) | (~s.halved & (s.best_value <= s.best_at_check))
            col = halve.view(-1, *([1] * (x.ndim - 1)))
            x, grad = torch.where(col, s.best_x, x), torch.where(col, s.best_grad, grad)
            x_prev = torch.where(col, s.best_x, x_prev)
            s = s._replace(eta=torch.where(halve, s.eta / 2, s.eta), halved=halve, best_at_check=s.best_value,
                           rises=torch.zeros_like(s.rises))
        eta = s.eta.view(-1, *([1] * (x.ndim - 1)))
        z = torch.clamp(x + eta * grad.sign(), s.lo, s.hi)
        a = 1.0 if t == 0 else self.momentum
        proposal = x + a * (z - x) + (1 - a) * (x - x_prev)
        return proposal, s._replace(x_prev=x, t=t + 1)


def apgd(momentum: float = 0.75, rho: float = 0.75) -> APGD:
    """Auto-PGD's step-size rule (momentum 0.75, checkpoint threshold 75%)."""
    return APGD(momentum, rho)


def adam(beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-9) -> Adam:
    """DeepMind's attack Adam (ε = 1e-9, not PyTorch's default 1e-8)."""
    return Adam(beta1, beta2, eps)


def sign() -> Sign:
    """Sign-gradient ascent."""
    return Sign()
