"""Checkpoints: round trips of every accepted kind, atomic writes, and refusals that run no code."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import robusteval.models.checkpoints as ckpt
from robusteval.errors import UserError
from robusteval.models import create_model, load_model, save_checkpoint, sha256_file


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_model("small_cnn", activation="softplus")
    net(torch.rand(16, 1, 28, 28))  # one train-mode pass so BN running stats are not the defaults
    return net.eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@dataclass
class Config:
    method: str = "llr"
    eps: float = 0.1


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path, model, x):
    path = save_checkpoint(
        tmp_path / "sub" / "m.pt", model, "small_cnn", {"activation": "softplus"}, "fashion-mnist",
        training={"config": Config(), "command": "robusteval train --method llr", "out": tmp_path,
                  "lr": np.float64(0.1), "rng": np.arange(3)},
        metrics={"epoch": [1], "clean_acc": [0.8]}, extra={"optimizer": {"step": 3}},
    )  # fmt: skip
    loaded = load_model(path)
    assert loaded.source == "robusteval-checkpoint" and not loaded.model.training
    assert torch.equal(loaded.model(x), model(x))
    meta = loaded.meta
    assert meta["format"] == "robusteval-checkpoint" and meta["format_version"] == 1
    assert meta["arch"] == "small_cnn" and meta["arch_kwargs"] == {"activation": "softplus"}
    assert meta["dataset"] == "fashion-mnist" and meta["normalization"] == {"mean": [0.5], "std": [0.5]}
    assert meta["training"]["config"] == {"method": "llr", "eps": 0.1} and meta["training"]["out"] == str(
        tmp_path
    )
    assert meta["training"]["command"].startswith("robusteval train") and meta["metrics"]["clean_acc"] == [
        0.8
    ]
    assert meta["input_size"] == (1, 28, 28) and meta["num_classes"] == 10 and "state_dict" not in meta
    assert loaded.sha256 == sha256_file(path) and len(loaded.sha256) == 64
    # The file is plain data: torch's weights-only unpickler reads it without any allow-listing.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw["state_dict"]) == set(model.state_dict())


def test_wrn_round_trip(tmp_path):
    torch.manual_seed(0)
    net = create_model("wrn16_4", activation="swish").eval()
    save_checkpoint(tmp_path / "w.pt", net, "wrn16_4", {"activation": "swish"}, "cifar10")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_model(tmp_path / "w.pt").model(x), net(x))


def test_unstorable_metadata_is_refused_at_save_time(tmp_path, model):
    with pytest.raises(TypeError, match=r"training\['fn'\]"):
        save_checkpoint(tmp_path / "m.pt", model, "small_cnn", training={"fn": lambda: 0})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temp_files(tmp_path, model, monkeypatch):
    target = tmp_path / "m.pt"
    save_checkpoint(target, model, "small_cnn")
    before = target.read_bytes()
    save_checkpoint(target, model, "small_cnn", metrics={"epoch": 2})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model, "small_cnn", metrics={"epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # old file intact, temp file removed
    assert load_model(target).meta["metrics"] == {"epoch": 2} and before != target.read_bytes()


def test_plain_state_dict_needs_arch(tmp_path, model, x):
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="plain state_dict; pass arch=NAME .*small_cnn"):
        load_model(tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", arch="small_cnn", arch_kwargs={"activation": "softplus"})
    assert loaded.source == "state_dict" and torch.equal(loaded.model(x), model(x))
    # Prefixes from DataParallel / torch.compile, and a {"state_dict": ...} wrapper, are accepted.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    again = load_model(tmp_path / "wrapped.pt", arch="small_cnn", arch_kwargs={"activation": "softplus"})
    assert torch.equal(again.model(x), model(x))


def test_state_dict_for_another_architecture_is_a_clear_error(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match=r"does not fit architecture 'wrn16_4': \d+ missing .* unexpected"):
        load_model(tmp_path / "sd.pt", arch="wrn16_4")
    narrow = create_model("small_cnn", width=16).state_dict()
    torch.save(narrow, tmp_path / "narrow.pt")
    with pytest.raises(
        UserError, match=r"shape mismatches \(e\.g\. features\.0\.weight: file \[16, 1, 3, 3\]"
    ):
        load_model(tmp_path / "narrow.pt", arch="small_cnn")
    with pytest.raises(UserError, match="unknown architecture 'nope'"):
        load_model(tmp_path / "sd.pt", arch="nope")
    save_checkpoint(tmp_path / "c.pt", model, "small_cnn", {"activation": "softplus"})
    with pytest.raises(UserError, match="is a 'small_cnn' checkpoint, but arch 'wrn16_4'"):
        load_model(tmp_path / "c.pt", arch="wrn16_4")


class Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {}, "hook": Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="needs arbitrary code execution to load .*refused") as err:
        load_model(path, arch="small_cnn")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_files_that_are_not_models(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(UserError, match="is not a robusteval checkpoint, state_dict"):
        load_model(tmp_path / "notes.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="is not a robusteval checkpoint"):
        load_model(tmp_path / "list.pt", arch="small_cnn")
    with pytest.raises(UserError, match="model file not found"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(UserError, match="unknown zoo model 'doesnotexist'; available:"):
        load_model("zoo:doesnotexist")
    torch.save({"format": "robusteval-checkpoint", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(UserError, match="format version 99"):
        load_model(tmp_path / "future.pt")


def test_torch_export_round_trip(tmp_path, model, x):
    program = torch.export.export(model, (x,))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.source == "torch.export" and loaded.meta["input_size"] == (1, 28, 28)
    loaded.model.eval()  # the exported graph itself refuses .eval(); the wrapper must not forward it
    assert not loaded.model.training
    torch.testing.assert_close(loaded.model(x), model(x))
    xr = x.clone().requires_grad_(True)  # attacks need input gradients through the program
    (g,) = torch.autograd.grad(loaded.model(xr).sum(), xr)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def _rewrite_zip(src: Path, dst: Path, replace: dict | None = None, add: dict | None = None) -> None:
    """Copy a torch zip archive, replacing members by path suffix and adding members under its top folder."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            new = next((v for k, v in (replace or {}).items() if info.filename.endswith(k)), None)
            zout.writestr(info, new if new is not None else zin.read(info.filename))
        for member, data in (add or {}).items():
            zout.writestr(f"{top}/{member}", data)


