"""Shared fixtures: one intra-op thread for the whole suite, a tiny trained checkpoint, tiny data,
broken models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

TINY_ARCH_KWARGS = {"width": 4, "hidden": 16}


class QuantisedInput(torch.nn.Module):
    """A gradient-masking model as a user would ship it: the input rounded to 4 grey levels (the input
    gradient is exactly zero), then the wrapped network."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 3) / 3)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # The suite's models are tiny: one intra-op thread is fastest, and on a loaded 2-core machine two
    # threads oversubscribe badly (measured: WRN-16-4 build + forward 0.2 s on one thread, 3 s on two).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model():
    from robusteval.models import create_model

    return create_model("small_cnn", **TINY_ARCH_KWARGS)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """The first 32 images of the bundled Fashion-MNIST subset as an npz (uint8 images, labels)."""
    from robusteval.data import BUNDLED_SUBSET

    with np.load(BUNDLED_SUBSET) as f:
        arrays = {k: f[k] for k in f.files}
    x = arrays.get("x", arrays.get("images"))[:32]
    y = arrays.get("y", arrays.get("labels"))[:32]
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A ~3k-parameter small_cnn trained for a few seconds on the bundled subset (≈70% clean accuracy),
    saved as a robusteval checkpoint with training metadata (method, inner steps)."""
    from robusteval.data import BUNDLED_SUBSET, load_npz
    from robusteval.models import save_checkpoint

    ds = load_npz(BUNDLED_SUBSET)
    torch.manual_seed(0)
    model = _tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for x, y, _ in ds.batches(50):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model.eval(), "small_cnn", TINY_ARCH_KWARGS, dataset="fashion-mnist",
                    training={"method": "adversarial", "steps": 2, "eps": 0.1})
    return path


@pytest.fixture(scope="session")
def tiny_state_dict(tiny_ckpt, tmp_path_factory):
    """The tiny model as a bare state_dict (needs --arch)."""
    state = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    path = tmp_path_factory.mktemp("sd") / "tiny_state.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def nan_ckpt(tmp_path_factory):
    """A checkpoint whose last layer's bias is NaN: every logit is NaN."""
    from robusteval.models import save_checkpoint

    model = _tiny_model().eval()
    with torch.no_grad():
        model.head[-1].bias.fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    save_checkpoint(path, model, "small_cnn", TINY_ARCH_KWARGS, dataset="fashion-mnist")
    return path


def run_eval(models, battery, eps, data, *, steps=None, restarts=None, queries=None, **kw):
    """:func:`robusteval.runner.evaluate` of an :class:`Evaluation` built from keywords (budget keys
    ``steps``/``restarts``/``queries`` go into its :class:`Budget`); returns the :class:`Outcome`."""
    from robusteval import runner
    from robusteval.evaluation import Budget, Evaluation

    kw.setdefault("progress", False)
    eps = tuple(eps) if isinstance(eps, (list, tuple)) else (eps,)
    battery = tuple(battery) if isinstance(battery, (list, tuple)) else (battery,)
    ev = Evaluation(models=tuple(models), battery=battery, eps=eps, dataset=data,
                    budget=Budget(steps=steps, restarts=restarts, queries=queries), **kw)
    return runner.evaluate(ev)
