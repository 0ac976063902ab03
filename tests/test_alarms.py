"""Masking alarms: each fires on a model built to trip it, none fires on the bundled zoo, and an alarm
marks the number unreliable in the table, summary.md and every report, with its own exit status."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import QuantisedInput, run_eval
from torch import nn

from robusteval import alarms
from robusteval.cli import cli
from robusteval.data import load_npz
from robusteval.models import list_zoo, load_model


class _Reverse(torch.autograd.Function):
    """The identity forward, the negated gradient backward: gradients that point the wrong way."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Wrapped(nn.Module):
    """The tiny trained CNN behind a transformation that masks or breaks it."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        k = self.kind
        if k == "quantised":
            return self.net(torch.round(x * 3) / 3)
        if k == "step":
            return self.net((x > 0.5).float())
        if k == "softmax":
            return torch.softmax(self.net(x), 1)
        if k == "noise":
            return self.net(x) + 0.5 * torch.randn(x.shape[0], 10)
        if k == "autograd":
            with torch.enable_grad():
                probe = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.net(probe).sum(), probe)
            return self.net(x) + 0 * g.flatten(1)[:, :10]
        if k == "reversed":
            return self.net(_Reverse.apply(x))
        if k == "constant":
            return torch.zeros(x.shape[0], 10)  # the same prediction whatever the input
        return self.net(x)


@pytest.fixture(scope="module")
def data(tiny_npz):
    return load_npz(tiny_npz)


@pytest.fixture(scope="module")
def net(tiny_ckpt):
    return load_model(tiny_ckpt).model.eval()


def _alarm_names(model, data, name="m", eps=(0.1,), **kw):
    kw.setdefault("randomized", False)  # a random model raises the alarm unless the randomised protocol runs
    kw = {"steps": 20, "restarts": 1, "queries": 300, "batch_size": 32, "device": "cpu", "progress": False,
          **kw}
    return {a.check for a in run_eval([(name, model)], ["untargeted"], list(eps), data, **kw).alarms}


@pytest.mark.parametrize("kind, alarm", [
    ("quantised", "unusable-gradients"),
    ("reversed", "black-box-beats-white-box"),
    ("step", "unusable-gradients"),
    ("softmax", "probability-outputs"),
    ("noise", "randomness"),
    ("autograd", "autograd-in-forward"),
])
def test_each_alarm_fires_on_a_model_built_to_trip_it(kind, alarm, net, data):
    assert alarm in _alarm_names(Wrapped(net, kind).eval(), data)


def test_no_convergence_at_large_eps_fires_on_a_model_no_attack_can_move(net, data):
    # A constant classifier: its clean-correct examples stay correct at every radius.
    found = _alarm_names(Wrapped(net, "constant").eval(), data)
    assert "no-convergence-at-large-eps" in found


def test_non_monotone_in_eps():
    found = alarms.monotone("m", "sha", {0.05: 0.40, 0.1: 0.55, 0.2: 0.10}, n=100)
    assert [(a.check, a.eps) for a in found if a.raised] == [("non-monotone-in-eps", 0.1)]
    assert len(found) == 3  # a verdict per radius: the plan's checks are covered
    assert not any(a.raised for a in alarms.monotone("m", "sha", {0.05: 0.40, 0.1: 0.405, 0.2: 0.10},
                                                     n=100))  # < 1 example


def test_a_plain_model_raises_no_alarm(net, data):
    assert _alarm_names(net, data) == set()


def test_no_false_alarm_on_the_bundled_zoo(data):
    names = [z for z in list_zoo() if z.startswith("fmnist-")]
    assert len(names) == 6
    ds = data.subset(slice(0, 24))
    models = [load_model(f"zoo:{z}") for z in names]
    out = run_eval(models, ["untargeted", "multi-targeted"], 0.1, ds, steps=40, restarts=2, queries=250,
                   batch_size=24, device="cpu")
    assert out.alarms == [], [(a.model, a.check, a.detail) for a in out.alarms]
    assert set(out.records["attack"]) == {"untargeted", "multi-targeted", "square"}  # the check ran
    assert {v.check for v in out.verdicts} == set(alarms.PRE + alarms.POST)  # every check gave a verdict


def test_unreliable_is_marked_everywhere_with_its_own_exit_status(net, tiny_npz, tmp_path):
    path = tmp_path / "quantised.pt"
    torch.jit.script(QuantisedInput(net).eval()).save(str(path))
    out = tmp_path / "run"
    args = ["attack", "-m", str(path), "--dataset", f"npz:{tiny_npz}", "--n", "32", "--eps", "0.1", "-a",
            "untargeted", "--steps", "10", "--restarts", "1", "--queries", "300", "--device", "cpu", "-q",
            "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == alarms.UNRELIABLE_EXIT, result.output
    # (the graph rounds its input: the attacks went through BPDA by themselves, and the name says so)
    assert "UNRELIABLE quantised+bpda: unusable-gradients" in result.stdout and "Alarms" in result.stdout
    assert "Remedy:" in result.stdout and "--allow-unreliable" in result.stderr
    summary = (out / "summary.md").read_text()
    assert "UNRELIABLE quantised" in summary and "unusable-gradients" in summary
    report = CliRunner().invoke(cli, ["report", str(out), "--format", "markdown"])
    assert report.exit_code == alarms.UNRELIABLE_EXIT and "unusable-gradients" in report.stdout
    allowed = CliRunner().invoke(cli, ["report", str(out), "--allow-unreliable"])
    assert allowed.exit_code == 0 and "UNRELIABLE quantised" in allowed.stdout
    # the worst case includes Square, which the gradient attacks could not match on this model
    from robusteval import records

    df = records.read(out)
    assert "square" in set(df["attack"])


class NanGradient(nn.Module):
    """Finite logits, a NaN input gradient everywhere (d√u at u = 0 times 0) and no zero-gradient op:
    no gradient attack can move it, and BPDA has nothing to replace."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0 * torch.sqrt((x - x.detach()).abs()).flatten(1).sum(1, keepdim=True)


def test_no_blind_members_square_alone_at_its_full_budget_when_gradients_are_unusable(net, data):
    out = run_eval([("nan-grad", NanGradient(net).eval())], ["standard"], 0.1, data.subset(slice(0, 16)),
                   batch_size=16, device="cpu", queries=None)
    df = out.records
    assert set(df["attack"]) == {"square"}  # the four gradient members were skipped, not run blind
    assert df["attack_config"].str.contains("steps=4999").all()  # Square's full 5,000 queries
    unusable = [a for a in out.alarms if a.check == "unusable-gradients"]
    assert unusable and "Square ran at its full budget" in unusable[0].detail  # the alarm stays
