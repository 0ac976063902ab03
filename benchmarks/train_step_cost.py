"""Cost of one training step of each method, as a ratio to one nominal step.

A "step" is what :func:`robusteval.training.train` does per batch: :func:`compute_loss` (including the
inner maximisation through ``attacks.run``), ``backward()`` and an SGD update, with the model in train
mode and ε at its full value (after the ramp). Methods: nominal; adversarial PGD-k (k = 2, 10; Adam);
TRADES (k = 10); LLR (M = 2, 10; Adam, double backprop). Architectures: ``small_cnn`` on 28×28 grey
inputs (Fashion-MNIST shape, batch 128) and ``wrn16_4`` on 32×32 RGB inputs (batch 32 by default, to
keep the CPU run short). Random inputs: the cost does not depend on the pixel values.

Per configuration: ``--warmup`` untimed steps, then ``--repeats`` timed steps; the median is reported.
The issue's target: LLR with M inner steps costs no more than 1.5× ADV with the same M.

    python benchmarks/train_step_cost.py                       # CPU, 1 thread
    python benchmarks/train_step_cost.py --device cuda --wrn-batch 128 --repeats 10
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from robusteval.models import create_model
from robusteval.training import LossConfig, compute_loss

METHODS = [
    ("nominal", "nominal", 1),
    ("adv k=2", "adversarial", 2),
    ("adv k=10", "adversarial", 10),
    ("trades k=10", "trades", 10),
    ("llr M=2", "llr", 2),
    ("llr M=10", "llr", 10),
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(arch: str, shape, batch: int, eps: float, device: str, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model(arch).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    ids = torch.arange(batch)
    out = {}
    for label, method, steps in METHODS:
        cfg = LossConfig(method, steps=steps)
        times = []
        for r in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            res = compute_loss(cfg, model, x, y, eps=eps, ids=ids, seed=r)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            sync(device)
            if r >= warmup:
                times.append(time.perf_counter() - start)
        out[label] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--cnn-batch", type=int, default=128)
    ap.add_argument("--wrn-batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-wrn", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # as the trainer (docs/protocol.md)
        torch.backends.cudnn.allow_tf32 = False

    configs = [("small_cnn", (1, 28, 28), args.cnn_batch, 0.1)]
    if not args.skip_wrn:
        configs.append(("wrn16_4", (3, 32, 32), args.wrn_batch, 8 / 255))
    where = (f"{args.threads} thread(s), {platform.processor() or platform.machine()}" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"# train_step_cost: torch {torch.__version__}, device {args.device} ({where}), "
          f"warm-up {args.warmup}, median of {args.repeats}")
    results = {}
    for arch, shape, batch, eps in configs:
        results[arch] = time_steps(arch, shape, batch, eps, args.device, args.warmup, args.repeats)
    header = f"{'method':<12}" + "".join(f"{f'{a} (b={b})':>22}" for a, _, b, _ in configs)
    print(header)
    print("-" * len(header))
    for label, _, _ in METHODS:
        row = f"{label:<12}"
        for arch, *_ in configs:
            t, base = results[arch][label], results[arch]["nominal"]
            row += f"{f'{t / base:6.2f}x  ({t * 1000:7.0f} ms)':>22}"
        print(row)
    for m in (2, 10):
        row = f"{f'llr/adv M={m}':<12}"
        for arch, *_ in configs:
            row += f"{results[arch][f'llr M={m}'] / results[arch][f'adv k={m}']:>21.2f}x"
        print(row)


if __name__ == "__main__":
    main()
