"""The reference trainer: LLR regulariser checks and batch-norm capture/replay (docs/methods.md,
"LLR training"), one step of every method, the engine as the only inner loop, and bit-exact resume after
interruption."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import attacks
from robusteval.data import Dataset
from robusteval.models import create_model
from robusteval.training import (
    BatchNormReplay,
    LossConfig,
    compute_loss,
    eps_at,
    llr_loss,
    llr_terms,
    lr_at,
    make_config,
    make_optimizer,
    train,
)


def batch(n=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("small_cnn", **kw)


# ------------------------------------------------------------------------------------ LLR regulariser


def test_llr_regulariser_is_exactly_zero_at_eps_zero():
    model, (x, y) = small(), batch()
    cfg = LossConfig("llr", steps=3)
    out = llr_loss(model, x, y, eps=0.0, cfg=cfg)
    reference = small()
    nominal = F.cross_entropy(reference(x), y)
    assert out.parts["g"] == 0.0 and out.parts["lin"] == 0.0
    # The LLR loss normalises with the captured batch statistics, the reference with BatchNorm's own
    # kernel: the same values reduced in a different order, so they agree to float32 rounding (a few ulp
    # of a loss ~5, ulp 4.8e-7), not bit for bit. A non-zero regulariser would add orders more.
    torch.testing.assert_close(out.loss, cfg.nominal_weight * nominal, rtol=1e-6, atol=0)


class AffineLossModel(nn.Module):
    """Logits whose first entry is w·x + b; with criterion z[:, 0] the loss is affine in x."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 2).double()

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_llr_on_an_affine_loss_has_zero_gap_and_only_the_mu_term():
    torch.manual_seed(1)
    model = AffineLossModel()
    x, y = batch(8, dtype=torch.float64)
    y = y % 2
    affine = lambda z, y: z[:, 0]
    w = model.lin.weight[0].detach()
    x0 = x.clone().requires_grad_(True)
    loss0 = affine(model(x0), y)
    (grad0,) = torch.autograd.grad(loss0.sum(), x0, create_graph=True)
    for seed in range(5):  # g = 0 for every δ
        gen = torch.Generator().manual_seed(seed)
        delta = (torch.rand(x.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.2
        g, lin = llr_terms(lambda xx: affine(model(xx), y), x, delta, loss0, grad0)
        assert g.abs().max() < 1e-12
        assert torch.allclose(lin, (delta.flatten(1) * w).sum(1))
    # The full step (engine search in float32: the engine keeps its buffers in float32).
    model.float()
    x, w = x.float(), w.float()
    cfg = LossConfig("llr", steps=3, llr_lambda=4.0, llr_mu=3.0, nominal_weight=2.0)
    out = llr_loss(model, x, y, eps=0.1, cfg=cfg, criterion=affine)
    assert out.parts["g"] < 1e-5 and out.delta.abs().max() > 0
    mu_term = 3.0 * (out.delta.flatten(1) * w).sum(1).abs().mean()
    regulariser = out.loss - 2.0 * affine(model(x), y).mean()
    assert torch.allclose(regulariser, mu_term, rtol=1e-4, atol=1e-4)


def test_directional_derivative_matches_finite_differences_in_float64():
    torch.manual_seed(0)  # a smooth tiny net (small_cnn's max-pooling has kinks); BN with fixed stats
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Softplus(), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10)).double().eval()
    x, y = batch(4, dtype=torch.float64)
    x = x * 0.8 + 0.1
    x0 = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x0), y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x0, create_graph=True)
    delta = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.5
    h = 1e-5
    with torch.no_grad():
        fd = (F.cross_entropy(model(x + h * delta), y, reduction="none")
              - F.cross_entropy(model(x - h * delta), y, reduction="none")) / (2 * h)
    assert torch.allclose((delta * grad).flatten(1).sum(1), fd, rtol=1e-6, atol=1e-8)


