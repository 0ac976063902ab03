"""BPDA: zero-gradient operations pass gradients straight through; forward values unchanged."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import QuantisedInput, run_eval
from torch import nn

from robusteval import bpda
from robusteval.cli import cli
from robusteval.data import load_npz
from robusteval.errors import UserError
from robusteval.models import load_model


@pytest.fixture(scope="module")
def data(tiny_npz):
    return load_npz(tiny_npz)


@pytest.fixture(scope="module")
def exported(tiny_ckpt, data, tmp_path_factory):
    """The tiny CNN behind 4-level input quantisation, saved as a torch.export program (.pt2)."""
    model = QuantisedInput(load_model(tiny_ckpt).model).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (data.images[:4],), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("pt2") / "quantised.pt2"
    torch.export.save(program, path)
    return path


def test_straight_through_keeps_the_forward_and_gives_a_gradient(exported, data):
    model = load_model(exported).model
    x = data.images
    assert bpda.zero_gradient_ops(model, x[:2]) == ["round"]
    st = bpda.straight_through(model, x[:8])
    assert st.replaced == ["round"]
    with torch.no_grad():
        assert torch.equal(st(x), model(x))  # bit-identical forward
    probe = x[:8].clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(probe).sum(), probe, allow_unused=True)
    assert plain is None or bool((plain == 0).all())  # the original hides its gradient
    (g,) = torch.autograd.grad(st(probe).sum(), probe)
    assert bool((g != 0).any())


def test_gradient_attacks_through_bpda_break_at_least_as_much_as_square(exported, data):
    kw = dict(steps=30, restarts=2, queries=500, batch_size=32, device="cpu")
    loaded = load_model(exported)
    plain = run_eval([loaded], ["untargeted", "multi-targeted"], 0.1, data, **kw)
    names = {a.check: a.detail for a in plain.alarms}
    assert "unusable-gradients" in names and "round" in names["unusable-gradients"]  # the alarm stays...
    assert "through BPDA" in names["unusable-gradients"]  # ...and the attacks went through BPDA by themselves
    assert set(plain.records["model"]) == {"quantised+bpda"} and all(a.model == "quantised+bpda"
                                                                     for a in plain.alarms)
    outcome = run_eval([load_model(exported)], ["untargeted", "multi-targeted"], 0.1, data, no_skip=True,
                       bpda=True, **kw)
    with_bpda = outcome.records
    assert set(with_bpda["model"]) == {"quantised+bpda"}
    robust = with_bpda.groupby("attack")["robust"].mean()
    # independent columns (--no-skip): each gradient attack alone matches or beats Square
    assert robust["multi-targeted"] <= robust["square"] and robust["untargeted"] <= robust["square"]
    assert "unusable-gradients" not in {a.check for a in outcome.alarms}
    # every recorded point was verified on the original model (the runner's re-classification)
    attacked = with_bpda[with_bpda.status == "attacked"]
    assert (attacked["robust"] == (attacked["adv_pred"] == attacked["label"])).all()


def test_bpda_refuses_a_model_without_zero_gradient_ops(tiny_ckpt, data):
    with pytest.raises(UserError, match="no zero-gradient operation"):
        bpda.straight_through(load_model(tiny_ckpt).model, data.images[:4])


def test_bpda_on_a_torchscript_archive(tiny_ckpt, tiny_npz, data, tmp_path):
    path = tmp_path / "quantised.ts"
    torch.jit.script(QuantisedInput(load_model(tiny_ckpt).model).eval()).save(str(path))
    model = load_model(path).model
    assert bpda.zero_gradient_ops(model, data.images[:2]) == ["round"]
    st = bpda.straight_through(model, data.images[:8])
    with torch.no_grad():
        assert torch.equal(st(data.images), model(data.images))  # bit-identical forward
    probe = data.images[:8].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(st(probe).sum(), probe)
    assert bool((g != 0).any())
    (plain,) = torch.autograd.grad(model(probe).sum(), probe, allow_unused=True)
    assert plain is None or bool((plain == 0).all())  # the override is gone after the call
    args = ["attack", "-m", str(path), "--bpda", "--dataset", f"npz:{tiny_npz}", "--n", "32", "--eps",
            "0.1", "-a", "untargeted", "--steps", "20", "--restarts", "1", "--queries", "300", "--device",
            "cpu", "-q", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "quantised+bpda" in result.stdout


def test_bpda_on_the_command_line(exported, tiny_npz, tmp_path):
    args = ["attack", "-m", str(exported), "--bpda", "--dataset", f"npz:{tiny_npz}", "--n", "32", "--eps",
            "0.1", "-a", "untargeted", "--steps", "20", "--restarts", "1", "--queries", "300",
            "--device", "cpu", "-q", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output  # through BPDA the gradient attacks work: no alarm
    assert "quantised+bpda" in result.stdout and "none" in result.stdout


class StepFunctions(nn.Module):
    """Two step functions of the input: a comparison converted to numbers, and one selecting in a where."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x > 0.5).float()) + self.net(torch.where(x < 0.3, 1.0, 0.0))


class NearestLevel(nn.Module):
    """Argmax-based quantisation: each pixel replaced by the nearest of 4 levels (an argmin index)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("levels", torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))

    def forward(self, x):
        return self.net(self.levels[(x[..., None] - self.levels).abs().argmin(-1)])


@pytest.mark.parametrize("wrapper, found", [(StepFunctions, "comparison"),
                                            (NearestLevel, "argmax-quantisation")])
def test_bpda_passes_gradients_through_step_functions(wrapper, found, tiny_ckpt, data):
    model = wrapper(load_model(tiny_ckpt).model).eval()
    x = data.images[:8]
    assert bpda.zero_gradient_ops(model, x) == [found]
    st = bpda.straight_through(model, x)
    with torch.no_grad():
        assert torch.equal(st(data.images), model(data.images))  # bit-identical forward
    probe = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(st(probe).sum(), probe)
    assert bool((g != 0).any())
