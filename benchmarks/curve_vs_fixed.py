"""The robustness curve of one ``min-norm`` run against fixed-ε ``standard`` runs on the same examples.

For one model and norm: ``standard`` at each of the given radii, one ``min-norm`` run at a larger radius,
and per radius the fixed-ε robust accuracy, the curve's (an example is robust at ε when its minimum-norm
radius exceeds ε, ``robusteval.reports.radii``), and the examples on which they disagree. Example (CPU)::

    python benchmarks/curve_vs_fixed.py zoo:fmnist-adv2 l2 0.5,1.0,2.0 3.0 100
"""

from __future__ import annotations

import sys
import time

from robusteval import reports, runner
from robusteval.data import load_dataset
from robusteval.evaluation import Evaluation
from robusteval.models import load_model


def main() -> None:
    if len(sys.argv) != 6:
        sys.exit("usage: curve_vs_fixed.py MODEL NORM RADII(comma-separated) MAX_RADIUS N")
    spec, norm = sys.argv[1], sys.argv[2]
    radii = [float(v) for v in sys.argv[3].split(",")]
    emax, n = float(sys.argv[4]), int(sys.argv[5])
    ds = load_dataset("fashion-mnist", n=n)
    net = load_model(spec).model.eval()

    def evaluate(battery, eps):
        t = time.time()
        out = runner.evaluate(Evaluation(models=((spec, net),), battery=battery, eps=eps, dataset=ds,
                                         norm=norm, checks=False, progress=False, batch_size=250))
        return out.records, time.time() - t

    fixed_runs, t_fixed = evaluate(("standard",), tuple(radii))
    search, t_search = evaluate(("min-norm",), (emax,))
    radius = reports.radii(search).set_index("example_id")["radius"]  # 0 clean-wrong, inf never broken
    print(f"# {spec} {norm} n={n}: standard at {radii} {t_fixed:.0f}s; min-norm at {emax} {t_search:.0f}s")
    print("| model | norm | ε | standard | curve | curve above | curve below |")
    print("|---|---|---|---|---|---|---|")
    for e in radii:
        fixed = fixed_runs[fixed_runs.eps == e].groupby("example_id").robust.all()
        curve = radius.reindex(fixed.index) > e
        print(f"| {spec} | {norm} | {e:g} | {fixed.mean():.1%} | {curve.mean():.1%} | "
              f"{int((curve & ~fixed).sum())} | {int((~curve & fixed).sum())} |")


if __name__ == "__main__":
    main()
