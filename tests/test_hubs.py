"""Models from other hubs, offline: a RobustBench-layout checkpoint built with the package's own
architecture code, a timm architecture with a weights file; missing extras and files give one line."""

from __future__ import annotations

import builtins
import importlib.util
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from robusteval import records
from robusteval.cli import cli
from robusteval.errors import UserError
from robusteval.models import hubs, load_model


def _npz(path, shape, classes, n=4):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
             y=rng.integers(0, classes, size=n))
    return path


def _attack(model, npz, out, *extra):
    args = ["attack", "-m", model, "--dataset", f"npz:{npz}", "--n", "4", "-a", "apgd-ce", "--steps", "3",
            "--no-checks", "--device", "cpu", "-q", "--out", str(out), *extra]
    return CliRunner().invoke(cli, args)


needs_robustbench = pytest.mark.skipif(importlib.util.find_spec("robustbench") is None,
                                       reason="the robustbench extra is not installed")
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="the timm extra is not installed")


@needs_robustbench
def test_a_robustbench_layout_checkpoint_is_evaluated_offline(tmp_path):
    dicts, BenchmarkDataset, ThreatModel = hubs._robustbench_zoo()
    net = dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]["Ding2020MMA"]["model"]()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    where = tmp_path / "models" / "cifar10" / "Linf"
    where.mkdir(parents=True)
    # saved the way RobustBench's checkpoints are: under "state_dict", with DataParallel's prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               where / "Ding2020MMA.pt")
    spec = "robustbench:cifar10/Linf/Ding2020MMA"
    loaded = load_model(spec, model_dir=tmp_path / "models")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), net.eval()(x))  # the same weights, strictly loaded
    assert loaded.meta["dataset"] == "cifar10" and loaded.name == "Ding2020MMA"

    out = tmp_path / "run"
    npz = _npz(tmp_path / "c.npz", (3, 32, 32), 10)
    res = _attack(spec, npz, out, "--model-dir", str(tmp_path / "models"))
    assert res.exit_code == 0, res.output
    df = records.read(out)
    assert set(df["model"]) == {"Ding2020MMA"}
    assert set(df["checkpoint_sha256"]) == {loaded.sha256}
    assert np.allclose(df["eps"], 8 / 255)  # CIFAR-10's default radius (the dataset the zoo name says)
    assert "default ε = 8/255" in res.stderr


@needs_robustbench
def test_robustbench_mistakes_are_one_line(tmp_path):
    res = _attack("robustbench:cifar10/Linf/Ding2020MMA", tmp_path / "none.npz", tmp_path / "r",
                  "--model-dir", str(tmp_path))
    assert res.exit_code != 0 and "never downloads" in res.output
    assert str(tmp_path / "cifar10" / "Linf" / "Ding2020MMA.pt") in res.output
    assert "Traceback" not in res.output
    for spec, words in [("robustbench:cifar10/Linf", "DATASET/THREAT/NAME"),
                        ("robustbench:mnist/Linf/X", "unknown dataset"),
                        ("robustbench:cifar10/corruptions/X", "not an ε-ball"),
                        ("robustbench:cifar10/Linf/NoSuchModel2099", "not in RobustBench")]:
        with pytest.raises(UserError, match=words):
            load_model(spec, model_dir=tmp_path)
    where = tmp_path / "cifar10" / "Linf"
    where.mkdir(parents=True)
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, where / "Ding2020MMA.pt")  # not its weights
    with pytest.raises(UserError, match="do not fit the architecture"):
        load_model("robustbench:cifar10/Linf/Ding2020MMA", model_dir=tmp_path)


@needs_timm
def test_a_timm_architecture_with_a_weights_file_is_evaluated_offline(tmp_path):
    import timm

    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    loaded = load_model("timm:test_efficientnet", weights=weights)
    cfg = net.pretrained_cfg
    assert loaded.meta["input_size"] == tuple(cfg["input_size"]) and loaded.meta["num_classes"] == 10
    x = torch.rand(2, *cfg["input_size"])
    mean, std = (torch.tensor(cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():  # [0, 1] inputs, normalised as timm's pretrained configuration says
        torch.testing.assert_close(loaded.model(x), net((x - mean) / std), rtol=1e-4, atol=1e-5)

    out = tmp_path / "run"
    res = _attack("timm:test_efficientnet", _npz(tmp_path / "i.npz", tuple(cfg["input_size"]), 10), out,
                  "--weights", str(weights), "--eps", "4/255")
    assert res.exit_code == 0, res.output
    df = records.read(out)
    assert set(df["model"]) == {"test_efficientnet"} and set(df["checkpoint_sha256"]) == {loaded.sha256}

    res = _attack("timm:test_efficientnet", tmp_path / "i.npz", tmp_path / "r2")
    assert res.exit_code != 0 and "needs --weights" in res.output and "Traceback" not in res.output
    with pytest.raises(UserError, match="not an architecture timm"):
        load_model("timm:no_such_net_2099", weights=weights)


@pytest.mark.parametrize("spec, extra", [("timm:resnet18", "timm"),
                                         ("robustbench:cifar10/Linf/Carmon2019Unlabeled", "robustbench")])
def test_without_the_extra_one_line_names_it(spec, extra, tmp_path, monkeypatch):
    real_find, real_import = importlib.util.find_spec, builtins.__import__

    def find(name, *a, **k):
        return None if name.split(".")[0] == extra else real_find(name, *a, **k)

    def imp(name, *a, **k):
        if name.split(".")[0] == extra:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find)
    monkeypatch.setattr(builtins, "__import__", imp)
    for key in [k for k in sys.modules if k.split(".")[0] == extra]:
        monkeypatch.delitem(sys.modules, key)
    res = _attack(spec, tmp_path / "none.npz", tmp_path / "r", "--weights", str(tmp_path / "w.pt")) \
        if extra == "timm" else _attack(spec, tmp_path / "none.npz", tmp_path / "r")
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert f"pip install 'robusteval[{extra}]'" in res.output
    assert len(res.output.strip().splitlines()) == 1
