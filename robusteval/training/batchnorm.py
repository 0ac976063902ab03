"""Batch-norm capture/replay for the LLR trainer (docs/methods.md, "LLR training").

In an LLR step every perturbed forward pass must be normalised with the statistics of the *nominal*
batch, and the running statistics must move exactly once per step. :class:`BatchNormReplay` does this
for standard ``nn.BatchNorm1d/2d/3d`` modules without replacing them: inside the ``with`` block each
batch-norm module's ``forward`` is swapped (an instance attribute shadowing the class method) for a
manual normalisation, and restored on exit. Modes (``ctx.mode = ...``):

* ``"capture_train"`` — normalise with the batch's own (biased) mean/variance, update the running
  statistics once exactly as ``nn.BatchNorm`` does in train mode, and store ``mu``/``var`` *attached*
  to the graph;
* ``"replay_attached"`` — normalise with the stored statistics, gradient flowing through them into the
  nominal pass (the LLR regulariser's final term);
* ``"replay_detached"`` — the same statistics, detached (the inner linearity search: it must not
  build a graph into the nominal pass).

Replay modes never touch the running statistics. Normalisation is written out by hand because
``F.batch_norm`` cannot carry gradients through externally supplied statistics, so the normalisation is
written out here.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("capture_train", "replay_attached", "replay_detached")


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every standard batch-norm module (1d/2d/3d, and subclasses such as SyncBatchNorm) in ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BatchNormReplay:
    """Context manager: capture the nominal batch's BN statistics once, replay them for later passes.

    ``with BatchNormReplay(model) as bn:`` starts in ``capture_train``; set ``bn.mode`` to a replay mode
    after the nominal pass. Stored statistics are dropped on exit (they hold the nominal graph; the
    autograd graph of a loss computed inside keeps its own references, so ``backward()`` may run after
    the block). Replaying before anything was captured is an error.
    """

    def __init__(self, model: nn.Module, mode: str = "capture_train"):
        self.modules = batchnorm_modules(model)
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saved: list[tuple[nn.Module, object]] = []
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"batch-norm mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def __enter__(self) -> BatchNormReplay:
        for m in self.modules:
            self._saved.append((m, m.__dict__.get("forward")))
            m.forward = self._make_forward(m)
        return self

    def __exit__(self, *exc) -> None:
        for m, previous in reversed(self._saved):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
        self._saved.clear()
        self.stats.clear()

    def _make_forward(self, bn: nn.modules.batchnorm._BatchNorm):
        def forward(h: torch.Tensor) -> torch.Tensor:
            return self._normalise(bn, h)

        return forward

    def _normalise(self, bn: nn.modules.batchnorm._BatchNorm, h: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, h.ndim))
        if self._mode == "capture_train":
            # Biased batch variance for normalising (as nn.BatchNorm and LLR-DM do).
            var, mu = torch.var_mean(h, dim=dims, correction=0)
            if bn.track_running_stats and bn.running_mean is not None:
                self._update_running(bn, h, mu, var)
            self.stats[id(bn)] = (mu, var)
        else:
            if id(bn) not in self.stats:
                raise RuntimeError("batch-norm replay before any capture_train pass")
            mu, var = self.stats[id(bn)]
            if self._mode == "replay_detached":
                mu, var = mu.detach(), var.detach()
        shape = [1, -1] + [1] * (h.ndim - 2)
        out = (h - mu.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        return out

    def _update_running(self, bn, h, mu, var) -> None:
        # Same rule as nn.BatchNorm in train mode (momentum, or a cumulative average when momentum is
        # None; unbiased variance in the running estimate), so a nominal step under capture_train
        # leaves exactly the buffers a plain train-mode forward would.
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            n = h.numel() // h.shape[1]
            bn.running_mean.lerp_(mu.detach(), factor)
            bn.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), factor)
