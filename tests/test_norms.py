"""L2 and L1 threat models (attacks.threats), the attacks for each norm, the minimum-norm attack, and the
robustness curve (robusteval.reports.curve)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import attacks
from robusteval import records, reports
from robusteval.cli import cli

BALLS = [(attacks.L2Ball, 0.6), (attacks.L1Ball, 0.9), (attacks.LinfBall, 0.2)]


def _brute_nearest(ball, x: torch.Tensor, p: torch.Tensor, samples: int = 400_000) -> torch.Tensor:
    """The nearest of many feasible points (uniform in the ε-cube around ``x``, clipped to the box and
    kept when inside the ball) to ``p``: a brute-force upper bound on the projection's distance."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(samples, x.numel(), generator=g, dtype=torch.float64)
    c = (x + (u * 2 - 1) * ball.eps).clamp(0, 1)
    c = c[ball.distance(c, x.expand_as(c)) <= ball.eps]
    return (c - p).norm(dim=1).min()


@pytest.mark.parametrize("ball, eps", BALLS)
def test_projection_is_the_nearest_feasible_point(ball, eps):
    """Against brute force on small vectors, with the box active (points near the faces of [0, 1])."""
    threat = ball(eps)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, generator=g, dtype=torch.float64) ** 3  # many coordinates near 0
    p = x + torch.randn(12, 3, generator=g, dtype=torch.float64)
    proj = threat.project(p, x)
    assert bool(threat.contains(proj, x).all())
    for i in range(len(x)):
        ours = (proj[i] - p[i]).norm()
        assert float(ours) <= float(_brute_nearest(threat, x[i:i + 1], p[i])) + 1e-9
    inside = threat.project(x + 0.01 * (p - x) / (p - x).norm(dim=1, keepdim=True), x)
    assert torch.allclose(inside, (x + 0.01 * (p - x) / (p - x).norm(dim=1, keepdim=True)).clamp(0, 1))


