"""``robusteval report``: redraw any table from saved per-example records, without rerunning anything."""

from __future__ import annotations

from pathlib import Path

import click

from robusteval.cli import cli
from robusteval.errors import UserError


def _split(values) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


@cli.command("report")
@click.argument("record_files", nargs=-1, required=True, metavar="RECORDS...")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "latex", "csv", "json", "html"]),
              default="table", show_default=True,
              help="Output format (table: a rich table; json: the summary's fields for scripts; html: one "
                   "self-contained page with tables, alarms, plan, models, cost and figures — needs -o).")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the report to FILE (atomically) instead of the terminal.")
@click.option("--rows", multiple=True, default=("model",), show_default=True,
              help="Record column(s) for the rows (repeat or comma-separate), e.g. model,train_steps.")
@click.option("--columns", default="attack", show_default=True,
              help="Record column for the columns (attack: per-attack columns plus the worst case).")
@click.option("--title", default=None, help="Table title / LaTeX caption.")
@click.option("--allow-unreliable", is_flag=True,
              help="Exit 0 even when a model's records carry masking alarms (they are still marked).")
@click.option("--merge-runs", is_flag=True,
              help="Combine records of one model from different runs (other seed, budget or mode): an "
                   "example counts as robust only if it is robust in every run. Without it such files are "
                   "refused.")
@click.option("--curve", "curve_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.csv",
              help="Also write robust accuracy against ε (CSV, and a plot beside it as FILE.png): each "
                   "example's radius is the smallest distance of any adversarial point in the records (a "
                   "minimum-norm run, -a fmn, gives it for every ε up to its own); ε values where a fixed-ε "
                   "run's number is above the curve are flagged.")
def report_command(record_files, fmt, output, rows, columns, title, merge_runs, allow_unreliable, curve_path):
    """Summarise records.csv files (or run directories) into a robust-accuracy table.

    Every number is a group-by of the per-example records: Nominal = clean accuracy, one column per
    attack, and Worst case = robust against every attack (robust.all() per example). Several files
    are combined (e.g. runs of different models), so the F3 table (regularizer variants) and the F4
    table (methods with their PGD steps) of the LLR paper are both one command.

    A model whose run raised masking alarms (alarms.csv beside its records.csv) is marked in an Alarms
    column with the remedy under the table, and the command exits with status 3 unless
    --allow-unreliable. Records are checked against their run's plan (plan.json): a run that does not
    cover its plan (interrupted between two attacks, or during the checks) is marked incomplete in a
    Status column, its worst case is not shown, and the command exits with status 4; records that are
    not in the plan, and shards of different plans, are refused. The files are only read, never changed.

    Different checkpoints with the same name stay separate rows (name [sha256 prefix]); records of one
    model, attack and ε from different runs (checkpoint, attack configuration, seed or mode differ) or
    on different images are refused with a message that says what differs, unless --merge-runs.

    \b
    Examples:
      robusteval report runs/demo/records.csv
      robusteval report runs/adv2 runs/llr2 --format latex
      robusteval report runs/*/records.csv --rows model,train_steps --format markdown   # Table F4 style
      robusteval report runs/x/records.csv --rows model --columns eps --format csv
      robusteval report runs/demo --format html -o report.html      # one page to open or share
    """
    from robusteval.cli.attack import finish, show_results

    if fmt == "html" and output is None:
        raise UserError("--format html writes a page: give its file with -o report.html")
    if output is not None:
        view = _write_report(list(record_files), Path(output), fmt, _split(rows), columns, title, merge_runs)
    else:
        view = show_results(list(record_files), rows=_split(rows), columns=columns, title=title, fmt=fmt,
                            merge_runs=merge_runs)
    if curve_path is not None:
        write_curve(view.records, Path(curve_path))
    finish(view, allow_unreliable)


def _write_report(paths, output: Path, fmt, rows, columns, title, merge_runs):
    """The report written to ``output`` (an HTML page, or the text of the other formats); the records are
    only read. A path among the inputs is refused as the output (a reader never writes what it reads)."""
    from robusteval import page, reports, runs
    from robusteval.paths import atomic_write, output_dir

    target = output.expanduser().resolve()
    if any(Path(p).expanduser().resolve() == target for p in paths):
        raise UserError(f"{output} is one of the inputs; write the report to another file")
    from robusteval import rundir

    gamma_only = [p for p in paths if fmt == "html" and Path(p).is_dir()
                  and not (Path(p) / rundir.filename(rundir.RECORDS)).is_file()
                  and (Path(p) / rundir.filename(rundir.GAMMA)).is_file()]  # a `robusteval gamma` directory
    attacked = [p for p in paths if p not in gamma_only]
    if not attacked:
        raise UserError("the report needs at least one attack run (records.csv) besides γ directories")
    view = runs.read(attacked, merge_runs=merge_runs)
    table, note = reports.run_table(view, rows=rows, columns=columns)
    if fmt == "html":
        text = page.render(attacked, view, table, note, title, gamma=gamma_only)
    elif fmt == "table":
        text = reports.render(table, "markdown", note=note, title=title)
    else:
        text = reports.render(table, fmt, note=note, title=title)
    output_dir(output.parent if str(output.parent) else Path("."))
    atomic_write(output, text)
    click.echo(f"report: {output}")
    return view


def write_curve(df, path) -> None:
    """The robustness curve of the records: CSV, plot, and any ε where it disagrees with a fixed-ε run."""
    from robusteval import reports
    from robusteval.figures import curve_figure
    from robusteval.paths import atomic_write, output_dir

    output_dir(path.parent if str(path.parent) else Path("."))
    table = reports.curve(df)
    atomic_write(path, table.to_csv(index=False))
    png = curve_figure(table, path.with_suffix(".png"), title="robust accuracy against ε")
    for line in reports.curve_disagreements(df):
        click.echo(line)
    click.echo(f"curve: {path}, {png}")
