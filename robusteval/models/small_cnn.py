"""A small CNN for 28×28 single-channel images (Fashion-MNIST, MNIST), fast on a CPU.

Layout: ``Normalize → [conv3×3(32) → BN → act → maxpool2] → [conv3×3(64) → BN → act → maxpool2] →
[conv3×3(64, stride 2) → BN → act] → flatten(64·4·4) → linear(128) → act → linear(classes)``,
about 190k parameters. The batch-norm layers are standard ``nn.BatchNorm2d`` on purpose: this is the
model the tests and the CPU demo train, so the trainer's batch-norm capture/replay
(docs/methods.md, "LLR training") is exercised on it. Convolutions before a BN carry no bias (BN's offset
replaces it).
"""

from __future__ import annotations

import torch
from torch import nn

from robusteval.models.normalize import Normalize, resolve_normalization
from robusteval.models.registry import make_activation, register


class SmallCNN(nn.Module):
    """Three conv-BN-activation stages and a two-layer head; inputs are [0, 1] images ``[N, C, 28, 28]``."""

    def __init__(
        self,
        num_classes: int = 10,
        activation: str = "relu",
        in_channels: int = 1,
        normalization="fashion-mnist",
        width: int = 32,
        hidden: int = 128,
    ):
        super().__init__()
        self.normalize = Normalize(*resolve_normalization(normalization, in_channels))

        def stage(cin, cout, stride=1, pool=False):
            layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
            layers.append(make_activation(activation))
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(
            *stage(in_channels, width, pool=True),  # 28 -> 14
            *stage(width, 2 * width, pool=True),  # 14 -> 7
            *stage(2 * width, 2 * width, stride=2),  # 7 -> 4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden),
            make_activation(activation),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


@register("small_cnn", input_size=(1, 28, 28), dataset="fashion-mnist")
def small_cnn(
    num_classes: int = 10,
    activation: str = "relu",
    in_channels: int = 1,
    normalization="fashion-mnist",
    width: int = 32,
    hidden: int = 128,
) -> nn.Module:
    """Small CNN for 28×28 grey images (~190k parameters, BatchNorm2d), for CPU training and tests."""
    return SmallCNN(num_classes, activation, in_channels, normalization, width, hidden)