def _exact_l2_scale(u: torch.Tensor, cap: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The L2 scale in float64 by 200 halvings: the largest λ ∈ [0, 1] with Σ min(λ|u|, c)² ≤ ε² (the
    clipped point's squared norm grows with λ)."""
    m, c, e = u.abs().double(), cap.double(), eps.double()
    low, high = torch.zeros(len(u), dtype=torch.float64), torch.ones(len(u), dtype=torch.float64)
    for _ in range(200):
        mid = (low + high) / 2
        ok = (torch.minimum(mid[:, None] * m, c) ** 2).sum(1) <= e * e
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    return low


def _exact_l1_threshold(u: torch.Tensor, cap: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The L1 multiplier in float64 from the sorted breakpoints: the kept mass Σ min((|u| − t)⁺, c) is
    linear between consecutive breakpoints (|u_i| − c_i where a coordinate starts to lose mass, |u_i|
    where it has none left), so it is evaluated at every breakpoint and interpolated."""
    mag, cap = u.abs().double(), cap.double()
    points = torch.cat([(mag - cap).clamp_min(0), mag], 1).sort(1).values
    mass = torch.minimum((mag[:, None, :] - points[:, :, None]).clamp_min(0), cap[:, None, :]).sum(2)
    e = eps.double()[:, None]
    k = (mass > e).sum(1, keepdim=True).clamp(1, points.shape[1] - 1)  # first breakpoint with mass ≤ ε
    t0, t1 = points.gather(1, k - 1), points.gather(1, k)
    m0, m1 = mass.gather(1, k - 1), mass.gather(1, k)
    return (t0 + (m0 - e) * (t1 - t0) / (m0 - m1).clamp_min(1e-300)).squeeze(1)


def _exact_l2_magnitudes(u, cap, eps):
    """|δ| of the exact L2 projection (float64): ``min(λ|u|, c)`` at the exact scale."""
    lam = _exact_l2_scale(u, cap, eps)
    return torch.minimum(lam[:, None] * u.abs().double(), cap.double())


def _exact_l1_magnitudes(u, cap, eps):
    """|δ| of the exact L1 projection (float64): ``min((|u| − t)⁺, c)`` at the exact multiplier."""
    t = _exact_l1_threshold(u, cap, eps)
    return torch.minimum((u.abs().double() - t[:, None]).clamp_min(0), cap.double())


@pytest.mark.parametrize("ball, eps, spread, exact_of", [
    (attacks.L2Ball, 3.0, (-2.5, 0.5), _exact_l2_magnitudes),
    (attacks.L1Ball, 10.0, (-3.0, 0.0), _exact_l1_magnitudes)])
def test_projection_matches_the_exact_one_and_uses_the_budget(ball, eps, spread, exact_of):
    """Each search (L2: the roots of the clipped norm's pieces; L1: Newton) against the exact projection
    in float64 (L2: the scale by 200 halvings; L1: the multiplier from sorted breakpoints), on 784-dimensional
    rows with the box active and per-example radii down to 0: the point is inside the ball, spends all but
    a millionth of ε, and is the exact projection up to float32 rounding."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(24, 1, 28, 28, generator=g)
    x[:8] = (x[:8] > 0.5).float()
    p = x + torch.randn(x.shape, generator=g) * torch.logspace(*spread, 24).view(-1, 1, 1, 1)
    threat = ball(eps)
    radius = torch.rand(24, generator=g) * eps
    radius[0] = 0.0
    for r in (None, radius):
        proj = threat.project(p, x) if r is None else threat.project_to(p, x, r)
        e = torch.full((24,), eps) if r is None else r
        u = (p - x).flatten(1)
        cap = torch.where(u >= 0, 1 - x.flatten(1), x.flatten(1))
        outside = threat.distance(x + torch.minimum(u.abs(), cap).view_as(x), x) > e
        assert 10 < int(outside.sum()) < 24
        exact = x.flatten(1)[outside].double() + u[outside].sign() * exact_of(u[outside], cap[outside],
                                                                              e[outside])
        assert float((proj.flatten(1)[outside].double() - exact).abs().max()) < 1e-5
        used = threat.distance(proj, x)
        assert bool((used <= e + threat.slack(x)).all())
        assert bool((used[outside] >= e[outside] * (1 - 2.0 ** -19) - threat.slack(x)).all())
        assert torch.equal(proj[~outside], torch.clamp(p[~outside], 0, 1))



@pytest.mark.parametrize("ball, eps", [(attacks.L2Ball, 1.5), (attacks.L1Ball, 8.0)])
def test_projection_of_a_row_does_not_depend_on_the_other_rows(ball, eps):
    """Only the rows outside the ball are searched; each row's point must be the one it gets projected
    alone, to the bit, whether the batch holds rows already inside, rows pushed out by a hair (a projected
    point moved by 1e-5 per coordinate) or rows far outside."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(30, 1, 12, 12, generator=g)
    x[:6] = (x[:6] > 0.5).float()  # the box active
    p = x + torch.randn(x.shape, generator=g) * torch.linspace(0.001, 1.0, 30).view(-1, 1, 1, 1)
    threat = ball(eps)
    again = threat.project(p, x) + 1e-5 * torch.randn(x.shape, generator=g)  # a hair outside or inside
    for batch in (p, again, torch.cat([p[:15], again[15:]])):
        inside = threat.distance(torch.clamp(batch, 0, 1), x) <= eps
        assert 0 < int(inside.sum()) < len(x)  # a mixed batch
        whole = threat.project(batch, x)
        radius = torch.rand(30, generator=g) * eps
        whole_r = threat.project_to(batch, x, radius)
        for i in range(len(x)):
            assert torch.equal(whole[i:i + 1], threat.project(batch[i:i + 1], x[i:i + 1]))
            alone = threat.project_to(batch[i:i + 1], x[i:i + 1], radius[i:i + 1])
            assert torch.equal(whole_r[i:i + 1], alone)
        assert bool(threat.contains(whole, x).all())


def test_l1_step_moves_the_coordinates_a_full_sort_would_choose():
    """APGD's L1 step keeps the ``topk`` share of coordinates with the largest |gradient|; the cut is taken
    from the largest k values only, and must equal the k-th value of a full sort, ties included."""
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(8, 1, 6, 6, generator=g)
    grad[0] = 1.0  # all tied
    grad[1, 0, :3] = grad[1, 0, 3:]  # pairs of ties
    x = torch.rand(8, 1, 6, 6, generator=g)
    threat = attacks.L1Ball(2.0)
    opt = attacks.optimizers.APGD()
    state = opt.init(x, threat=threat, center=x, steps=100, box=(torch.zeros_like(x), torch.ones_like(x)))
    share = torch.tensor([1 / 36, 0.2, 0.5, 1.0, 0.1, 0.3, 0.05, 0.9])
    state = state._replace(topk=share)
    value = torch.zeros(8)
    proposal, _ = opt._step_l1(x, grad, value, state, 0.5)
    flat = grad.flatten(1).abs()
    k = (share * 36).clamp(1, 36).long()
    cut = flat.sort(1, descending=True).values.gather(1, (k - 1)[:, None])
    sparse = (grad.sign() * (grad.abs() >= cut.view(-1, 1, 1, 1))).flatten(1)
    direction = (sparse / sparse.abs().sum(1, keepdim=True)).view_as(grad)
    assert torch.equal(proposal, threat.project(x + 0.5 * direction, x))


@pytest.mark.parametrize("ball, eps", BALLS)
def test_samples_lie_in_the_ball_and_depend_only_on_the_example(ball, eps):
    threat = ball(eps)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    a = threat.sample(x, attacks.generators(0, range(5), 0))
    b = threat.sample(x[2:3], attacks.generators(0, [2], 0))
    assert bool(threat.contains(a, x).all()) and torch.equal(a[2:3], b)


class RowWise(nn.Module):
    """One example at a time: CPU kernels round differently with the batch size, which a normalised
    gradient step would amplify; per-example results must then be bit-identical."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.cat([self.net(x[i:i + 1]) for i in range(len(x))])


class Linear(nn.Module):
    """A binary linear classifier ``z₁ = w·x − c``, ``z₀ = 0``: the nearest misclassified point in ‖·‖_p is
    at distance ``|w·x − c| / ‖w‖_q`` (q dual to p) while the box is not in the way."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x):
        s = x.flatten(1) @ self.w - 0.5 * self.w.sum()
        return torch.stack([torch.zeros_like(s), s], 1)


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("linf", 1), ("l1", float("inf"))])
def test_minimum_norm_attack_finds_the_exact_distance_on_a_linear_model(norm, dual):
    w = torch.randn(20, generator=torch.Generator().manual_seed(0)) * 10
    model = Linear(w).eval()
    x = torch.rand(64, 20, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.4  # the box stays inactive
    y = model(x).argmax(1)
    exact = (x @ w - 0.5 * w.sum()).abs() / torch.linalg.vector_norm(w, ord=dual)
    atk = attacks.get("fmn", 3.0, norm=norm)
    res = attacks.run(atk, model, x, y, seed=0)
    found = atk.threat.distance(res.x_adv, x)
    assert bool(res.success.all())
    assert bool(((found - exact).abs() <= 0.01 * exact + 1e-6).all())  # within 1% of the exact radius
    assert bool(atk.threat.contains(res.x_adv, x).all())


_EVERY_NORM = ["apgd-ce", "apgd-dlr", "apgd-t", "apgd-ce-odi", "fmn", "min-norm-untargeted",
               "min-norm-targeted", "v4 apgd-ce", "v4 apgd-t", "v5 apgd-t", "square", "v8 apgd-t-margin",
               "v9 apgd-dlr-odi", "v10 apgd-ce", "v13 apgd-ce-odi", "v15 apgd-dlr-odi", "v15 apgd-t-margin"]


@pytest.mark.parametrize("name, norm", [(n, norm) for norm in ("l2", "l1") for n in _EVERY_NORM]
                         + [(n, norm) for n in ("fab-t", "min-norm-fab", "v12 fab-t", "v14 fab-t")
                            for norm in ("l2", "linf", "l1")])
def test_every_norm_is_deterministic_per_example_and_leaves_the_model_alone(name, norm):
    torch.manual_seed(0)
    model = RowWise(nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    version, _, preset = name.rpartition(" ")
    atk = attacks.get(preset, {"l2": 0.8, "l1": 2.0, "linf": 0.1}[norm], norm=norm, steps=12)
    if version:  # standard's L1 form (annealed, Gaussian starts, boxed ranking; v5: more targets); in L2
        annealed = atk.replace(anneal=attacks.presets.L1_ANNEAL)  # annealing alone
        form = attacks.presets.FORMS[f"standard-{version}"]
        atk = form(atk) if norm == "l1" or preset == "fab-t" else annealed
    ids = torch.arange(10, 16)
    full = attacks.run(atk, model, x, y, ids=ids, seed=5)
    part = attacks.run(atk, model, x[3:], y[3:], ids=ids[3:], seed=5)
    assert torch.equal(full.x_adv[3:], part.x_adv) and torch.equal(full.success[3:], part.success)
    assert bool(atk.threat.contains(full.x_adv, x).all())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert attacks.from_config(atk.config()) == atk


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("linf", 1), ("l1", float("inf"))])
@pytest.mark.parametrize("form", ["standard-v9", "standard-v10", "standard-v12", "standard-v14"])
def test_fab_t_breaks_exactly_the_examples_within_the_radius_of_a_linear_model(norm, dual, form):
    """On a binary linear model an example can be broken within ε iff its exact distance to the boundary
    is at most ε (box inactive): FAB's first step lands on the boundary (times η), so fab-t breaks every
    example inside the radius and, its points being feasible, none outside; v10's fab-t, which only
    evaluates its search's point projected onto the ε-ball, breaks the same examples, and so does v12's,
    whose searches that stay outside 1.5ε end at the first decision."""
    w = torch.randn(20, generator=torch.Generator().manual_seed(0)) * 10
    model = Linear(w).eval()
    x = torch.rand(64, 20, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.4
    y = model(x).argmax(1)
    exact = (x @ w - 0.5 * w.sum()).abs() / torch.linalg.vector_norm(w, ord=dual)
    eps = float(exact.median())
    atk = attacks.presets.FORMS[form](attacks.get("fab-t", eps, norm=norm))
    res = attacks.run(atk, model, x, y, seed=0)
    assert bool(atk.threat.contains(res.x_adv, x).all())
    clear = (exact - eps).abs() > 0.02 * eps  # away from the radius itself
    assert torch.equal(res.success[clear], (exact <= eps)[clear])
    assert 20 < int(res.success.sum()) < 44
    if form in ("standard-v12", "standard-v14"):
        # the far searches (beyond 1.5ε, no nearer point to come) stop at 0.3 · 80
        far = exact > 1.6 * eps
        assert far.any() and bool((res.steps[far] == 24).all())
        assert bool((res.steps[exact <= 1.3 * eps] > 24).all())


def _brute_force_hyperplane(g, c, lo, hi, p):
    """The smallest ‖δ‖_p with g·δ = c inside [lo, hi], by another route: in L2 every split of the
    coordinates into those at a face of the box and the free ones (free ones ∝ g, the multiplier from the
    constraint); in L∞ the smallest t at which the box ∩ {|δ_i| ≤ t} can carry c (bisection on t); in L1
    every vertex of the feasible set (one coordinate free, every other at 0 or at a face of the box)."""
    n = len(g)
    if p == 1:
        import itertools

        best = None
        for free in range(n):
            for faces in itertools.product((0, 1, 2), repeat=n - 1):  # 0 zero, 1 at lo, 2 at hi
                d = torch.zeros(n, dtype=torch.float64)
                others = [i for i in range(n) if i != free]
                for i, f in zip(others, faces, strict=True):
                    d[i] = lo[i] if f == 1 else hi[i] if f == 2 else 0.0
                if g[free] == 0:
                    continue
                d[free] = (c - float(g @ d)) / float(g[free])
                if bool((d >= lo - 1e-12).all() and (d <= hi + 1e-12).all()):
                    norm = float(d.abs().sum())
                    best = norm if best is None else min(best, norm)
        return best
    if p == 2:
        import itertools

        best = None
        for faces in itertools.product((0, 1, 2), repeat=n):  # 0 free, 1 at lo, 2 at hi
            d = torch.zeros(n, dtype=torch.float64)
            fixed = torch.tensor([f != 0 for f in faces])
            for i, f in enumerate(faces):
                d[i] = lo[i] if f == 1 else hi[i] if f == 2 else 0.0
            rest = c - float((g * d)[fixed].sum())
            gf = g[~fixed]
            if float((gf * gf).sum()) > 0:
                d[~fixed] = gf * rest / float((gf * gf).sum())
            elif abs(rest) > 1e-12:
                continue
            if bool((d >= lo - 1e-12).all() and (d <= hi + 1e-12).all()) and abs(float(g @ d) - c) < 1e-9:
                norm = float(d.norm())
                best = norm if best is None else min(best, norm)
        return best
    sign = 1.0 if c >= 0 else -1.0
    lo_t, hi_t = 0.0, float(torch.maximum(lo.abs(), hi.abs()).max())

    def carry(t):  # the most of sign·c the box ∩ the t-cube can carry
        top = torch.minimum(hi, torch.full_like(hi, t))
        bottom = torch.maximum(lo, torch.full_like(lo, -t))
        return float(torch.maximum(sign * g * top, sign * g * bottom).sum())

    if carry(hi_t) < abs(c):
        return None
    for _ in range(200):
        mid = (lo_t + hi_t) / 2
        lo_t, hi_t = (mid, hi_t) if carry(mid) < abs(c) else (lo_t, mid)
    return hi_t


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_the_hyperplane_projection_is_the_nearest_point_against_a_brute_force(p):
    gen = torch.Generator().manual_seed(7)
    checked = 0
    for _ in range(60):
        g = torch.randn(4, generator=gen, dtype=torch.float64)
        x = torch.rand(4, generator=gen, dtype=torch.float64)
        lo, hi = -x, 1 - x  # the [0, 1] box around x
        c = float(torch.randn(1, generator=gen, dtype=torch.float64)) * 0.5
        d = attacks.project_on_hyperplane(g[None], torch.tensor([c], dtype=torch.float64), lo[None], hi[None],
                                          p)[0]
        assert bool((d >= lo - 1e-9).all() and (d <= hi + 1e-9).all())
        want = _brute_force_hyperplane(g, c, lo, hi, p)
        if want is None:  # the box cannot reach the hyperplane: the nearest corner towards it
            assert abs(float(g @ d)) <= abs(c) and float(g @ d) * c >= 0
            continue
        assert abs(float(g @ d) - c) < 1e-9
        assert float(d.norm(p=p)) == pytest.approx(want, rel=1e-6, abs=1e-9)
        checked += 1
    assert checked > 30


def test_the_hyperplane_projection_refuses_a_norm_it_has_no_solution_for():
    with pytest.raises(ValueError, match="L1, L2 and L∞"):
        attacks.project_on_hyperplane(torch.ones(1, 4), torch.ones(1), -torch.ones(1, 4), torch.ones(1, 4), 3)


def test_the_l1_hyperplane_projection_fills_the_steepest_coordinates_first_and_stops_at_the_box():
    """The L1 answer by hand: |g| = (4, 2, 1); c = 3 needs 3/4 of a unit on the first coordinate alone;
    with the box leaving that coordinate 0.5, the rest (3 − 2 = 1) goes to the next steepest, 1/2 unit;
    a c no box corner reaches fills every coordinate towards it."""
    g = torch.tensor([[4.0, -2.0, 1.0]], dtype=torch.float64)
    wide = torch.full((1, 3), 10.0, dtype=torch.float64)
    d = attacks.project_on_hyperplane(g, torch.tensor([3.0], dtype=torch.float64), -wide, wide, 1)
    assert torch.allclose(d, torch.tensor([[0.75, 0.0, 0.0]], dtype=torch.float64))
    hi = torch.tensor([[0.5, 10.0, 10.0]], dtype=torch.float64)
    d = attacks.project_on_hyperplane(g, torch.tensor([3.0], dtype=torch.float64), -wide, hi, 1)
    assert torch.allclose(d, torch.tensor([[0.5, -0.5, 0.0]], dtype=torch.float64))
    tight = torch.full((1, 3), 0.1, dtype=torch.float64)
    d = attacks.project_on_hyperplane(g, torch.tensor([-3.0], dtype=torch.float64), -tight, tight, 1)
    assert torch.allclose(d, torch.tensor([[-0.1, 0.1, -0.1]], dtype=torch.float64))


class Seen(nn.Module):
    """Records every input the attack evaluates."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("norm, eps", [("l2", 0.1), ("l1", 0.4), ("linf", 0.01)])
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t"])
def test_every_point_apgd_evaluates_is_inside_the_ball_and_the_box(norm, eps, name):
    """APGD's L2 and L1 steps end with the ball ∩ box projection and the engine takes their points as they
    are (``projected``); L∞'s momentum step is clamped by the engine. Every point the model sees — starts,
    steps, the iterate after a step-size reset — must be inside the threat set, with the box active."""
    g = torch.Generator().manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    model = Seen(net).eval()
    x = torch.rand(12, 3, 8, 8, generator=g)
    x[:4] = (x[:4] > 0.5).float()  # on the faces of the box
    y = net(x).argmax(1)
    atk = attacks.get(name, eps, norm=norm)
    attacks.run(atk, model, x, y, seed=0)
    assert len(model.inputs) > 50
    done = atk.optimizer.projected(atk.optimizer.init(x, threat=atk.threat, center=x, box=atk.threat.box(x),
                                                      steps=10), atk.threat)
    assert done == (norm != "linf")
    for seen in model.inputs:
        match = (seen.flatten(1)[:, None] - x.flatten(1)[None]).abs()
        rows = (match <= eps + 1e-6).all(-1).float().argmax(1) if norm == "linf" else None
        # each evaluated row belongs to one of the clean inputs: the nearest in the threat's norm
        if rows is None:
            rows = atk.threat.distance(seen[:, None].expand(-1, len(x), -1, -1, -1).flatten(0, 1),
                                       x[None].expand(len(seen), -1, -1, -1, -1).flatten(0, 1)
                                       ).view(len(seen), len(x)).argmin(1)
        assert bool(atk.threat.contains(seen, x[rows]).all())


def test_square_l2_stays_feasible_and_breaks_a_linear_model():
    w = torch.randn(3 * 8 * 8, generator=torch.Generator().manual_seed(4))
    model = nn.Sequential(nn.Flatten(), Linear(w)).eval()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    y = model(x).argmax(1)
    atk = attacks.get("square", 1.0, norm="l2", queries=300)
    res = attacks.run(atk, model, x, y, seed=0)
    assert bool(atk.threat.contains(res.x_adv, x).all()) and bool(res.success.any())


def test_square_l1_stays_feasible_and_breaks_the_near_examples_of_a_linear_model():
    """On a linear model the exact L1 distance to the boundary inside the box is the fractional knapsack
    of :func:`attacks.boxed_l1_distance`: L1 Square (1,000 queries, no gradient) must break most
    examples within half the radius, and no example beyond the radius can be broken by a feasible point."""
    w = torch.randn(3 * 8 * 8, generator=torch.Generator().manual_seed(4))
    model = nn.Sequential(nn.Flatten(), Linear(w)).eval()
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    z = model(x)
    y = z.argmax(1)
    grad = torch.where(y[:, None] == 1, w, -w)  # of the margin z_y − z_other
    exact = attacks.boxed_l1_distance((z[:, 0] - z[:, 1]).abs(), grad, x.flatten(1),
                                      (torch.zeros_like(x), torch.ones_like(x)))
    eps = 3.0
    atk = attacks.get("square", eps, norm="l1", queries=1000)
    assert isinstance(atk.optimizer, attacks.RandomSquaresL1)
    res = attacks.run(atk, model, x, y, seed=0)
    assert bool(atk.threat.contains(res.x_adv, x).all())
    near, far = exact < eps / 2, exact > eps * (1 + 1e-4)
    assert int(near.sum()) >= 20 and int(far.sum()) >= 1  # the draw covers both cases
    assert float(res.success[near].float().mean()) >= 0.8  # measured: 43 of 45
    assert not bool(res.success[far].any())
    with torch.no_grad():
        assert torch.equal(res.success, model(res.x_adv).argmax(1) != y)


def test_an_l1_battery_ends_with_the_l1_square_check():
    from robusteval.evaluation import build_battery

    battery = build_battery(["standard"], attacks.L1Ball(5.0), checks=True)
    assert battery.check is not None and battery.check.threat.norm == "l1"
    assert isinstance(battery.check.optimizer, attacks.RandomSquaresL1)


def _rows(distances, robust, eps, attack="a"):
    base = {c: 0 for c in records.COLUMNS} | {"model": "m", "dataset": "d", "norm": "l2", "draws": 1,
                                              "status": "attacked", "clean_correct": True, "attack": attack}
    return [base | {"example_id": i, "distance": dist, "robust": r, "eps": eps}
            for i, (dist, r) in enumerate(zip(distances, robust, strict=True))]


def test_the_curve_is_monotone_and_flags_a_fixed_radius_run_above_it():
    # a minimum-norm run at ε = 2 breaks examples 0..2 at radii 0.5, 1.2, 1.9; a fixed-ε run at ε = 1.5
    # breaks example 0 only: example 1 (radius 1.2) is a miss of the fixed run
    df = records.coerce(pd.DataFrame(_rows([0.5, 1.2, 1.9, 2.0], [False, False, False, True], 2.0, "fmn")
                                     + _rows([0.4, 1.5, 1.5, 1.5], [False, True, True, True], 1.5, "std")))
    table = reports.curve(df)
    acc = table.set_index("eps")["robust_accuracy"]
    assert acc.is_monotonic_decreasing
    # radii: example 0 min(0.5, 0.4) = 0.4, example 1 1.2, example 2 1.9, example 3 never broken
    assert (acc[0.0], acc[0.4], acc[1.2], acc[1.5], acc[1.9], acc[2.0]) == (1.0, 0.75, 0.5, 0.5, 0.25, 0.25)
    flags = reports.curve_disagreements(df)
    assert len(flags) == 1 and "ε=1.5" in flags[0] and "1 example(s)" in flags[0]


def test_attack_and_report_in_l2_end_to_end(tiny_ckpt, tiny_npz, tmp_path):
    out = tmp_path / "o"
    args = ["attack", "-m", str(tiny_ckpt), "--dataset", f"npz:{tiny_npz}", "-n", "16", "--norm", "l2",
            "--eps",
            "1.5", "-a", "apgd-ce", "-a", "fmn", "--steps", "20", "--queries", "50", "--device", "cpu", "-q",
            "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "L2" in result.stdout
    df = records.read(out)
    assert set(df["norm"]) == {"l2"} and (df.loc[df.status == "attacked", "distance"] <= 1.5 + 1e-3).all()
    curve = CliRunner().invoke(cli, ["report", str(out), "--curve", str(tmp_path / "c.csv")])
    assert curve.exit_code == 0 and (tmp_path / "c.png").is_file()
    table = pd.read_csv(tmp_path / "c.csv")
    assert table["robust_accuracy"].is_monotonic_decreasing
    other = CliRunner().invoke(cli, ["attack", "-m", str(tiny_ckpt), "--dataset", f"npz:{tiny_npz}", "-n",
                                     "16", "--eps", "0.1", "-a", "apgd-ce", "--device", "cpu", "-q", "--out",
                                     str(out)])
    assert other.exit_code != 0 and "holds an evaluation in L2" in other.stderr


def test_annealing_validates_its_stages_and_splits_the_steps():
    atk = attacks.get("apgd-ce", 10.0, norm="l1")
    assert atk.replace(anneal=((3.0, 0.3), (2.0, 0.3))).stages() == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert atk.replace(steps=2, anneal=((3.0, 0.3),)).stages() == [(1.0, 2)]  # a stage of 0 steps is dropped
    assert atk.stages() == [(1.0, 100)]
    for bad in [((0.5, 0.3),), ((3.0, 0.0),), ((3.0, 0.6), (2.0, 0.5)), ((3.0,),), (3.0, 0.3),
                ((float("inf"), 0.3),)]:
        with pytest.raises(ValueError, match="anneal"):
            atk.replace(anneal=bad)
    with pytest.raises(ValueError, match="gradient"):
        attacks.get("square", 0.1).replace(anneal=((2.0, 0.3),))


def test_annealed_run_spends_its_steps_in_the_larger_balls_and_returns_points_of_the_eps_ball():
    """A robust example's steps are all ``steps`` (30 + 30 + 40), each stage evaluates its end point once
    more (2 extra forwards per example), and every returned point lies in the ε-ball ∩ box although the
    first 60 steps move in the 3ε and 2ε balls."""
    w = torch.randn(64, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Flatten(), Linear(w)).eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    eps = 0.005  # far too small to break these examples: every row runs all its steps
    plain = attacks.get("apgd-ce", eps, norm="l1")
    annealed = plain.replace(anneal=((3.0, 0.3), (2.0, 0.3)))
    rp = attacks.run(plain, model, x, y, seed=0, compact=False)
    ra = attacks.run(annealed, model, x, y, seed=0, compact=False)
    assert not bool(ra.success.any()) and not bool(rp.success.any())
    assert ra.forward_rows - rp.forward_rows == 2 * len(x)
    assert bool((ra.steps == 100).all())
    assert bool(annealed.threat.contains(ra.x_adv, x).all())
    assert bool((annealed.threat.distance(ra.x_adv, x) > 0.5 * eps).all())  # the stages' point was kept


def test_standard_anneals_its_l1_members_only_and_v5_attacks_nine_l1_targets():
    from robusteval.evaluation import build_battery

    l1 = build_battery(["standard-v7"], attacks.threat_of(10.0, norm="l1")).attacks
    assert all(a.anneal == attacks.presets.L1_ANNEAL for a in l1)
    assert isinstance(l1[0].start, attacks.GaussianStart)
    for spec in (["standard-v3"], ["apgd-ce"]):  # version 3 and a preset by itself keep their L1 form
        assert all(a.anneal == () for a in build_battery(spec, attacks.threat_of(10.0, norm="l1")).attacks)
    v4 = build_battery(["standard-v4"], attacks.threat_of(10.0, norm="l1")).attacks
    targets = {a.name: a.targets.k for a in l1 if isinstance(a.targets, attacks.RankedTargets)}
    assert targets == {"apgd-t": attacks.presets.L1_TARGETS}
    assert [a.targets.k for a in v4 if a.name == "apgd-t"] == [3]
    assert [a.replace(targets=b.targets) for a, b in zip(l1, v4, strict=True)] == list(v4)  # nothing else
    assert build_battery(["standard-v5"], attacks.threat_of(10.0, norm="l1")).attacks == l1  # v6 is v5 in L1
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):  # outside L1, v5 and v4 are v3
        v3 = build_battery(["standard-v3"], attacks.threat_of(eps, norm=norm)).attacks
        assert build_battery(["standard-v5"], attacks.threat_of(eps, norm=norm)).attacks == v3
        assert build_battery(["standard-v4"], attacks.threat_of(eps, norm=norm)).attacks == v3
    assert build_battery(["standard-v7"], attacks.threat_of(0.1, norm="linf")).attacks == \
        build_battery(["standard-v3"], attacks.threat_of(0.1, norm="linf")).attacks  # v7 is v3 in L∞


def test_v6_in_l2_attacks_nine_targets_ungated_and_ends_with_fab_t():
    from robusteval.evaluation import build_battery

    l2 = build_battery(["standard-v6"], attacks.threat_of(2.0, norm="l2"))
    v5 = build_battery(["standard-v5"], attacks.threat_of(2.0, norm="l2"))
    assert [a.name for a in l2.members] == [a.name for a in v5.members] + ["fab-t"]
    assert [a.targets.k for a in l2.members if a.name == "apgd-t"] == [attacks.presets.L1_TARGETS]
    assert [a.replace(targets=b.targets) for a, b in zip(l2.members[:4], v5.members, strict=True)] == \
        list(v5.members)  # the first four differ from v5's only in apgd-t's targets
    assert v5.gates == (None, 1.0, 0.5, 0.25)
    assert l2.gates == (None, None, 0.5, 0.25, None)
    # the members before the last gated one score their survivors; fab-t, like apgd-t, is not gated
    assert [l2.scores(a) for a in l2.members] == [True, True, True, False, False]
    for norm, eps in (("linf", 0.1), ("l1", 10.0)):  # v6 is v5 outside L2
        battery = build_battery(["standard-v6"], attacks.threat_of(eps, norm=norm))
        assert battery.gates == (None, 1.0, 0.5, 0.25)
        assert battery.attacks == build_battery(["standard-v5"], attacks.threat_of(eps, norm=norm)).attacks
    assert attacks.gates(["standard-v6"], "l2") == {"apgd-dlr-odi": 0.5, "apgd-ce-odi": 0.25}
    assert attacks.expand(["standard-v6"], "linf") == ["apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi"]
    assert attacks.gates(["apgd-t"], "l2") == {}  # a member by itself is never gated


def test_v7_is_v6_with_looser_l2_gates_on_apgd_t_and_fab_t():
    from robusteval.evaluation import build_battery

    for eps in (1.0, 2.0):
        v7 = build_battery(["standard-v7"], attacks.threat_of(eps, norm="l2"))
        v6 = build_battery(["standard-v6"], attacks.threat_of(eps, norm="l2"))
        assert v7.members == v6.members  # the same five attacks, configured alike
        assert v7.gates == (None, 2.0, 0.5, 0.25, 1.0)
        # every member before the last gated one scores its survivors; fab-t is gated, so apgd-ce-odi scores
        assert [v7.scores(a) for a in v7.members] == [True, True, True, True, False]
    for norm, eps in (("linf", 0.1), ("l1", 10.0)):  # v7 is v6 (so v5) outside L2
        assert build_battery(["standard-v7"], attacks.threat_of(eps, norm=norm)).attacks == \
            build_battery(["standard-v6"], attacks.threat_of(eps, norm=norm)).attacks
    assert attacks.gates(["standard-v7"], "l2") == {"apgd-t": 2.0, "apgd-dlr-odi": 0.5, "apgd-ce-odi": 0.25,
                                                    "fab-t": 1.0}
    assert attacks.gates(["standard-v7"], "linf") == {"apgd-t": 1.0, "apgd-dlr-odi": 0.5, "apgd-ce-odi": 0.25}


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v8_is_v7_then_apgd_t_margin_on_the_survivors_nearest_the_boundary(norm, eps):
    from robusteval.evaluation import build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v8, v7 = build_battery(["standard-v8"], threat), build_battery(["standard-v7"], threat)
    assert v8.members[:-1] == v7.members  # v7's members, configured alike, in the same order
    assert v8.gates == (*v7.gates, attacks.presets.NEAR)
    last, targeted = v8.members[-1], v7.members[1]
    assert last.name == "apgd-t-margin" and isinstance(last.objective, attacks.TargetedMargin)
    # apgd-t's targets, starts, steps and (in L1) annealing, with three restarts of each target
    assert last.replace(name="apgd-t", objective=targeted.objective, restarts=1) == targeted
    assert last.restarts == 3
    # v7's last member now scores its survivors too: the near round's gate reads the smallest score
    assert [v8.scores(a) for a in v8.members] == [True] * (len(v8.members) - 1) + [False]


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v9_is_v8_with_the_stall_rule_on_the_members_between_the_first_pass_and_the_near_round(norm, eps):
    from robusteval.evaluation import build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v9, v8 = build_battery(["standard-v9"], threat), build_battery(["standard-v8"], threat)
    assert v9.gates == v8.gates and [a.name for a in v9.members] == [a.name for a in v8.members]
    for new, old in zip(v9.members, v8.members, strict=True):
        stalls = new.name in ("apgd-t", "apgd-dlr-odi", "apgd-ce-odi")  # not apgd-ce, fab-t, apgd-t-margin
        assert new == (old.replace(stall=attacks.presets.STALL) if stalls else old), new.name
    assert [v9.scores(a) for a in v9.members] == [v8.scores(a) for a in v8.members]


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v10_is_v9_with_fab_t_ending_at_its_search_and_the_l1_first_pass_probed(norm, eps):
    from robusteval.evaluation import Budget, build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v10, v9 = build_battery(["standard-v10"], threat), build_battery(["standard-v9"], threat)
    assert v10.gates == v9.gates and [a.name for a in v10.members] == [a.name for a in v9.members]
    for new, old in zip(v10.members, v9.members, strict=True):
        if new.name == "fab-t":  # the search's 80 steps, then only its point projected onto the ε-ball
            assert new == old.replace(steps=80, anneal=((10.0, 1.0),))
            assert new.stages() == [(10.0, 80), (1.0, 0)]
        elif new.name == "apgd-ce" and norm == "l1":
            assert new == old.replace(probe=attacks.presets.PROBE)
        else:
            assert new == old, new.name
    assert [v10.scores(a) for a in v10.members] == [v9.scores(a) for a in v9.members]
    # a budget override keeps fab-t's share: its search gets 80% of the steps given
    short = build_battery(["standard-v10"], threat, budget=Budget(steps=50))
    assert [a.steps for a in short.members if a.name == "fab-t"] == ([40] if norm == "l2" else [])


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v11_is_v10_and_in_l1_adds_fab_t_and_stops_gating_the_targeted_members(norm, eps):
    from robusteval.evaluation import Budget, build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v11, v10 = build_battery(["standard-v11"], threat), build_battery(["standard-v10"], threat)
    if norm != "l1":  # L∞ and L2: v10 itself
        assert v11.members == v10.members and v11.gates == v10.gates
        return
    # L1: v10's members in v10's forms, with fab-t (in its v10 form) before the near round, as in L2
    assert [a.name for a in v11.members] == ["apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t",
                                             "apgd-t-margin"]
    assert [a for a in v11.members if a.name != "fab-t"] == list(v10.members)
    fab = v11.members[4]
    l2_fab = build_battery(["standard-v10"], attacks.threat_of(2.0, norm="l2")).members[4]
    assert fab.name == "fab-t" and fab.threat == threat
    assert fab.replace(threat=l2_fab.threat) == l2_fab  # the same search, targets and budget as L2's
    # neither targeted member is gated; the diverse-restart rounds and the near round keep v10's gates
    assert attacks.gates(["standard-v11"], "l1") == {"apgd-dlr-odi": 0.5, "apgd-ce-odi": 0.25,
                                                     "apgd-t-margin": attacks.presets.NEAR}
    assert [v11.scores(a) for a in v11.members] == [True] * 5 + [False]
    short = build_battery(["standard-v11"], threat, budget=Budget(steps=50))
    assert [a.steps for a in short.members if a.name == "fab-t"] == [40]


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v12_is_v11_with_fab_t_searches_ending_when_they_stall(norm, eps):
    from robusteval.evaluation import Budget, build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v12, v11 = build_battery(["standard-v12"], threat), build_battery(["standard-v11"], threat)
    assert [a.name for a in v12.members] == [a.name for a in v11.members] and v12.gates == v11.gates
    for new, old in zip(v12.members, v11.members, strict=True):
        assert new == (old.replace(search_stall=attacks.presets.SEARCH_STALL) if new.name == "fab-t" else old)
    assert ("fab-t" in [a.name for a in v12.members]) == (norm != "linf")
    short = build_battery(["standard"], threat, budget=Budget(steps=50))
    assert [(a.steps, a.search_stall) for a in short.members if a.name == "fab-t"] == \
        ([] if norm == "linf" else [(40, attacks.presets.SEARCH_STALL)])


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v13_is_v12_in_linf_and_l2_and_in_l1_gives_each_member_its_own_streams(norm, eps):
    from robusteval.evaluation import Budget, build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v13, v12 = build_battery(["standard-v13"], threat), build_battery(["standard-v12"], threat)
    assert [a.name for a in v13.members] == [a.name for a in v12.members] and v13.gates == v12.gates
    if norm != "l1":
        assert v13.members == v12.members
        return
    for new, old in zip(v13.members, v12.members, strict=True):
        changes = {"stream": attacks.presets.STREAMS[new.name]}
        if new.name == "apgd-t":
            changes["targets"] = replace(old.targets, k=6)
        if new.name == "apgd-ce-odi":
            changes.update(restarts=20, steps=50)
        assert new == old.replace(**changes)
    # the members' streams (first stream, then one per run) do not overlap: no member repeats a start
    spans = sorted((a.stream, a.stream + len(a.targets.trials(a.restarts, 10))) for a in v13.members)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans[:-1], spans[1:], strict=True))
    short = build_battery(["standard-v13"], threat, budget=Budget(steps=40, restarts=2))
    odi = [a for a in short.members if a.name == "apgd-ce-odi"]
    assert [(a.restarts, a.steps) for a in odi] == [(8, 20)]  # a budget scales as the preset: 4× runs, ½


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v14_is_v13_but_fab_t_attacks_six_targets_in_l1(norm, eps):
    from robusteval.evaluation import Budget, build_battery

    threat = attacks.threat_of(eps, norm=norm)
    v14, v13 = build_battery(["standard-v14"], threat), build_battery(["standard-v13"], threat)
    assert [a.name for a in v14.members] == [a.name for a in v13.members] and v14.gates == v13.gates
    for new, old in zip(v14.members, v13.members, strict=True):
        if norm == "l1" and new.name == "fab-t":
            assert new == old.replace(targets=replace(old.targets, k=6))
            assert len(new.targets.trials(new.restarts, 10)) == 6  # one search per target, the first six
        else:
            assert new == old
    # a budget override keeps the six targets and scales the steps as before
    short = build_battery(["standard-v14"], threat, budget=Budget(steps=50))
    fab = [(a.steps, a.targets.k) for a in short.members if a.name == "fab-t"]
    assert fab == {"linf": [], "l2": [(40, 9)], "l1": [(40, 6)]}[norm]


def test_v14_fab_t_in_l1_runs_six_searches_per_survivor_where_v13_ran_nine():
    """On a ten-class model at a radius no search can reach, each search stops at 30% of its 80 steps
    (v12's rule), so the steps per example count the searches: 6 × 24 in v14, 9 × 24 in v13; in L2 both
    run nine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    for norm, expected in (("l1", {"standard-v13": 216, "standard-v14": 144}),
                           ("l2", {"standard-v13": 216, "standard-v14": 216})):
        for version, steps in expected.items():
            atk = attacks.presets.FORMS[version](attacks.get("fab-t", 1e-3, norm=norm))
            res = attacks.run(atk, model, x, y, seed=0)
            assert not bool(res.success.any())
            assert res.steps.tolist() == [steps] * 8, (norm, version)


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("l1", float("inf")), ("linf", 1)])
def test_the_last_approach_reaches_every_example_within_the_exact_distance_on_a_linear_model(norm, dual):
    """On a binary linear model with the box inactive the nearest misclassified point is at
    ``|w·x − c| / ‖w‖_q``: with no steps of its own from the clean input, an attack's last approach
    (``polish``) must break every example nearer than 0.9ε and none beyond ε, with feasible points the model
    misclassifies, recorded as a run after the attack's own and with the polish's steps."""
    w = torch.randn(20, generator=torch.Generator().manual_seed(0)) * 10
    model = Linear(w).eval()
    x = torch.rand(64, 20, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.4
    y = model(x).argmax(1)
    exact = (x @ w - 0.5 * w.sum()).abs() / w.norm(p=dual)
    eps = float(exact.median())
    still = attacks.get("apgd-ce", eps, norm=norm).replace(steps=0, start=attacks.starts.NoStart())
    assert not bool(attacks.run(still, model, x, y, seed=0).success.any())
    res = attacks.run(still.replace(polish=50), model, x, y, seed=0)
    assert bool(res.success[exact < 0.9 * eps].all())
    assert not bool(res.success[exact > eps * (1 + 1e-4)].any())
    assert bool(still.threat.contains(res.x_adv, x).all())
    assert bool((model(res.x_adv).argmax(1) != y)[res.success].all())
    assert set(res.run[res.success].tolist()) == {1} and set(res.steps.tolist()) <= set(range(51))
    assert bool((res.steps[~res.success] == 50).all())
    assert "polish=50" in still.replace(polish=50).config() and "polish" not in still.config()
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="polish"):
            still.replace(polish=bad)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 2.0), ("l1", 10.0)])
def test_v15_is_standard_and_is_v14_with_a_last_approach_after_three_l1_members(norm, eps):
    from robusteval.evaluation import Budget, build_battery

    assert attacks.presets.STANDARD == "standard-v15"
    threat = attacks.threat_of(eps, norm=norm)
    v15, v14 = build_battery(["standard"], threat), build_battery(["standard-v14"], threat)
    assert [a.name for a in v15.members] == [a.name for a in v14.members] and v15.gates == v14.gates
    for new, old in zip(v15.members, v14.members, strict=True):
        polished = norm == "l1" and new.name in ("apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")
        assert new == (old.replace(polish=50) if polished else old)
    short = build_battery(["standard"], threat, budget=Budget(steps=20))  # the polish is not a budget
    assert {a.polish for a in short.members} == ({0, 50} if norm == "l1" else {0})


@pytest.mark.parametrize("name", ["apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin"])
def test_v15_adds_only_successes_to_v14_in_l1(name):
    """v15's form of a polished member is v14's plus the last approach: every example v14's breaks it
    breaks at the same point, and an example it does not break has v14's point, margin and run, with 50
    more steps; in L∞ and L2 the forms are v14's."""
    torch.manual_seed(0)
    model = RowWise(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))).eval()
    x = torch.rand(48, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    base = attacks.get(name, 1.5, norm="l1", steps=3)  # runs too short to finish what they start
    v14, v15 = attacks.presets.FORMS["standard-v14"](base), attacks.presets.FORMS["standard-v15"](base)
    assert v15 == v14.replace(polish=attacks.presets.POLISH)
    old, new = attacks.run(v14, model, x, y, seed=2), attacks.run(v15, model, x, y, seed=2)
    assert bool(new.success[old.success].all())
    gained = new.success & ~old.success
    assert 0 < int(gained.sum()) < int((~old.success).sum())  # the polish broke some, not every one
    same = ~gained
    assert torch.equal(new.x_adv[same], old.x_adv[same]) and torch.equal(new.margin[same], old.margin[same])
    assert torch.equal(new.run[same], old.run[same])
    assert torch.equal(new.steps[old.success], old.steps[old.success])
    kept = ~new.success
    assert torch.equal(new.steps[kept], old.steps[kept] + attacks.presets.POLISH)
    for norm, eps in (("l2", 0.8), ("linf", 0.1)):
        other = attacks.get(name, eps, norm=norm)
        assert attacks.presets.FORMS["standard-v15"](other) == attacks.presets.FORMS["standard-v14"](other)


def test_stream_offsets_the_runs_generator_streams_and_round_trips():
    """Run ``j`` of an attack with ``stream=s`` starts where run ``s + j`` of the same attack with the
    default stream starts: with no steps, the final iterate is the start itself."""
    torch.manual_seed(0)
    model = RowWise(nn.Sequential(nn.Flatten(), nn.Linear(16, 4))).eval()
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    base = attacks.get("apgd-ce", 2.0, norm="l1").replace(steps=0, tracking=attacks.FinalIterate(),
                                                           start=attacks.starts.GaussianStart())
    ids = torch.arange(20, 25)
    starts = [attacks.run(base.replace(stream=s), model, x, y, ids=ids, seed=7).x_adv for s in range(3)]
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])
    direct = base.start(x, base.threat, attacks.seeding.generators(7, ids.tolist(), 2), model=model)
    assert torch.allclose(starts[2], direct, atol=1e-6)
    assert "stream=" not in base.config()  # the default keeps earlier records' configuration text
    moved = base.replace(stream=3072)
    assert "stream=3072" in moved.config() and attacks.from_config(moved.config()) == moved
    for bad in (-1, True, 1.5, 1 << 32):
        with pytest.raises(ValueError, match="stream"):
            base.replace(stream=bad)


