"""``robusteval attack``: run an attack battery on one or more models and print the robust-accuracy table.

Options → one :class:`~robusteval.evaluation.Evaluation` (one option, one field) →
:func:`robusteval.runner.evaluate` → the directory's table (:func:`show_results`): the table and output
paths on stdout, progress and errors on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from robusteval.cli import cli
from robusteval.cli.common import parse_eps, parse_step_size
from robusteval.cli.options import DEFAULT_N, default_out, model_option
from robusteval.errors import UserError

DEFAULT_ATTACKS = ("standard",)


class Verdict(click.ClickException):
    """A table was printed, but the run is unreliable (an alarm) or incomplete: an exit status of its own."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def finish(view, allow_unreliable: bool) -> None:
    """Exit with :data:`robusteval.plan.INCOMPLETE_EXIT` when the plan is not covered, else with
    :data:`robusteval.alarms.UNRELIABLE_EXIT` when an alarm was raised (unless ``allow_unreliable``)."""
    from robusteval.alarms import UNRELIABLE_EXIT
    from robusteval.plan import INCOMPLETE_EXIT

    if view.gaps:
        raise Verdict(f"the evaluation is incomplete ({len(view.gaps)} part(s) missing, listed above); its "
                      "numbers are not final", INCOMPLETE_EXIT)
    if view.alarms and not allow_unreliable:
        models = sorted({a.model for a in view.alarms})
        raise Verdict(f"robust accuracy of {', '.join(models)} is unreliable ({len(view.alarms)} alarm(s), "
                      "remedies above); pass --allow-unreliable to exit 0 anyway", UNRELIABLE_EXIT)


def show_results(paths, rows=("model",), columns: str = "attack", title: str | None = None,
                 save: Path | None = None, fmt: str = "table", merge_runs: bool = False):
    """Print the table of every record in ``paths`` (run directories or records files) with its alarms and
    completeness; save ``summary.csv``/``summary.md`` into ``save``. Returns the :class:`runs.View`.

    A directory's table covers all of it (earlier invocations resumed into it included), so the summary
    never shows only the last invocation's ε or models."""
    from robusteval import reports, runs

    view = runs.read(paths, merge_runs=merge_runs)
    table, note = reports.run_table(view, rows=rows, columns=columns)
    if fmt == "table":
        reports.print_table(table, title=title, note=note)
    else:
        click.echo(reports.render(table, fmt, note=note, title=title), nl=False)
    if save is not None:
        paths = reports.save_summary(table, save, note=note, title=title)
        click.echo(f"summary: {', '.join(map(str, paths))}")
    return view


@cli.command("attack")
@model_option
@click.option("--attack", "-a", "attack_names", multiple=True, default=DEFAULT_ATTACKS, show_default=True,
              help="Attack preset or battery, in battery order (repeat). Default: standard (version 14: "
                   "apgd-ce, apgd-t, apgd-dlr-odi, apgd-ce-odi, each on the survivors of the ones before, "
                   "the last three only where the boundary is near, radius-annealed in L1; in L2 apgd-t "
                   "on survivors within 2ε and fab-t after them within ε; apgd-t-margin last, on the "
                   "near misses (within ε/20); runs after the first pass end early when far from the "
                   "boundary and not getting nearer; fab-t ends at its search's point projected onto "
                   "the ε-ball, and in L1 the first pass probes its annealing stages; in L1 apgd-t on "
                   "every survivor and fab-t after the diverse rounds; fab-t's searches end early when "
                   "they cannot reach the ε-ball; in L1 apgd-t on 6 targets, apgd-ce-odi as 20 runs "
                   "of 50 steps, each member's starts from random streams of its own, and fab-t on 6 "
                   "targets; then Square as the check; standard-v1 to standard-v13 by name). paper: the LLR "
                   "paper's untargeted, "
                   "random-targeted and "
                   "multi-targeted at 20 × 200. Presets: untargeted, random-targeted, multi-targeted, "
                   "fgsm-20, pgd-K, apgd-ce, apgd-dlr, apgd-pma, apgd-t, apgd-t-margin, apgd-dlr-odi, "
                   "apgd-ce-odi, fab-t, "
                   "square, fmn, "
                   "min-norm-untargeted, min-norm-targeted, min-norm-fab. min-norm: the minimum-norm "
                   "battery (the three searches, each on every example; per-example radii for report "
                   "--curve).")
