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
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .targets import l1_knapsack


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

    def projected(self, state, threat) -> bool:
        """Whether ``step`` already returns the projection onto ``threat``'s ball ∩ box (then the engine
        does not project the point again)."""
        return False


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
    center: torch.Tensor | None = None  # the clean inputs, and the threat: the inner projection of an
    threat: object = None  # L2 or L1 step (None: the box alone, as for L∞)
    topk: torch.Tensor | None = None  # L1: the share of coordinates a step moves, per example
    sparsity: torch.Tensor | None = None  # L1: coordinates the best point had moved at the last check
    first: float = 0.0  # L1: the first step size, which a reset returns to


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
      in L∞ the engine applies the outer one, in L2 and L1 the step does (:meth:`projected`);
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

    def init(self, x: torch.Tensor, generators=None, *, steps: int = 0, box=None, threat=None, center=None,
             **run) -> APGDState:
        n = x.shape[0]
        lo, hi = box if box is not None else (torch.full_like(x, -math.inf), torch.full_like(x, math.inf))
        empty = torch.zeros(n, device=x.device, dtype=x.dtype)
        norm = getattr(threat, "norm", "linf")
        if norm == "linf":
            return APGDState(empty, x, x, torch.zeros_like(x), empty, empty, empty.long(), empty,
                             empty.bool(), lo, hi, 0, apgd_checkpoints(steps))
        # L1 (Croce & Hein, ICML 2021): the sparsity is adapted every 4% of the run instead
        checks = apgd_checkpoints(steps) if norm == "l2" else \
            tuple(range(max(int(0.04 * steps), 1), steps, max(int(0.04 * steps), 1)))
        d = float(x[0].numel()) if n else 1.0
        topk, sparsity = torch.full_like(empty, 0.2), torch.full_like(empty, d)
        if norm == "l1" and run.get("resumed"):  # from an earlier stage's point: its sparsity
            sparsity = ((x - center) != 0).flatten(1).sum(1).to(x.dtype)
            topk = sparsity / d / 1.5
        return APGDState(empty, x, x, torch.zeros_like(x), empty, empty, empty.long(), empty,
                         empty.bool(), lo, hi, 0, checks, center, threat, topk, sparsity)

    def projected(self, state: APGDState, threat) -> bool:
        """In L2 and L1 the step ends with the projection onto its threat's ball ∩ box, the one the engine
        would apply: projecting the point again would change it only by the rounding of ``x + (p − x)``
        and cost a search for the rows that rounding pushes out by a hair. In L∞ the momentum step is not
        clamped here, so the engine clamps it."""
        return state.threat is not None and state.threat == threat

    def step(self, x, grad, value, state: APGDState, lr):
        if state.threat is not None and state.threat.norm == "l1":
            return self._step_l1(x, grad, value, state, lr)
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
        if s.threat is None:  # L∞: sign steps, the ball ∩ box is the box (lo, hi)
            z = torch.clamp(x + eta * grad.sign(), s.lo, s.hi)
        else:  # L2: steps along the normalised gradient, projected onto the ball ∩ box
            z = s.threat.project(x + eta * s.threat.steepest(grad), s.center, (s.lo, s.hi))
        a = 1.0 if t == 0 else self.momentum
        proposal = x + a * (z - x) + (1 - a) * (x - x_prev)
        if s.threat is not None:
            proposal = s.threat.project(proposal, s.center, (s.lo, s.hi))
        return proposal, s._replace(x_prev=x, t=t + 1)

    def _step_l1(self, x, grad, value, s: APGDState, lr):
        """APGD's L1 step (Croce & Hein, "Mind the box", ICML 2021): the sign of the gradient on the
        ``topk`` share of coordinates with the largest gradient, normalised to an L1 step of ``η``, no
        momentum; every 4% of the run, if the best point moved clearly fewer coordinates than at the last
        check the step resets to ε and the search restarts from the best point, else the step shrinks by
        1.5 (down to ε/10); the share to move becomes a third less than the best point's sparsity."""
        t = s.t
        view = (-1, *([1] * (x.ndim - 1)))
        if t == 0:
            s = s._replace(eta=torch.full_like(value, float(lr)), best_x=x, best_grad=grad, best_value=value,
                           first=float(lr))
        else:
            better = value > s.best_value
            s = s._replace(best_x=torch.where(better.view(view), x, s.best_x),
                           best_grad=torch.where(better.view(view), grad, s.best_grad),
                           best_value=torch.where(better, value, s.best_value))
        if t in s.checkpoints:
            d = float(x[0].numel())
            moved = ((s.best_x - s.center) != 0).flatten(1).sum(1).to(value.dtype)
            reset = moved / s.sparsity.clamp_min(1) < 0.95
            eta = torch.where(reset, torch.full_like(s.eta, s.first), s.eta / 1.5)
            eta = eta.clamp(s.first / 10, s.first)
            x = torch.where(reset.view(view), s.best_x, x)
            grad = torch.where(reset.view(view), s.best_grad, grad)
            s = s._replace(eta=eta, topk=moved / d / 1.5, sparsity=moved)
        flat = grad.flatten(1).abs()
        d = flat.shape[1]
        k = (s.topk * d).clamp(1, d).long()  # coordinates to move, per example
        # the k-th largest |g| of each row: the largest k are enough (the same values a full sort gives)
        cut = flat.topk(int(k.max()) if k.numel() else 1, 1).values.gather(1, (k - 1)[:, None])
        sparse = (grad.sign() * (grad.abs() >= cut.view(view))).flatten(1)
        direction = (sparse / sparse.abs().sum(1, keepdim=True).clamp_min(1e-12)).view_as(grad)
        proposal = s.threat.project(x + s.eta.view(view) * direction, s.center, (s.lo, s.hi))
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