def test_fab_t_in_l1_breaks_what_apgd_leaves_and_its_points_pass_the_fp32_check():
    """fab-t in L1 on a trained model, on eight test images that v10's first pass and Square left robust
    on adv10 at ε = 5 and reference AutoAttack broke (benchmarks/RESULTS.md, "`standard` v11"): every
    point it reports is inside the ε-ball ∩ box and misclassified in fp32 (re-checked here); it breaks
    most of them (measured: 7 of 8), where apgd-ce, run here first, breaks none."""
    from robusteval.data import load_dataset
    from robusteval.models import load_model

    net = load_model("zoo:fmnist-adv10", device="cpu").model.eval()
    ds = load_dataset("fashion-mnist", n=500).subset(torch.tensor([159, 169, 178, 266, 274, 277, 376, 439]))
    x, y, ids, eps = ds.images, ds.labels.long(), ds.ids, 5.0
    form = attacks.presets.FORMS["standard"]
    first = attacks.run(form(attacks.get("apgd-ce", eps, norm="l1")), net, x, y, ids=ids, seed=0)
    assert not bool(first.success.any())
    fab = attacks.run(form(attacks.get("fab-t", eps, norm="l1")), net, x, y, ids=ids, seed=0)
    assert bool(attacks.threat_of(eps, norm="l1").contains(fab.x_adv, x).all())
    with torch.no_grad():
        wrong = net(fab.x_adv.float()).argmax(1) != y
    assert torch.equal(wrong, fab.success)
    assert int(fab.success.sum()) >= 5


