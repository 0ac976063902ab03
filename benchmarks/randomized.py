"""Randomised models: robusteval's randomised protocol against reference AutoAttack ``version="rand"``.

Each zoo model is wrapped the way a randomised defence ships it — Gaussian input noise (``--noise``,
σ = 0.05 and 0.1) or dropout at test time on the penultimate features (``--dropout``, p = 0.2) — and
evaluated by both tools on the same examples:

* **robusteval**: the ``standard`` battery through the runner, with the randomised protocol (EoT with K
  chosen by the convergence check, every point judged over ``--draws`` draws). Reported: worst case over
  draws (the headline), expected, the K chosen and its convergence, wall time, forward and backward
  passes per example (counted by a wrapper).
* **AutoAttack rand** (APGD-CE and APGD-DLR with 20 EoT iterations): its own robust accuracy (it judges
  each point by one forward), and its points judged with the same ``--draws`` draws as robusteval's
  (``robusteval.randomness.judge``: worst case and expected), wall time, passes.

``--convergence`` also prints the worst-case robust accuracy of APGD-CE on the first 100 examples as
K doubles (2, 4, ..., 32), to show it falls or stays and where the check stops.

Needs the ``bench`` extra. Example (CPU)::

    python benchmarks/randomized.py --model zoo:fmnist-adv2 --n 500 --eps 0.1 \
        --noise 0.05 --noise 0.1 --dropout 0.2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import attacks
from robusteval import randomness, runner
from robusteval.data import load_dataset
from robusteval.evaluation import Evaluation
from robusteval.models import load_model
from robusteval.runtime import eval_mode

try:
    from vs_peers import Counted
except ImportError:  # run from another directory
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_peers import Counted


class Noise(torch.nn.Module):
    """Gaussian input noise at test time (drawn from the global RNG, as a defence would)."""

    def __init__(self, net, sigma: float):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


class Dropout(torch.nn.Module):
    """Dropout with probability ``p`` on the small CNN's penultimate features, on at test time."""

    def __init__(self, net, p: float):
        super().__init__()
        self.net, self.p = net, p

    def forward(self, x):
        h = self.net.head[:-1](self.net.features(self.net.normalize(x)))
        return self.net.head[-1](F.dropout(h, self.p, training=True))


def run_robusteval(model, ds, eps, draws, batch):
    counted = Counted(model)
    t0 = time.perf_counter()
    outcome = runner.evaluate(Evaluation(models=(("m", counted),), battery=("standard",), eps=(eps,),
                                         dataset=ds, batch_size=batch, device="cpu", progress=False,
                                         draws=draws, randomized=True))
    seconds = time.perf_counter() - t0
    df = outcome.records
    per = df.groupby("example_id")
    worst = float(per["robust"].all().mean())
    expected = float(per["robust_share"].min().fillna(0).mean())
    eot = next(v for v in outcome.verdicts if v.check == "eot-convergence")
    return worst, expected, seconds, counted, eot


def run_autoattack(model, x, y, eps, draws, batch):
    from pyautoattack import AutoAttack

    counted = Counted(model)
    aa = AutoAttack(counted, eps=eps, norm="Linf", version="rand", seed=0, device="cpu")
    aa.verbose = False
    t0 = time.perf_counter()
    x_adv = aa.run_standard_evaluation(x, y, batch_size=batch)
    seconds = time.perf_counter() - t0
    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv
    ok = attacks.LinfBall(eps).contains(x_adv, x, tol=1e-6)
    with torch.no_grad(), randomness.seeded(0, 0, 12345, "cpu"):
        own = (model(x_adv).argmax(1) == y) | ~ok  # AutoAttack's judgement: one forward per point
    clean = randomness.judge(model, x, y, draws, 0, 0)
    judged = randomness.judge(model, x_adv, y, draws, 0, 0)
    worst = ((judged.share == 1) & (clean.share == 1)) | ~ok
    mean = lambda t: float(t.float().mean())
    return mean(own), mean(worst), mean(judged.share), seconds, counted


def convergence(model, ds, eps, draws):
    x, y, ids = ds.images[:100], ds.labels[:100].long(), ds.ids[:100]
    atk = attacks.get("apgd-ce", eps)
    out = []
    for k in (2, 4, 8, 16, 32):
        with randomness.seeded(0, 0, 777 + k, "cpu"):
            res = attacks.run(atk.replace(draws=k), model, x, y, ids=ids, seed=0)
        share = randomness.judge(model, res.x_adv, y, draws, 0, 0).share
        out.append((k, float((share == 1).float().mean())))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--noise", type=float, action="append", default=[])
    p.add_argument("--dropout", type=float, action="append", default=[])
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--convergence", action="store_true")
    p.add_argument("--no-aa", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_dataset("fashion-mnist", n=args.n)
    x, y = ds.images, ds.labels.long()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, n={len(ds)}, eps={args.eps}, judged over {args.draws} draws",
          flush=True)
    print("| model | randomness | robusteval worst | robusteval expected | K (check) | s | fwd/ex | bwd/ex | "
          "AA rand own | AA judged worst | AA judged expected | s | fwd/ex | bwd/ex |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.model:
        net = load_model(spec).model.eval()
        settings = [(f"noise σ={s}", Noise(net, s)) for s in args.noise]
        settings += [(f"dropout p={q}", Dropout(net, q)) for q in args.dropout]
        for label, model in settings:
            model.eval()
            with eval_mode(model):
                if args.convergence:
                    print(f"# convergence {spec} {label}: " + ", ".join(f"K={k} {ra:.1%}"
                          for k, ra in convergence(model, ds, args.eps, args.draws)), flush=True)
                worst, expected, sec, cnt, eot = run_robusteval(model, ds, args.eps, args.draws, args.batch)
                row = (f"| {spec} | {label} | {worst:.1%} | {expected:.1%} | "
                       f"{eot.detail.split('(')[-1].split(',')[0]} | {sec:.0f} | "
                       f"{cnt.forward_rows / len(ds):.0f} | {cnt.backward_rows / len(ds):.0f} |")
                if args.no_aa:
                    print(row + " – | – | – | – | – | – |", flush=True)
                    continue
                own, aw, ae, asec, acnt = run_autoattack(model, x, y, args.eps, args.draws, args.batch)
                print(row + f" {own:.1%} | {aw:.1%} | {ae:.1%} | {asec:.0f} | "
                      f"{acnt.forward_rows / len(ds):.0f} | {acnt.backward_rows / len(ds):.0f} |", flush=True)
                print(f"# {spec} {label}: {eot.detail}", flush=True)


if __name__ == "__main__":
    main()
