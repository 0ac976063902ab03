"""``robusteval attack``: run an attack battery on one or more models and print the robust-accuracy table.

Parse → :func:`robusteval.runner.evaluate` → :func:`robusteval.reports.summarize` → render (ARCHITECTURE.md,
"CLI"): the table and output paths on stdout, progress and errors on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from robusteval.cli import cli
from robusteval.cli.common import parse_eps, parse_step_size, resolve_device
from robusteval.cli.options import DEFAULT_EPS, DEFAULT_N, default_out, load_data, model_option
from robusteval.errors import UserError

DEFAULT_ATTACKS = ("standard",)


class Unreliable(click.ClickException):
    """A table was printed, but a masking alarm fired: exit with a status of its own."""

    def __init__(self, message: str):
        from robusteval.alarms import UNRELIABLE_EXIT

        super().__init__(message)
        self.exit_code = UNRELIABLE_EXIT


def show_table(df, alarm_list, rows=("model",), title: str | None = None, out: Path | None = None):
    """Print the summary table of ``df`` marked with its alarms; save ``summary.*`` into ``out`` if given."""
    from robusteval import reports

    table = reports.summarize(df, rows=rows)
    if alarm_list is not None:
        table = reports.mark_alarms(table, df, alarm_list)
    note = "\n".join(filter(None, [reports.mode_note(df), reports.alarm_note(alarm_list)]))
    reports.print_table(table, title=title, note=note)
    return reports.save_summary(table, out, note=note, title=title) if out is not None else []


def fail_if_unreliable(alarm_list, allow: bool) -> None:
    """Exit with :data:`robusteval.alarms.UNRELIABLE_EXIT` when an alarm fired, unless ``allow``."""
    if alarm_list and not allow:
        models = sorted({a.model for a in alarm_list})
        raise Unreliable(f"robust accuracy of {', '.join(models)} is unreliable ({len(alarm_list)} alarm(s), "
                         "remedies above); pass --allow-unreliable to exit 0 anyway")


def show_results(out: Path, rows=("model",), title: str | None = None) -> list:
    """Print the summary table of every record in ``out`` and save ``summary.csv``/``summary.md`` there.

    The table covers the whole directory (earlier invocations resumed into it included), so the summary
    never shows only the last invocation's ε or models. Returns the alarms of the directory.
    """
    from robusteval import alarms, records

    df = records.read(out)  # the directory: records.csv and every shard's file, merged
    has_checks = alarms.exists(out)
    alarm_list = alarms.read(out) if has_checks else None
    paths = show_table(df, alarm_list, rows, title, out)
    click.echo(f"records: {', '.join(str(p) for p in records.files_in(out))}")
    click.echo(f"summary: {', '.join(map(str, paths))}")
    return alarm_list or []


@cli.command("attack")
@model_option
@click.option("--attack", "-a", "attack_names", multiple=True, default=DEFAULT_ATTACKS, show_default=True,
              help="Attack preset or battery, in battery order (repeat). Default: standard (apgd-ce, apgd-t, "
                   "apgd-dlr-odi, apgd-ce-odi, each on the survivors of the ones before, then Square as the "
                   "check). paper: the LLR paper's untargeted, random-targeted and multi-targeted at "
                   "20 × 200. Presets: untargeted, random-targeted, multi-targeted, fgsm-20, pgd-K, "
                   "apgd-ce, apgd-dlr, apgd-t, apgd-dlr-odi, apgd-ce-odi, square.")
@click.option("--eps", "eps_texts", multiple=True,
              help="Radius in [0,1] pixel units: 0.031, 8/255, or 8 with --eps-scale 255 (repeatable). "
                   "Default: the dataset's usual ε (0.1 Fashion-MNIST, 8/255 CIFAR-10).")
@click.option("--eps-scale", type=float, default=1.0, show_default=True, help="Divide every --eps by this.")
@click.option("--dataset", default=None, help="Dataset name (default: the checkpoint's, else fashion-mnist).")
@click.option("--data-dir", type=click.Path(), default=None, help="Where the dataset lives.")
@click.option("--download", is_flag=True, help="Download the dataset through torchvision if missing.")
@click.option("--n", "-n", "--num-examples", "n", type=int, default=None,
              help=f"Evaluate the first N test examples (default {DEFAULT_N}, or all if fewer). Under "
                   "torchrun write -n or --num-examples (torchrun mistakes --n for one of its own options).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds every random start (per example).")
@click.option("--restarts", type=int, default=None, help="Override the presets' restarts (paper: 20).")
@click.option("--steps", type=int, default=None, help="Override the presets' steps (paper: 200).")
@click.option("--step-size", default=None, help="First step size: 0.1 (pixel units) or 0.25eps (relative).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default runs/attack-<time>); the same --out resumes a run.")
@click.option("--arch", default=None, help="Architecture name, for checkpoints that are bare state_dicts.")
@click.option("--no-skip", is_flag=True,
              help="Run every attack on every clean-correct example (independent per-attack columns).")
@click.option("--queries", type=click.IntRange(min=1), default=None,
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
              help="Skip the masking alarms (randomness, softmax outputs, unusable gradients, autograd in "
                   "forward, Square on the survivors, large ε, monotonicity in ε). Not recommended.")
@click.option("--allow-unreliable", is_flag=True,
              help="Exit 0 even when an alarm marks a model's number unreliable (it is still marked).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def attack_command(models, attack_names, eps_texts, eps_scale, dataset, data_dir, download, n,
                   batch_size, device, seed, restarts, steps, step_size, out, arch, no_skip, queries,
                   bpda, precision, compile_model, shard_text, no_checks, allow_unreliable, quiet):
    """Evaluate robust accuracy under an attack battery; print a table like the LLR paper's Tables F3/F4.

    Clean-misclassified examples are not attacked; by default each attack runs only on the survivors
    of the attacks before it (worst case), --no-skip runs every attack on every example. Every
    adversarial example is verified (‖δ‖∞ ≤ ε, inside [0,1], re-classified in eval mode) before it is
    recorded in OUT/records.csv, one row per model × attack × ε × example; rerunning with the same
    --out resumes. Also writes OUT/summary.csv and OUT/summary.md.

    With no --attack the `standard` battery runs: the strongest per pass robusteval has (its robust
    accuracy equalled or was below reference AutoAttack's on every model and radius measured, in 0.34 to
    0.55 of its time: benchmarks/RESULTS.md). --attack paper reproduces the LLR paper's tables.

    \b
    Examples:
      robusteval attack --model ckpt.pt --eps 8/255
      robusteval attack --model ckpt.pt --attack paper --eps 8/255
      robusteval attack --model ckpt.pt --attack multi-targeted --eps 8/255
      robusteval attack -m zoo:fmnist-adv2 -m zoo:fmnist-llr2 -a untargeted -a multi-targeted --eps 0.1
      robusteval attack -m wrn.pt --arch wrn28_8 --dataset cifar10 --data-dir ~/data --eps 8 --eps-scale 255
      robusteval attack -m ckpt.pt --eps 0.1 --restarts 5 --steps 100 --no-skip --out runs/ckpt
    """
    from robusteval import distributed, records, runner

    shard = distributed.parse_shard(shard_text)
    ctx = distributed.from_env()
    if ctx is not None and shard is not None:
        raise UserError("--shard and torchrun both split the work; use one of them")
    if ctx is not None and not out:
        raise UserError("under torchrun every rank must write to the same --out: pass --out")
    try:
        if ctx is not None:
            device, shard, quiet = distributed.start(ctx, device), ctx.shard, quiet or ctx.rank != 0
        if steps is not None and steps < 1 or restarts is not None and restarts < 1:
            raise UserError("--steps and --restarts must be ≥ 1 (0 steps would not attack at all)")
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        eps_values = [parse_eps(t, eps_scale) for t in eps_texts]
        size = parse_step_size(step_size)
        overrides = dict(steps=steps, restarts=restarts, step_size=size[0] if size else None,
                         relative_step=size[1] if size else None)
        runner.build_attacks(attack_names, eps_values[0] if eps_values else 0.1, queries=queries,
                             **overrides)  # names, early
        out = Path(out) if out else default_out("attack")
        if ctx is not None:
            distributed.agree(ctx, {"models": list(models), "attacks": list(attack_names), "eps": eps_values,
                                    "n": n, "dataset": dataset, "seed": seed, "out": str(out.resolve()),
                                    "overrides": overrides, "no_skip": no_skip, "checks": not no_checks,
                                    "precision": precision, "queries": queries, "bpda": bpda})
        mine = out / (records.shard_filename(*shard) if shard else records.FILENAME)
        records.check_appendable(mine)  # an unwritable --out fails before any work
        device = resolve_device(device)
        entries = runner.load_entries(models, arch=arch, device=device)
        if dataset is None:
            found = {e.meta.get("dataset") for e in entries if e.meta.get("dataset")}
            if len(found) > 1:
                names = ", ".join(sorted(found))
                raise UserError(f"the models were trained on different datasets ({names}); pass --dataset")
            dataset = found.pop() if found else "fashion-mnist"
        ds = load_data(dataset, data_dir, n, download)
        if not eps_values:
            text = DEFAULT_EPS.get(ds.name, "8/255")
            if not ctx or ctx.rank == 0:
                click.echo(f"using the default ε = {text} for {ds.name} (set it with --eps)", err=True)
            eps_values = [parse_eps(text)]
        if not ctx or ctx.rank == 0:
            click.echo(f"writing {mine if not ctx else out} (rerun with --out {out} to resume)", err=True)
        runner.evaluate(entries, attack_names, eps_values, ds, batch_size=batch_size, device=device,
                        seed=seed, out=out, no_skip=no_skip, progress=not quiet, checks=not no_checks,
                        queries=queries, bpda=bpda, precision=precision, compile=compile_model, shard=shard,
                        **overrides)
        if ctx is not None:
            distributed.wait_all(ctx)
            if ctx.rank != 0:
                return
        title = f"Robust accuracy — {ds.name} test, first {len(ds)} examples"
        if shard is not None and ctx is None:
            show_shard(out, shard, title, allow_unreliable)
            return
        fail_if_unreliable(show_results(out, title=title), allow_unreliable)
    finally:
        if ctx is not None:
            distributed.stop()


def show_shard(out: Path, shard: tuple[int, int], title: str, allow_unreliable: bool) -> None:
    """Print one shard's table (its own examples only) and how to merge the shards."""
    from robusteval import alarms, records

    df = records.read(out / records.shard_filename(*shard))
    alarm_file = out / alarms.shard_filename(*shard)
    alarm_list = alarms.read(alarm_file) if alarm_file.is_file() else None
    show_table(df, alarm_list, title=f"{title} — shard {shard[0]}/{shard[1]} only")
    click.echo(f"records: {out / records.shard_filename(*shard)}")
    click.echo(f"when every shard is done: robusteval report {out}")
    fail_if_unreliable(alarm_list or [], allow_unreliable)
