"""Architectures: the registry sweep, parameter counts from docs/methods.md ("Models"), normalisation
inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robusteval.errors import UserError
from robusteval.models import NORMALIZATIONS, Normalize, create_model, find_normalize, get_arch, list_models
from robusteval.models.wide_resnet import PreActBlock, TFSameConv2d

ALL = list_models()
LIGHT = [name for name in ALL if not get_arch(name).heavy]



def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_has_the_issue_architectures():
    assert {"small_cnn", "wrn16_4", "wrn28_8", "wrn28_10", "wrn40_8", "resnet50", "resnet152"} <= set(ALL)


@pytest.mark.parametrize("name", LIGHT)
def test_light_models_forward_without_nan(name):
    spec = get_arch(name)
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(4, *spec.input_size)
    out = model(x)  # train mode: exercises batch-statistics BN
    assert out.shape == (4, spec.num_classes) and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", ALL)
def test_every_model_builds_and_traces_its_input_size(name):
    # The meta device checks construction and every shape at the full input size without computing;
    # heavy models are too slow to run for real in the quick suite (see the slow test below).
    spec = get_arch(name)
    with torch.device("meta"):
        model = create_model(name).eval()
        out = model(torch.empty(2, *spec.input_size))
    assert out.shape == (2, spec.num_classes)
    assert isinstance(next(model.children()), Normalize), "Normalize must be the first layer"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if get_arch(n).heavy])
def test_heavy_models_forward_without_nan(name):
    spec = get_arch(name)
    model = create_model(name).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, *spec.input_size))).all()


@pytest.mark.parametrize(
    "name, llr, stem16",
    [
        ("wrn28_8", 23_501_450, 23_354_842),
        ("wrn40_8", 35_894_922, 35_748_314),
        ("wrn28_10", 36_713_770, 36_479_194),
    ],
)
def test_wrn_parameter_counts_match_algorithms_md(name, llr, stem16):
    with torch.device("meta"):
        assert n_params(create_model(name)) == llr
        assert n_params(create_model(name, stem_width=16)) == stem16  # Gowal et al.'s 16-channel stem


def test_torchvision_resnet_parameter_counts():
    with torch.device("meta"):
        assert n_params(create_model("resnet50")) == 25_557_032
        assert n_params(create_model("resnet152")) == 60_192_808


def test_wrn_layout_details():
    model = create_model("wrn16_4", activation="softplus")
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    # Projection shortcut in the first block of every group (even group 1, equal widths), nowhere else.
    assert [b.shortcut is not None for b in blocks] == [True, False] * 3
    assert model.stem.out_channels == 64  # 16 * width
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.fc.bias is not None and torch.all(model.fc.bias == 0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(type(m) is nn.BatchNorm2d and m.momentum == 0.1 and m.eps == 1e-5 for m in bns)
    softplus = [m for m in model.modules() if isinstance(m, nn.Softplus)]
    assert len(softplus) == 1 + 2 * 6 and all(m.beta == 1 for m in softplus)  # 2 per block + head
    assert not any(isinstance(m, (nn.Dropout, nn.ReLU)) for m in model.modules())
    # He-normal, truncated at 2σ: std close to sqrt(2 / fan_in), no value beyond the cut.
    w = model.blocks[0].conv1.weight
    sigma = (2.0 / w[0].numel()) ** 0.5
    assert abs(w.std().item() / sigma - 1) < 0.05
    assert w.abs().max().item() <= 2 * sigma / 0.87962566103423978 + 1e-6


def test_activations_and_unknown_names():
    for act, cls in [("relu", nn.ReLU), ("softplus", nn.Softplus), ("swish", nn.SiLU)]:
        assert any(isinstance(m, cls) for m in create_model("small_cnn", activation=act).modules())
    with pytest.raises(UserError, match="unknown activation"):
        create_model("wrn16_4", activation="tanh")
    with pytest.raises(UserError, match="known: .*small_cnn"):
        create_model("resnet9000")
    with pytest.raises(UserError, match="bad arguments"):
        create_model("small_cnn", depth=3)


def test_tf_same_padding_is_asymmetric_for_stride_two():
    conv = TFSameConv2d(1, 1, 3, 2, 0, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TF SAME pads 0 top/left and 1 bottom/right: the top-left tap of output (0, 0) is x[0, 0].
    assert conv(x)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    model = create_model("wrn16_4", padding="tf_same")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalize_layer_maps_unit_inputs_with_the_llr_constants():
    model = create_model("wrn16_4").eval()
    norm = find_normalize(model)
    mean, std = NORMALIZATIONS["cifar10"]
    assert mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())  # travels with checkpoints
    # 2x - 1 for MNIST-like data and ImageNet.
    assert find_normalize(create_model("small_cnn")).as_dict() == {"mean": [0.5], "std": [0.5]}
    assert NORMALIZATIONS["imagenet"] == ((0.5,) * 3, (0.5,) * 3)
    custom = create_model("small_cnn", normalization={"mean": [0.2], "std": [0.3]})
    assert find_normalize(custom).as_dict()["std"] == pytest.approx([0.3])


def test_models_take_unit_inputs_and_gradients_reach_them():
    model = create_model("small_cnn").eval()
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
