"""``robusteval gamma``, ``surface`` and ``show`` end to end on tiny checkpoints (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from robusteval import records
from robusteval.cli import cli
from robusteval.data import load_dataset
from robusteval.models import create_model, load_model, save_checkpoint

KW = {"width": 4, "hidden": 16, "activation": "softplus"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("small_cnn", **KW)
        paths.append(str(save_checkpoint(root / f"tiny{seed}.pt", model, "small_cnn", KW, "fashion-mnist")))
    return paths


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_gamma_cli_records_histogram_and_summary(ckpts, tmp_path):
    out = tmp_path / "g"
    r = invoke("gamma", "--model", ckpts[0], "--model", ckpts[1], "--eps", "8/255", "--n", 10,
               "--batch-size", 6, "--steps", 5, "--bins", 7, "--out", out)
    assert r.exit_code == 0, r.output
    assert "tiny0" in r.stdout and "median √γ" in r.stdout and "p90" in r.stdout
    df = records.read_gamma(out)  # γ results are records: the same id / prediction columns as attacks
    assert len(df) == 20 and set(df.model) == {"tiny0", "tiny1"}
    for col in ("example_id", "label", "clean_pred", "clean_correct", "gamma", "sqrt_gamma", "lin_abs",
                "loss", "loss_adv", "eps", "eps_text", "steps", "bn", "grad_mode"):
        assert col in df.columns
    assert (df.gamma >= 0).all() and np.allclose(df.sqrt_gamma, np.sqrt(df.gamma))
    # ε round-trips exactly (full precision, read with Python's float) and keeps the text as given
    assert df.eps.eq(8 / 255).all() and df.eps_text.eq("8/255").all()
    assert list(df.example_id[:10]) == list(range(10))
    # The saved bin counts are those recomputed from gamma.csv on the saved (shared) edges.
    assert (out / "gamma_hist.png").stat().st_size > 0
    hist = pd.read_csv(out / "gamma_hist.csv")
    for name, h in hist.groupby("model"):
        h = h.sort_values("bin")
        edges = np.append(h.left.to_numpy(), h.right.to_numpy()[-1])
        assert len(edges) == 8
        recomputed = np.histogram(df[df.model == name].sqrt_gamma, bins=edges)[0]
        assert np.array_equal(recomputed, h["count"].to_numpy())
    assert hist.groupby("model")["left"].apply(tuple).nunique() == 1  # shared bins
    # Clean correctness agrees with the model in eval mode.
    ds = load_dataset("fashion-mnist", n=10)
    model = load_model(ckpts[0]).model
    with torch.no_grad():
        correct = (model(ds.images).argmax(1) == ds.labels).numpy()
    assert np.array_equal(df[df.model == "tiny0"].clean_correct.to_numpy(), correct)
    summary = pd.read_csv(out / "gamma_summary.csv")
    assert summary.set_index("model").loc["tiny1", "n"] == 10


def test_surface_cli_grid_matches_losses(ckpts, tmp_path):
    r = invoke("surface", "--model", ckpts[0], "--index", 126, "--eps", "0.1", "--grid", 9, "--steps", 5,
               "--restarts", 1, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    grid = pd.read_csv(tmp_path / "surface_tiny0_126.csv")
    assert (tmp_path / "surface_tiny0_126.png").stat().st_size > 0 and len(grid) == 81
    ds = load_dataset("fashion-mnist", n=1, offset=126)
    model = load_model(ckpts[0]).model
    with torch.no_grad():
        l0 = F.cross_entropy(model(ds.images), ds.labels).item()
    centre = grid[(grid.a == 0) & (grid.b == 0)].loss.item()
    assert centre == pytest.approx(l0, rel=1e-6)
    assert f"loss at x: {l0:.6g}" in r.stdout
    assert len(grid[(grid.a == 1) & (grid.b == 0)]) == 1  # the attack's point is on the grid


def test_show_cli_prints_labels(ckpts, tmp_path):
    r = invoke("show", "--model", ckpts[1], "--index", 3, "--attack", "pgd-5", "--eps", "0.1",
               "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "true: " in r.stdout and "adversarial: " in r.stdout
    assert (tmp_path / "show_tiny1_3_pgd-5.png").stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["surface", "--model", "{m}", "--index", 10**7, "--eps", "0.1"], "out of range"),
    (["show", "--model", "{m}", "--eps", "abc"], "invalid epsilon"),
    (["gamma", "--model", "{m}", "--eps", "-1"], "invalid epsilon"),
    (["gamma", "--model", "{m}", "--eps", "2"], "eps-scale"),
    (["gamma", "--model", "missing.pt", "--eps", "0.1"], "not found"),
    (["gamma", "--model", "zoo:no-such-model", "--eps", "0.1"], "unknown zoo model"),
    (["surface", "--model", "{m}", "--grid", 8, "--eps", "0.1"], "odd"),
    (["show", "--model", "{m}", "--attack", "no-such-attack", "--eps", "0.1"], "unknown attack"),
    (["gamma", "--model", "{m}", "--eps", "0.1", "--dataset", "cifar10", "--data-dir", "{tmp}"], "not found"),
    (["gamma", "--model", "{m}", "--eps", "0.1", "--step-size", "fast"], "invalid step size"),
])
def test_user_errors_are_one_line(ckpts, tmp_path, args, needle):
    args = [str(a).format(m=ckpts[0], tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "o")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("using the default")]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))


def test_model_dataset_mismatch_is_one_line(ckpts, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 32, 32), np.uint8), y=np.arange(4))
    r = CliRunner().invoke(cli, ["gamma", "--model", ckpts[0], "--eps", "0.1", "--dataset",
                                f"npz:{tmp_path / 'c.npz'}", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "takes images of shape" in r.stderr, r.stderr


def test_help_has_examples():
    for cmd in ("gamma", "surface", "show"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and "robusteval " + cmd in r.output
