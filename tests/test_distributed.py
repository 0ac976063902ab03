"""Sharded evaluation: torchrun ranks and --shard I/N jobs give the single-process records."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from robusteval import distributed, records, rundir
from robusteval.cli import cli
from robusteval.errors import UserError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
VOLATILE = ["seconds"]  # wall time per example: the only column that may differ between runs


def assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Row for row equal: every id, flag, prediction, restart, step count and target exactly; floats
    (margin, objective, linf) to 1e-4 relative — a shard's batches hold other examples, and CPU
    convolutions round differently with the batch, which moves logits in the 6th digit."""
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-6)
    for col in a.columns:
        if a[col].dtype.kind != "f":
            assert a[col].equals(b[col]), col


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _args(ckpt, out, n=24, extra=()):
    return ["attack", "-m", str(ckpt), "-a", "pgd-6", "-a", "multi-targeted", "--restarts", "2",
            "--steps", "6", "--eps", "0.05", "-n", str(n), "--batch-size", "5", "--out", str(out), "-q",
            "--no-checks", *extra]


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=VOLATILE).sort_values(list(records.KEY)).reset_index(drop=True)


def _table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return lines[start:end + 1]


@pytest.fixture(scope="module")
def single(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    res = CliRunner().invoke(cli, _args(tiny_ckpt, out))
    assert res.exit_code == 0, res.output
    df = records.read(out / records.FILENAME)
    assert df["robust"].any() and (~df["robust"] & df["clean_correct"]).any()
    return _sorted(df), _table(res.output)


def test_shards_and_report_equal_the_single_run(single, tiny_ckpt, tmp_path):
    out = tmp_path / "sharded"
    for i in range(3):
        res = CliRunner().invoke(cli, _args(tiny_ckpt, out, extra=("--shard", f"{i}/3")))
        assert res.exit_code == 0, res.output
        assert f"records: {out / rundir.filename(rundir.RECORDS, (i, 3))}" in res.output
        assert "when every shard is done: robusteval report" in res.output
    assert_same(_sorted(records.read(out)), single[0])
    res = CliRunner().invoke(cli, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert _table(res.output) == single[1]
    (out / rundir.filename(rundir.RECORDS, (1, 3))).unlink()  # a missing shard is named, never absent
    res = CliRunner().invoke(cli, ["report", str(out)])
    assert res.exit_code != 0 and "shard(s) 1/3 (records.shard-1-of-3.csv) missing" in res.output


def test_torchrun_two_ranks_equal_the_single_run(single, tiny_ckpt, tmp_path):
    out = tmp_path / "ranks"
    proc = subprocess.run([*TORCHRUN, "-m", "robusteval", *_args(tiny_ckpt, out)], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("records*.csv")) == [rundir.filename(rundir.RECORDS, (0, 2)),
                                                                 rundir.filename(rundir.RECORDS, (1, 2))]
    assert_same(_sorted(records.read(out)), single[0])
    assert _table(proc.stdout) == single[1]  # printed once, by rank 0


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def test_a_killed_rank_resumes_to_the_same_records(single, tiny_ckpt, tmp_path):
    out = tmp_path / "killed"
    args = [*TORCHRUN, "-m", "robusteval", *_args(tiny_ckpt, out, extra=("--batch-size", "1"))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            start_new_session=True)
    shard1 = out / rundir.filename(rundir.RECORDS, (1, 2))
    deadline = time.time() + 240
    while _rows(shard1) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = _children(proc.pid)
    if proc.poll() is not None or not ranks:
        pytest.skip("the run finished before a rank could be killed")
    os.kill(max(ranks), signal.SIGKILL)  # the later-started worker: rank 1
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the dead rank
    done_before = _rows(shard1)
    assert 0 < done_before
    again = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    merged = _sorted(records.read(out))
    assert_same(merged, single[0])  # nothing lost, nothing duplicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_with_different_out_are_refused_on_every_rank(tiny_ckpt, tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "robusteval", *_args(tiny_ckpt, tmp_path / f"o{rank}")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode != 0
        assert "every rank must get the same arguments" in err and "out" in err
        assert "Traceback" not in err


def test_more_ranks_than_examples_is_a_clear_error(tiny_ckpt, tmp_path):
    proc = subprocess.run([*TORCHRUN, "-m", "robusteval", *_args(tiny_ckpt, tmp_path / "o", n=1)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert "2 shards (or processes) but only 1 examples" in proc.stderr


@pytest.mark.parametrize("text", ["2/2", "a/b", "1", "-1/3", "0/0"])
def test_bad_shard_spec_is_refused(text):
    with pytest.raises(UserError, match="shard must be I/N"):
        distributed.parse_shard(text)
    assert distributed.parse_shard("1/3") == (1, 3)


def test_shard_and_torchrun_together_are_refused(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = CliRunner().invoke(cli, _args(tiny_ckpt, tmp_path / "o", extra=("--shard", "0/2")))
    assert res.exit_code != 0 and "--shard and torchrun" in res.output


def test_two_process_training_writes_one_checkpoint_that_loads_and_resumes(tmp_path):
    from robusteval.models import load_model

    out = tmp_path / "ddp.pt"
    base = [*TORCHRUN, "-m", "robusteval", "train", "--method", "adversarial", "--steps", "1", "--n-train",
            "200", "--batch-size", "50", "--eval-n", "0", "--out", str(out), "--quiet"]
    first = subprocess.run([*base, "--epochs", "1"], capture_output=True, text=True, env=_env(), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp.pt"]  # rank 0 alone writes
    assert first.stdout.count(str(out)) == 1  # one final line, from rank 0
    loaded = load_model(out)
    assert loaded.meta["training"]["method"] == "adversarial"
    again = subprocess.run([*base, "--epochs", "2", "--resume"], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    epochs = load_model(out).meta["metrics"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["train_loss"] == e["train_loss"] and e["train_acc"] > 0 for e in epochs)  # finite, summed


def test_training_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    cmd = [*TORCHRUN, "-m", "robusteval", "train", "--method", "nominal", "--n-train", "200", "--batch-size",
           "51", "--eval-n", "0", "--epochs", "1", "--out", str(tmp_path / "x.pt"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert "batch size 51 does not split over 2 processes" in proc.stderr


def test_torchrun_gamma_merges_the_ranks_into_the_single_process_rows(tiny_ckpt, tmp_path):
    args = ["gamma", "-m", str(tiny_ckpt), "-n", "20", "--steps", "10", "--eps", "0.1"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    proc = subprocess.run([*TORCHRUN, "-m", "robusteval", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = records.read_gamma(tmp_path / "one")
    two = records.read_gamma(tmp_path / "two")
    assert one["example_id"].tolist() == two["example_id"].tolist()  # dataset order, every example once
    assert one["clean_pred"].tolist() == two["clean_pred"].tolist()
    # γ is a maximisation: a rank's batch holds other examples, CPU kernels round differently with the
    # batch, and a few searches then end elsewhere — as with a different --batch-size in one process
    rel = ((one["gamma"] - two["gamma"]).abs() / one["gamma"].abs().clip(lower=1e-8))
    assert rel.median() < 1e-4 and (rel < 1e-3).mean() >= 0.8
    assert (tmp_path / "two" / "gamma_hist.png").is_file()


def test_split_and_unsplit_runs_do_not_mix_in_one_out(tiny_ckpt, tmp_path):
    out = tmp_path / "mixed"
    res = CliRunner().invoke(cli, _args(tiny_ckpt, out, n=6, extra=("--shard", "0/2")))
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, _args(tiny_ckpt, out, n=6))
    assert res.exit_code != 0 and "split into 2 shards; finish it with --shard" in res.output
    res = CliRunner().invoke(cli, _args(tiny_ckpt, out, n=6, extra=("--shard", "0/3")))
    assert res.exit_code != 0 and "not split into 3 shards" in res.output
    single = tmp_path / "single"
    assert CliRunner().invoke(cli, _args(tiny_ckpt, single, n=6)).exit_code == 0
    res = CliRunner().invoke(cli, _args(tiny_ckpt, single, n=6, extra=("--shard", "1/2")))
    assert res.exit_code != 0 and "not split into 2 shards" in res.output
