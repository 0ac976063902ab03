"""``robusteval gamma``: per-example local linearity γ(ε, x) of one or more models (LLR Figure F3)."""

from __future__ import annotations

import click

from robusteval.cli import cli
from robusteval.cli.common import parse_eps, parse_step_size, resolve_device
from robusteval.cli.options import (
    DEFAULT_N,
    check_fits,
    console,
    dataset_name,
    load,
    load_data,
    model_option,
    model_options,
    progress,
    resolve_eps,
    unique_names,
)
from robusteval.errors import UserError


@cli.command("gamma")
@model_option
@click.option("--eps", default=None, help="Radius ε: 8/255, 0.031 (default: per dataset).")
@model_options
@click.option("--n", "-n", "--num-examples", "n", type=click.IntRange(min=1), default=None,
              help=f"Number of test examples (default {DEFAULT_N}, or all if fewer).")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--steps", type=click.IntRange(min=0), default=50, show_default=True,
              help="Adam steps of the γ search (paper: 50).")
@click.option("--step-size", default="0.1", show_default=True,
              help="Adam step size in pixel units (paper: 0.1), or relative like 0.25eps.")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--bn", type=click.Choice(["eval", "nominal"]), default="eval", show_default=True,
              help="Batch norm: running statistics, or the nominal batch's (the LLR trainer's convention).")
@click.option("--grad-mode", type=click.Choice(["deepmind", "exact"]), default="deepmind", show_default=True,
              help="deepmind: stop-gradient on δ in the linear term (DeepMind's code); exact: true gradient.")
@click.option("--bins", type=click.IntRange(min=1), default=30, show_default=True, help="Histogram bins.")
@click.option("--log-counts", is_flag=True, help="Log-scale histogram counts.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/gamma", show_default=True,
              help="Output directory.")
def gamma_command(models, eps, eps_scale, dataset, data_dir, device, arch, seed, n, batch_size, steps,
                  step_size, restarts, bn, grad_mode, bins, log_counts, out):
    """Measure local linearity γ(ε, x) per test example (Qin et al. 2019, Eq. 5; supplementary F.4).

    γ(ε,x) = max over the ε-ball of |ℓ(x+δ) − ℓ(x) − δᵀ∇ℓ(x)|, searched with 50 Adam steps of size 0.1
    from a random start. Writes DIR/gamma.csv (one row per model and example), DIR/gamma_hist.png with
    the models' √γ histograms on shared bins (Figure F3), DIR/gamma_hist.csv (its bin counts) and
    DIR/gamma_summary.csv; prints mean, median and 90th percentile of √γ per model.

    \b
    Examples:
      robusteval gamma --model zoo:fmnist-adv2 --model zoo:fmnist-llr2 --eps 0.1
      robusteval gamma --model ckpt.pt --eps 8/255 --dataset cifar10 --n 1000 --out runs/g
      robusteval gamma --model ckpt.pt --eps 8 --eps-scale 255 --bn nominal --log-counts
      torchrun --nproc-per-node=4 -m robusteval gamma -m ckpt.pt --dataset cifar10 -n 10000 --out runs/g

    Under torchrun each rank measures the examples at positions rank, rank + N, ... into
    DIR/gamma.shard-R-of-N.csv; rank 0 merges them into DIR/gamma.csv (the single-process rows, in
    dataset order) and draws the figures.

    Rows are appended per batch: rerunning into the same --out resumes, and a run with other models
    adds them beside the ones already there (a model measured before with other settings is refused).
    """
    from robusteval import distributed

    with distributed.session(device) as (ctx, device):
        _gamma(ctx, models, eps, eps_scale, dataset, data_dir, device, arch, seed, n, batch_size, steps,
               step_size, restarts, bn, grad_mode, bins, log_counts, out)