def test_gaussian_start_is_a_sparse_point_on_the_l1_boundary():
    ball = attacks.L1Ball(3.0)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    gens = attacks.generators(0, [0, 1, 2, 3], 0)
    x0 = attacks.GaussianStart()(x, ball, gens)
    assert bool(ball.contains(x0, x).all())
    assert torch.allclose(ball.distance(x0, x), torch.full((4,), 3.0), atol=1e-4)
    assert bool((((x0 - x) != 0).flatten(1).sum(1) < 0.5 * 64).all())  # sparse
    again = attacks.GaussianStart()(x[2:], ball, attacks.generators(0, [2, 3], 0))
    assert torch.equal(again, x0[2:])  # each example's start depends on its own generator only


def test_annealing_strengthens_l1_apgd_on_a_trained_model():
    """On the adversarially trained zoo model at L1 ε = 10 (the first 100 bundled images), the annealed,
    Gaussian-started APGD-CE of standard v4 leaves fewer robust examples than the plain run (measured:
    39% against 43%, benchmarks/RESULTS.md)."""
    from robusteval.data import load_dataset
    from robusteval.models import load_model

    ds = load_dataset("fashion-mnist", n=100)
    model = load_model("zoo:fmnist-adv2").model.eval()
    x, y = ds.images, ds.labels.long()
    plain = attacks.get("apgd-ce", 10.0, norm="l1")
    v4 = attacks.presets._l1_annealed(plain)
    robust = {a.anneal: int((~attacks.run(a, model, x, y, ids=ds.ids, seed=0).success).sum())
              for a in (plain, v4)}
    assert robust[v4.anneal] < robust[()]


