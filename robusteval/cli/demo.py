"""``robusteval demo``: the bundled zoo under Untargeted and MultiTargeted, as in LLR Table F4.

Runs offline: the zoo's Fashion-MNIST models (``zoo:fmnist-*``) and the bundled 1,000-image test subset
(or an installed full copy). The paper's budget — 20 restarts × 200 steps on the whole test set — is
cut so that six small CNNs finish in a few minutes on 2 CPU cores; the output says so.
"""

from __future__ import annotations

import re

import click

from robusteval.cli import cli
from robusteval.cli.attack import show_results
from robusteval.cli.common import resolve_device
from robusteval.cli.options import default_out
from robusteval.errors import UserError

DEMO_ATTACKS = ("untargeted", "multi-targeted")
DEMO_EPS = 0.1  # the zoo's training radius (Fashion-MNIST)


def _natural(name: str):
    # fmnist-adv2 before fmnist-adv10: numbers compare as numbers.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@cli.command("demo")
@click.option("--n", "n", type=int, default=500, show_default=True, help="Test examples (paper: 10,000).")
@click.option("--restarts", type=int, default=2, show_default=True, help="Restarts per attack (paper: 20).")
@click.option("--steps", type=int, default=40, show_default=True, help="Steps per restart (paper: 200).")
@click.option("--batch-size", type=int, default=250, show_default=True)
@click.option("--queries", type=click.IntRange(min=1), default=250, show_default=True,
              help="Square's budget as the black-box check (robusteval attack: 1,000).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip", is_flag=True,
              help="Battery mode (faster): Multi-Targeted only on Untargeted's survivors.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default runs/demo-<time>); the same --out resumes.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def demo_command(n, restarts, steps, batch_size, queries, device, seed, skip, out, quiet):
    """Evaluate every bundled zoo model with Untargeted and Multi-Targeted and print an F4-style table.

    The table has the layout of the LLR paper's Table F4 (methods with their training PGD steps ×
    Nominal / Untargeted / Multi-Targeted, plus the worst case), on Fashion-MNIST at ε = 0.1 with a
    reduced attack budget (printed with the results). For the full budget use `robusteval attack`.

    \b
    Examples:
      robusteval demo
      robusteval demo --n 1000 --restarts 20 --steps 200     # the paper's budget (slow on a CPU)
    """
    from pathlib import Path

    from robusteval import runner
    from robusteval.cli.attack import finish
    from robusteval.evaluation import Budget, Evaluation
    from robusteval.models import list_zoo

    names = sorted((z for z in list_zoo() if z.startswith("fmnist-")), key=_natural)
    if not names:
        raise UserError("the bundled zoo has no Fashion-MNIST models yet (robusteval/zoo/fmnist-*.pt); "
                        "train them as described in robusteval/zoo/README.md, or use `robusteval attack`")
    if n < 1:
        raise UserError("--n must be ≥ 1")
    out = Path(out) if out else default_out("demo")
    ev = Evaluation(models=tuple(f"zoo:{z}" for z in names), battery=DEMO_ATTACKS, eps=(DEMO_EPS,),
                    dataset="fashion-mnist", limit=n, budget=Budget(steps=steps, restarts=restarts,
                                                                    queries=queries),
                    seed=seed, no_skip=not skip, batch_size=batch_size, device=device, out=out,
                    progress=not quiet)
    models = runner.load_models(ev.models, device=resolve_device(device))
    ds = runner.select_data(ev, models)
    click.echo(f"demo budget: n={len(ds)} test images ({ds.source}), ε={DEMO_EPS}, "
               f"{' + '.join(DEMO_ATTACKS)} with {restarts} restarts × {steps} steps "
               f"(paper: 20 restarts × 200 steps on all 10,000), masking checks with Square at {queries} "
               f"queries; {len(models)} models: {', '.join(names)}")
    runner.evaluate(ev.replace(models=tuple(models), dataset=ds),
                    notify=lambda m: click.echo(UserError(m).as_flags(), err=True))
    view = show_results([out], rows=("model", "train_steps"), save=out,
                        title=f"Fashion-MNIST, ε = {DEMO_EPS} (Table F4 layout; reduced budget, see above)")
    finish(view, allow_unreliable=True)
