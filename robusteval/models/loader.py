"""Every model spec a user can give, in one place: a file or ``zoo:NAME`` (:mod:`.checkpoints`), and
``robustbench:DATASET/THREAT/NAME`` or ``timm:NAME`` (:mod:`.hubs`)."""

from __future__ import annotations

import os

import torch

from robusteval.errors import UserError
from robusteval.models import checkpoints, hubs


def load_model(
    spec: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu", arch_kwargs=None,
    model_dir: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
) -> checkpoints.LoadedModel:
    """The model ``spec`` names, in eval mode on ``device``; never executes code from a file.

    ``arch``/``arch_kwargs``: for a plain state_dict; ``model_dir``: where ``robustbench:`` models are
    found (default ``./models``); ``weights``: the weights file of a ``timm:`` model. Every problem is a
    one-line :class:`UserError`.
    """
    if hubs.is_hub(spec):
        return hubs.load_hub(str(spec), device, model_dir=model_dir, weights=weights)
    if weights is not None:
        raise UserError("`weights` is for timm:NAME models; a checkpoint file carries its own weights")
    return checkpoints.load_model(spec, arch=arch, device=device, arch_kwargs=arch_kwargs)