class MinNormState(NamedTuple):
    radius: torch.Tensor  # [N] the current ball's radius (∞ until the first estimate)
    center: torch.Tensor  # the clean inputs
    lo: torch.Tensor
    hi: torch.Tensor
    threat: object
    t: int
    steps: int


@dataclass(frozen=True)
class MinNorm(GradientStep):
    """The fast minimum-norm attack's step (FMN, Pintor et al., NeurIPS 2021) as an optimizer.

    Each example keeps a radius r that follows the boundary: where the iterate is adversarial r shrinks
    to ``(1 − γ)·min(r, ‖δ‖)``, elsewhere it grows to ``(1 + γ)·r``; the first r is the distance to the
    boundary of the margin's linearisation, ``‖δ‖ + max(−m, 0)/‖∇m‖_*`` (dual norm). The iterate moves
    along the L2-normalised gradient by the schedule's step (cosine-annealed) and is projected onto the
    ball of radius r ∩ box (:meth:`project_to` of the threat); γ decays from ``gamma`` to 0 by a cosine.
    With the ``MinDistance`` tracking of the engine, the smallest adversarial point found is kept.
    ``value`` must be adversarial where > 0 (the untargeted margin, or a targeted one).

    ``direction``: ``"l2"`` moves along the L2-normalised gradient in every norm (FMN's rule);
    ``"steepest"`` moves along the threat's steepest-ascent direction where that is dense — the sign of
    the gradient in L∞, where an L2-normalised step of the same size barely moves each coordinate and
    the search settles a few percent outside the boundary — and along the L2-normalised gradient in L2
    and L1 (L1's steepest direction is one coordinate, too sparse to follow a boundary).
    """

    gamma: float = 0.05
    direction: str = field(default="l2", metadata={"omit_default": True})
    name = "min-norm"

    def __post_init__(self):
        if self.direction not in ("l2", "steepest"):
            raise ValueError("the minimum-norm direction is 'l2' or 'steepest'")

    def init(self, x: torch.Tensor, generators=None, *, steps: int = 0, box=None, threat=None, center=None,
             **run) -> MinNormState:
        if threat is None or center is None:
            raise ValueError("the minimum-norm step needs the threat and the clean inputs")
        lo, hi = box if box is not None else threat.box(center)
        radius = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)
        return MinNormState(radius, center, lo, hi, threat, 0, steps)

    def step(self, x, grad, value, state: MinNormState, lr):
        s, th = state, state.threat
        delta = x - s.center
        size = th.distance(x, s.center)
        flat = grad.flatten(1)
        dual = {math.inf: flat.abs().sum(1), 2: flat.norm(dim=1), 1: flat.abs().amax(1)}[th.p]
        adv = value > 0
        gamma = self.gamma * (1 + math.cos(math.pi * s.t / max(s.steps, 1))) / 2
        first = torch.where(adv, size, size + (-value).clamp_min(0) / dual.clamp_min(1e-12))
        grown = torch.where(adv, torch.minimum(s.radius, size) * (1 - gamma), s.radius * (1 + gamma))
        radius = torch.where(torch.isinf(s.radius), first, grown).clamp_max(th.eps)
        if self.direction == "steepest" and th.p == math.inf:
            unit = grad.sign()
        else:
            unit = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(grad)
        proposal = th.project_to(s.center + delta + float(lr) * unit, s.center, radius, (s.lo, s.hi))
        return proposal, s._replace(radius=radius, t=s.t + 1)


