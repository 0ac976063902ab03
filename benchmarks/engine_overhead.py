"""Engine overhead: N steps of the ``untargeted`` preset against N bare forward+backward passes.

Both sides use the same model, batch and device. "Bare" is the minimum any gradient attack needs per
step: a forward pass, the same per-example objective (the margin) and the gradient with respect to
the input (``torch.autograd.grad``). The attack runs with compaction disabled (every example stays in
the batch for every step) and one restart, so the ratio measures the engine's own cost: success check,
best-iterate bookkeeping, Adam update, projection, plus its one clean and one final forward. A second
ratio is given against a forward + full ``loss.backward()`` (parameter gradients too), the cost of a
training step's backward. Measurements are interleaved (bare, attack, bare, attack, ...) so
load drift hits both sides alike; the median of the repeats is reported.

``--precision bf16`` runs both sides under autocast (the engine's success decisions stay fp32, so its
candidates are re-evaluated in fp32: part of the engine's cost). ``--compact K`` measures the engine with
compaction every K steps (1: every step, as on a CPU) instead of none.

    python benchmarks/engine_overhead.py                  # small CNN + ResNet-18, CPU, batch 128
    python benchmarks/engine_overhead.py --device cuda --steps 50
    python benchmarks/engine_overhead.py --device cuda --models wrn28_10 --batch 256 --precision bf16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn
import torchvision

import attacks


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def resnet18_32() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def wrn28_10() -> nn.Module:
    from robusteval.models import create_model

    return create_model("wrn28_10", num_classes=10)


def _autocast(device, precision):
    import contextlib

    dtype = attacks.engine.PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare(model, x, y, steps, device, full_backward=False, precision="fp32"):
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        xi = x.detach().requires_grad_(True)
        # the attack's own objective (the margin), so the ratio isolates the engine's bookkeeping
        with _autocast(device, precision):
            loss = attacks.margin_of(model(xi).float(), y).sum()
        if full_backward:
            loss.backward()
        else:
            torch.autograd.grad(loss, xi)
    _sync(device)
    return time.perf_counter() - t0


def attack(model, x, y, steps, device, precision="fp32", compact=False):
    atk = attacks.get("untargeted", 8 / 255, steps=steps, restarts=1)
    _sync(device)
    t0 = time.perf_counter()
    attacks.run(atk, model, x, y, seed=0, compact=compact, precision=precision)
    _sync(device)
    return time.perf_counter() - t0


def measure(name, model, shape, batch, steps, repeats, device, precision="fp32", compact=False):
    torch.manual_seed(0)
    model = model.to(device).eval()
    x = torch.rand(batch, *shape, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)  # clean-correct by construction: every example is attacked
    bare(model, x, y, 2, device, precision=precision)
    attack(model, x, y, 2, device, precision, compact)
    t_bare, t_atk, t_full = [], [], []
    for _ in range(repeats):
        t_bare.append(bare(model, x, y, steps, device, precision=precision))
        t_atk.append(attack(model, x, y, steps, device, precision, compact))
        t_full.append(bare(model, x, y, steps, device, full_backward=True, precision=precision))
        model.zero_grad(set_to_none=True)
    b, a, f = (statistics.median(t) for t in (t_bare, t_atk, t_full))
    print(f"{name:10s} batch {batch:4d} {precision} {steps} steps: bare fwd+input-bwd "
          f"{b / steps * 1e3:8.2f} ms/step | untargeted {a / steps * 1e3:8.2f} ms/step | "
          f"ratio {a / b:5.3f} | vs fwd+full-bwd {f / steps * 1e3:8.2f} ms/step, ratio {a / f:5.3f}",
          flush=True)
    return b / steps, a / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="small_cnn,resnet18")
    p.add_argument("--precision", default="fp32", choices=list(attacks.engine.PRECISIONS))
    p.add_argument("--compact", type=int, default=0, help="compaction cadence of the engine (0: none)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    for name in args.models.split(","):
        build, shape = MODELS[name]
        measure(name, build(), shape, args.batch, args.steps, args.repeats, args.device, args.precision,
                args.compact or False)


MODELS = {"small_cnn": (small_cnn, (1, 28, 28)), "resnet18": (resnet18_32, (3, 32, 32)),
          "wrn28_10": (wrn28_10, (3, 32, 32))}


if __name__ == "__main__":
    main()