def _gamma(ctx, models, eps, eps_scale, dataset, data_dir, device, arch, seed, n, batch_size, steps,
           step_size, restarts, bn, grad_mode, bins, log_counts, out):
    from pathlib import Path

    import torch

    from robusteval import distributed, records, rundir
    from robusteval.linearity import gamma_records

    device = resolve_device(device)
    step = parse_step_size(step_size)
    _check_options(eps, eps_scale, seed, steps, restarts, batch_size, n, bins)
    out = Path(out)
    shard = ctx.shard if ctx is not None else None
    writer = rundir.RunDir(out, shard)
    mine = writer.path(rundir.GAMMA)
    loaded = [load(spec, arch, device) for spec in models]
    names = unique_names([m.name for m in loaded], list(models))
    data, jobs = {}, []
    for lm in loaded:  # every data/model problem surfaces before the long run starts
        dname = dataset_name(lm, dataset)
        if dname not in data:
            data[dname] = load_data(dname, data_dir, n)
        ds = data[dname].shard(ctx.rank, ctx.world) if ctx is not None else data[dname]
        radius, text = resolve_eps(eps, eps_scale, ds.name, with_text=True)
        check_fits(lm, ds, device, radius, seed, batch_size)
        jobs.append((ds, radius, text))
    if ctx is not None:
        distributed.agree(ctx, {"models": list(models), "eps": eps, "n": n, "seed": seed, "steps": steps,
                                "out": str(out.resolve()), "bn": bn, "grad_mode": grad_mode})
    with writer.writing():
        records.check_appendable(mine, records.GAMMA)
        existing = records.read_if_exists(mine, records.GAMMA)
        settings = [dict(dataset=ds.name, eps=radius, steps=steps, step_size=step_size, restarts=restarts,
                         bn=bn, grad_mode=grad_mode, seed=seed) for ds, radius, _ in jobs]
        todo = [_remaining(existing, name, lm.sha256, ds, cfg, mine)
                for lm, name, (ds, _, _), cfg in zip(loaded, names, jobs, settings, strict=True)]
        with progress(enabled=ctx is None or ctx.rank == 0) as bar:
            for lm, name, (ds, radius, text), left in zip(loaded, names, jobs, todo, strict=True):
                task = bar.add_task(f"γ {name}", total=len(ds), completed=len(ds) - len(left))
                gamma_records(lm.model, name, lm.sha256, left, radius, text, batch_size=batch_size,
                              steps=steps, step_size=step[0], relative_step=step[1], restarts=restarts,
                              bn=bn, grad_mode=grad_mode, seed=seed, step_size_text=step_size,
                              on_batch=lambda k, task=task: bar.advance(task, k),
                              emit=lambda rows: records.append(mine, rows, records.GAMMA))
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        if ctx is not None:
            distributed.wait_all(ctx)
            if ctx.rank != 0:
                return
            _merge_gamma_shards(out, ctx.world, names)
    path = out / records.GAMMA_FILENAME
    _figures(path, out, names, bins, log_counts)


def _check_options(eps, eps_scale, seed, steps, restarts, batch_size, n, bins) -> None:
    """Every option that is a number, before any model loads (a bad ε, seed or budget is one line)."""
    from robusteval.evaluation import MAX_BATCH, MAX_RESTARTS, MAX_STEPS, check_count, check_seed

    if eps is not None:
        parse_eps(eps, eps_scale)
    check_seed(seed)
    for value, what, upper, low in ((steps, "steps", MAX_STEPS, 0), (restarts, "restarts", MAX_RESTARTS, 1),
                                    (batch_size, "batch_size", MAX_BATCH, 1), (n, "n", 1 << 62, 1),
                                    (bins, "bins", 10_000, 1)):
        check_count(value, what, upper, low)