@click.option("--eps", "eps_texts", multiple=True,
              help="Radius in [0,1] pixel units: 0.031, 8/255, or 8 with --eps-scale 255 (repeatable). "
                   "Default: the dataset's usual ε (0.1 Fashion-MNIST, 8/255 CIFAR-10).")
@click.option("--eps-scale", type=float, default=1.0, show_default=True, help="Divide every --eps by this.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True,
              help="The threat model: the L∞, L2 or L1 ball of radius ε (intersected with [0, 1]). The paper "
                   "presets are L∞ only; standard, the APGD presets, fmn, min-norm (minimum norm) and "
                   "Square take every norm.")
@click.option("--dataset", default=None, help="Dataset name (default: the checkpoint's, else fashion-mnist).")
@click.option("--data-dir", type=click.Path(), default=None, help="Where the dataset lives.")
@click.option("--download", is_flag=True, help="Download the dataset through torchvision if missing.")
@click.option("--n", "-n", "--num-examples", "n", type=int, default=None,
              help=f"Evaluate the first N test examples (default {DEFAULT_N}, or all if fewer). Under "
                   "torchrun write -n or --num-examples (torchrun mistakes --n for one of its own options).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds every random start (per example); 0 to 2^63 − 1.")
@click.option("--restarts", type=int, default=None, help="Override the presets' restarts (paper: 20).")
@click.option("--steps", type=int, default=None, help="Override the presets' steps (paper: 200).")
@click.option("--step-size", default=None, help="First step size: 0.1 (pixel units) or 0.25eps (relative).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default runs/attack-<time>); the same --out resumes a run.")
@click.option("--arch", default=None, help="Architecture name, for checkpoints that are bare state_dicts.")
@click.option("--model-dir", type=click.Path(file_okay=False), default=None,
              help="Where robustbench:DATASET/THREAT/NAME models are found (RobustBench's layout) "
                   "[default: ./models].")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="The weights (safetensors or a state dict) of a timm:NAME model.")
@click.option("--no-skip", is_flag=True,
              help="Run every attack on every clean-correct example (independent per-attack columns).")
@click.option("--queries", type=int, default=None,
              help="Query budget of Square (default 5,000 as an attack, 1,000 as the black-box check).")
@click.option("--bpda", is_flag=True,
              help="Attack through a copy whose zero-gradient ops (round, floor, ceil, trunc, sign, step "
                   "functions made of a comparison, argmax quantisation) pass gradients straight through "
                   "(BPDA); points are verified on the original model.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Run the attacks' forward/backward passes under autocast in this precision (faster on "
                   "GPUs); the clean pass, every success decision and the verification stay fp32.")
@click.option("--compile", "compile_model", is_flag=True,
              help="Attack through torch.compile of the model (off by default; helps on some GPUs).")
@click.option("--shard", "shard_text", default=None, metavar="I/N",
              help="Evaluate only shard I of N (0-based; examples I, I+N, I+2N, ...) into "
                   "OUT/records.shard-I-of-N.csv, for array jobs; `robusteval report OUT` merges the shards. "
                   "Under torchrun the rank and world size set it.")
@click.option("--no-checks", is_flag=True,
              help="Skip the masking alarms (randomness, batch dependence, softmax outputs, unusable "
                   "gradients, autograd in forward, Square on the survivors, large ε, monotonicity in ε). "
                   "Not recommended.")
@click.option("--randomized/--deterministic", "randomized", default=None,
              help="Evaluate as a randomised model (EoT gradients, every point judged over --draws draws; "
                   "robust only if correct in every draw), or as a deterministic one. Default: randomised "
                   "when the randomness check finds random outputs.")