def min_norm(gamma: float = 0.05, direction: str = "l2") -> MinNorm:
    """The fast minimum-norm step (γ₀ = 0.05, as FMN)."""
    return MinNorm(gamma, direction)


class HyperplaneState(NamedTuple):
    center: torch.Tensor  # the clean inputs
    lo: torch.Tensor
    hi: torch.Tensor
    threat: object


def project_on_hyperplane(grad: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                          p: float, halvings: int = 60) -> torch.Tensor:
    """``[N, ...]``: the smallest ``δ`` in the threat's norm ``p`` (1, 2 or ∞) with ``grad · δ = c`` per
    row and ``lo ≤ δ ≤ hi`` (``lo ≤ 0 ≤ hi``), or, where the box cannot reach ``c``, the box corner that
    comes nearest. In L2 and L∞, by the optimality conditions the answer is ``clamp(s·d, lo, hi)`` for one
    scalar ``s ≥ 0`` with ``d = sign(c)·grad`` in L2 and ``sign(c)·sign(grad)`` in L∞. Where the box is
    not in the way that is the closed form ``s = |c| / (grad · d)``; elsewhere ``grad · clamp(s·d, lo,
    hi)`` grows monotonically with ``s``, so ``s`` is found by bisection, each row on its own, halving
    until the bracket stops changing (checked every fourth halving, as the ball projection does). In L1
    the problem is a fractional knapsack (:func:`~attacks.targets.l1_knapsack`)."""
    if p not in (1, 2, math.inf):
        raise ValueError("the hyperplane projection is defined for the L1, L2 and L∞ threat models")
    g = grad.flatten(1)
    lo_f, hi_f = lo.flatten(1), hi.flatten(1)
    if p == 1:
        return l1_knapsack(g, c, lo_f, hi_f)[0].view_as(grad)
    sign = torch.sign(c)
    d = sign[:, None] * (g if p == 2 else g.sign())
    target = c.abs()
    free = target / (g * d).sum(1).clamp_min(1e-30)  # the unboxed solution's scalar
    step = free[:, None] * d
    boxed = ((step < lo_f) | (step > hi_f)).any(1)
    if bool(boxed.any()):
        room = torch.where(d > 0, hi_f, torch.where(d < 0, -lo_f, torch.zeros_like(d)))
        s_max = (room / d.abs().clamp_min(1e-30)).masked_fill(d == 0, 0).amax(1)  # every coordinate full
        low, high = torch.zeros_like(s_max), s_max
        for i in range(halvings):
            mid = (low + high) / 2
            short = (g * torch.clamp(mid[:, None] * d, lo_f, hi_f)).sum(1) * sign < target
            new_low, new_high = torch.where(short, mid, low), torch.where(short, high, mid)
            done = i % 4 == 3 and torch.equal(new_low, low) and torch.equal(new_high, high)
            low, high = new_low, new_high
            if done:
                break
        step = torch.where(boxed[:, None], torch.clamp(high[:, None] * d, lo_f, hi_f), step)
    return step.view_as(grad)