def _remaining(existing, name: str, sha: str, ds, settings: dict, path):
    """The examples of ``ds`` without a γ record of model ``name`` in ``existing``; records of that model
    made with another checkpoint or other settings are refused (a rerun must measure the same thing)."""
    from robusteval import records

    done = existing[existing["model"] == name]
    if len(done):
        expect = {"checkpoint_sha256": sha, **settings}
        for col, value in expect.items():
            have = set(done[col].map(records.eps_key) if col == "eps" else done[col])
            want = records.eps_key(value) if col == "eps" else value
            if have != {want}:
                found = ", ".join(sorted(map(str, have)))[:60]
                raise UserError(f"{path} already has γ records of {name} with a different "
                                f"{col.replace('_', ' ')} ({found}); use another `out`, or the same options "
                                "to resume")
    import torch

    keep = ~torch.isin(ds.ids, torch.tensor(done["example_id"].tolist(), dtype=ds.ids.dtype))
    return ds.subset(keep)


def _figures(path, out, names, bins, log_counts) -> None:
    """Every figure and table, redrawn from the γ records on disk (records are the one result format)."""
    from robusteval import records
    from robusteval.figures import gamma_histogram
    from robusteval.linearity import gamma_summary

    df = records.read_gamma(path)
    hist = gamma_histogram(df, out / "gamma_hist.png", log=log_counts, bins=bins)
    from robusteval.paths import atomic_write

    atomic_write(out / "gamma_hist.csv", hist.to_frame().to_csv(index=False))
    summary = gamma_summary(df)
    atomic_write(out / "gamma_summary.csv", summary.to_csv(index=False))
    render_summary(summary)
    for f in ("gamma.csv", "gamma_hist.png", "gamma_hist.csv", "gamma_summary.csv"):
        click.echo(str(out / f))


def _merge_gamma_shards(out, world: int, names: list[str]) -> None:
    """gamma.csv := its own rows of other models, then every rank's rows in single-process order (model
    in the order given, then dataset position), written atomically."""
    import io

    import pandas as pd

    from robusteval import records, rundir
    from robusteval.paths import atomic_write

    parts = [records.read_if_exists(out / rundir.filename(rundir.GAMMA, (r, world)), records.GAMMA)
             for r in range(world)]
    shards = pd.concat(parts, ignore_index=True)
    whole = records.read_if_exists(out / records.GAMMA_FILENAME, records.GAMMA)
    keep = whole[~whole["model"].isin(set(shards["model"]))]
    shards["_model"] = shards["model"].map({m: i for i, m in enumerate(names)})
    shards = shards.sort_values(["_model", "example_id"], kind="stable").drop(columns="_model")
    rows = keep.to_dict("records") + shards.to_dict("records")  # (no concat: it would retype the ints)
    buf = io.StringIO()
    records.write_rows(buf, rows, records.GAMMA)
    atomic_write(out / records.GAMMA_FILENAME, buf.getvalue())


def render_summary(summary) -> None:
    from rich.table import Table

    table = Table(title="local linearity √γ(ε, x) per model (lower = more linear)")
    for col, label in [("model", "model"), ("n", "n"), ("eps", "ε"), ("clean_acc", "clean acc"),
                       ("sqrt_gamma_mean", "mean √γ"), ("sqrt_gamma_median", "median √γ"),
                       ("sqrt_gamma_p90", "p90 √γ"), ("gamma_mean", "mean γ")]:
        if col == "model":  # names stay whole; the numeric columns may wrap instead
            width = min(40, max([len(str(m)) for m in summary["model"]] + [5]))
            table.add_column(label, min_width=width, overflow="fold")
        else:
            table.add_column(label, justify="right")
    for r in summary.itertuples():
        table.add_row(str(r.model), str(r.n), f"{r.eps:.4g}", f"{100 * r.clean_acc:.2f}%",
                      f"{r.sqrt_gamma_mean:.4f}", f"{r.sqrt_gamma_median:.4f}", f"{r.sqrt_gamma_p90:.4f}",
                      f"{r.gamma_mean:.4g}")
    console().print(table)
