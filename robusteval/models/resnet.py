"""torchvision ResNets for 224×224 ImageNet inputs, with the normalisation layer in front.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), as built by
``torchvision.models``; never with downloaded weights. The LLR paper's ImageNet model is a ResNet-152
(docs/methods.md, "Models"); its TF-Hub release takes [0, 1] inputs normalised as ``2x − 1``, which is the
default here. Weights trained with torchvision's own recipe need ``normalization="torchvision-imagenet"``.
The wrapped network is ``.net``, so a torchvision state_dict maps to ours by the prefix ``net.``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from robusteval.models.normalize import Normalize, resolve_normalization
from robusteval.models.registry import register


class TorchvisionResNet(nn.Module):
    """``Normalize`` followed by ``torchvision.models.resnet{depth}(weights=None)``."""

    def __init__(self, depth: int = 50, num_classes: int = 1000, normalization="imagenet"):
        super().__init__()
        self.normalize = Normalize(*resolve_normalization(normalization, 3))
        self.net = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@register("resnet50", input_size=(3, 224, 224), dataset="imagenet", num_classes=1000, heavy=True)
def resnet50(num_classes: int = 1000, normalization="imagenet") -> nn.Module:
    """torchvision ResNet-50 for ImageNet (no pretrained weights)."""
    return TorchvisionResNet(50, num_classes, normalization)


@register("resnet152", input_size=(3, 224, 224), dataset="imagenet", num_classes=1000, heavy=True)
def resnet152(num_classes: int = 1000, normalization="imagenet") -> nn.Module:
    """torchvision ResNet-152 for ImageNet (the LLR paper's ImageNet architecture; no pretrained weights)."""
    return TorchvisionResNet(152, num_classes, normalization)