def _vertex_l1_distance(margin: float, g: torch.Tensor, x: torch.Tensor) -> float:
    """min ‖δ‖₁ with g·δ ≤ −margin and x + δ in [0, 1]: a linear programme whose optimum is a vertex —
    every coordinate at 0 or at its room in the box except at most one — so enumerating them is exact."""
    d, best = len(g), float("inf")
    room = torch.where(g > 0, x, 1 - x)  # moving against the gradient's sign lowers the margin
    for mask in range(2 ** d):
        full = [i for i in range(d) if mask >> i & 1]
        gain = sum(float(g[i].abs() * room[i]) for i in full)
        cost = sum(float(room[i]) for i in full)
        if gain >= margin:
            best = min(best, cost)
        for j in set(range(d)) - set(full):
            t = (margin - gain) / float(g[j].abs()) if float(g[j].abs()) > 0 else float("inf")
            if 0 <= t <= float(room[j]):
                best = min(best, cost + t)
    return best


def test_boxed_l1_distance_is_the_exact_first_order_distance_inside_the_box():
    gen = torch.Generator().manual_seed(7)
    for _ in range(40):
        g = torch.randn(1, 5, generator=gen)
        x = torch.rand(1, 5, generator=gen)
        margin = torch.rand(1, generator=gen) * 2
        box = (torch.zeros_like(x), torch.ones_like(x))
        got = float(attacks.boxed_l1_distance(margin, g, x, box))
        want = _vertex_l1_distance(float(margin), g[0], x[0])
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6) or (got == want == float("inf"))
    wrong = attacks.boxed_l1_distance(torch.tensor([-0.5]), torch.tensor([[2.0, -1.0]]),
                                      torch.tensor([[0.5, 0.5]]), (torch.zeros(1, 2), torch.ones(1, 2)))
    assert float(wrong) == pytest.approx(-0.25)  # a misclassified point: the unboxed value, below 0
    with pytest.raises(ValueError, match="L1"):
        attacks.RankedTargets(3, by="linearised-box").assign(
            torch.zeros(1, 4), torch.tensor([0]), torch.tensor([0]), 0, 4, model=nn.Linear(2, 4),
            x=torch.rand(1, 2), threat=attacks.LinfBall(0.1))


