"""Where and how a model runs: the device choice, a model's device, and the eval-mode guard.

One home for each: the runner, γ, the trainer and the CLI all use these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from robusteval.errors import UserError


def resolve_device(name: str | None) -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; ``cuda[:k]`` without a GPU is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("`device` cuda was requested but no CUDA device is available")
        return name
    if name == "cpu":
        return "cpu"
    raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")


def device_of(model, default: str | torch.device = "cpu") -> torch.device:
    """The device of a model's first parameter (else first buffer), else ``default``."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device(default)


@contextlib.contextmanager
def eval_mode(model) -> Iterator:
    """Every sub-module in eval mode for the block; each module's own flag is restored afterwards.

    Flags are set directly (not through ``.train()``), so wrappers whose ``train()`` is special — a
    ``torch.export`` program — and plain callables (not modules) work too.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


@contextlib.contextmanager
def strict_fp32(device: torch.device | str = "cpu") -> Iterator[None]:
    """fp32 with TF32 off and autocast disabled for the block; previous settings restored after.

    γ is a small difference of O(1) numbers (ℓ(x+δ) − ℓ(x) − δᵀ∇ℓ): TF32's 10-bit mantissa or fp16
    autocast would swamp it; the LLR trainer's double backprop likewise (docs/protocol.md,
    "Numerics of γ and LLR"). The global TF32 flags are restored on exit, so a library call never leaves them
    changed.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    kinds = {"cpu", torch.device(device).type} | ({"cuda"} if torch.cuda.is_available() else set())
    try:
        with contextlib.ExitStack() as stack:
            for kind in sorted(kinds):
                stack.enter_context(torch.autocast(kind, enabled=False))
            yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = old