def test_mu_term_has_a_parameter_gradient_through_double_backprop():
    model, (x, y) = small(activation="softplus"), batch()
    x0 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0, create_graph=True)
    assert grad.grad_fn is not None
    cfg = LossConfig("llr", steps=2, llr_lambda=0.0, llr_mu=1.0, nominal_weight=0.0)
    out = llr_loss(model, x, y, eps=0.1, cfg=cfg)  # loss = mean |δ*ᵀ∇ℓ(x)| only
    model.zero_grad()
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


# -------------------------------------------------------------------------------------- batch norm


def test_bn_replay_normalises_with_the_nominal_statistics_by_hand():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    net = nn.Sequential(conv, bn).train()
    x, _ = batch(8)
    delta = 0.1 * torch.randn_like(x)
    fresh = copy.deepcopy(net)
    stock = net(x)  # plain train-mode BatchNorm2d
    with BatchNormReplay(fresh) as ctx:
        captured = fresh(x)
        ctx.mode = "replay_detached"
        replayed = fresh(x + delta)
        ctx.mode = "replay_attached"
        attached = fresh(x + delta)
    assert torch.allclose(captured, stock, atol=1e-5)
    h0, h1 = conv(x), conv(x + delta)
    mu = h0.mean((0, 2, 3), keepdim=True)
    var = h0.var((0, 2, 3), unbiased=False, keepdim=True)
    by_hand = (h1 - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(replayed, by_hand, atol=1e-5) and torch.allclose(attached, by_hand, atol=1e-5)
    # Running statistics moved once, exactly as the stock forward moved them; forward restored.
    assert torch.allclose(fresh[1].running_mean, bn.running_mean) and torch.allclose(fresh[1].running_var,
                                                                                        bn.running_var)
    assert int(fresh[1].num_batches_tracked) == 1 and "forward" not in fresh[1].__dict__


def test_running_stats_change_exactly_once_per_llr_step():
    model, (x, y) = small(), batch(32)
    reference = copy.deepcopy(model)
    reference(x)  # one plain train-mode forward on the nominal batch
    out = llr_loss(model, x, y, eps=0.1, cfg=LossConfig("llr", steps=3))
    out.loss.backward()
    for (name, buf), ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        if "running" in name or "num_batches" in name:
            assert torch.allclose(buf, ref, atol=1e-6), name
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 1 and "forward" not in m.__dict__ for m in bns)


# ------------------------------------------------------------------------------ one step per method


@pytest.mark.parametrize("method", ["nominal", "adversarial", "trades", "llr"])
def test_one_step_decreases_the_methods_own_loss(method):
    model, (x, y) = small(), batch(32)
    cfg = LossConfig(method, steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = compute_loss(cfg, model, x, y, eps=0.1, seed=0)
    opt.zero_grad()
    before.loss.backward()
    opt.step()
    after = compute_loss(cfg, model, x, y, eps=0.1, seed=0, delta=before.delta)
    assert after.loss.item() < before.loss.item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())


@pytest.mark.parametrize("method,calls", [("nominal", 0), ("adversarial", 1), ("trades", 1), ("llr", 1)])
def test_inner_maximisation_runs_through_the_engine(monkeypatch, method, calls):
    seen = []
    real = attacks.run

    def counting(attack, *args, **kwargs):
        seen.append(attack)
        return real(attack, *args, **kwargs)

    monkeypatch.setattr(attacks, "run", counting)
    model, (x, y) = small(), batch()
    compute_loss(LossConfig(method, steps=2), model, x, y, eps=0.1)
    assert len(seen) == calls
    assert all(a.tracking == attacks.FinalIterate(evades=False) and a.steps == 2 for a in seen)
    seen.clear()
    compute_loss(LossConfig(method, steps=2), model, x, y, eps=0.0)
    assert not seen  # ε = 0: nothing to search


# ---------------------------------------------------------------------------------- trainer and CLI