def test_min_norm_restarts_from_the_fixed_radius_point_and_keeps_the_nearer_one():
    """On a linear model both searches end at the exact distance; the second restart runs on every
    example (not only the unbroken ones), starts from APGD-CE's point at the run's radius, and its passes
    are counted; the preset round-trips and its nested attack follows the threat's radius."""
    w = torch.randn(16, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Flatten(), Linear(w)).eval()
    x = 0.25 + 0.5 * torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))  # box inactive
    y = model(x).argmax(1)
    exact = (x.flatten(1) @ w - 0.5 * w.sum()).abs() / torch.linalg.vector_norm(w, ord=2)
    atk = attacks.get("min-norm-untargeted", 3.0, norm="l2")
    res = attacks.run(atk, model, x, y, seed=0)
    found = atk.threat.distance(res.x_adv, x)
    assert bool(res.success.all()) and bool(((found - exact).abs() <= 0.01 * exact + 1e-6).all())
    once = attacks.run(attacks.get("fmn", 3.0, norm="l2"), model, x, y, seed=0)
    assert bool((res.steps == 2 * once.steps).all())  # both restarts ran on every example
    inner = attacks.run(atk.start.starts[1].attack, model, x, y, seed=0)
    assert res.forward_rows > once.forward_rows + inner.forward_rows  # the second search's passes on top
    assert attacks.from_config(atk.config()) == atk
    assert attacks.get("min-norm-untargeted", 1.0, norm="l2").start.starts[1].attack.eps == 1.0
    with pytest.raises(ValueError, match="start policies"):
        attacks.StartsByRestart(())
    with pytest.raises(ValueError, match="Attack"):
        atk.replace(start=attacks.AttackStart("apgd-ce"))


