"""Reliability: every user mistake and fault is one clear line with the right exit status, no
file is ever damaged by a reader, and nothing that differs is merged into one number.

The CLI cases are one table (:data:`CASES`): a new case is one entry. Each entry builds its arguments
from the shared fixture files and names the files whose bytes must be unchanged afterwards.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import QuantisedInput
from torch import nn

import robusteval.models.checkpoints as ckpt
from robusteval import alarms, progress, records
from robusteval.cli import cli
from robusteval.errors import UserError
from robusteval.models import load_model, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def attack_args(model, npz, out, *extra, n=16, eps="0.05", attack="untargeted", steps=2):
    return ["attack", "-m", model, "--dataset", f"npz:{npz}", "--n", n, "--eps", eps, "-a", attack,
            *(["--steps", steps] if steps is not None else []), "--restarts", 1, "--batch-size", 8,
            "--device", "cpu", "--out", out, "-q", "--no-checks", *extra]


class NanOffGrid(nn.Module):
    """Finite logits on 8-bit images, NaN anywhere else: broken only on perturbed inputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        off = ((x * 255 - torch.round(x * 255)).abs() > 1e-3).flatten(1).any(1)
        return torch.where(off[:, None], torch.full_like(z, float("nan")), z)


class TupleOut(nn.Module):
    """The tiny network behind a wrong output type (here a tuple; below a dict, integer one-hot)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(x)
        return z, z.softmax(1)


class DictOut(TupleOut):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


class OneHotOut(TupleOut):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.net(x).argmax(1), 10)


class NanGradient(nn.Module):
    """Finite logits whose input gradient is NaN everywhere: d√u at u = 0 is infinite, times 0."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.sqrt((x - x.detach()).abs()).flatten(1).sum(1, keepdim=True)
        return self.net(x) + 0 * hidden


def _export(model: nn.Module, path: Path, batch: int, dynamic: bool) -> Path:
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), path)
    return path


