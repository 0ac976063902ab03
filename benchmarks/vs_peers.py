"""Strength and speed against peer tools on the same models, examples and device.

* **AutoAttack** (``pyautoattack``, the reference implementation packaged; ``version="standard"``:
  APGD-CE, APGD-T with 9 targets, FAB-T, Square with 5000 queries) against robusteval's battery —
  ``standard`` by default (APGD-CE, then targeted APGD towards the 3 classes nearest by linearised
  distance, then the Square check, each on the survivors of the ones before), or ``--battery reduced``
  (untargeted + multi-targeted at ``--restarts`` × ``--steps``). Reported: robust accuracy of each, the
  examples one breaks and the other does not, wall time, and forward and backward passes per example
  (counted by a wrapper around the model: every example row through ``forward``, every example row
  whose logits receive a gradient). Every adversarial point from either tool is re-checked here (inside
  the ε-ball and [0, 1], re-classified in eval mode) before it counts.
* **torchattacks** PGD (sign steps of 2.5ε/k, random start; Madry et al.) against robusteval's
  ``pgd-k`` (Adam 0.1) at the same k and restarts: robust accuracy and time.

``--masked quantise`` / ``--masked softmax`` wraps each model the way a gradient-masking defense
would (input rounded to 4 grey levels; a softmax at the output). robusteval's side always runs through
``robusteval.runner.evaluate`` with the masking checks on, so its worst case includes the Square check
and the alarms it raises are printed.

Needs the ``bench`` extra: ``pip install -e ".[bench]"``. Example (CPU, the bundled zoo)::

    python benchmarks/vs_peers.py --model zoo:fmnist-adv2 --model zoo:fmnist-llr2 --n 200 --eps 0.1 --no-pgd
    python benchmarks/vs_peers.py --model zoo:fmnist-adv2 --masked quantise --n 100 --no-pgd
    python benchmarks/vs_peers.py --model zoo:fmnist-adv10 --n 1000 --device cuda --no-pgd
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import attacks
from robusteval import runner
from robusteval.data import load_dataset
from robusteval.evaluation import Budget, Evaluation
from robusteval.models import load_model


class Masked(torch.nn.Module):
    """A model behind a gradient-masking transformation (built here, as a defense would ship it)."""

    def __init__(self, net: torch.nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        if self.kind == "quantise":
            return self.net(torch.round(x * 3) / 3)  # 4 grey levels: the input gradient is exactly zero
        return torch.softmax(self.net(x), 1)  # probabilities: the margin's gradient vanishes when confident


def verified_robust(model, x, x_adv, y, eps, norm="linf"):
    """Robust flags from an independent check of the returned points (never from a tool's own flag)."""
    ok = attacks.threat_of(eps, norm=norm).contains(x_adv, x, tol=1e-6)  # feasibility is the threat model's
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    # an infeasible point cannot count as a break: the example stays robust for that tool
    return (pred == y) | ~ok, int((~ok).sum())


class Counted(torch.nn.Module):
    """Counts example rows through ``forward`` and example rows whose logits get a gradient (backward).

    ``counts`` may be shared with another :class:`Counted` (see :func:`count_bpda_copies`). Nothing is
    counted while ``torch.export`` traces the module: a trace is not a pass.
    """

    def __init__(self, net: torch.nn.Module, counts: dict | None = None):
        super().__init__()
        self.net = net
        self.counts = counts if counts is not None else {"forward": 0, "backward": 0}

    @property
    def forward_rows(self) -> int:
        return self.counts["forward"]

    @property
    def backward_rows(self) -> int:
        return self.counts["backward"]

    def forward(self, x):
        z = self.net(x)
        if _tracing():
            return z
        self.counts["forward"] += x.shape[0]
        if z.requires_grad:
            z.register_hook(self._count)
        return z

    def _count(self, grad):
        self.counts["backward"] += grad.shape[0]

    def reset(self):
        self.counts["forward"] = self.counts["backward"] = 0


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(torch.compiler.is_compiling() or (exporting is not None and exporting()))


def count_bpda_copies(counted: Counted) -> None:
    """Count the passes of the runner's BPDA copies into ``counted``.

    A model whose graph has a zero-gradient operation is attacked through a straight-through copy that
    ``torch.export`` captures from it, and a capture keeps no hooks, so ``counted`` alone would miss
    every pass of that copy; each copy the runner makes is wrapped in a :class:`Counted` sharing
    ``counted``'s counts.
    """
    from robusteval import bpda

    original = getattr(bpda.straight_through, "original", bpda.straight_through)

    def straight_through(model, example):
        return Counted(original(model, example), counts=counted.counts).eval()

    straight_through.original = original
    bpda.straight_through = straight_through


def run_robusteval(model, ds, eps, battery, batch, device, name="model", restarts=None, steps=None,
                   norm="linf", seed=0):
    """robusteval's battery, then the Square check on its survivors, through the runner (which verifies
    every point), with the run's ``seed``; returns per-example robust flags (worst case), seconds, the
    alarms raised and the records."""
    t0 = time.perf_counter()
    outcome = runner.evaluate(Evaluation(models=((name, model),), battery=tuple(battery), eps=(eps,),
                                         dataset=ds, batch_size=batch, device=device, progress=False,
                                         budget=Budget(steps=steps, restarts=restarts), norm=norm,
                                         seed=seed))
    df = outcome.records
    seconds = time.perf_counter() - t0
    worst = df.groupby("example_id", sort=False)["robust"].all()
    robust = torch.tensor([bool(worst[int(i)]) for i in ds.ids.tolist()])
    return robust, seconds, outcome.alarms, df


def run_autoattack(model, x, y, eps, batch, norm="linf"):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, eps=eps, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm], version="standard",
                    seed=0, device=str(x.device))
    _sync(x.device)
    t0 = time.perf_counter()
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch)
    _sync(x.device)
    seconds = time.perf_counter() - t0
    robust, bad = verified_robust(model, x, x_adv, y, eps, norm)
    return robust, seconds, bad


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


