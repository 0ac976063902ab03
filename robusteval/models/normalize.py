"""Input normalisation as the first layer of every model.

Attacks, ε, step sizes and ∇ₓℓ all live in [0, 1] pixel units (docs/protocol.md, "Units"). If
normalisation happened in the data loader instead, every one of those quantities would silently change
scale by 1/std, so every architecture in the registry starts
with a :class:`Normalize` layer and every model takes [0, 1] images.

:data:`NORMALIZATIONS` holds the per-dataset constants. CIFAR-10 uses the LLR constants
(125.3, 123.0, 113.9)/255 and (63.0, 62.1, 66.7)/255 from DeepMind's LLR code (docs/methods.md,
"Models"), not the common 0.4914/0.2470 sets; MNIST-like data and ImageNet use ``2x − 1`` as in
LLR-DM and the released TF-Hub models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robusteval.errors import UserError

_HALF = (0.5, 0.5, 0.5)

#: name -> (mean, std), per channel, applied to [0, 1] inputs as ``(x - mean) / std``.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # DeepMind's LLR code and its released CIFAR-10 model.
    "cifar10": (
        (125.3 / 255, 123.0 / 255, 113.9 / 255),
        (63.0 / 255, 62.1 / 255, 66.7 / 255),
    ),
    # Commonly used CIFAR-100 / SVHN training-set statistics (no LLR reference exists for these).
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # 2x - 1: DeepMind's LLR MNIST setting and the released ImageNet model.
    "mnist": ((0.5,), (0.5,)),
    "fashion-mnist": ((0.5,), (0.5,)),
    "imagenet": (_HALF, _HALF),
    # torchvision's ImageNet statistics, for weights trained with torchvision's recipe.
    "torchvision-imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "identity": ((0.0,), (1.0,)),
}


def resolve_normalization(
    spec: str | dict | Sequence | None, channels: int, default: str = "identity"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Turn a normalisation spec into per-channel ``(mean, std)`` tuples of length ``channels``.

    ``spec`` is a name from :data:`NORMALIZATIONS`, a ``{"mean": .., "std": ..}`` dict (the checkpoint
    format), a ``(mean, std)`` pair, or ``None`` for ``default``. A single value is broadcast to all
    channels (so ``"identity"`` and the ``2x − 1`` sets fit any channel count).
    """
    if spec is None:
        spec = default
    if isinstance(spec, str):
        if spec not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {spec!r}; known: {', '.join(sorted(NORMALIZATIONS))}")
        mean, std = NORMALIZATIONS[spec]
    elif isinstance(spec, dict):
        mean, std = spec["mean"], spec["std"]
    else:
        mean, std = spec
    mean, std = _per_channel(mean, channels), _per_channel(std, channels)
    if any(s <= 0 for s in std):
        raise UserError(f"normalization std must be positive, got {std}")
    return mean, std


def _per_channel(values, channels: int) -> tuple[float, ...]:
    values = [float(v) for v in (values.tolist() if torch.is_tensor(values) else values)]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"normalization has {len(values)} values for {channels} input channels")
    return tuple(values)


class Normalize(nn.Module):
    """``(x − mean) / std`` per channel, for [0, 1] inputs of shape ``[N, C, H, W]``.

    ``mean`` and ``std`` are persistent buffers, so they travel with the ``state_dict`` and a
    checkpoint always carries the normalisation its weights were trained with.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def as_dict(self) -> dict[str, list[float]]:
        """The checkpoint's ``normalization`` entry: ``{"mean": [...], "std": [...]}``."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4f}" for v in t.flatten().tolist()) + ")"
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


def find_normalize(model: nn.Module) -> Normalize | None:
    """The model's :class:`Normalize` layer if it is the first submodule, else ``None``."""
    first = next(iter(model.children()), None)
    return first if isinstance(first, Normalize) else None