def test_min_norm_curve_is_never_above_a_fixed_radius_run_it_starts_from():
    """Every example the restart's fixed-radius attack breaks at ε gets a radius ≤ ε (the search starts
    from that adversarial point and keeps the nearest adversarial point it sees)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.rand(20, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    atk = attacks.get("min-norm-untargeted", 0.5, norm="l2", steps=20)
    res = attacks.run(atk, model, x, y, seed=0)
    fixed = attacks.run(atk.start.starts[1].attack, model, x, y, seed=0)
    assert bool(res.success[fixed.success].all())
    assert bool((atk.threat.distance(res.x_adv, x)[fixed.success] <= 0.5 + 1e-5).all())


def test_steepest_steps_reach_the_exact_linf_distance_where_l2_steps_stop_short():
    """On a linear model whose nearest L∞ point is a vertex of the ball (every coordinate moved by the
    radius), the sign step of ``min-norm-untargeted`` ends within 0.01% of the exact radius ‖·‖ = m/‖w‖₁;
    ``fmn``'s L2-normalised step, which moves a coordinate by its share of ‖w‖₂, ends further out."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(784, generator=torch.Generator().manual_seed(0))
    model = Linear(w).eval()
    side = torch.where(torch.rand(32, 1, generator=g) < 0.5, -1.0, 1.0)
    a = (torch.rand(32, 1, generator=g) * 0.1 + 0.05) * side
    x = 0.5 + a * w.sign() + 0.01 * (torch.rand(32, 784, generator=g) - 0.5)  # radius ≤ 0.15: box inactive
    y = model(x).argmax(1)
    exact = (x @ w - 0.5 * w.sum()).abs() / w.abs().sum()
    gap = {}
    for name in ("fmn", "min-norm-untargeted"):
        atk = attacks.get(name, 0.3, norm="linf")
        res = attacks.run(atk, model, x, y, seed=0)
        assert bool(res.success.all()) and bool(atk.threat.contains(res.x_adv, x).all())
        gap[name] = float(((atk.threat.distance(res.x_adv, x) - exact) / exact).max())
    assert 0.0 <= gap["min-norm-untargeted"] <= 1e-4 < gap["fmn"]
    assert attacks.MinNorm().direction == "l2" and "direction" not in attacks.get("fmn", 0.3).config()
    with pytest.raises(ValueError, match="direction"):
        attacks.MinNorm(direction="sign")


