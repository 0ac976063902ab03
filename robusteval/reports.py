"""Tables from per-example records: every number is a group-by of :mod:`robusteval.records` rows.

:func:`summarize` builds the robust-accuracy tables of the LLR paper (Qin et al. 2019): rows are models
(or any record columns, e.g. ``train_method`` + ``train_steps``), columns are *Nominal*, one column per
attack and the per-example *Worst case* over all attacks.

* Table F3 style — regularizer variants × Nominal / Untargeted / Multi-Targeted:
  ``summarize(df, rows=["model"])``;
* Table F4 style — methods with their PGD steps × Nominal / Untargeted / Multi-Targeted:
  ``summarize(df, rows=["model", "train_steps"])`` (``train_steps`` comes from checkpoint metadata).

A cell is the fraction of *units* — (model, dataset, ε, example) — that are robust against every record
of the cell (``robust.all()`` per unit, then the mean). With ``columns="attack"`` a cell holds one
record per unit, so it is that attack's robust accuracy; the worst-case column takes all attacks.
Whether per-attack columns are independent depends on how the records were made (``mode``): with
``no-skip`` each attack ran on every clean-correct example; in ``skip`` mode an attack ran only on the
survivors of the ones before it, so its column is cumulative (robust against it *and* all earlier
attacks). :func:`mode_note` states which, and the renderers print it under the table.

Renderers: :func:`render` (``markdown``, ``latex``, ``csv``, ``json``) and :func:`rich_table`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from robusteval.errors import UserError
from robusteval.plan import eps_key

UNIT = ("model", "dataset", "norm", "eps", "example_id")
NOMINAL, WORST, COUNT = "Nominal", "Worst case", "n"
#: A randomised model's numbers judged by the mean share of correct draws (beside the worst case).
NOMINAL_EXPECTED, EXPECTED = "Nominal (expected)", "Expected"
FORMATS = ("table", "markdown", "latex", "csv", "json")
HEADERS = {"model": "Model", "train_method": "Method", "train_steps": "PGD steps", "eps": "ε", "norm": "Norm",
           "dataset": "Dataset", "attack": "Attack", "seed": "Seed", "mode": "Mode"}  # fmt: skip
_UPPER = {"fgsm", "pgd", "apgd", "ce", "dlr", "t", "odi", "fab", "fmn"}


def attack_title(name: str) -> str:
    """``multi-targeted`` → ``Multi-Targeted``, ``pgd-50`` → ``PGD-50``, ``apgd-ce`` → ``APGD-CE``
    (the papers' spelling)."""
    return "-".join(p.upper() if p in _UPPER else p.capitalize() for p in str(name).split("-"))


def format_eps(eps: float) -> str:
    """ε as the paper writes it: ``8/255`` for a whole number of 1/255 steps (long decimal), else ``0.1``."""
    k, short = float(eps) * 255, f"{float(eps):g}"
    if abs(k - round(k)) < 1e-6 and round(k) != 0 and len(short) > 5:
        return f"{round(k)}/255"
    return short


def summarize(df: pd.DataFrame, rows: Sequence[str] = ("model",), columns: str = "attack",
              worst_case: bool = True) -> pd.DataFrame:
    """Robust-accuracy table (fractions in [0, 1]) as a DataFrame.

    Output columns: the ``rows`` keys, ``n`` (examples per row), ``Nominal`` (clean accuracy), one column
    per value of ``columns`` in order of first appearance, and ``Worst case`` (only for
    ``columns="attack"``). ``eps`` is always shown: unless it is among ``rows``/``columns`` it is added to
    the rows, so a table never hides its radius and numbers at different radii are never averaged
    together; ``dataset`` is added the same way when the records hold several datasets.
    """
    rows = list(dict.fromkeys(rows))
    for col in [*rows, columns]:
        if col not in df.columns:
            raise UserError(f"unknown record column {col!r}; available: {', '.join(df.columns)}")
    if columns in rows:
        raise UserError(f"{columns!r} cannot be both a row key and the column key")
    if df.empty:
        raise UserError("no records to summarise")
    if "eps" not in rows and columns != "eps":
        rows.append("eps")
    if df["dataset"].nunique() > 1 and "dataset" not in rows and columns != "dataset":
        rows.insert(rows.index("eps") if "eps" in rows else len(rows), "dataset")
    if "norm" in df.columns and (df["norm"].nunique() > 1 or (df["norm"] != "linf").any()) \
            and "norm" not in rows and columns != "norm":  # a radius is read with its norm
        rows.insert(rows.index("eps") if "eps" in rows else len(rows), "norm")
    unit = list(dict.fromkeys([*rows, *UNIT]))
    groups = dict(sort=False, dropna=False)
    random = "draws" in df.columns and bool((df["draws"] > 1).any())
    per_unit = df.groupby(unit, **groups).agg(clean=("clean_correct", "max"), robust=("robust", "all"),
                                              **({"clean_share": ("clean_share", "max"),
                                                  "share": ("robust_share", "min")} if random else {}))
    # n and Nominal count each example of a row once, whatever the column key splits it into (a column
    # per ε holds every example of the row once per ε)
    per_row = per_unit if columns not in unit else df.groupby(
        [c for c in unit if c != columns], **groups).agg(
        clean=("clean_correct", "max"), **({"clean_share": ("clean_share", "max")} if random else {}))
    table = per_row.groupby(rows, **groups).agg(**{COUNT: ("clean", "size"), NOMINAL: ("clean", "mean")})
    if random:  # the same two numbers judged by the mean share of correct draws
        table[NOMINAL_EXPECTED] = per_row.groupby(rows, **groups)["clean_share"].mean()
    complete = pd.Series(True, index=table.index)
    for value in pd.unique(df[columns]):
        sub = df[df[columns] == value]
        per_example = sub.groupby(unit, **groups)["robust"].all().groupby(rows, **groups)
        # A column with fewer examples than its row (an interrupted run) would report the accuracy of
        # whatever subset happens to be recorded: show it as missing ("–") instead of a wrong number.
        size = per_example.size().reindex(table.index, fill_value=0)
        done = size >= table[COUNT]
        complete &= done | (size == 0)  # an attack a row never ran (another ε's battery) leaves it whole
        label = attack_title(value) if columns == "attack" else (
            format_eps(value) if columns == "eps" else str(value))
        table[label] = per_example.mean().where(done)
    if worst_case and columns == "attack":
        table[WORST] = per_unit.groupby(rows, **groups)["robust"].mean().where(complete)
        if random:
            table[EXPECTED] = per_unit.groupby(rows, **groups)["share"].mean().where(complete)
    return table.reset_index()


ALARMS, STATUS, PROTOCOL = "Alarms", "Status", "Protocol"


def _rows_of(table: pd.DataFrame, df: pd.DataFrame):
    """For each row of a :func:`summarize` table, the records it was computed from."""
    keys = [c for c in row_keys(table) if c in df.columns]
    for row in table[keys].itertuples(index=False, name=None):
        sub = df
        for k, v in zip(keys, row, strict=True):
            sub = sub[sub[k].astype(str) == str(v)] if k != "eps" else sub[sub[k].map(float) == float(v)]
        yield sub


def _same_model(verdict_model: str, record_model: str) -> bool:
    # a display name made unique by the reader ("name [sha prefix]") still belongs to its verdicts
    return record_model == verdict_model or record_model.startswith(verdict_model + " [")


def mark_alarms(table: pd.DataFrame, df: pd.DataFrame, verdicts) -> pd.DataFrame:
    """Add an ``Alarms`` column: per row, the checks that raised an alarm for its model(s) at its ε, or
    ``none``. Verdicts are matched to records by checkpoint hash and model name, so a row keeps its
    alarms whatever its display name; a table without a ``model`` or ``eps`` key gets the alarms of
    every model and radius in the row's records."""
    raised = [v for v in verdicts if v.raised]
    cells = []
    for sub in _rows_of(table, df):
        pairs = set(zip(sub["checkpoint_sha256"], sub["model"], sub["norm"], sub["eps"].map(eps_key),
                        strict=True))
        found = {v.check for v in raised for sha, model, norm, e in pairs
                 if v.checkpoint_sha256 == sha and _same_model(v.model, model) and v.norm == norm
                 and eps_key(v.eps) == e}
        cells.append(", ".join(sorted(found)) if found else "none")
    out = table.copy()
    out[ALARMS] = cells
    return out


def mark_status(table: pd.DataFrame, df: pd.DataFrame, gaps, planned=None) -> pd.DataFrame:
    """Add a ``Status`` column from the plan's gaps (:func:`robusteval.plan.coverage`): ``complete``, or
    ``incomplete`` with what is missing (an incomplete row's worst case is not a number: ``–``), or
    ``no plan`` for records whose (model, ε) no plan covers (``planned``: the planned pairs)."""
    out, cells = table.copy(), []
    for i, sub in enumerate(_rows_of(table, df)):
        pairs = set(zip(sub["model"], sub["eps"].map(eps_key), strict=True))
        mine = [g for g in gaps for model, e in pairs if _same_model(g.model, model) and eps_key(g.eps) == e]
        known = planned is None or all(any(_same_model(m, model) and k == e for m, k in planned)
                                       for model, e in pairs)
        if not known:
            cells.append("no plan")
        elif mine:
            what = sorted({g.what for g in mine})
            cells.append("incomplete: " + ", ".join(what))
            for col in (WORST, EXPECTED):
                if col in out.columns:
                    out.loc[out.index[i], col] = float("nan")
        else:
            cells.append("complete")
    out[STATUS] = cells
    return out


def mark_protocol(table: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Add a ``Protocol`` column when any row is a randomised model's: ``EoT K, M draws`` (the attacks'
    EoT samples, the draws every point was judged over) or ``deterministic``."""
    if "draws" not in df.columns or not bool((df["draws"] > 1).any()):
        return table
    cells = []
    for sub in _rows_of(table, df):
        draws = int(sub["draws"].max())
        eot = sorted({int(k) for k in sub["attack_config"].str.extract(r"draws=(\d+)")[0].dropna()})
        cells.append(f"EoT {'/'.join(map(str, eot)) or 1}, {draws} draws" if draws > 1 else "deterministic")
    out = table.copy()
    out[PROTOCOL] = cells
    return out


def alarm_note(alarms) -> str | None:
    """One line per alarm: which model is unreliable, what was measured, and the remedy."""
    raised = [a for a in alarms or [] if a.raised]
    if not raised:
        return None
    seen, lines = set(), []
    for a in raised:
        if (a.model, a.check, a.detail) not in seen:
            seen.add((a.model, a.check, a.detail))
            lines.append(f"UNRELIABLE {a.model}: {a.check} — {a.detail}. Remedy: {a.remedy}.")
    return "\n".join(lines)


def gap_note(gaps, limit: int = 8) -> str | None:
    """One line per missing part of the plan (at most ``limit``), and what to do about it."""
    if not gaps:
        return None
    lines = [f"INCOMPLETE {g}" for g in gaps[:limit]]
    if len(gaps) > limit:
        lines.append(f"INCOMPLETE … and {len(gaps) - limit} more")
    lines.append("The run was interrupted or is still going: rerun the same command (same --out) to finish "
                 "it; its numbers are not final.")
    return "\n".join(lines)


def run_table(view, rows=("model",), columns: str = "attack") -> tuple[pd.DataFrame, str | None]:
    """The table of a run view (:class:`robusteval.runs.View`) with its Alarms and Status columns, and
    the note under it: how columns were computed, every alarm with its remedy, what is missing."""
    df = view.records
    table = mark_protocol(summarize(df, rows=rows, columns=columns), df)
    if view.verdicts is not None:
        table = mark_alarms(table, df, view.verdicts)
    table = mark_status(table, df, view.gaps, view.planned)
    if ALARMS in table.columns:  # no alarm *yet*: the checks of the row have not all given a verdict
        pending = table[STATUS].str.contains("checks") & (table[ALARMS] == "none")
        table.loc[pending, ALARMS] = "pending"
    unplanned = (f"no plan beside the records of {', '.join(map(str, view.unplanned))}: their completeness "
                 "cannot be checked" if view.unplanned else None)
    note = "\n".join(filter(None, [mode_note(df) if columns == "attack" else None, alarm_note(view.verdicts),
                                   gap_note(view.gaps), unplanned]))
    return table, note or None


def _annealing(df: pd.DataFrame) -> str:
    """The annealing stages of the attacks in ``df``, read from their stored configurations: "apgd-ce,
    apgd-t spent 30% of their steps in the 3ε ball and 30% in the 2ε ball, fab-t 80% in the 10ε ball"
    ("" when none anneals; a configuration that does not parse is left out, never guessed)."""
    import attacks

    by_stages: dict[tuple, list[str]] = {}
    probes: dict[str, int] = {}
    for name, cfg in df[["attack", "attack_config"]].astype(str).drop_duplicates().itertuples(index=False):
        if "anneal=((" not in cfg:
            continue
        try:
            atk = attacks.from_config(cfg)
        except (ValueError, TypeError, SyntaxError):
            continue
        if atk.anneal and name not in by_stages.setdefault(tuple(atk.anneal), []):
            by_stages[tuple(atk.anneal)].append(name)
        if atk.probe:
            probes[name] = atk.probe
    parts = []
    for stages, names in by_stages.items():
        spent = " and ".join(f"{round(100 * share)}% in the {multiple:g}ε ball" for multiple, share in stages)
        whose = "their" if len(names) > 1 else "its"
        parts.append(f"{', '.join(names)} spent " + spent.replace("% in", f"% of {whose} steps in", 1))
    text = ", ".join(parts)
    if probes:
        text += " (" + ", ".join(f"{name} checked its point projected onto the ε-ball every {k} of those "
                                 "steps" for name, k in probes.items()) + ")"
    return text


def mode_note(df: pd.DataFrame) -> str:
    """One line saying how per-attack columns were computed (see the module docstring)."""
    black_box = df["attack_config"].str.contains("RandomSquares", regex=False)
    base = df["mode"].str.split("+").str[0]
    check = ("; Square (the black-box check) ran on the survivors of the gradient attacks"
             if bool((black_box & (base == "skip")).any()) else "")
    low = sorted({m.split("+")[1] for m in df["mode"].unique() if "+" in m})
    if low:
        check += (f"; attack passes ran in {'/'.join(low)} (autocast), every point was verified in fp32")
    if "draws" in df.columns and bool((df["draws"] > 1).any()):
        eot = sorted({int(k) for k in df["attack_config"].str.extract(r"draws=(\d+)")[0].dropna()})
        check += (f"; randomised model: EoT with {'/'.join(map(str, eot)) or '1'} samples, every point "
                  f"judged over {int(df['draws'].max())} draws — Nominal and Worst case count an example "
                  "only if every draw classifies it correctly, the (expected) columns give the mean share "
                  "of correct draws")
    if "status" in df.columns and bool((df["status"] == "gated").any()):
        check += ("; budget reallocated (robusteval standard v3 and later, docs/methods.md): a gated "
                  "survivor skipped "
                  "a member because its closeness to the boundary was above that member's gate, and counts "
                  "as robust to it")
    annealed = _annealing(df)
    if annealed:
        check += (f"; radius annealed (docs/methods.md, \"Radius annealing\"): {annealed} before the ε-ball, "
                  "whose points alone count")
    searching = df["attack_config"].astype(str).str.contains("tracking=MinDistance()", regex=False)
    modes = set(base[~black_box & ~searching].unique())
    if not modes and bool(searching.any()):
        return ("Each minimum-norm attack ran on every clean-correct example" + check +
                "; Worst case = robust to all attacks.")
    if bool(searching.any()):
        check += ("; a minimum-norm attack searches every clean-correct example whatever the mode, so its "
                  "column is the accuracy against it alone")
    modes = modes or set(base[~black_box].unique()) or set(base.unique())
    if modes == {"no-skip"}:
        return ("Each gradient attack ran on every clean-correct example (--no-skip)" + check +
                "; Worst case = robust to all attacks.")
    note = ("Battery mode: each attack ran only on the survivors of the attacks before it, so an attack's "
            "column is the accuracy against it and all earlier attacks; use --no-skip for independent "
            "columns" + check + ".")
    return note if modes == {"skip"} else "Mixed records (skip and no-skip); " + note


def _cell(col: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if col == COUNT:
        return str(int(value))
    if col == "norm":
        return {"linf": "L∞", "l2": "L2", "l1": "L1"}.get(str(value), str(value))
    if col == "eps":
        return format_eps(value)
    if col == "train_steps":
        return str(int(value))
    if isinstance(value, float):
        return f"{100 * value:.2f}%"
    return str(value)


def row_keys(table: pd.DataFrame) -> list[str]:
    """The row-key columns of a :func:`summarize` table (those before ``n``)."""
    cols = list(table.columns)
    return cols[: cols.index(COUNT)] if COUNT in cols else []


def _text_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    keys = row_keys(table)
    headers = [HEADERS.get(c, c) if c in keys else c for c in table.columns]
    body = [[_cell(c if c in keys or c == COUNT else "", v) for c, v in zip(table.columns, r, strict=True)]
            for r in table.itertuples(index=False, name=None)]
    return headers, body


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("ε", r"$\epsilon$")):
        text = text.replace(a, b)
    return text


def render(table: pd.DataFrame, fmt: str, note: str | None = None, title: str | None = None) -> str:
    """Render a :func:`summarize` table as ``markdown``, ``latex``, ``csv`` or ``json`` text.

    Row keys are rendered as labels, the rest as percentages. CSV and JSON keep the
    accuracies as fractions in [0, 1] with full precision, for machines; markdown and LaTeX show
    percentages with two decimals as in the paper.
    """
    keys = row_keys(table)
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        data = [{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in r.items()}
                for r in table.to_dict("records")]
        return json.dumps({"title": title, "note": note, "rows": data}, indent=2, ensure_ascii=False) + "\n"
    headers, body = _text_rows(table)
    if fmt == "markdown":
        lines = [f"**{title}**", ""] if title else []
        lines += ["| " + " | ".join(headers) + " |",
                  "|" + "|".join("---" if c in keys else "---:" for c in table.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"
    if fmt == "latex":
        spec = "".join("l" if c in keys else "r" for c in table.columns)
        lines = [r"\begin{table}[t]", r"\centering"]
        lines += [rf"\caption{{{_latex_escape(title)}}}"] if title else []
        lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                  " & ".join(map(_latex_escape, headers)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(_latex_escape, r)) + r" \\" for r in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [rf"\par\footnotesize {_latex_escape(note)}"] if note else []
        return "\n".join(lines + [r"\end{table}"]) + "\n"
    raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def rich_table(table: pd.DataFrame, title: str | None = None, note: str | None = None):
    """The table as a :class:`rich.table.Table` (percentages, row keys left-aligned)."""
    from rich.table import Table
    from rich.text import Text

    keys = row_keys(table)
    headers, body = _text_rows(table)
    out = Table(title=Text(title) if title else None, caption=Text(note) if note else None,
                caption_justify="left")
    for col, header in zip(table.columns, headers, strict=True):
        out.add_column(Text(header), justify="left" if col in keys else "right", no_wrap=True)
    for r in body:  # plain text: a name like "model [a65ee9b7]" is not rich markup
        out.add_row(*map(Text, r))
    return out


def print_table(table: pd.DataFrame, title: str | None = None, note: str | None = None, console=None) -> None:
    """Print :func:`rich_table` on stdout, wide enough that no cell is cut when output is not a terminal."""
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)
    console.print(rich_table(table, title, note))


def save_summary(table: pd.DataFrame, out, note: str | None = None, title: str | None = None) -> list:
    """Write ``summary.csv`` and ``summary.md`` into directory ``out``; return their paths."""
    from pathlib import Path

    from robusteval.paths import atomic_write

    out = Path(out)
    paths = [out / "summary.csv", out / "summary.md"]
    atomic_write(paths[0], render(table, "csv"))
    atomic_write(paths[1], render(table, "markdown", note=note, title=title))
    return paths


# ---------------------------------------------------------------------------------- robustness curve


def radii(df: pd.DataFrame) -> pd.DataFrame:
    """Each example's radius per (model, dataset, norm): the smallest distance of any verified adversarial
    point in the records (a minimum-norm attack's, or any fixed-ε attack's — each is an upper bound on
    the example's minimal adversarial radius), 0 for a clean-wrong example, ∞ when nothing broke it."""
    keys = ["model", "dataset", "norm", "example_id"]
    broken = df[(df["status"] == "attacked") & ~df["robust"]]
    r = broken.groupby(keys)["distance"].min()
    out = df.groupby(keys, sort=False)["clean_correct"].max().to_frame("clean_correct")
    out["radius"] = r.reindex(out.index)
    out["radius"] = out["radius"].where(out["clean_correct"], 0.0).fillna(float("inf"))
    return out.reset_index()


def curve(df: pd.DataFrame, points: int = 200) -> pd.DataFrame:
    """Robust accuracy as a function of ε from the radii (:func:`radii`): ``robust(ε) = share of examples
    whose radius exceeds ε``, monotone by construction; evaluated at every radius where it steps, at the
    radii of the records and on an even grid of ``points`` up to the largest ε recorded."""
    rows = []
    for (model, dataset, norm), sub in radii(df).groupby(["model", "dataset", "norm"], sort=False):
        mine = df[(df["model"] == model) & (df["dataset"] == dataset) & (df["norm"] == norm)]
        top = float(mine["eps"].max())
        r = sub["radius"].to_numpy()
        grid = np.unique(np.concatenate([np.linspace(0, top, points), r[np.isfinite(r) & (r <= top)],
                                         mine["eps"].unique()]))
        for e in grid:
            rows.append({"model": model, "dataset": dataset, "norm": norm, "eps": float(e),
                         "robust_accuracy": float((r > e).mean()), "n": len(r)})
    return pd.DataFrame(rows)


def curve_disagreements(df: pd.DataFrame, tolerance_examples: int = 0) -> list[str]:
    """Every (model, ε) at which a fixed-ε battery's worst case is higher than the curve: examples it left
    robust that a point of another run (the minimum-norm attack) breaks within ε."""
    lines = []
    r = radii(df).set_index(["model", "dataset", "norm", "example_id"])["radius"]
    groups = df.groupby(["model", "dataset", "norm", df["eps"].map(eps_key)], sort=False)
    for (model, dataset, norm, eps), sub in groups:
        fixed = sub.groupby("example_id")["robust"].all()
        ids = fixed.index
        mine = r.loc[[(model, dataset, norm, i) for i in ids]].to_numpy()
        missed = int((fixed.to_numpy() & (mine <= eps)).sum())
        if missed > tolerance_examples:
            on_curve, here = float((mine > eps).mean()), float(fixed.mean())
            lines.append(f"DISAGREE {model} / {norm.upper()} ε={eps:.4g}: the curve gives {on_curve:.2%}, "
                         f"the records at this ε {here:.2%} — {missed} example(s) left robust here are "
                         "broken within ε by another run (its number at this ε is too high)")
    return lines
