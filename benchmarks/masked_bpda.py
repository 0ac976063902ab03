"""BPDA on a masked model: a zoo model behind 4-level input quantisation, exported as a torch.export
program, evaluated with and without ``--bpda`` (same examples, same battery, checks on).

    python benchmarks/masked_bpda.py --model zoo:fmnist-adv2 --n 100

Prints, for each setting, the per-attack robust accuracy, the worst case and the alarms.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from robusteval import runner
from robusteval.data import load_dataset
from robusteval.evaluation import Budget, Evaluation
from robusteval.models import load_model


class QuantisedInput(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 3) / 3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:fmnist-adv2")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--restarts", type=int, default=2)
    args = p.parse_args()
    ds = load_dataset("fashion-mnist", n=args.n)
    model = QuantisedInput(load_model(args.model).model).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (ds.images[:4],), dynamic_shapes=({0: batch},))
    path = Path(tempfile.mkdtemp()) / "quantised.pt2"
    torch.export.save(program, path)
    print(f"# {args.model} behind 4-level input quantisation ({path.name}), n={len(ds)}, eps={args.eps}, "
          f"untargeted + multi-targeted {args.restarts} x {args.steps}, --no-skip, checks on")
    print("| setting | untargeted | multi-targeted | square (check) | worst case | alarms | seconds |")
    print("|---|---|---|---|---|---|---|")
    for bpda in (False, True):
        t0 = time.perf_counter()
        outcome = runner.evaluate(Evaluation(
            models=(load_model(path),), battery=("untargeted", "multi-targeted"), eps=(args.eps,), dataset=ds,
            budget=Budget(steps=args.steps, restarts=args.restarts), no_skip=True, bpda=bpda, progress=False,
            device="cpu"))
        df = outcome.records
        seconds = time.perf_counter() - t0
        by = df.groupby("attack")["robust"].mean()
        worst = df.groupby("example_id")["robust"].all().mean()
        found = ", ".join(sorted({a.check for a in outcome.alarms})) or "none"
        print(f"| {'--bpda' if bpda else 'plain'} | {by['untargeted']:.1%} | {by['multi-targeted']:.1%} | "
              f"{by['square']:.1%} | {worst:.1%} | {found} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