class Affine(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("linf", 1), ("l1", float("inf"))])
@pytest.mark.parametrize("preset", ["min-norm-targeted", "min-norm-fab"])
def test_targeted_min_norm_finds_the_nearest_of_several_class_boundaries(norm, dual, preset):
    """A multi-class linear model is misclassified exactly where some z_t ≥ z_y, so the minimal radius is
    min over t of (z_y − z_t)/‖w_y − w_t‖ (dual norm); the targeted searches (3 targets ranked by that
    linearised distance, exact here; FAB's 9 by clean logit, every wrong class here) find it within 1%.
    Class weights of very different sizes make the class with the nearest logit another than the nearest
    boundary."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(5, 30, generator=gen) * torch.tensor([1.0, 8.0, 0.5, 4.0, 2.0])[:, None]
    b = 3 * torch.randn(5, generator=gen)
    model = Affine(w, b).eval()
    x = 0.4 + 0.2 * torch.rand(40, 30, generator=gen)
    z = model(x)
    y = z.argmax(1)
    diff = w[y][:, None, :] - w[None, :, :]  # [N, C, d]: w_y − w_t
    gap = z.gather(1, y[:, None]) - z
    dist = gap / torch.linalg.vector_norm(diff, ord=dual, dim=2).clamp_min(1e-12)
    dist = dist.masked_fill(torch.nn.functional.one_hot(y, 5).bool(), float("inf"))
    exact = dist.min(1).values
    atk = attacks.get(preset, {"l1": 2.0}.get(norm, 0.5), norm=norm)
    res = attacks.run(atk, model, x, y, seed=0)
    # the box stays inactive for these: x ± 0.08 ⊂ [0, 1]; in L1 the nearest point moves one coordinate
    inside = exact < (0.4 if norm == "l1" else 0.08)
    top = z.masked_fill(torch.nn.functional.one_hot(y, 5).bool(), float("-inf")).argmax(1)
    assert int(inside.sum()) >= 30 and int((dist.argmin(1) != top)[inside].sum()) >= 5  # the case in point
    found = atk.threat.distance(res.x_adv, x)
    assert bool(res.success[inside].all()) and bool(atk.threat.contains(res.x_adv, x).all())
    assert bool(((found - exact).abs() <= 0.01 * exact + 1e-6)[inside].all())
    assert attacks.from_config(atk.config()) == atk


def test_the_min_norm_battery_searches_every_example_with_both_members(tiny_npz):
    """``min-norm`` is a battery whose second member runs on every clean-correct example (a nearer point
    may come), not only on the survivors of the first, and the curve takes each example's nearer point."""
    from conftest import run_eval

    from robusteval.data import load_npz

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    df = run_eval([("lin", net)], ["min-norm"], [3.0], load_npz(tiny_npz), norm="l2", checks=False,
                  steps=10).records
    assert list(dict.fromkeys(df["attack"])) == ["min-norm-untargeted", "min-norm-targeted", "min-norm-fab"]
    for _, sub in df.groupby("attack"):
        attacked = sub[sub["status"] == "attacked"]
        assert (sub["status"] != "skipped").all() and (attacked["mode"] == "no-skip").all()
        assert len(attacked) == int(sub["clean_correct"].sum())
    nearest = df[~df["robust"] & (df["status"] == "attacked")].groupby("example_id")["distance"].min()
    got = reports.radii(df).set_index("example_id")["radius"]
    assert torch.allclose(torch.tensor(got[nearest.index].to_numpy()), torch.tensor(nearest.to_numpy()))


def test_l2_square_adds_its_pattern_and_an_earlier_configuration_still_writes_over_it():
    """The L2 Square preset blends its pattern into W1's old perturbation (``blend=True`` in its text); the
    text of an earlier run (no ``blend``) still builds the overwriting form, so its records reproduce."""
    w = torch.randn(3 * 8 * 8, generator=torch.Generator().manual_seed(4))
    model = nn.Sequential(nn.Flatten(), Linear(w)).eval()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    y = model(x).argmax(1)
    atk = attacks.get("square", 1.0, norm="l2", queries=60)
    assert "RandomSquaresL2(blend=True)" in atk.config()
    old = attacks.from_config(atk.config().replace("RandomSquaresL2(blend=True)", "RandomSquaresL2()"))
    assert old.optimizer.blend is False and old.config() == atk.config().replace("(blend=True)", "()")
    new_run, old_run = attacks.run(atk, model, x, y, seed=0), attacks.run(old, model, x, y, seed=0)
    for res in (new_run, old_run):
        assert bool(atk.threat.contains(res.x_adv, x).all())
    assert not torch.equal(new_run.x_adv, old_run.x_adv)
    assert "blend" not in attacks.get("square", 5.0, norm="l1").config()  # L1 has always blended


def test_the_report_says_a_minimum_norm_member_searched_every_example():
    """A ``min-norm`` run's records are ``no-skip`` without ``--no-skip``: the table's note says why."""
    ok = {"status": "attacked", "clean_correct": True, "robust": False, "success": True}
    rows = [{"model": "m", "dataset": "d", "norm": "l2", "eps": 3.0, "example_id": 0, "mode": mode,
             "attack": name, "attack_config": cfg, **ok}
            for name, mode, cfg in (("min-norm-targeted", "no-skip", "tracking=MinDistance(), x=1"),
                                    ("apgd-ce", "skip", "tracking=Evasion()"))]
    alone = reports.mode_note(pd.DataFrame(rows[:1]))
    mixed = reports.mode_note(pd.DataFrame(rows))
    assert alone.startswith("Each minimum-norm attack ran on every clean-correct example")
    assert "--no-skip" not in alone
    assert mixed.startswith("Battery mode") and "accuracy against it alone" in mixed and "Mixed" not in mixed


def test_the_report_describes_each_annealed_attack_from_its_stored_configuration():
    ok = {"status": "attacked", "clean_correct": True, "robust": False, "success": True, "mode": "skip",
          "model": "m", "dataset": "d", "norm": "l2", "eps": 2.0, "example_id": 0}
    l1 = attacks.presets.FORMS["standard-v9"]
    built = [l1(attacks.get("apgd-ce", 5.0, norm="l1")), l1(attacks.get("apgd-t", 5.0, norm="l1")),
             attacks.get("fab-t", 2.0, norm="l2"), attacks.get("apgd-dlr", 2.0, norm="l2")]
    rows = [{**ok, "attack": a.name, "attack_config": a.config()} for a in built]
    bad = "anneal=((3.0, 0.3),), name=print()"  # a configuration that does not parse is not guessed at
    rows.append({**ok, "attack": "broken", "attack_config": bad})
    note = reports.mode_note(pd.DataFrame(rows))
    assert ("radius annealed (docs/methods.md, \"Radius annealing\"): apgd-ce, apgd-t spent 30% of their "
            "steps in the 3ε ball and 30% in the 2ε ball, fab-t spent 80% of its steps in the 10ε ball "
            "before the ε-ball") in note
    assert "apgd-dlr" not in note and "broken" not in note and "projected" not in note
    assert "radius annealed" not in reports.mode_note(pd.DataFrame(rows[3:4]))
    probed = attacks.presets.FORMS["standard-v10"](attacks.get("apgd-ce", 5.0, norm="l1"))
    row = {**ok, "attack": probed.name, "attack_config": probed.config()}
    assert ("apgd-ce spent 30% of its steps in the 3ε ball and 30% in the 2ε ball (apgd-ce checked its point "
            "projected onto the ε-ball every 10 of those steps) before the ε-ball") in \
        reports.mode_note(pd.DataFrame([row]))
