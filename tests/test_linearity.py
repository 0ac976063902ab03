"""γ(ε, x), Proposition 4.1 and loss surfaces (robusteval.linearity) against closed forms and invariants."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import attacks
from robusteval.figures import gamma_histogram
from robusteval.linearity import eval_mode, gamma, gamma_summary, loss_surface, prop41_check, random_direction
from robusteval.models import create_model

EPS = 8 / 255


class Identity(torch.nn.Module):
    """The "model" z = x (flattened); with loss ½‖z‖², g(δ; x) = ½‖δ‖² for every x."""

    def forward(self, x):
        return x.flatten(1)


half_sq = lambda z, y: 0.5 * (z**2).sum(1)


def box_gamma(x, eps):
    """½·Σ_i max of δ_i² over the box-clipped interval [max(−ε, −x_i), min(ε, 1 − x_i)]."""
    lo, hi = torch.clamp(-x, min=-eps), torch.clamp(1 - x, max=eps)
    return 0.5 * torch.maximum(lo**2, hi**2).flatten(1).sum(1).double()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return create_model("small_cnn", width=4, hidden=16, activation="softplus").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("grad_mode", ["deepmind", "exact"])
def test_quadratic_loss_gamma_is_half_d_eps_squared(grad_mode):
    g = torch.Generator().manual_seed(0)
    x = 2 * EPS + torch.rand(5, 1, 12, 12, generator=g) * (0.5 - 2 * EPS)  # away from the box faces
    y = torch.zeros(5, dtype=torch.long)
    r = gamma(Identity(), x, y, EPS, grad_mode=grad_mode, loss_fn=half_sq)
    expected = 0.5 * 144 * EPS**2
    target = torch.full((5,), expected, dtype=torch.float64)
    assert torch.allclose(r.gamma.double(), target, rtol=1e-4, atol=0)
    assert torch.allclose(box_gamma(x, EPS), target, rtol=1e-6)
    # The recomputed pieces are consistent: γ = |ℓ(x+δ) − ℓ(x) − δᵀ∇ℓ| with ∇ℓ(x) = x.
    lin = (r.delta * x).flatten(1).sum(1)
    assert torch.allclose(r.lin, lin.abs()) and torch.allclose(r.grad, x)
    assert torch.allclose(r.gamma, (r.loss_adv - r.loss - lin).abs())
    assert r.delta.abs().max() <= EPS + 1e-6


def test_quadratic_loss_gamma_box_clipped():
    # ε = 0.8 > x_i and > 1 − x_i for many pixels: the optimum lies on a box face. The added linear term
    # 1ᵀz leaves g unchanged but keeps the ascent direction x + δ + 1 away from zero inside the box.
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 8, 8, generator=g) * 0.5
    y = torch.zeros(4, dtype=torch.long)
    loss = lambda z, y: 0.5 * (z**2).sum(1) + z.sum(1)
    r = gamma(Identity(), x, y, 0.8, loss_fn=loss)
    expected = box_gamma(x, 0.8)
    assert expected.max() < 0.5 * 64 * 0.8**2  # the box really clips
    assert torch.allclose(r.gamma.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("grad_mode", ["deepmind", "exact"])
def test_affine_loss_gives_zero_gamma(grad_mode):
    w = torch.linspace(-2, 2, 100)
    affine = lambda z, y: z @ w + 3.0
    x = torch.rand(6, 1, 10, 10)
    r = gamma(Identity(), x, torch.zeros(6, dtype=torch.long), 0.1, grad_mode=grad_mode, loss_fn=affine)
    assert r.gamma.max() < 1e-5  # float32 rounding of O(10) numbers only
    assert r.lin.max() > 0.1  # while the linear term itself is large


def test_gamma_nonnegative_zero_at_zero_and_monotone_in_eps(cnn, batch):
    x, y = batch
    prev = None
    for eps in (0.0, 0.02, 0.05, 0.1):
        r = gamma(cnn, x, y, eps, steps=20, seed=3)
        assert (r.gamma >= 0).all() and torch.isfinite(r.gamma).all()
        if eps == 0:
            assert torch.equal(r.gamma, torch.zeros_like(r.gamma))
            assert torch.equal(r.delta, torch.zeros_like(r.delta))
        else:
            assert (r.gamma >= prev * (1 - 1e-3) - 1e-7).all()
            assert (r.delta.abs().flatten(1).amax(1) <= eps + 1e-6).all()
        prev = r.gamma
    # The returned γ is the best iterate the engine kept, recomputed at that point.
    assert torch.allclose(r.gamma, r.search_value, rtol=1e-4, atol=1e-6)


def test_gamma_is_independent_of_batching(cnn, batch):
    x, y = batch
    ids = torch.arange(100, 108)
    whole = gamma(cnn, x, y, 0.05, steps=10, ids=ids).gamma
    parts = torch.cat([gamma(cnn, x[i:i + 5], y[i:i + 5], 0.05, steps=10, ids=ids[i:i + 5]).gamma
                       for i in range(0, 8, 5)])
    assert torch.allclose(whole, parts, rtol=1e-4, atol=1e-6)


def test_numerics_guard_and_mode_restore(batch):
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(784, 10)

        def forward(self, x):
            tf32 = torch.backends.cuda.matmul.allow_tf32
            seen.append((tf32, torch.is_autocast_enabled("cpu"), self.training))
            return self.lin(x.flatten(1))

    x, y = batch
    model = Probe().train()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = gamma(model, x, y, 0.05, steps=2)
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert seen and all(s == (False, False, False) for s in seen)  # fp32, no autocast, eval mode
    assert r.gamma.dtype == torch.float32 and model.training  # the caller's mode is back
    with pytest.raises(ValueError, match="fp32"):
        gamma(Probe().double(), x, y, 0.05, steps=1)
    with pytest.raises(ValueError, match="bn"):
        gamma(model, x, y, 0.05, bn="train")


def test_bn_nominal_leaves_the_model_untouched(cnn, batch):
    x, y = batch
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    nominal = gamma(cnn, x, y, 0.05, steps=5, bn="nominal")
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert not cnn.training and (nominal.gamma >= 0).all()
    ev = gamma(cnn, x, y, 0.05, steps=5, bn="eval")
    assert not torch.allclose(nominal.loss, ev.loss)  # batch statistics differ from running ones
    # ℓ(x) under nominal statistics is the train-mode loss of the batch.
    train_copy = create_model("small_cnn", width=4, hidden=16, activation="softplus")
    train_copy.load_state_dict(cnn.state_dict())
    with torch.no_grad():
        assert torch.allclose(nominal.loss, F.cross_entropy(train_copy.train()(x), y, reduction="none"),
                              atol=1e-5)


def test_prop41_holds_for_attack_delta_and_flags_underestimates(cnn, batch):
    x, y = batch
    eps = 0.05
    r = gamma(cnn, x, y, eps, steps=20)
    atk = attacks.run(attacks.get("pgd-20", eps), cnn, x, y, seed=5)
    check = prop41_check(cnn, x, y, atk.x_adv, r)
    assert check.fraction == 0.0 and (check.shortfall == 0).all()
    assert (check.bound >= check.lhs - 1e-5).all()
    # A γ that is too small must be caught, with the size of the shortfall in the warning.
    r.gamma = torch.zeros_like(r.gamma)
    with pytest.warns(RuntimeWarning, match="under-estimated"):
        bad = prop41_check(cnn, x, y, atk.x_adv, r)
    assert bad.fraction > 0 and (bad.shortfall[bad.violated] > 0).all()
    with pytest.raises(ValueError, match="ε-ball"):
        prop41_check(cnn, x, y, (x + 0.2).clamp(0, 1), r)
    nominal = gamma(cnn, x, y, eps, steps=20, bn="nominal")
    assert prop41_check(cnn, x, y, atk.x_adv, nominal).fraction == 0.0


def test_loss_surface_centre_and_adversarial_point(cnn, batch):
    x, y = batch[0][:1], batch[1][:1]
    eps = 0.1
    with eval_mode(cnn):
        atk = attacks.get("untargeted", eps, steps=10, restarts=1, tracking=attacks.Maximize())
        res = attacks.run(atk, cnn, x, y)
    surf = loss_surface(cnn, x[0], y[0], res.x_adv[0] - x[0], rand_direction=7, eps=eps, grid=41)
    with torch.no_grad():
        l0 = F.cross_entropy(cnn(x), y).item()
        ladv = F.cross_entropy(cnn(res.x_adv), y).item()
    assert surf.loss.shape == (41, 41)
    assert surf.loss[20, 20].item() == pytest.approx(l0, rel=1e-6) and surf.center == pytest.approx(l0, 1e-6)
    i = int((surf.a == 1).nonzero()[0, 0])  # the attack's point is exactly a grid point (a = 1, b = 0)
    assert i == 30 and surf.b[20] == 0
    assert surf.loss[i, 20].item() == pytest.approx(ladv, rel=1e-5)
    assert surf.adv == pytest.approx(ladv, rel=1e-5)
    frame = surf.to_frame()
    assert len(frame) == 41 * 41 and set(frame.columns) == {"a", "b", "loss"}
    v = random_direction((1, 3, 3), seed=7)
    assert torch.equal(v, random_direction((1, 3, 3), seed=7)) and set(v.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="odd"):
        loss_surface(cnn, x[0], y[0], res.x_adv[0] - x[0], eps=eps, grid=40)


def test_histogram_shared_bins_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"model": ["a"] * 50 + ["b"] * 30, "gamma": rng.random(80) ** 2, "eps": 0.1,
                       "clean_correct": rng.random(80) > 0.5})
    df["sqrt_gamma"] = np.sqrt(df["gamma"])
    hist = gamma_histogram(df, tmp_path / "h.png", log=True, bins=12)
    assert (tmp_path / "h.png").stat().st_size > 0
    assert len(hist.edges) == 13 and hist.counts["a"].sum() == 50 and hist.counts["b"].sum() == 30
    for name, g in df.groupby("model"):
        assert np.array_equal(hist.counts[name], np.histogram(g["sqrt_gamma"], bins=hist.edges)[0])
    s = gamma_summary(df).set_index("model")
    assert s.loc["a", "n"] == 50
    assert math.isclose(s.loc["b", "sqrt_gamma_p90"], df[df.model == "b"]["sqrt_gamma"].quantile(0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hist.to_frame()["count"].sum() == 80
