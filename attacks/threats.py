"""Threat models: the set of allowed adversarial inputs around a clean input (L∞, L2, L1).

The threat model owns everything geometric — random starts, projection and the membership check —
so the engine never clips anything itself (Foolbox 3's rule: every iterate is projected into the
threat set before it is evaluated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinfBall:
    """The L∞ ball of radius ``eps`` around ``x``, intersected with the box ``bounds``.

    Iterates are kept in input space (``x_adv``, not ``delta``) so that the point the model sees is
    exactly the point that is checked and reported: ``x_adv`` is clamped into the box last, hence
    lies in ``bounds`` exactly, and ``|x_adv - x| ≤ eps`` up to one rounding of ``x ± eps``.

    Projection order (clip to ±ε, then to the box) follows DeepMind's IBP ``_project_perturbation``
    (docs/methods.md, "Threat models and projection"). Units: [0, 1] pixel space.
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        eps = float(self.eps)
        lo, hi = (float(b) for b in self.bounds)
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite non-negative number, got {self.eps!r}")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"bounds must be finite with low < high, got {self.bounds!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", (lo, hi))

    norm = "linf"
    p = math.inf

    def steepest(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-norm steepest-ascent direction of a linear function with gradient ``grad``: its sign."""
        return grad.sign()

    def slack(self, x: torch.Tensor) -> float:
        """Nothing beyond ``tol``: one coordinate's rounding of ``x ± ε`` is all an L∞ distance sees."""
        return 0.0

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate interval of the ball ∩ box: ``[max(x−ε, lo), min(x+ε, hi)]``.

        It is never empty because ``x`` lies in both sets, so clamping to it equals clamping to the ball
        and then to the box — exactly, since clamping does no arithmetic. The engine computes it once per
        run and projects with a single ``clamp`` per step.
        """
        lo, hi = self.bounds
        return (x - self.eps).clamp_(min=lo), (x + self.eps).clamp_(max=hi)

    def project_to(self, x_adv: torch.Tensor, x: torch.Tensor, radius: torch.Tensor,
                   box=None) -> torch.Tensor:
        """The nearest point of the ball of per-example ``radius`` (≤ ``eps``) ∩ box: the minimum-norm
        attack's shrinking ball."""
        r = radius.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        low, high = self.box(x) if box is None else box
        return torch.clamp(torch.minimum(torch.maximum(x_adv, x - r), x + r), low, high)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, box=None) -> torch.Tensor:
        """Nearest point of the ball ∩ box: clamp to ``x ± eps``, then to ``bounds``."""
        low, high = self.box(x) if box is None else box
        return torch.clamp(x_adv, low, high)

    def sample(self, x: torch.Tensor, generators) -> torch.Tensor:
        """Uniform random start ``x + U(-eps, eps)``, projected (IBP ``random_init=1``).

        ``generators`` holds one CPU ``torch.Generator`` per row of ``x``: each example's noise depends
        only on its own generator, never on the batch it is in (:mod:`attacks.seeding`). The noise is drawn
        on the CPU and moved, so starts are identical on every device.
        """
        if len(generators) != x.shape[0]:
            raise ValueError("one generator per example is required")
        shape = x.shape[1:]
        noise = torch.stack([torch.rand(shape, generator=g, dtype=torch.float32) for g in generators]) \
            if len(generators) else torch.empty((0, *shape))
        noise = noise.to(device=x.device, dtype=x.dtype)
        return self.project(x + (2.0 * noise - 1.0) * self.eps, x)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example ‖x_adv − x‖∞."""
        if x.shape[0] == 0:
            return x.new_zeros(0)
        return (x_adv - x).flatten(1).abs().amax(1)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-example membership: ‖x_adv − x‖∞ ≤ eps + tol and x_adv inside the box (exactly)."""
        lo, hi = self.bounds
        flat = x_adv.flatten(1)
        inside_box = (flat >= lo).all(1) & (flat <= hi).all(1) & torch.isfinite(flat).all(1)
        return inside_box & (self.distance(x_adv, x) <= self.eps + tol)


def _norm_of(delta: torch.Tensor, p: int) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().sum(1) if p == 1 else flat.pow(2).sum(1).sqrt()


@dataclass(frozen=True)
class _LpBall:
    """The L2 or L1 ball of radius ``eps`` around ``x``, intersected with the box ``bounds``.

    ``project`` is the exact Euclidean projection onto ball ∩ box (not "scale into the ball, then clip",
    which lands elsewhere when the box is active), found per example by a search on the multiplier of
    the ball constraint (L2: the roots of the clipped norm's quadratic pieces, :meth:`_pieces`; L1:
    safeguarded Newton, :meth:`_newton`) on the rows outside the ball only; the search ends on the
    feasible side, so a projected point is inside the ball as its float32 norm judges it and within
    :meth:`slack` after float32 rounding of ``x + δ``.
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    p = 2
    norm = "l2"

    def __post_init__(self):
        LinfBall.__post_init__(self)  # the same checks of ε and the bounds

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image box only: the ball is not a box, :meth:`project` handles it."""
        lo, hi = self.bounds
        return torch.full_like(x, lo), torch.full_like(x, hi)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example ‖x_adv − x‖_p, accumulated in float64 (a sum of d terms)."""
        if x.shape[0] == 0:
            return x.new_zeros(0)
        return _norm_of((x_adv.double() - x.double()), self.p).to(x.dtype)

    def slack(self, x: torch.Tensor) -> float:
        """The rounding of ``x + δ`` in float32 (≤ 1.2e-7 per coordinate) summed the way the norm sums it."""
        d = x[0].numel() if x.shape[0] else 1
        return 1.2e-7 * (d if self.p == 1 else math.sqrt(d)) + 1e-6 * max(1.0, self.eps)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-example membership: inside the box exactly, ‖x_adv − x‖_p ≤ eps + tol + :meth:`slack`."""
        lo, hi = self.bounds
        flat = x_adv.flatten(1)
        inside_box = (flat >= lo).all(1) & (flat <= hi).all(1) & torch.isfinite(flat).all(1)
        return inside_box & (self.distance(x_adv, x) <= self.eps + tol + self.slack(x))

    def steepest(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-norm direction of steepest ascent of a linear function with gradient ``grad``."""
        flat = grad.flatten(1)
        if self.p == 2:
            return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(grad)
        top = flat.abs().argmax(1, keepdim=True)  # L1: all the budget on the largest coordinate
        return torch.zeros_like(flat).scatter(1, top, flat.gather(1, top).sign()).view_as(grad)

    def sample(self, x: torch.Tensor, generators) -> torch.Tensor:
        """A random point of the ball: a direction from the example's own generator (Gaussian for L2,
        Laplace-like for L1), a radius ε·u with u uniform, then the projection onto the box."""
        if len(generators) != x.shape[0]:
            raise ValueError("one generator per example is required")
        shape = x.shape[1:]
        rows = []
        for g in generators:
            v = torch.randn(shape, generator=g, dtype=torch.float32)
            if self.p == 1:
                v = v.sign() * torch.empty(shape).exponential_(generator=g)
            u = torch.rand((), generator=g, dtype=torch.float32)
            rows.append(v / _norm_of(v[None], self.p).clamp_min(1e-12) * self.eps * u)
        noise = torch.stack(rows) if rows else torch.empty((0, *shape))
        return self.project(x + noise.to(device=x.device, dtype=x.dtype), x)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, box=None) -> torch.Tensor:
        """The nearest point of ball ∩ box to ``x_adv`` (see the class docstring)."""
        return self.project_to(x_adv, x, None, box)

    def project_to(self, x_adv: torch.Tensor, x: torch.Tensor, radius, box=None) -> torch.Tensor:
        """The nearest point of the ball of per-example ``radius`` (``None``: ``eps``) ∩ box."""
        eps = torch.full((x.shape[0],), self.eps, dtype=x.dtype, device=x.device) if radius is None \
            else radius.to(device=x.device, dtype=x.dtype).clamp_max(self.eps)
        lo_b, hi_b = self.box(x) if box is None else box
        lo, hi = lo_b - x, hi_b - x  # the box, for δ
        u = x_adv - x
        d0 = torch.clamp(u, lo, hi)
        inside = _norm_of(d0, self.p) <= eps
        if bool(inside.all()):
            return torch.clamp(x + d0, lo_b, hi_b)
        # only the rows outside are searched: every row's search is its own, so the points are the same
        # to the bit as a search over all rows, and a batch where a few rows were pushed out by rounding
        # (an optimizer's already-projected step, evaluated again) costs a few rows' search
        out = None if not bool(inside.any()) else (~inside).nonzero()[:, 0]
        if out is not None:
            u, lo, hi, eps = u[out], lo[out], hi[out], eps[out]
        cap = torch.where(u >= 0, hi, -lo)  # how far each coordinate may move in its own direction
        mag = u.abs()
        if self.p == 2:
            scale = self._pieces(u, mag.flatten(1), cap.flatten(1), lo, hi, eps)
            delta = torch.clamp(u * scale.view(-1, *([1] * (u.ndim - 1))), lo, hi)
        else:
            t = self._newton(mag.flatten(1), cap.flatten(1), eps)
            delta = u.sign() * torch.minimum((mag - t.view(-1, *([1] * (u.ndim - 1)))).clamp_min(0), cap)
        delta = delta if out is None else d0.index_copy(0, out, delta)
        return torch.clamp(x + delta, lo_b, hi_b)

    #: Both searches stop once the point's norm is within this share of ε below it (or their bracket is
    #: this narrow): the point then uses all but a millionth of the budget.
    _TOL = 2.0 ** -20

    def _newton(self, mag, cap, eps):
        """L1: per row the smallest ``t ≥ 0`` with ``s(t) = Σ_i min((m_i − t)⁺, c_i) ≤ ε``, for rows whose
        clipped point is outside the ball (``s(0) > ε``).

        ``s`` is piecewise linear and non-increasing: coordinate i loses mass at rate 1 between
        ``m_i − c_i`` and ``m_i``. Newton's step ``t + (s(t) − ε) / n(t)``, with ``n(t)`` the number of
        coordinates losing mass at ``t``, is exact once ``t`` and the root share a linear piece; it is
        safeguarded by a bracket ``[a, b]`` (``s(a) > ε ≥ s(b)``, from ``0`` and ``max m``) and falls back
        to the bracket's midpoint when it would leave it. A step from the infeasible side is lengthened by
        a ``2⁻²¹`` share, so that a root reached up to rounding lands on the feasible side. The result is
        the bracket's feasible end, so the point is inside the ball exactly as the float32 sum judges it,
        found in 3–4 evaluations of ``s`` on an attack's iterates (25 or more halvings for a bisection)."""
        n = mag.shape[0]
        low = mag - cap  # where each coordinate starts to lose mass
        a = torch.zeros(n, device=mag.device, dtype=mag.dtype)
        b = mag.amax(1)
        t = a
        for _ in range(60):
            col = t[:, None]
            f = torch.minimum((mag - col).clamp_min(0), cap).sum(1) - eps
            feasible = f <= 0
            b, a = torch.where(feasible, t, b), torch.where(feasible, a, t)
            done = (feasible & (f >= -self._TOL * eps)) | (b - a <= self._TOL * b)
            if bool(done.all()):
                break
            slope = ((low < col) & (col < mag)).sum(1).to(mag.dtype)
            step = t + f / slope.clamp_min(1)
            step = torch.where(feasible, step, step + (step - t) * 2.0 ** -21)
            inside = (slope > 0) & (step > a) & (step < b)
            t = torch.where(done, b, torch.where(inside, step, (a + b) / 2))
        return b

    def _pieces(self, u, mag, cap, lo, hi, eps):
        """L2: per row the largest scale ``λ ∈ [0, 1]`` with ``‖clamp(λu, lo, hi)‖₂ ≤ ε`` (``λ = 1/(1 + t)``
        for the multiplier ``t``), for rows whose clipped point is outside the ball.

        ``g(λ) = Σ_i min(λ m_i, c_i)²`` (``m = |u|``, ``c``: each coordinate's room in its own direction)
        is piecewise quadratic and non-decreasing: coordinate i grows as ``λ m_i`` until it meets its cap
        at ``λ = c_i / m_i``. The quadratic of the piece at ``λ``, ``λ² A + B`` (``A``: Σ m_i² over the
        coordinates not yet capped, ``B``: Σ c_i² over the capped ones), lies on or above ``g`` everywhere
        (a capped coordinate contributes at most c_i², a free one at most λ² m_i²) and touches it at ``λ``,
        so its root ``√((ε² − B)/A)`` is feasible and at least as large as any feasible ``λ`` it was taken
        from: from ``λ = 1`` the roots climb to the answer and are exact once they share its piece, in
        2–3 evaluations of ``g`` on an attack's iterates, at most 5 measured (the bisection it replaces
        took about 36). Each
        root is taken a ``2⁻²²`` share short, and a bracket ``[a, b]`` (``a`` feasible as the float32
        norm judges it, ``b`` not) guards against rounding: a root outside it gives way to the midpoint.
        The search stops when the point spends all but a ``2⁻²⁰`` share of ε (or the bracket is that
        narrow) and returns ``a``, so the point is inside the ball as the float32 norm judges it."""
        n = mag.shape[0]
        a = torch.zeros(n, device=mag.device, dtype=mag.dtype)
        b = torch.ones_like(a)
        lam, done = b, torch.zeros(n, dtype=torch.bool, device=mag.device)
        sq, cq, e2 = mag * mag, cap * cap, eps * eps
        view = (-1, *([1] * (u.ndim - 1)))
        for _ in range(60):
            free = lam[:, None] * mag < cap
            big = torch.where(free, sq, torch.zeros_like(sq)).sum(1)
            fixed = torch.where(free, torch.zeros_like(cq), cq).sum(1)
            root = ((e2 - fixed).clamp_min(0) / big.clamp_min(1e-30)).sqrt() * (1 - 2.0 ** -22)
            ok = (root > a) & (root < b)
            # a finished row re-evaluates its feasible end (unchanged), so it ends where it would alone
            lam = torch.where(done, a, torch.where(ok, root, (a + b) / 2))
            size = _norm_of(torch.clamp(u * lam.view(view), lo, hi), 2)
            feasible = size <= eps
            a, b = torch.where(feasible, lam, a), torch.where(feasible, b, lam)
            done = done | (feasible & (size >= eps * (1 - self._TOL))) | (b - a <= self._TOL * b)
            if bool(done.all()):
                break
            lam = a  # the next piece from the feasible end
        return a


@dataclass(frozen=True)
class L2Ball(_LpBall):
    """The L2 ball of radius ``eps`` around ``x`` ∩ the box ``bounds`` (see :class:`_LpBall`)."""

    p = 2
    norm = "l2"


@dataclass(frozen=True)
class L1Ball(_LpBall):
    """The L1 ball of radius ``eps`` around ``x`` ∩ the box ``bounds`` (see :class:`_LpBall`)."""

    p = 1
    norm = "l1"


#: Threat models by norm name (the command line's ``--norm``).
BALLS = {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}