def _stem(spec: str, args) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
    return f"{name}-{args.dataset}-n{args.n}-{args.norm}-eps{args.eps:g}"


def save_flags(root, spec, args, ids, r_re, r_aa, t_aa, bad, cost_aa, records) -> None:
    """Per-example robust flags of both tools, and AutoAttack's seconds and passes, for a later
    ``--autoattack-from`` run; with ``r_aa=None`` (``--no-autoattack``) robusteval's flags and records
    only, its flags in a file of their own (``…-robusteval.csv``), so a saved AutoAttack run in the same
    directory is never overwritten."""
    import json
    from pathlib import Path

    import pandas as pd

    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(spec, args)
    flags = {"example_id": ids.tolist(), "robusteval_robust": r_re.tolist()}
    if r_aa is not None:
        flags["autoattack_robust"] = r_aa.tolist()
    pd.DataFrame(flags).to_csv(out / (f"{stem}.csv" if r_aa is not None else f"{stem}-robusteval.csv"),
                               index=False)
    # robusteval's own records of the run: per example and member, steps and seconds
    records.to_csv(out / f"{stem}-records.csv", index=False)
    if r_aa is None:
        return
    (out / f"{stem}.json").write_text(json.dumps({"autoattack_seconds": t_aa, "infeasible": bad,
                                                  "autoattack_passes": cost_aa}))