def test_malicious_export_archive_is_refused_without_running(tmp_path, model, x):
    # torch.export.load retries sample inputs with weights_only=False (and loads AOTInductor libraries),
    # so a crafted .pt2 would run code; the archive is checked before torch sees it.
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(Evil(marker), evil)
    _rewrite_zip(
        tmp_path / "m.pt2", tmp_path / "inputs.pt2", {"data/sample_inputs/model.pt": evil.getvalue()}
    )
    with pytest.raises(UserError, match="sample_inputs/model.pt is not weights-only loadable.*refused"):
        load_model(tmp_path / "inputs.pt2")
    _rewrite_zip(
        tmp_path / "m.pt2", tmp_path / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"}
    )
    with pytest.raises(UserError, match="contains data/aotinductor/model/model.so"):
        load_model(tmp_path / "aoti.pt2")
    assert not marker.exists()


def test_torchscript_round_trip(tmp_path, model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still a format users have
        torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    loaded = load_model(tmp_path / "m.ts")
    assert loaded.source == "torchscript"
    torch.testing.assert_close(loaded.model(x), model(x))


def test_zoo_names_resolve(tmp_path, model, x, monkeypatch):
    monkeypatch.setattr(ckpt, "ZOO_DIR", tmp_path)
    save_checkpoint(tmp_path / "tiny.pt", model, "small_cnn", {"activation": "softplus"})
    assert ckpt.list_zoo() == ["tiny"]
    loaded = load_model("zoo:tiny")
    assert loaded.name == "tiny" and torch.equal(loaded.model(x), model(x))
    with pytest.raises(UserError, match="available: tiny"):
        load_model("zoo:other")