@click.option("--draws", type=int, default=20, show_default=True,
              help="Randomised models: the draws every clean and adversarial point is judged over.")
@click.option("--eot-max", type=int, default=32, show_default=True,
              help="Randomised models: the most EoT samples per step; their number doubles from 2 on a "
                   "subset until robust accuracy settles (an alarm if it does not).")
@click.option("--allow-unreliable", is_flag=True,
              help="Exit 0 even when an alarm marks a model's number unreliable (it is still marked).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def attack_command(models, attack_names, eps_texts, eps_scale, norm, dataset, data_dir, download, n,
                   batch_size, device, seed, restarts, steps, step_size, out, arch, model_dir, weights,
                   no_skip, queries,
                   bpda, precision, compile_model, shard_text, no_checks, randomized, draws, eot_max,
                   allow_unreliable, quiet):
    """Evaluate robust accuracy under an attack battery; print a table like the LLR paper's Tables F3/F4.

    Clean-misclassified examples are not attacked; by default each attack runs only on the survivors
    of the attacks before it (worst case), --no-skip runs every attack on every example. Every
    adversarial example is verified (‖δ‖∞ ≤ ε, inside [0,1], re-classified in eval mode) before it is
    recorded in OUT/records.csv, one row per model × attack × ε × example. The run's plan
    (OUT/plan.json) is written before any attack: rerunning with the same --out resumes what the plan
    lists and the records lack, and a run that does not cover its plan is reported as incomplete (exit
    status 4). Alarms go to OUT/alarms.csv and are never erased by a later run (exit status 3). Also
    writes OUT/summary.csv and OUT/summary.md.

    With no --attack the `standard` battery runs (version 14, docs/methods.md): the strongest per pass
    robusteval has. In L∞ on the zoo its robust accuracy equalled or was below reference AutoAttack's at
    every model and radius measured, at 0.14 to 0.38 of its time (backward passes: 0.09 to 0.25 of
    AutoAttack's at ε 0.05 and 0.1, about 0.6 at 0.2; benchmarks/RESULTS.md). In L2 (nine targets on
    every survivor, then FAB) it was at or below AutoAttack on the six zoo models at ε 1.0 and 2.0, at
    0.5 to 0.75 of its time (version 6; version 7 gates apgd-t and fab-t in L2: the same numbers at
    0.26 to 0.38 at ε 1.0 and 0.57 to 0.67 at ε 2.0); standard-v5 is cheaper in L2 and was weaker at
    ε 2.0. Version 8 ends with apgd-t-margin on the near misses: it broke 12 of the 18 examples only
    AutoAttack had broken at L1 ε 10, L2 ε 2.0 and L∞ ε 0.2, at 9 to 15% more time. Version 9 ends
    the runs of apgd-t and the diverse rounds early when they are far from the boundary and not
    getting nearer: v8's results on every row measured, at 0.30 to 0.33 of AutoAttack's time at L∞
    ε 0.2, 0.46 to 0.54 at L2 ε 2.0 and 0.36 to 0.43 at L1 ε 10. Version 10 drops steps that never
    broke an example (fab-t's ascent after its search; the wait of L1's annealing stages): v9's
    results, at 0.38 to 0.47 of AutoAttack's time at L2 ε 2.0 and 0.28 to 0.41 at L1 ε 10. Version 11
    adds FAB to the L1 battery and runs apgd-t and fab-t on every L1 survivor: at or below AutoAttack
    on all twelve L1 rows measured, at 0.50 to 0.75 of its time. Version 12 ends FAB's searches that
    cannot reach the ε-ball: v11's results on every L1 and L2 row measured, with fab-t at 0.4 of its L1
    steps and fewer backward passes than AutoAttack at L1 ε 5 and L2 ε 2.0. Version 13 gives L1's near
    misses fresh starts (apgd-ce-odi as 20 short runs, each member's starts its own, apgd-t on 6
    targets): lower robust accuracy than v12 on all six models at L1 ε 5, half as many examples broken
    only by AutoAttack there, at 0.37 to 0.57 of its time on the robust models.
    --attack paper reproduces the LLR paper's tables.

    \b
    Examples:
      robusteval attack --model ckpt.pt --eps 8/255
      robusteval attack --model ckpt.pt --attack paper --eps 8/255
      robusteval attack --model ckpt.pt --attack multi-targeted --eps 8/255
      robusteval attack -m zoo:fmnist-adv2 -m zoo:fmnist-llr2 -a untargeted -a multi-targeted --eps 0.1
      robusteval attack -m wrn.pt --arch wrn28_8 --dataset cifar10 --data-dir ~/data --eps 8 --eps-scale 255
      robusteval attack -m robustbench:cifar10/Linf/Carmon2019Unlabeled --model-dir models --data-dir ~/data
      robusteval attack -m timm:resnet18 --weights resnet18.safetensors --dataset imagenet --data-dir ~/in
      robusteval attack -m ckpt.pt --eps 0.1 --restarts 5 --steps 100 --no-skip --out runs/ckpt
    """
    # Long: the options map one to one onto the fields of an Evaluation, and the help text is long.
    from robusteval import distributed, runner
    from robusteval.evaluation import Budget, Evaluation

    shard = distributed.parse_shard(shard_text)
    if distributed.from_env() is not None and shard is not None:
        raise UserError("`shard` and torchrun both split the work; use one of them")
    if distributed.from_env() is not None and not out:
        raise UserError("under torchrun every rank must write to the same `out`: pass `out`")
    with distributed.session(device) as (ctx, device):
        if ctx is not None:
            shard, quiet = ctx.shard, quiet or ctx.rank != 0
        size = parse_step_size(step_size)
        ev = Evaluation(
            models=tuple(models), battery=tuple(attack_names),
            eps=tuple(parse_eps(t, eps_scale, norm) for t in eps_texts), norm=norm, dataset=dataset,
            data_dir=data_dir,
            download=download, n=n, limit=DEFAULT_N, budget=Budget(steps, restarts, size[0] if size else None,
                                                   size[1] if size else None, queries),
            seed=seed, precision=precision, compile=compile_model, bpda=bpda, no_skip=no_skip,
            checks=not no_checks, randomized=randomized, draws=draws, eot_max=eot_max, shard=shard,
            batch_size=batch_size, device=device, arch=arch, model_dir=model_dir, weights=weights,
            out=Path(out) if out else default_out("attack"), progress=not quiet)
        if ctx is not None:
            distributed.agree(ctx, {"models": list(models), "attacks": list(attack_names), "eps": ev.eps,
                                    "norm": norm,
                                    "n": n, "dataset": dataset, "seed": seed, "out": str(ev.out.resolve()),
                                    "budget": ev.budget, "no_skip": no_skip, "checks": not no_checks,
                                    "precision": precision, "bpda": bpda, "randomized": randomized,
                                    "draws": draws, "eot_max": eot_max})
        speak = ctx is None or ctx.rank == 0
        outcome = runner.evaluate(ev, notify=lambda m: click.echo(UserError(m).as_flags(), err=True)
                                  if speak else None)
        if ctx is not None:
            distributed.wait_all(ctx)
            if ctx.rank != 0:
                return
        title = f"Robust accuracy — {outcome.dataset} test, first {outcome.selected} examples"
        if shard is not None and ctx is None:
            from robusteval.rundir import RunDir

            mine = RunDir(ev.out, shard).records
            view = show_results([mine], title=f"{title} — shard {shard[0]}/{shard[1]} only")
            finish(view, allow_unreliable)
            click.echo(f"records: {mine}")
            click.echo(f"when every shard is done: robusteval report {ev.out}")
            return
        view = show_results([ev.out], title=title, save=ev.out)
        from robusteval import records

        click.echo(f"records: {', '.join(str(p) for p in records.files_in(ev.out))}")
        finish(view, allow_unreliable)
