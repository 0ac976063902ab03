"""Wide-ResNets in the layout of DeepMind's LLR code (docs/methods.md, "Models").

WRN-d-k (Zagoruyko & Komodakis 2016) as re-implemented in ``local_linearity_regularizer/wide_resnet.py``
for Qin et al., "Adversarial Robustness through Local Linearization" (NeurIPS 2019):

* stem: 3×3 conv, stride 1, **16·k** output channels (Zagoruyko uses 16);
* three groups of ``n = (d − 4) / 6`` pre-activation blocks, widths 16k, 32k, 64k, strides 1, 2, 2;
* block: ``a = act(BN(x))``; the first block of **every** group takes its shortcut as a 1×1 projection
  of the *activated* input ``a`` (even in group 1 where the widths already match), the other blocks
  use the raw ``x``; ``out = conv3×3(act(BN(conv3×3(a, stride)))) + shortcut``; no dropout;
* head: ``act(BN(x))`` → global average pool → linear with bias;
* all convolutions bias-free; ``nn.BatchNorm2d`` (momentum 0.1, eps 1e-5 = LLR-DM's decay 0.1); He
  normal init drawn from a truncated normal as TF1's ``variance_scaling(2, fan_in)``.

Parameter counts (BN and linear bias included, 10 classes): WRN-28-8 23,501,450; WRN-40-8 35,894,922;
WRN-28-10 36,713,770 (``stem_width=16`` gives Gowal et al.'s variant: 23,354,842 / 35,748,314 /
36,479,194). ``padding="tf_same"`` reproduces TF's asymmetric SAME padding for stride 2 (pad 0 top/left,
1 bottom/right), needed only to load TF weights; the default symmetric padding is fine for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robusteval.errors import UserError
from robusteval.models.normalize import Normalize, resolve_normalization
from robusteval.models.registry import make_activation, register

# TF1 truncated normal (cut at 2σ) has std 0.8796 of its untruncated σ; variance_scaling divides it out.
_TRUNC_STD = 0.87962566103423978


class TFSameConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size.

    Same parameters (and ``state_dict`` keys) as ``nn.Conv2d``; only the padding differs, and only for
    strided convolutions on even sizes, where TF puts the extra pixel at the bottom/right.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int, padding: str) -> nn.Conv2d:
    if padding == "tf_same":
        return TFSameConv2d(cin, cout, k, stride, 0, bias=False)
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation residual block; ``project`` = 1×1 shortcut from the activated input (LLR-DM)."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str, project: bool, padding: str):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), make_activation(activation)
        self.conv1 = _conv(cin, cout, 3, stride, padding)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), make_activation(activation)
        self.conv2 = _conv(cout, cout, 3, 1, padding)
        self.shortcut = _conv(cin, cout, 1, stride, padding) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.act2(self.bn2(self.conv1(a)))) + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` in LLR-DM's layout (see the module docstring); [0, 1] inputs."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 8,
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        normalization="cifar10",
        stem_width: int | None = None,
        padding: str = "same",
    ):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise UserError(f"Wide-ResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if padding not in ("same", "tf_same"):
            raise UserError(f"padding must be 'same' or 'tf_same', got {padding!r}")
        make_activation(activation)  # validate early, before building anything
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.normalize = Normalize(*resolve_normalization(normalization, in_channels))
        self.stem = _conv(in_channels, stem_width or 16 * width, 3, 1, padding)
        blocks, cin = [], stem_width or 16 * width
        for cout, stride in zip(widths, (1, 2, 2), strict=True):
            for i in range(n):
                first = i == 0
                blocks.append(PreActBlock(cin, cout, stride if first else 1, activation, first, padding))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.act = nn.BatchNorm2d(cin), make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal (truncated, TF1 ``variance_scaling(2, fan_in)``) kernels, zero biases, BN γ=1 β=0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = math.sqrt(2.0 / nn.init._calculate_fan_in_and_fan_out(m.weight)[0]) / _TRUNC_STD
                nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.blocks(self.stem(self.normalize(x)))))
        return self.fc(torch.flatten(self.pool(h), 1))


def _wrn(depth: int, width: int):
    def factory(
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 3,
        normalization="cifar10",
        stem_width: int | None = None,
        padding: str = "same",
    ) -> nn.Module:
        return WideResNet(depth, width, num_classes, activation, in_channels, normalization, stem_width,
                          padding)  # fmt: skip

    factory.__name__ = f"wrn{depth}_{width}"
    return factory


for _depth, _width, _heavy, _note in [
    (16, 4, False, "small, for CPU work"),
    (28, 8, True, "LLR CIFAR-10 (supplementary F.2)"),
    (28, 10, True, "Gowal et al. 2020 depth/width"),
    (40, 8, True, "the released LLR CIFAR-10 model"),
]:
    register(
        f"wrn{_depth}_{_width}",
        input_size=(3, 32, 32),
        dataset="cifar10",
        heavy=_heavy,
        description=f"Wide-ResNet-{_depth}-{_width}, LLR-DM layout ({_note})",
    )(_wrn(_depth, _width))