@dataclass(frozen=True)
class Hyperplane(GradientStep):
    """The step of FAB (Croce & Hein, ICML 2020) for a fixed radius, as an optimizer: the objective's
    first-order model at the iterate ``x`` puts the boundary on the hyperplane ``value + grad·(u − x) = 0``;
    the step goes to a convex combination of the nearest points of that hyperplane (within the box) to
    ``x`` and to the clean input, ``(1 − α)(x + η δₓ) + α(x₀ + η δ₀)`` with ``α = min(‖δₓ‖ / (‖δₓ‖ + ‖δ₀‖),
    alpha_max)`` and the overshoot ``η``; an adversarial iterate steps back to ``x₀ + β(x − x₀)``. Unlike
    an ascent step it jumps to where the linear model says the boundary is, however far, and the bias
    towards the clean input and the backward step keep it near, so FAB is a minimum-norm search. The
    engine projects every iterate onto its ball ∩ box; in an annealing stage (``Attack.anneal``) the
    search runs in the larger ball and hands its nearest adversarial point on (``stage_keeps``), which
    is how FAB's unconstrained search followed by "is it within ε?" is run. ``value`` must be
    adversarial where > 0 (a pair margin ``z_t − z_y`` for the targeted form). The step size of the
    schedule is not used. L1, L2 and L∞ (the hyperplane projection in the threat's norm)."""

    eta: float = 1.05
    alpha_max: float = 0.1
    beta: float = 0.9
    name = "hyperplane"
    #: in a larger annealing ball this rule is a minimum-norm search: keep its nearest adversarial point
    stage_keeps = "nearest"

    def init(self, x: torch.Tensor, generators=None, *, steps: int = 0, box=None, threat=None, center=None,
             **run) -> HyperplaneState:
        if threat is None or center is None:
            raise ValueError("the hyperplane step needs the threat and the clean inputs")
        if getattr(threat, "p", None) not in (1, 2, math.inf):
            raise ValueError("the hyperplane (FAB) step is defined for the L1, L2 and L∞ threat models")
        lo, hi = box if box is not None else threat.box(center)
        return HyperplaneState(center, lo, hi, threat)

    def step(self, x, grad, value, state: HyperplaneState, lr):
        s = state
        p = s.threat.p
        back = (value > 0).view(-1, *([1] * (x.ndim - 1)))
        # δₓ from x, δ₀ from the clean input, both kept in the box: value + grad·(x + δₓ − x) = 0, ...
        dx = project_on_hyperplane(grad, -value, s.lo - x, s.hi - x, p)
        c0 = -value - (grad * (s.center - x)).flatten(1).sum(1)
        d0 = project_on_hyperplane(grad, c0, s.lo - s.center, s.hi - s.center, p)
        nx, n0 = (t.flatten(1).norm(p=p, dim=1) for t in (dx, d0))
        alpha = (nx / (nx + n0).clamp_min(1e-30)).clamp_max(self.alpha_max)
        alpha = alpha.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        proposal = (1 - alpha) * (x + self.eta * dx) + alpha * (s.center + self.eta * d0)
        # an adversarial iterate (a minimum-norm search goes on after a success) steps back towards x₀
        proposal = torch.where(back, s.center + self.beta * (x - s.center), proposal)
        return torch.clamp(proposal, s.lo, s.hi), s