def load_autoattack(root, spec, args, ids):
    """AutoAttack's side of an earlier ``--save`` run; refuses a file for other examples."""
    import json
    from pathlib import Path

    import pandas as pd

    stem = _stem(spec, args)
    try:
        df = pd.read_csv(Path(root) / f"{stem}.csv")
        meta = json.loads((Path(root) / f"{stem}.json").read_text())
        if df["example_id"].tolist() != ids.tolist():
            raise SystemExit(f"error: the saved AutoAttack run for {spec} covers other examples")
        robust = torch.tensor(df["autoattack_robust"].astype(bool).tolist())
        return (robust, float(meta["autoattack_seconds"]), int(meta["infeasible"]),
                str(meta["autoattack_passes"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: no usable saved AutoAttack run for {spec} under {root}: {exc!r}") from None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--norm", choices=["linf", "l2", "l1"], default="linf")
    versions = sorted((k for k in attacks.BATTERIES if k.startswith("standard-")),
                      key=lambda k: int(k.rpartition("v")[2]))
    p.add_argument("--battery", choices=["standard", "reduced", *versions], default="standard",
                   help="standard (the current version), an earlier standard-vN by name, or reduced")
    p.add_argument("--restarts", type=int, default=5, help="restarts per attack of the reduced battery")
    p.add_argument("--steps", type=int, default=100, help="steps per restart of the reduced battery")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--seed", type=int, default=0,
                   help="robusteval's seed (every random start; AutoAttack keeps its own seed 0)")
    p.add_argument("--no-pgd", action="store_true", help="skip the torchattacks PGD comparison")
    p.add_argument("--masked", choices=["quantise", "softmax"], default=None,
                   help="evaluate each model behind a gradient-masking wrapper")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write each model's per-example robust flags of both tools (CSV), robusteval's "
                        "records and AutoAttack's seconds and passes (JSON) under DIR (with --no-autoattack: "
                        "robusteval's flags, in a -robusteval.csv file, and records)")
    p.add_argument("--autoattack-from", default=None, metavar="DIR",
                   help="take AutoAttack's flags, seconds and passes from an earlier --save run (same model, "
                        "examples, norm and eps) instead of running it; the ratio then spans two runs")
    args = p.parse_args()
    device = torch.device(args.device)
    ds = load_dataset(args.dataset, n=args.n)
    x, y, ids = ds.images.to(device), ds.labels.long().to(device), ds.ids.long()
    print(f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {args.dataset} n={len(x)} ({ds.source}), {args.norm} eps={args.eps}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if args.battery.startswith("standard"):
        battery, kw = [args.battery], {}
        members = ", ".join(attacks.expand([args.battery], args.norm))
        version = attacks.presets.STANDARD if args.battery == "standard" else args.battery
        print(f"# robusteval battery: {args.battery} ({version}: {members}), then the Square check on the "
              "survivors")
    else:
        battery, kw = ["untargeted", "multi-targeted"], dict(restarts=args.restarts, steps=args.steps)
        print(f"# robusteval battery: untargeted + multi-targeted, {args.restarts} restarts x {args.steps} "
              "steps, then the Square check on the survivors")
    rows = ["| model | clean | robusteval | AutoAttack | broken only by robusteval | only by AA "
            "| time re / AA (s) | ratio | fwd / bwd per example re | fwd / bwd per example AA "
            "| robusteval alarms |", "|" + "---|" * 11]
    k = args.pgd_steps
    pgd_rows = [f"| model | torchattacks PGD-{k} | robusteval pgd-{k} | time ta / re (s) |",
                "|---|---|---|---|"]
    for spec in args.model:
        net = load_model(spec, device=str(device)).model.eval()
        if args.masked:
            net, spec = Masked(net, args.masked).eval(), f"{spec} ({args.masked})"
        model = Counted(net).eval()
        count_bpda_copies(model)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        model.reset()
        r_re, t_re, found, records = run_robusteval(model, ds, args.eps, battery, args.batch, str(device),
                                                    spec, norm=args.norm, seed=args.seed, **kw)
        cost_re = f"{model.forward_rows / len(x):.0f} / {model.backward_rows / len(x):.0f}"
        names = ", ".join(sorted({a.check for a in found})) or "none"
        for a in found:
            print(f"# alarm {spec}: {a.check} — {a.detail}", flush=True)
        if not args.no_autoattack:
            if args.autoattack_from:
                r_aa, t_aa, bad, cost_aa = load_autoattack(args.autoattack_from, spec, args, ids)
            else:
                model.reset()
                r_aa, t_aa, bad = run_autoattack(model, x, y, args.eps, args.batch, args.norm)
                r_aa = r_aa.cpu()
                cost_aa = f"{model.forward_rows / len(x):.0f} / {model.backward_rows / len(x):.0f}"
            if args.save:
                save_flags(args.save, spec, args, ids, r_re, r_aa, t_aa, bad, cost_aa, records)
            only_aa = ids[~r_aa & r_re].tolist()
            rows.append(f"| {spec} | {clean:.1%} | {r_re.float().mean():.1%} | {r_aa.float().mean():.1%} | "
                        f"{int((~r_re & r_aa).sum())} | {len(only_aa)} | {t_re:.0f} / {t_aa:.0f}"
                        + (f" ({bad} infeasible AA points)" if bad else "")
                        + f" | {t_re / t_aa:.2f} | {cost_re} | {cost_aa} | {names} |")
            if only_aa:
                print(f"# broken only by AutoAttack ({spec}): example ids {only_aa}", flush=True)
        else:
            if args.save:
                save_flags(args.save, spec, args, ids, r_re, None, None, 0, None, records)
            rows.append(f"| {spec} | {clean:.1%} | {r_re.float().mean():.1%} | – | – | – | {t_re:.0f} / – "
                        "| – "
                        f"| {cost_re} | – | {names} |")
        if not args.no_pgd:
            r_ta, t_ta, r_pg, t_pg = run_pgd_pair(net, x, y, ids, args.eps, args.pgd_steps)
            pgd_rows.append(f"| {spec} | {r_ta.float().mean():.1%} | {r_pg.float().mean():.1%} | "
                            f"{t_ta:.1f} / {t_pg:.1f} |")
        print("\n".join(rows), flush=True)
    if not args.no_pgd:
        print()
        print("\n".join(pgd_rows))


if __name__ == "__main__":
    main()