def synthetic(n, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    # Class-dependent mean so there is something to learn.
    x = (0.3 * torch.rand(n, 1, 28, 28, generator=g) + 0.07 * y.view(-1, 1, 1, 1)).clamp(0, 1)
    ids = torch.arange(offset, offset + n)
    classes = [str(i) for i in range(10)]
    return Dataset("fashion-mnist", "train", x, y, ids, classes, (0.5,), (0.5,), "synthetic")


def test_schedules_and_weight_decay_groups():
    cfg = make_config("llr", "fashion-mnist", epochs=10, eps=0.1, eps_ramp_epochs=2)
    assert cfg.lr_decay_epochs == (7, 9) and cfg.batch_size == 128 and (cfg.llr_lambda, cfg.llr_mu) == (4, 3)
    assert [lr_at(cfg, e) for e in (0, 6, 7, 9)] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert eps_at(cfg, 0, 100) == 0.0 and eps_at(cfg, 100, 100) == pytest.approx(0.05)
    assert eps_at(cfg, 500, 100) == 0.1
    paper = make_config("llr", "cifar10")
    assert (paper.epochs, paper.lr_decay_epochs, paper.batch_size) == (110, (100, 105), 256)
    assert (paper.eps_ramp_epochs, paper.eps, paper.weight_decay) == (15, 8 / 255, 2e-4)
    model = small()
    decay, other = make_optimizer(model, cfg).param_groups
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay["params"]} == kernels and decay["weight_decay"] == cfg.weight_decay
    assert other["weight_decay"] == 0
    assert len(decay["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_resume_after_interruption_is_bit_exact(tmp_path):
    data = (synthetic(96), synthetic(20, offset=10_000, seed=1))
    cfg = make_config("llr", "fashion-mnist", epochs=2, batch_size=32, steps=1, eps=0.1, eps_ramp_epochs=1,
                      eval_n=20, eval_steps=2, lr_decay_epochs=(1,))
    full = train(cfg, tmp_path / "full.pt", data=data, progress=False)

    def kill(info):
        if info.global_step == 4:  # mid second epoch (3 steps per epoch)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut.pt", data=data, progress=False, on_step=kill)
    saved = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert (saved["extra"]["resume"]["epoch"], saved["extra"]["resume"]["step_in_epoch"]) == (1, 1)
    resumed = train(cfg, tmp_path / "cut.pt", data=data, progress=False, resume=True)
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "cut.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert resumed["clean_acc"] == full["clean_acc"] and resumed["pgd_acc"] == full["pgd_acc"]
    assert len(b["metrics"]["epochs"]) == 2 and b["extra"]["resume"]["finished"]


def test_trainer_calls_the_engine_for_every_adversarial_step(monkeypatch, tmp_path):
    calls = []
    real = attacks.run
    monkeypatch.setattr(attacks, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = make_config("adversarial", "fashion-mnist", epochs=1, batch_size=32, steps=1, eps_ramp_epochs=0,
                      eval_n=0)
    train(cfg, tmp_path / "adv.pt", data=(synthetic(96), None), progress=False)
    assert len(calls) == 3


def test_cli_trains_on_fashion_mnist_and_refuses_conflicting_resume(tmp_path):
    from robusteval.cli import cli

    out = tmp_path / "nom.pt"
    args = ["train", "--method", "nominal", "--n-train", "128", "--eval-n", "50", "--epochs", "1",
            "--eval-steps", "2", "--device", "cpu", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(cli, args)
    if result.exit_code and "not found" in result.output:
        pytest.skip("Fashion-MNIST is not installed")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["training"]["command"] and ckpt["training"]["method"] == "nominal"
    assert ckpt["arch"] == "small_cnn" and "clean_acc" in ckpt["metrics"]
    clash = CliRunner().invoke(cli, [*args, "--lr", "0.5", "--resume"])
    assert clash.exit_code != 0 and "stored configuration" in clash.output
    done = CliRunner().invoke(cli, [*args, "--resume"])
    assert done.exit_code == 0, done.output