@pytest.fixture(scope="module")
def w(tiny_ckpt, tiny_state_dict, nan_ckpt, tiny_npz, tmp_path_factory):
    """Shared files: a finished run's records and variants of it, models, data files."""
    d = tmp_path_factory.mktemp("reliability")
    p = {"d": d, "ckpt": tiny_ckpt, "sd": tiny_state_dict, "nan": nan_ckpt, "npz": tiny_npz}

    def put(key, name, text):
        p[key] = d / name
        p[key].write_text(text)

    run = invoke(attack_args(tiny_ckpt, tiny_npz, d / "run"))
    assert run.exit_code == 0, run.output
    p["rec"] = d / "run" / "records.csv"
    text = p["rec"].read_text()
    put("nonl", "nonl.csv", text.rstrip("\n"))  # complete, only the final newline missing
    lines = text.splitlines(keepends=True)
    put("garbage", "garbage.csv", "".join(lines[:3] + ["this,is,not,a,record\n"] + lines[3:]))

    def second_row(column, value):  # the file's line 3 with one field changed
        cells = next(csv.reader([lines[2]]))
        cells[records.COLUMNS.index(column)] = value(cells[records.COLUMNS.index(column)])
        buf = io.StringIO()
        csv.writer(buf).writerow(cells)
        return buf.getvalue()

    put("badid", "badid.csv", "".join(lines[:2] + [second_row("example_id", lambda v: "abc")] + lines[3:]))
    put("maybe", "maybe.csv", "".join(lines[:2] + [second_row("robust", lambda v: "maybe")] + lines[3:]))
    def edited(status, **changes):  # the file with the first row of ``status`` changed in place
        out = list(lines)
        k = next(i for i, line in enumerate(out) if i and next(csv.reader([line]))[col("status")] == status)
        cells = next(csv.reader([out[k]]))
        for column, value in changes.items():
            cells[col(column)] = value
        buf = io.StringIO()
        csv.writer(buf).writerow(cells)
        out[k] = buf.getvalue()
        return out, buf.getvalue()

    col = records.COLUMNS.index
    put("conflict", "conflict.csv", text + edited("attacked", seconds="12.5")[1])  # same key, other row
    put("wrong_robust", "wrong_robust.csv", "".join(edited("clean-wrong", robust="True")[0]))
    robust_row = next(i for i, line in enumerate(lines)
                      if i and next(csv.reader([line]))[col("robust")] == "True")
    cells = next(csv.reader([lines[robust_row]]))
    cells[col("adv_pred")] = str((int(cells[col("label")]) + 1) % 10)
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    put("robust_misclassified", "robust_misclassified.csv",
        "".join(lines[:robust_row] + [buf.getvalue()] + lines[robust_row + 1:]))
    put("text", "notes.txt", "some notes without a final newline")
    put("file", "a-file", "x")
    p["ckpt_copy"] = d / "copy.pt"
    p["ckpt_copy"].write_bytes(tiny_ckpt.read_bytes())
    # two different checkpoints with the same file name, and the same model with another seed
    for sub, bump in (("A", 0.0), ("B", 0.5)):
        m = load_model(tiny_ckpt).model
        with torch.no_grad():
            m.head[-1].bias.add_(bump)
        save_checkpoint(d / sub / "model.pt", m, "small_cnn", {"width": 4, "hidden": 16}, "fashion-mnist")
        assert invoke(attack_args(d / sub / "model.pt", tiny_npz, d / f"run{sub}", n=8)).exit_code == 0
    assert invoke(attack_args(tiny_ckpt, tiny_npz, d / "seed1", "--seed", "1")).exit_code == 0
    # data: another image set under the same ids, 32×32 images, a truncated and a NaN npz
    with np.load(tiny_npz) as f:
        x, y = f["x"], f["y"]
    np.savez(p.setdefault("npz2", d / "other.npz"), x=255 - x, y=y)
    np.savez(p.setdefault("npz32", d / "big.npz"), x=np.zeros((8, 32, 32), np.uint8), y=y[:8])
    p["npz_cut"] = d / "cut.npz"
    p["npz_cut"].write_bytes(tiny_npz.read_bytes()[:300])
    nan_x = (x[:8] / 255.0).astype(np.float32)
    nan_x[3, 0, 0] = np.nan
    np.savez(p.setdefault("npz_nan", d / "nan.npz"), x=nan_x, y=y[:8])
    # models: a CIFAR-shaped checkpoint, a state_dict without normalisation, NaN only off the pixel grid
    torch.manual_seed(0)
    wrn = ckpt.create_model("wrn16_4")
    save_checkpoint(p.setdefault("cifar", d / "cifar.pt"), wrn.eval(), "wrn16_4", dataset="cifar10")
    scripted = torch.jit.script(NanOffGrid(load_model(tiny_ckpt).model))
    scripted.save(str(p.setdefault("nan_off_grid", d / "nan_off_grid.pt")))
    net = load_model(tiny_ckpt).model
    for kind, wrapper in (("tuple", TupleOut), ("dict", DictOut), ("onehot", OneHotOut)):
        torch.jit.script(wrapper(net).eval()).save(str(p.setdefault(kind, d / f"{kind}.pt")))
    torch.jit.script(QuantisedInput(net).eval()).save(str(p.setdefault("quantised", d / "quantised.pt")))
    torch.jit.script(NanGradient(net).eval()).save(str(p.setdefault("nan_grad", d / "nan_grad.pt")))
    p["static"] = _export(copy.deepcopy(net).eval(), d / "static.pt2", 4, dynamic=False)
    p["train_mode"] = _export(copy.deepcopy(net).train(), d / "train_mode.pt2", 8, dynamic=True)
    # damaged robusteval checkpoints: a field missing or of the wrong type
    good = torch.load(tiny_ckpt, weights_only=True)
    for key, value in (("no_state", None), ("no_arch", None), ("kwargs_list", [4, 16]), ("state_list", [1])):
        field_ = {"no_state": "state_dict", "no_arch": "arch", "kwargs_list": "arch_kwargs",
                  "state_list": "state_dict"}[key]
        damaged = {k: v for k, v in good.items() if k != field_}
        if value is not None:
            damaged[field_] = value
        torch.save(damaged, p.setdefault(key, d / f"{key}.pt"))
    # IDX data: label count that differs from the image count, and a truncated archive
    idx = d / "idx_count"
    idx.mkdir()
    _idx(idx / "t10k-images-idx3-ubyte.gz", (x[:32]).astype(np.uint8))
    _idx(idx / "t10k-labels-idx1-ubyte.gz", y[:31].astype(np.uint8))
    p["idx_count"] = idx
    cut = d / "idx_cut"
    cut.mkdir()
    _idx(cut / "t10k-images-idx3-ubyte.gz", x[:32].astype(np.uint8))
    _idx(cut / "t10k-labels-idx1-ubyte.gz", y[:32].astype(np.uint8))
    blob = (cut / "t10k-images-idx3-ubyte.gz").read_bytes()
    (cut / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    p["idx_cut"] = cut
    return p


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@dataclass
class Case:
    args: object  # (paths, tmp_path) -> argument list
    exit: str  # "ok" (0) or "error" (non-zero)
    message: str  # in the one "Error:" line for errors, in stderr for "ok"
    unchanged: tuple[str, ...] = ()  # keys of files whose bytes must not change
    check: object = None  # optional (result, paths, tmp_path) -> None
    extra: dict = field(default_factory=dict)


def _alarmed(result, check: str) -> None:
    assert check in result.stdout and "Remedy:" in result.stdout, result.stdout


def _rows(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("│")]


def _numbers(result) -> list[list[str]]:
    """The table's cells but the Status column (a copy of a records file is read without its plan)."""
    return [[c.strip() for c in line.split("│")[1:-2]] for line in _rows(result)]


def _same_table_as_intact(result, p, tmp):
    assert _numbers(result) == _numbers(invoke(["report", p["rec"]])) != []


def _two_model_rows(result, p, tmp):
    names = [r.split("│")[1].strip() for r in _rows(result)]
    assert len(names) == 2 and all(n.startswith("model [") for n in names) and names[0] != names[1], names


def _records_once(result, p, tmp):
    df = records.read(tmp / "o")
    assert len(df) == 16 and df["eps"].nunique() == 1


def _eps_in_summary(result, p, tmp):
    assert "| Model | ε |" in (tmp / "o" / "summary.md").read_text()
    assert "eps" in (tmp / "o" / "summary.csv").read_text().splitlines()[0]


def _resume_other_eps(p, tmp):
    assert invoke(attack_args(p["ckpt"], p["npz"], tmp / "o")).exit_code == 0
    return attack_args(p["ckpt"], p["npz"], tmp / "o", eps="0.02")


def _both_eps_in_summary(result, p, tmp):
    summary = (tmp / "o" / "summary.md").read_text()
    assert "| 0.05 |" in summary and "| 0.02 |" in summary, summary


def _resume_other_data(p, tmp):
    assert invoke(attack_args(p["ckpt"], p["npz"], tmp / "o")).exit_code == 0
    return attack_args(p["ckpt"], p["npz2"], tmp / "o")


def _train(out, *extra):
    return ["train", "--method", "nominal", "--dataset", "fashion-mnist", "--n-train", "64", "--eval-n", "0",
            "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet", "--out", out, *extra]


def report(*keys, extra=()):
    """``robusteval report`` on fixture files (keys of the ``w`` fixture, or paths under its folder)."""
    return lambda p, t: ["report", *(p[k] if k in p else p["d"] / k for k in keys), *extra]


def _read_only(p, t):
    os.chmod(p["rec"], 0o444)  # restored by the test
    return ["report", p["rec"]]


def _gamma(model, data, out, *extra):
    return ["gamma", "-m", model, "--dataset", f"npz:{data}", "--n", 8, "--eps", 0.05, "--steps", 2,
            "--device", "cpu", "--out", out, *extra]


def _show(p, t):
    return ["show", "--model", p["nan"], "--dataset", f"npz:{p['npz']}", "--eps", 0.05, "--steps", 1,
            "--restarts", 1, "--device", "cpu", "--out", t / "s"]


def _attack(model, data="npz", out=None, *extra, **kw):
    return lambda p, t: attack_args(p[model], p[data], out(p, t) if out else t / "o", *extra, **kw)


def checked(model, out, *extra, eps="0.1", n=16):
    """An attack with the masking checks on (a small Square budget)."""
    args = attack_args(model, "{npz}", out, *extra, n=n, eps=eps)
    return [a for a in args if a != "--no-checks"] + ["--queries", 60]


def _with_checks(model, *extra, **kw):
    def build(p, t):
        return [str(a).replace("{npz}", str(p["npz"])) for a in checked(p[model], t / "o", *extra, **kw)]
    return build


def _alarm_then_other_eps(p, t):
    first = [str(a).replace("{npz}", str(p["npz"])) for a in checked(p["quantised"], t / "o")]
    assert invoke(first).exit_code == 3  # flagged at ε = 0.1
    return [str(a).replace("{npz}", str(p["npz"])) for a in checked(p["quantised"], t / "o", eps="0.02")]


def _first_eps_alarms_kept(result, p, t):
    verdicts = alarms.read(t / "o")
    raised = {(v.check, v.eps) for v in verdicts if v.raised}
    assert ("unusable-gradients", 0.1) in raised, raised
    report_ = invoke(["report", t / "o"])
    assert report_.exit_code == 3
    row = next(line for line in _rows(report_) if "│ 0.1 " in line)
    assert "unusable-gradients" in row  # the ε = 0.1 row keeps its alarm


def _killed(p, t, at: str):
    """Run an attack and kill it (KeyboardInterrupt) when ``at`` happens; return a report of the run."""
    import attacks as attack_lib
    from robusteval import runner

    real_run, real_large = attack_lib.run, alarms.large_eps

    def run(atk, *a, **kw):
        if at == "second member" and atk.name == "multi-targeted":
            raise KeyboardInterrupt
        return real_run(atk, *a, **kw)

    def large(*a, **kw):
        raise KeyboardInterrupt

    runner.attacks.run = run
    if at == "checks":
        alarms.large_eps = large
    try:
        args = checked(p["ckpt"], t / "o", "-a", "multi-targeted", "--no-skip")
        assert invoke([str(a).replace("{npz}", str(p["npz"])) for a in args]).exit_code == 130
    finally:
        runner.attacks.run, alarms.large_eps = real_run, real_large
    return ["report", t / "o"]


def _two_shards(first: list, second: list):
    def build(p, t):
        for i, extra in ((0, first), (1, second)):
            args = attack_args(p["ckpt"], p["npz"], t / "o", "--shard", f"{i}/2", *extra)
            assert invoke(args).exit_code == 0
        return ["report", t / "o"]
    return build


def _gamma_two_models(p, t):
    assert invoke(_gamma(p["ckpt"], p["npz"], t / "g")).exit_code == 0
    return _gamma(p["ckpt_copy"], p["npz"], t / "g")


def _gamma_both_kept(result, p, t):
    df = records.read_gamma(t / "g")
    assert set(df["model"]) == {"tiny", "copy"} and len(df) == 16
    again = invoke(_gamma(p["ckpt"], p["npz"], t / "g"))  # a rerun resumes: nothing is measured twice
    assert again.exit_code == 0 and len(records.read_gamma(t / "g")) == 16
    other = invoke(_gamma(p["ckpt"], p["npz"], t / "g", "--steps", 3))
    assert other.exit_code != 0 and "different steps" in other.stderr


def _broken_alarms(text: str):
    def build(p, t):
        out = t / "o"
        args = [str(a).replace("{npz}", str(p["npz"])) for a in checked(p["ckpt"], out)]
        assert invoke(args).exit_code == 0
        (out / "alarms.csv").write_text(text)
        return ["report", out]
    return build


def _huge_seed_in_records(p, t):
    path = t / "records.csv"
    lines = p["rec"].read_text().splitlines(keepends=True)
    cells = next(csv.reader([lines[1]]))
    cells[records.COLUMNS.index("seed")] = "9" * 24
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    path.write_text(lines[0] + buf.getvalue())
    return ["report", path]


def _no_nan_checkpoint(result, p, t):
    out = t / "nan.pt"
    assert not out.exists() or all(bool(torch.isfinite(v).all())
                                   for v in torch.load(out, weights_only=True)["state_dict"].values()
                                   if v.is_floating_point())


ERR, OK = "error", "ok"
CASES: dict[str, Case] = {
    # ---- readers never write
    "report on a checkpoint": Case(report("ckpt_copy"), ERR, "is not a robusteval records file",
                                   ("ckpt_copy",)),
    "report on a text file": Case(report("text"), ERR, "is not a robusteval records file", ("text",)),
    "report, last newline missing": Case(report("nonl"), OK, "", ("nonl",), _same_table_as_intact),
    "report on a read-only file": Case(_read_only, OK, "", ("rec",), _same_table_as_intact),
    "report, garbage row": Case(report("garbage"), ERR, "line 4: 5 fields", ("garbage",)),
    "report, non-integer id": Case(report("badid"), ERR, "line 3: example_id is 'abc', expected an integer",
                                   ("badid",)),
    "report, robust=maybe": Case(report("maybe"), ERR, "robust is 'maybe', expected True or False",
                                 ("maybe",)),
    "report, conflicting duplicates": Case(report("conflict"), ERR, "conflicting records", ("conflict",)),
    "report, clean-wrong row says robust": Case(report("wrong_robust"), ERR,
                                                "inconsistent record: a robust row",
                                                ("wrong_robust",)),
    "report, robust row re-classified as another class": Case(report("robust_misclassified"), ERR,
                                                              "robust disagrees with adv_pred",
                                                              ("robust_misclassified",)),
    # ---- never merge what differs
    "report, same name, other checkpoint": Case(report("runA", "runB"), OK, "", (), _two_model_rows),
    "report, other seed": Case(report("rec", "seed1"), ERR, "come from different runs: seed differs"),
    "report, other seed, --merge-runs": Case(report("rec", "seed1", extra=["--merge-runs"]), OK, ""),
    "resume on other data": Case(_resume_other_data, ERR, "made on different data"),
    "resume with another ε": Case(_resume_other_eps, OK, "", (), _both_eps_in_summary),
    # ---- models checked against the data before any attack
    "CIFAR model on Fashion-MNIST": Case(_attack("cifar"), ERR, "takes images of shape (3, 32, 32)"),
    "32×32 npz on a 28×28 model": Case(_attack("ckpt", "npz32", n=8), ERR,
                                       "takes images of shape (1, 28, 28)"),
    "NaN only on perturbed inputs (attack)": Case(_attack("nan_off_grid"), ERR,
                                                  "non-finite logits (NaN or inf) on random points"),
    "NaN only on perturbed inputs (gamma)": Case(lambda p, t: _gamma(p["nan_off_grid"], p["npz"], t / "g"),
                                                 ERR, "non-finite logits"),
    "show on a NaN model": Case(_show, ERR, "non-finite logits"),
    # ---- budgets and radii that cannot give a meaningful number
    "--steps 0": Case(_attack("ckpt", "npz", None, "--steps", 0), ERR, "must be ≥ 1"),
    "-a pgd-0": Case(_attack("ckpt", attack="pgd-0", steps=None), ERR, "has 0 steps"),
    "ε divided twice": Case(_attack("ckpt", "npz", None, "--eps", "8/255", "--eps-scale", 255), OK,
                            "warning: ε = 0.00012303 is below one grey level", (), _eps_in_summary),
    "ε given twice": Case(_attack("ckpt", "npz", None, "--eps", "0.05"), OK, "", (), _records_once),
    # ---- outputs
    "attack --out /dev/null": Case(_attack("ckpt", out=lambda p, t: "/dev/null"), ERR,
                                   "exists and is not a directory"),
    "attack --out under a file": Case(_attack("ckpt", out=lambda p, t: p["file"] / "o"), ERR,
                                      "part of the path is not a directory", ("file",)),
    "gamma --out under a file": Case(lambda p, t: _gamma(p["ckpt"], p["npz"], p["file"] / "g"), ERR,
                                     "part of the path is not a directory"),
    "train over an existing checkpoint": Case(lambda p, t: _train(p["ckpt_copy"]), ERR,
                                              "already exists; add --resume", ("ckpt_copy",)),
    "train --out under a file": Case(lambda p, t: _train(p["file"] / "m.pt"), ERR,
                                     "cannot write the checkpoint", ("file",)),
    "train --resume --overwrite": Case(lambda p, t: _train(p["ckpt_copy"], "--resume", "--overwrite"), ERR,
                                       "choose one", ("ckpt_copy",)),
    # ---- data files
    "truncated npz": Case(_attack("ckpt", "npz_cut"), ERR, "is not a readable .npz file", ("npz_cut",)),
    "NaN pixels": Case(_attack("ckpt", "npz_nan", n=8), ERR, "NaN or infinite pixels (first in image 3)"),
    # ---- verdicts are never lost, faked or mixed
    "another ε keeps the first ε's alarms": Case(_alarm_then_other_eps, ERR, "is unreliable", (),
                                                 _first_eps_alarms_kept),
    "batch statistics in forward (.pt2 exported in train mode)": Case(
        _with_checks("train_mode"), ERR, "is unreliable", (), lambda r, p, t: _alarmed(r, "batch-dependent")),
    "killed between two members (--no-skip)": Case(lambda p, t: _killed(p, t, "second member"), ERR,
                                                   "the evaluation is incomplete"),
    "killed during the checks": Case(lambda p, t: _killed(p, t, "checks"), ERR,
                                     "the evaluation is incomplete"),
    "shards of different -n": Case(_two_shards(["-n", 10], ["-n", 16]), ERR, "planned differently"),
    "shards of different ε": Case(_two_shards(["--eps", "0.1"], ["--eps", "0.2"]), ERR,
                                  "planned differently"),
    "finite logits, NaN input gradient": Case(_with_checks("nan_grad"), ERR, "is unreliable", (),
                                              lambda r, p, t: _alarmed(r, "unusable-gradients")),
    # ---- data
    "--data-dir that does not exist": Case(_attack("ckpt", "npz", None, "--dataset", "fashion-mnist",
                                                   "--data-dir", "/nonexistent"), ERR, "does not exist"),
    "--data-dir without the data": Case(lambda p, t: attack_args(p["ckpt"], p["npz"], t / "o", "--dataset",
                                                                 "fashion-mnist", "--data-dir", p["d"]),
                                        ERR, "fashion-mnist test data not found in --data-dir"),
    "IDX label count differs": Case(lambda p, t: attack_args(p["ckpt"], p["npz"], t / "o", "--dataset",
                                                             "fashion-mnist", "--data-dir", p["idx_count"]),
                                    ERR, "holds 32 images but t10k-labels-idx1-ubyte.gz 31 labels"),
    "truncated .gz in --data-dir": Case(lambda p, t: attack_args(p["ckpt"], p["npz"], t / "o", "--dataset",
                                                                 "fashion-mnist", "--data-dir", p["idx_cut"]),
                                        ERR, "is truncated or damaged"),
    # ---- nothing lost, directories stay usable
    "gamma into an existing --out adds and resumes": Case(_gamma_two_models, OK, "", (), _gamma_both_kept),
    "--seed beyond 64 bits": Case(_attack("ckpt", "npz", None, "--seed", "9" * 24), ERR,
                                  "--seed must be an integer in 0..9223372036854775807"),
    "a records file with a seed beyond 64 bits": Case(_huge_seed_in_records, ERR,
                                                      "seed is '999999999999999999999999', expected an "
                                                      "integer"),
    "empty alarms.csv": Case(_broken_alarms(""), ERR, "is not a robusteval alarms file"),
    "garbled alarms.csv": Case(_broken_alarms(",".join(alarms.COLUMNS) + "\nm,abc\n"), ERR,
                               "line 2: 2 fields"),
    # ---- model outputs of the wrong kind, and programs with a fixed batch
    "model returns a tuple (attack)": Case(_attack("tuple"), ERR,
                                           "returned a tuple of 2, not a tensor of logits"),
    "model returns a dict (gamma)": Case(lambda p, t: _gamma(p["dict"], p["npz"], t / "g"), ERR,
                                         "returned a dict (keys logits), not a tensor of logits"),
    "model returns integer one-hot outputs": Case(_attack("onehot"), ERR, "returned int64 outputs"),
    ".pt2 exported with a fixed batch": Case(_attack("static"), OK, "exported with a fixed batch of 4"),
    # ---- damaged checkpoints name the field
    "checkpoint without state_dict": Case(_attack("no_state"), ERR, "its field 'state_dict' is missing"),
    "checkpoint without arch": Case(_attack("no_arch"), ERR, "its field 'arch' is missing"),
    "checkpoint whose arch_kwargs is a list": Case(_attack("kwargs_list"), ERR,
                                                   "its field 'arch_kwargs' is list, not a dict"),
    "checkpoint whose state_dict is a list": Case(_attack("state_list"), ERR,
                                                  "its field 'state_dict' is list, not a dict"),
    # ---- budgets and values that cannot mean anything
    "--restarts beyond any budget": Case(_attack("ckpt", "npz", None, "--restarts", "9" * 23), ERR,
                                         "is above the supported maximum"),
    "--queries 1e23": Case(_attack("ckpt", "npz", None, "--queries", "1e23"), ERR, "is not a valid integer"),
    "--queries beyond any budget": Case(_attack("ckpt", "npz", None, "--queries", 10**12), ERR,
                                        "--queries = 1000000000000 is above the supported maximum"),
    "surface --extent nan": Case(lambda p, t: ["surface", "-m", p["ckpt"], "--dataset", f"npz:{p['npz']}",
                                               "--eps", 0.05, "--extent", "nan", "--device", "cpu",
                                               "--out", t / "s"], ERR, "--extent must be a positive finite"),
    "surface --extent inf": Case(lambda p, t: ["surface", "-m", p["ckpt"], "--dataset", f"npz:{p['npz']}",
                                               "--eps", 0.05, "--extent", "inf", "--device", "cpu",
                                               "--out", t / "s"], ERR, "--extent must be a positive finite"),
    "train --lr 1e6": Case(lambda p, t: _train(t / "nan.pt", "--lr", "1e6", "--epochs", 2), ERR,
                           "training diverged", (), _no_nan_checkpoint),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_case(name, w, tmp_path):
    case = CASES[name]
    before = {k: w[k].read_bytes() for k in case.unchanged}
    try:
        result = invoke(case.args(w, tmp_path))
    finally:
        if w["rec"].exists():
            os.chmod(w["rec"], 0o644)
    assert "Traceback" not in result.output
    if case.exit == "ok":
        assert result.exit_code == 0, result.output
        assert case.message in result.stderr, result.stderr
    else:
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and case.message in errors[0], result.stderr
    for k, data in before.items():
        assert w[k].read_bytes() == data, f"{k} was changed"
    if case.check is not None:
        case.check(result, w, tmp_path)


# ----------------------------------------------------------------------------------- library level


def test_state_dict_without_normalisation_warns_which_one_it_assumes(w):
    state = torch.load(w["sd"], weights_only=True)
    path = w["d"] / "nonorm_tiny.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("normalize.")}, path)
    with pytest.warns(UserWarning, match="has no normalisation layer; assuming small_cnn's default"):
        loaded = load_model(path, arch="small_cnn", arch_kwargs={"width": 4, "hidden": 16})
    assert loaded.meta["normalization_source"] == "architecture default"


def test_torn_last_line_is_ignored_by_readers_and_cut_only_by_append(w, tmp_path):
    path = tmp_path / records.FILENAME
    intact = w["rec"].read_text()
    path.write_text(intact + "tiny,abc,partial")
    before = path.read_bytes()
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        assert len(records.read(path)) == len(records.read(w["rec"]))
    assert path.read_bytes() == before  # the reader wrote nothing
    row = records.read(w["rec"]).iloc[0].to_dict() | {"example_id": 999}
    records.append(path, [row])
    assert path.read_text().startswith(intact) and len(records.read(path)) == len(records.read(w["rec"])) + 1


def test_append_refuses_a_file_that_is_not_a_records_file(w, tmp_path):
    path = tmp_path / records.FILENAME
    path.write_text("name,value\nfoo,1")  # no final newline: must not be "repaired"
    before = path.read_bytes()
    row = records.read(w["rec"]).iloc[0].to_dict()
    with pytest.raises(UserError, match="not a records file"):
        records.append(path, [row])
    assert path.read_bytes() == before


def test_records_carry_what_makes_them_comparable(w):
    df = records.read(w["rec"])
    assert df["example_sha"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert df["example_sha"].nunique() == len(df)
    assert df["checkpoint_sha256"].str.len().eq(64).all()
    assert df["attack_config"].str.contains("steps=2").all()
    assert (df["eps"] == 0.05).all()  # exact after the round trip


def test_engine_names_the_first_example_with_non_finite_logits():
    import attacks

    torch.manual_seed(0)
    model = NanOffGrid(nn.Sequential(nn.Flatten(), nn.Linear(4, 3))).eval()
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    y = model(x).argmax(1)  # both clean-correct, so both are attacked
    with pytest.raises(attacks.NonFiniteLogits, match="first for example id 7") as err:
        attacks.run(attacks.get("pgd-3", 0.1), model, x, y, ids=torch.tensor([7, 9]))
    assert err.value.example_ids.tolist() == [7, 9]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "robusteval", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "attack" in result.stdout and "Usage" in result.stdout


def test_plain_progress_prints_whole_lines():
    stream = io.StringIO()
    bar = progress.PlainProgress(stream=stream, interval=0.0)
    task = bar.add_task("m · untargeted · ε=0.1", total=4, robust="-")
    bar.update(task, completed=2, robust="50.0%")
    bar.update(task, completed=4, robust="25.0%")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("m · untargeted · ε=0.1  2/4  ETA ") and "robust 50.0%" in lines[0]
    assert lines[-1].startswith("m · untargeted · ε=0.1  4/4") and "robust 25.0%" in lines[-1]
    assert "…" not in stream.getvalue()


def test_train_notes_a_run_shorter_than_its_eps_ramp():
    from robusteval.training import make_config
    from robusteval.training.trainer import schedule_notes

    short = make_config("adversarial", "fashion-mnist", epochs=1, eps_ramp_epochs=2, lr_decay_epochs=(3,))
    notes = schedule_notes(short)
    assert any("training ends at ε = 0.05, below the target 0.1" in n for n in notes)
    assert any("decay at epoch(s) 3 falls after the last epoch" in n for n in notes)
    assert schedule_notes(make_config("adversarial", "fashion-mnist", epochs=4, eps_ramp_epochs=1,
                                      lr_decay_epochs=(3,))) == []


# ------------------------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_with_our_metadata(tiny_ckpt, tmp_path):
    pytest.importorskip("safetensors")
    m = load_model(tiny_ckpt)
    path = save_checkpoint(tmp_path / "m.safetensors", m.model, "small_cnn", {"width": 4, "hidden": 16},
                           dataset="fashion-mnist", training={"method": "adversarial", "steps": 2})
    again = load_model(path)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert again.source == "robusteval-checkpoint" and again.meta["training"]["steps"] == 2
    assert torch.equal(again.model(x), m.model(x))  # same weights, same code path


def test_bare_safetensors_needs_arch(tiny_ckpt, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    state = load_model(tiny_ckpt).model.state_dict()
    path = tmp_path / "bare.safetensors"
    st.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError, match="pass arch=NAME"):
        load_model(path)
    loaded = load_model(path, arch="small_cnn", arch_kwargs={"width": 4, "hidden": 16})
    assert loaded.source == "state_dict"


def test_safetensors_refuses_resume_state(tiny_ckpt, tmp_path):
    pytest.importorskip("safetensors")
    m = load_model(tiny_ckpt).model
    with pytest.raises(TypeError, match="save it as .pt"):
        save_checkpoint(tmp_path / "r.safetensors", m, "small_cnn", extra={"resume": {"t": torch.zeros(2)}})


def test_safetensors_without_the_package_names_the_extra(tiny_ckpt, tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    st.save_file({k: v.contiguous() for k, v in load_model(tiny_ckpt).model.state_dict().items()}, str(path))
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    result = invoke(["attack", "-m", path, "--arch", "small_cnn", "--device", "cpu", "-q", "--out",
                     tmp_path / "o"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.exit_code != 0 and len(errors) == 1 and "robusteval[safetensors]" in errors[0]


# ------------------------------------------------------------------------------ writers and locks


def test_a_second_writer_is_refused_and_the_directory_stays_usable(w, tmp_path):
    from robusteval import rundir

    out = tmp_path / "o"
    out.mkdir()
    with rundir.hold(out / ".lock", str(out)):  # another run holds the directory
        busy = invoke(attack_args(w["ckpt"], w["npz"], out))
        errors = [line for line in busy.stderr.splitlines() if line.startswith("Error")]
        assert busy.exit_code != 0 and len(errors) == 1 and "is being written by another robusteval run" in \
            errors[0] and f"pid {os.getpid()}" in errors[0]
        assert not (out / records.FILENAME).exists()  # the refused run wrote nothing
    done = invoke(attack_args(w["ckpt"], w["npz"], out))  # the holder is gone: the directory works
    assert done.exit_code == 0, done.output
    assert invoke(["report", out]).exit_code == 0


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_file(w, tmp_path, monkeypatch):
    import tempfile

    target = tmp_path / "model.pt"
    target.write_bytes(w["ckpt"].read_bytes())
    before = target.read_bytes()
    decoy = tmp_path / ".decoy.tmp"
    decoy.write_bytes(b"")

    def full_disk(*a, **kw):  # writes go to /dev/full, which fails every write with ENOSPC
        return os.open("/dev/full", os.O_WRONLY), str(decoy)

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    with pytest.raises(UserError, match="cannot write the checkpoint .*is the disk full.*unchanged"):
        save_checkpoint(target, load_model(w["ckpt"]).model, "small_cnn", {"width": 4, "hidden": 16})
    assert target.read_bytes() == before


def test_verdicts_are_merged_never_erased(tmp_path):
    path = tmp_path / "alarms.csv"
    raised = alarms.Verdict("m", "sha", "randomness", 0.1, True, "two forwards differ")
    clear = alarms.Verdict("m", "sha", "randomness", 0.1, False, "no difference")
    other = alarms.Verdict("m", "sha", "randomness", 0.2, False, "no difference")
    alarms.record(path, [raised])
    kept = alarms.record(path, [clear, other])  # a later run measured it clear: the alarm stays
    assert {(v.eps, v.raised, v.detail) for v in kept} == {(0.1, True, "two forwards differ"),
                                                          (0.2, False, "no difference")}
    assert alarms.read_file(path) == kept
