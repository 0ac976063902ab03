"""Every GPU measurement in one command, then the ``gpu``-marked tests.

    PYTHONPATH=. python3 benchmarks/gpu.py --out "$OUT"          # a few minutes on an H100/H200

1. Engine/bare ratio per step (``engine_overhead.measure``): small CNN at batch 1000 (28×28) and
   WRN-28-10 at batch 256 (32×32), fp32 and bf16; the engine with compaction at its GPU cadence.
2. End to end on ``zoo:fmnist-adv10``, first ``--n`` Fashion-MNIST test images, ε = 0.1: the LLR paper's
   untargeted + multi-targeted (20 × 200) in fp32 and in bf16 (robust accuracy after fp32
   verification, and time), and the ``standard`` battery; AutoAttack standard too when
   ``pyautoattack`` is importable (``--aa``).
3. WRN-28-10 (random weights) end to end: ``untargeted`` 1 × 50 steps on 256 random images, fp32 vs bf16.
4. ``pytest -m gpu tests/test_gpu.py``.

Everything printed is also written to ``OUT/gpu.txt``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_overhead as eo  # noqa: E402

import attacks  # noqa: E402
from robusteval import runner  # noqa: E402
from robusteval.data import load_dataset  # noqa: E402
from robusteval.evaluation import Evaluation  # noqa: E402
from robusteval.models import load_model  # noqa: E402


def _robust(df) -> float:
    return float(df.groupby("example_id")["robust"].all().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-results")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--aa", action="store_true", help="also run reference AutoAttack (needs pyautoattack)")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu.txt", "w")

    def say(text):
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    dev = "cuda"
    say(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    say("## 1. engine / bare per step (untargeted, one restart, 20 steps, median of 3)")
    for name, batch in (("small_cnn", 1000), ("wrn28_10", 256)):
        build, shape = eo.MODELS[name]
        for precision in ("fp32", "bf16"):
            every = attacks.engine.COMPACT_EVERY_GPU
            b, a = eo.measure(name, build(), shape, batch, 20, 3, dev, precision, every)
            say(f"| {name}, {batch} | {precision} | bare {b * 1e3:.2f} ms | engine {a * 1e3:.2f} ms | "
                f"ratio {a / b:.3f} |")

    say(f"## 2. end to end, zoo:fmnist-adv10, n = {args.n}, eps = 0.1")
    ds = load_dataset("fashion-mnist", n=args.n)
    model = load_model("zoo:fmnist-adv10", device=dev).model.eval()
    paper = ["untargeted", "multi-targeted"]
    runs = ((paper, "fp32"), (paper, "bf16"), (["standard"], "fp32"), (["standard"], "bf16"))
    for battery, precision in runs:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        df = runner.evaluate(Evaluation(models=(("adv10", model),), battery=tuple(battery), eps=(0.1,),
                                        dataset=ds, batch_size=1000, device=dev, progress=False,
                                        precision=precision)).records
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        say(f"| {'+'.join(battery)} | {precision} | robust {_robust(df):.2%} | {seconds:.1f} s |")
    if args.aa:
        from pyautoattack import AutoAttack

        x, y = ds.images.to(dev), ds.labels.long().to(dev)
        aa = AutoAttack(model, eps=0.1, norm="Linf", version="standard", seed=0, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=1000)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        ok = attacks.LinfBall(0.1).contains(x_adv, x, tol=1e-6)
        with torch.no_grad():
            robust = ((model(x_adv).argmax(1) == y) | ~ok).float().mean().item()
        say(f"| AutoAttack standard | fp32 | robust {robust:.2%} | {seconds:.1f} s |")

    say("## 3. WRN-28-10 (random weights), untargeted 1 x 50 steps, 256 images")
    torch.manual_seed(0)
    wrn = eo.wrn28_10().to(dev).eval()
    x = torch.rand(256, 3, 32, 32, device=dev)
    with torch.no_grad():
        y = wrn(x).argmax(1)
    atk = attacks.get("untargeted", 8 / 255, steps=50, restarts=1)
    times = {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = attacks.run(atk, wrn, x, y, seed=0, precision=precision)
        torch.cuda.synchronize()
        times[precision] = (time.perf_counter() - t0, int(res.success.sum()))
    for precision, (seconds, broken) in times.items():
        say(f"| wrn28_10 | {precision} | {seconds:.2f} s | broken {broken}/256 |")
    say(f"bf16 speed-up: {times['fp32'][0] / times['bf16'][0]:.2f}x")

    if not args.skip_tests:
        say("## 4. gpu tests")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-s", "tests/test_gpu.py"],
                              capture_output=True, text=True)
        say(proc.stdout[-4000:] + proc.stderr[-2000:])
    log.close()


if __name__ == "__main__":
    main()
