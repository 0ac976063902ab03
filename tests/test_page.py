"""The HTML report (one self-contained page) and the JSON summary: every section from the run's files,
nothing loaded from anywhere, a reader that never writes what it reads; the page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import QuantisedInput

from robusteval import alarms
from robusteval.cli import cli
from robusteval.models import load_model


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.ids, self.sources, self.links, self.text = 0, set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tables += tag == "table"
        if "id" in a:
            self.ids.add(a["id"])
        if "src" in a:
            self.sources.append(a["src"])
        if tag in ("link", "script") or "href" in a:
            self.links.append((tag, a))

    def handle_data(self, data):
        self.text.append(data)


def _run(args):
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tiny_npz, tmp_path_factory):
    """A run at two radii (a curve), and γ records of the same model."""
    root = tmp_path_factory.mktemp("page")
    run = root / "run"
    base = ["--dataset", f"npz:{tiny_npz}", "--n", "16", "--device", "cpu"]
    res = _run(["attack", "-m", str(tiny_ckpt), *base, "-q", "--eps", "0.05", "--eps", "0.1", "-a", "apgd-ce",
                "--steps", "5", "--queries", "50", "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = _run(["gamma", "-m", str(tiny_ckpt), *base, "--eps", "0.1", "--steps", "5", "--out",
                str(root / "g")])
    assert res.exit_code == 0, res.output
    return root, run, root / "g"


@pytest.fixture(scope="module")
def net_masked(tiny_ckpt, tmp_path_factory):
    """The tiny model behind an input quantiser, as TorchScript: the unusable-gradients alarm."""
    path = tmp_path_factory.mktemp("masked") / "quantised.pt"
    torch.jit.script(QuantisedInput(load_model(tiny_ckpt).model.eval()).eval()).save(str(path))
    return path


def test_html_report_has_every_section_embedded_and_loads_nothing(runs, tiny_ckpt):
    root, run, gamma = runs
    page = root / "report.html"
    res = _run(["report", str(run), str(gamma), "--format", "html", "-o", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    p = _Page()
    p.feed(text)
    assert {"robust-accuracy", "alarms", "plan", "models", "cost", "curve", "gamma"} <= p.ids
    assert p.tables >= 5  # accuracy, plan, models, cost, γ statistics per ε
    assert p.sources and all(s.startswith("data:image/png;base64,") for s in p.sources)  # curve, histogram
    assert not p.links and "http://" not in text and "https://" not in text  # nothing from the network
    words = " ".join(p.text)
    import hashlib

    assert hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest() in words  # the model's identity
    assert "APGD-CE" in words and "Worst case" in words and "Complete" in words
    assert str(tiny_ckpt) in words  # its source, from the plan


def test_html_report_shows_alarms_with_remedies_and_an_incomplete_run(runs, tiny_ckpt, tiny_npz, net_masked):
    root, run, _ = runs
    masked = root / "masked"
    res = _run(["attack", "-m", str(net_masked), "--dataset", f"npz:{tiny_npz}", "--n", "16", "--eps", "0.1",
                "-a", "untargeted", "--steps", "5", "--restarts", "1", "--queries", "100", "--device", "cpu",
                "-q", "--out", str(masked)])
    assert res.exit_code == alarms.UNRELIABLE_EXIT, res.output
    page = root / "masked.html"
    res = _run(["report", str(masked), "--format", "html", "-o", str(page)])
    assert res.exit_code == alarms.UNRELIABLE_EXIT  # the page is written, the verdict still exits 3
    text = page.read_text()
    assert "UNRELIABLE" in text and "unusable-gradients" in text and "remedy" in text
    assert alarms.REMEDIES["unusable-gradients"][:40] in text.replace("&#x27;", "'")

    partial = root / "partial"
    shutil.copytree(run, partial)
    df = pd.read_csv(partial / "records.csv")
    df[df["eps"] != 0.1].to_csv(partial / "records.csv", index=False)  # one radius lost
    res = _run(["report", str(partial), "--format", "html", "-o", str(root / "partial.html")])
    assert res.exit_code == 4
    assert "INCOMPLETE" in (root / "partial.html").read_text()


def test_report_output_mistakes_are_one_line(runs):
    root, run, _ = runs
    res = _run(["report", str(run), "--format", "html"])
    assert res.exit_code != 0 and "-o report.html" in res.output and "Traceback" not in res.output
    before = (run / "records.csv").read_bytes()
    res = _run(["report", str(run / "records.csv"), "--format", "html", "-o", str(run / "records.csv")])
    assert res.exit_code != 0 and "one of the inputs" in res.output
    assert (run / "records.csv").read_bytes() == before  # a reader never writes what it reads


def test_json_summary_has_the_fields_of_summary_csv(runs):
    _, run, _ = runs
    res = _run(["report", str(run), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    summary = pd.read_csv(run / "summary.csv")
    assert [list(r) for r in data["rows"]] == [list(summary.columns)] * len(summary)
    got = pd.DataFrame(data["rows"])
    for col in summary.columns:
        if pd.api.types.is_numeric_dtype(summary[col]):
            assert got[col].astype(float).tolist() == pytest.approx(summary[col].astype(float).tolist())
    assert "Battery mode" in data["note"]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Debian's chromium is not installed")
def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    import matplotlib.image as mpimg

    root, run, gamma = runs
    page = tmp_path / "report.html"
    assert _run(["report", str(run), str(gamma), "--format", "html", "-o", str(page)]).exit_code == 0
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    p = _Page()
    p.feed(dom.stdout)
    assert p.tables >= 5 and {"robust-accuracy", "models", "cost", "curve", "gamma"} <= p.ids
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.std() > 0.05  # not blank: text, tables and figures drawn
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.002 < dark < 0.5
