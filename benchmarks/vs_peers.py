"""Strength and speed against peer tools on the same models, examples and device.

* **AutoAttack** (``pyautoattack``, the reference implementation packaged; ``version="standard"``:
  APGD-CE, APGD-T with 9 targets, FAB-T, Square with 5000 queries) against robusteval's battery
  ``untargeted`` then ``multi-targeted`` on its survivors. Reported: robust accuracy of each, the
  examples one breaks and the other does not, and wall time. Every adversarial point from either tool
  is re-checked here (inside the ε-ball and [0, 1], re-classified in eval mode) before it counts.
* **torchattacks** PGD (sign steps of 2.5ε/k, random start; Madry et al.) against robusteval's
  ``pgd-k`` (Adam 0.1) at the same k and restarts: robust accuracy and time.

Needs the ``bench`` extra: ``pip install -e ".[bench]"``. Example (CPU, the bundled zoo)::

    python benchmarks/vs_peers.py --model zoo:fmnist-adv2 --model zoo:fmnist-llr2 --n 200 --eps 0.1
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import attacks
from robusteval.data import load_dataset
from robusteval.models import load_model


def verified_robust(model, x, x_adv, y, eps):
    """Robust flags from an independent check of the returned points (never from a tool's own flag)."""
    ok = attacks.LinfBall(eps).contains(x_adv, x, tol=1e-6)  # feasibility is the threat model's
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    # an infeasible point cannot count as a break: the example stays robust for that tool
    return (pred == y) | ~ok, int((~ok).sum())


def run_robusteval(model, x, y, ids, eps, restarts, steps, batch):
    t0 = time.perf_counter()
    robust = torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        robust &= model(x).argmax(1) == y
    for name in ("untargeted", "multi-targeted"):
        atk = attacks.get(name, eps, restarts=restarts, steps=steps)
        idx = robust.nonzero()[:, 0]
        for s in range(0, len(idx), batch):
            b = idx[s:s + batch]
            res = attacks.run(atk, model, x[b], y[b], ids=ids[b], seed=0)
            r, bad = verified_robust(model, x[b], res.x_adv, y[b], eps)
            assert bad == 0, "robusteval returned an infeasible point"
            robust[b] = r
    return robust, time.perf_counter() - t0


def run_autoattack(model, x, y, eps, batch):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=0, device=str(x.device))
    t0 = time.perf_counter()
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch)
    seconds = time.perf_counter() - t0
    robust, bad = verified_robust(model, x, x_adv, y, eps)
    return robust, seconds, bad


def run_pgd_pair(model, x, y, ids, eps, steps):
    import torchattacks

    t0 = time.perf_counter()
    ta = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    r_ta, _ = verified_robust(model, x, ta(x, y), y, eps)
    t_ta = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = attacks.run(attacks.get(f"pgd-{steps}", eps), model, x, y, ids=ids, seed=0)
    r_re, _ = verified_robust(model, x, res.x_adv, y, eps)
    return r_ta, t_ta, r_re, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--restarts", type=int, default=5, help="robusteval restarts per attack")
    p.add_argument("--steps", type=int, default=100, help="robusteval steps per restart")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--no-autoattack", action="store_true")
    args = p.parse_args()
    ds = load_dataset(args.dataset, n=args.n)
    x, y, ids = ds.images, ds.labels.long(), ds.ids.long()
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dataset} n={len(x)} ({ds.source}), eps={args.eps}")
    print(f"# robusteval battery: untargeted + multi-targeted, {args.restarts} restarts x {args.steps} steps")
    rows = ["| model | clean | robusteval | AutoAttack | broken only by robusteval | only by AA "
            "| time re / AA (s) |", "|" + "---|" * 7]
    k = args.pgd_steps
    pgd_rows = [f"| model | torchattacks PGD-{k} | robusteval pgd-{k} | time ta / re (s) |",
                "|---|---|---|---|"]
    for spec in args.model:
        model = load_model(spec).model.eval()
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        r_re, t_re = run_robusteval(model, x, y, ids, args.eps, args.restarts, args.steps, args.batch)
        if not args.no_autoattack:
            r_aa, t_aa, bad = run_autoattack(model, x, y, args.eps, args.batch)
            rows.append(f"| {spec} | {clean:.1%} | {r_re.float().mean():.1%} | {r_aa.float().mean():.1%} | "
                        f"{int((~r_re & r_aa).sum())} | {int((r_re & ~r_aa).sum())} | {t_re:.0f} / {t_aa:.0f}"
                        + (f" ({bad} infeasible AA points)" if bad else "") + " |")
        r_ta, t_ta, r_pg, t_pg = run_pgd_pair(model, x, y, ids, args.eps, args.pgd_steps)
        pgd_rows.append(f"| {spec} | {r_ta.float().mean():.1%} | {r_pg.float().mean():.1%} | "
                        f"{t_ta:.1f} / {t_pg:.1f} |")
        print("\n".join(rows if not args.no_autoattack else []), flush=True)
    print()
    print("\n".join(pgd_rows))


if __name__ == "__main__":
    main()
