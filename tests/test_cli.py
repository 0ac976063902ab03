"""`robusteval attack / report / models / demo` end to end with click's CliRunner."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from click.testing import CliRunner
from rich.console import Console

import attacks
from robusteval import records, reports, runner, runs
from robusteval.cli import cli
from robusteval.models import checkpoints


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("ROBUSTEVAL_DATA", raising=False)


def _attack_args(ckpt, npz, out, *extra):
    # the masking checks (Square ends the battery) are tested in test_alarms.py
    return ["attack", "--model", str(ckpt), "--dataset", f"npz:{npz}", "--n", "24", "--eps", "0.05",
            "-a", "untargeted", "-a", "multi-targeted", "--steps", "4", "--restarts", "1",
            "--batch-size", "8", "--device", "cpu", "--out", str(out), "-q", "--no-checks", *extra]


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def _rendered(table, title, note) -> str:
    buf = io.StringIO()
    reports.print_table(table, title=title, note=note, console=Console(file=buf))
    return buf.getvalue()


def test_attack_prints_the_table_recomputed_from_records(tiny_ckpt, tiny_npz, tmp_path):
    out = tmp_path / "run"
    result = _invoke(_attack_args(tiny_ckpt, tiny_npz, out))
    assert result.exit_code == 0, result.output
    df = records.read(out / "records.csv")
    assert len(df) == 24 * 2
    table, note = reports.run_table(runs.read(out))
    assert list(table[reports.STATUS]) == ["complete"]
    title = "Robust accuracy — npz test, first 24 examples"
    assert _rendered(table, title, note) in result.stdout
    expected = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), expected)
    assert "Worst case" in (out / "summary.md").read_text()
    assert f"records: {out / 'records.csv'}" in result.stdout


@pytest.mark.parametrize("command", [[], ["attack"], ["report"], ["models"], ["demo"]])
def test_every_command_has_help_with_examples(command):
    result = _invoke([*command, "--help"])
    assert result.exit_code == 0 and "Examples" in result.output


BAD = {
    "missing file": (lambda p: ["--model", str(p["tmp"] / "nope.pt")], "model file not found"),
    "wrong architecture": (lambda p: ["--model", str(p["sd"]), "--arch", "wrn16_4"],
                           "does not fit architecture"),
    "state_dict without arch": (lambda p: ["--model", str(p["sd"])], "pass --arch"),
    "eps 8//255": (lambda p: ["--model", str(p["ckpt"]), "--eps", "8//255"], "invalid epsilon"),
    "eps abc": (lambda p: ["--model", str(p["ckpt"]), "--eps", "abc"], "invalid epsilon"),
    "eps -1": (lambda p: ["--model", str(p["ckpt"]), "--eps", "-1"], "invalid epsilon"),
    "eps too big": (lambda p: ["--model", str(p["ckpt"]), "--eps", "8"], "--eps-scale 255"),
    "unknown attack": (lambda p: ["--model", str(p["ckpt"]), "--attack", "deepfool"], "unknown attack"),
    "missing cifar10": (lambda p: ["--model", str(p["ckpt"]), "--dataset", "cifar10", "--data-dir",
                                   str(p["tmp"] / "no-data")], "cifar10 test data not found"),
    "nan logits": (lambda p: ["--model", str(p["nan"]), "--dataset", f"npz:{p['npz']}", "--n", "8"],
                   "non-finite logits"),
    "n too large": (lambda p: ["--model", str(p["ckpt"]), "--dataset", f"npz:{p['npz']}", "--n", "99"],
                    "more than the 32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_nonzero_exit(case, tiny_ckpt, tiny_state_dict, nan_ckpt, tiny_npz,
                                                tmp_path):
    paths = {"tmp": tmp_path, "sd": tiny_state_dict, "ckpt": tiny_ckpt, "nan": nan_ckpt, "npz": tiny_npz}
    make_args, message = BAD[case]
    result = _invoke(["attack", *make_args(paths), "--out", str(tmp_path / "o"), "-q", "--steps", "1",
                      "--restarts", "1", "--device", "cpu"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_interrupted_attack_resumes_to_the_same_table(tiny_ckpt, tiny_npz, tmp_path, monkeypatch):
    assert _invoke(_attack_args(tiny_ckpt, tiny_npz, tmp_path / "full")).exit_code == 0
    real, count = attacks.run, {"n": 0}

    def killed(*a, **kw):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived inside the second batch
        return real(*a, **kw)

    monkeypatch.setattr(runner.attacks, "run", killed)
    cut = _invoke(_attack_args(tiny_ckpt, tiny_npz, tmp_path / "cut"))
    assert cut.exit_code == 130 and "rerun the same command (same --out) to resume" in cut.stderr
    assert 0 < len(records.read(tmp_path / "cut")) < 48
    monkeypatch.setattr(runner.attacks, "run", real)
    again = _invoke(_attack_args(tiny_ckpt, tiny_npz, tmp_path / "cut"))
    assert again.exit_code == 0, again.output
    full_csv = (tmp_path / "full" / "summary.csv").read_text()
    assert (tmp_path / "cut" / "summary.csv").read_text() == full_csv
    table_lines = lambda out: [line for line in out.splitlines() if line.startswith("│")]
    full = _invoke(["report", str(tmp_path / "full")])
    assert table_lines(again.stdout) == table_lines(full.stdout) != []


def test_report_formats_and_group_bys(tiny_ckpt, tiny_npz, tmp_path):
    out = tmp_path / "run"
    assert _invoke(_attack_args(tiny_ckpt, tiny_npz, out, "--no-skip")).exit_code == 0
    md = _invoke(["report", str(out / "records.csv"), "--format", "markdown", "--rows", "model,train_steps"])
    header = "| Model | PGD steps | ε | n | Nominal | Untargeted | Multi-Targeted | Worst case |"
    assert md.exit_code == 0 and header in md.stdout
    assert "--no-skip" in md.stdout  # the note says how the per-attack columns were computed
    latex = _invoke(["report", str(out), "--format", "latex", "--title", "F4"])
    assert r"\begin{tabular}" in latex.stdout and r"\%" in latex.stdout
    data = json.loads(_invoke(["report", str(out), "--format", "json"]).stdout)
    assert data["rows"][0]["model"] == "tiny" and 0 <= data["rows"][0]["Worst case"] <= 1
    by_eps = _invoke(["report", str(out), "--format", "csv", "--rows", "model", "--columns", "eps"])
    assert by_eps.exit_code == 0 and "0.05" in by_eps.stdout.splitlines()[0]
    two = tmp_path / "two"  # a column per ε: each holds every example of the row once
    assert _invoke(_attack_args(tiny_ckpt, tiny_npz, two, "--eps", "0.02")).exit_code == 0
    by_eps = _invoke(["report", str(two), "--format", "csv", "--columns", "eps"])
    table = pd.read_csv(io.StringIO(by_eps.stdout))
    per_attack = pd.read_csv(io.StringIO(_invoke(["report", str(two), "--format", "csv"]).stdout))
    assert table["n"].tolist() == [per_attack["n"].iloc[0]]
    for eps in ("0.02", "0.05"):
        worst = per_attack.loc[per_attack["eps"].map(lambda e: f"{e:g}") == eps, "Worst case"].iloc[0]
        assert table[eps].iloc[0] == pytest.approx(worst)  # the same number as the per-attack table's
    bad = _invoke(["report", str(out), "--rows", "colour"])
    assert bad.exit_code != 0 and "unknown record column 'colour'" in bad.stderr
    missing = _invoke(["report", str(tmp_path / "none.csv")])
    assert missing.exit_code != 0 and "records file not found" in missing.stderr


def test_models_lists_registry_and_zoo(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "ZOO_DIR", tmp_path)
    empty = _invoke(["models"])
    assert empty.exit_code == 0 and "small_cnn" in empty.stdout and "no checkpoints yet" in empty.stdout
    (tmp_path / "fmnist-adv2.pt").write_bytes(tiny_ckpt.read_bytes())
    listed = _invoke(["models"])
    assert listed.exit_code == 0
    row = next(line for line in listed.stdout.splitlines() if "fmnist-adv2" in line)
    assert "adversarial" in row and "small_cnn" in row and " 2 " in row


def test_demo_runs_the_zoo_or_says_it_is_empty(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "ZOO_DIR", tmp_path / "zoo")
    (tmp_path / "zoo").mkdir()
    empty = _invoke(["demo", "--out", str(tmp_path / "d0")])
    assert empty.exit_code != 0 and "no Fashion-MNIST models yet" in empty.stderr
    for name in ("fmnist-adv2", "fmnist-adv10"):
        (tmp_path / "zoo" / f"{name}.pt").write_bytes(tiny_ckpt.read_bytes())
    result = _invoke(["demo", "--n", "12", "--restarts", "1", "--steps", "2", "--device", "cpu", "-q",
                      "--out", str(tmp_path / "d1")])
    assert result.exit_code == 0, result.output
    assert "demo budget: n=12" in result.stdout and "paper: 20 restarts × 200 steps" in result.stdout
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == ["fmnist-adv2", "fmnist-adv10"]  # natural order, one row per model
    assert "PGD steps" in result.stdout and "Multi-Targeted" in result.stdout
