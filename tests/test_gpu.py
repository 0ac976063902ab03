"""GPU agreement: run on the GPU machine with ``python3 -m pytest -m gpu tests/test_gpu.py``.

The success flags of a fixed small run on CUDA must equal the CPU's, except at points whose fp32
margin is within 1e-4 of 0 (float rounding differs between devices); the count is printed.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import attacks
from robusteval import records
from robusteval.cli import cli
from robusteval.data import load_dataset
from robusteval.models import load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
NEAR = 1e-4


def _flags(device, precision="fp32"):
    model = load_model("zoo:fmnist-adv2", device=device).model.eval()
    ds = load_dataset("fashion-mnist", n=200)
    x, y = ds.images.to(device), ds.labels.long().to(device)
    res = attacks.run(attacks.get("apgd-ce", 0.1, steps=20), model, x, y, ids=ds.ids, seed=0,
                      precision=precision)
    return res.success.cpu(), res.margin.cpu()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_on_cuda_agrees_with_cpu(precision):
    ok_cpu, m_cpu = _flags("cpu")
    ok_gpu, m_gpu = _flags("cuda", precision)
    differ = ok_cpu != ok_gpu
    near = (m_cpu.abs() < NEAR) | (m_gpu.abs() < NEAR)
    print(f"{precision}: {int(differ.sum())} flag(s) differ, {int((differ & near).sum())} of them within "
          f"{NEAR} of the boundary")
    if precision == "fp32":
        assert not (differ & ~near).any()
    else:  # bf16 gradients take other paths; strength must stay within a few examples of 200
        assert abs(int(ok_gpu.sum()) - int(ok_cpu.sum())) <= 4


def test_cli_attack_and_gamma_on_cuda_agree_with_cpu(tmp_path):
    runner = CliRunner()
    out = {}
    for device in ("cpu", "cuda"):
        d = tmp_path / device
        res = runner.invoke(cli, ["attack", "-m", "zoo:fmnist-adv2", "-a", "pgd-20", "--n", "100", "--device",
                                  device, "--out", str(d), "-q", "--no-checks"])
        assert res.exit_code == 0, res.output
        out[device] = records.read(d / records.FILENAME).set_index("example_id")
        res = runner.invoke(cli, ["gamma", "-m", "zoo:fmnist-adv2", "--n", "100", "--device", device,
                                  "--out", str(tmp_path / f"g-{device}")])
        assert res.exit_code == 0, res.output
    a, b = out["cpu"], out["cuda"]
    differ = a["robust"] != b["robust"]
    near = (a["margin"].abs() < NEAR) | (b["margin"].abs() < NEAR)
    print(f"attack: {int(differ.sum())} robust flag(s) differ, {int((differ & near).sum())} near the "
          "boundary")
    assert not (differ & ~near).any()
    ga = records.read_gamma(tmp_path / "g-cpu").set_index("example_id")
    gb = records.read_gamma(tmp_path / "g-cuda").set_index("example_id")
    col = "gamma"
    torch.testing.assert_close(torch.tensor(ga[col].to_numpy()), torch.tensor(gb[col].to_numpy()),
                               rtol=1e-2, atol=1e-4)
