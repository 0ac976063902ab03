"""The HTML report: one self-contained page of a set of runs, to read in a browser and to share.

Everything on the page comes from the files the report reads (records, plans, alarms, γ records), through
the same functions as the terminal table: the robust-accuracy table with its Alarms and Status columns
and the note under it, every alarm with its remedy, the plan of each run and what of it is missing, each
model's identity, the cost of each attack, robust accuracy against ε where the records have several radii
or a minimum-norm attack, and √γ histograms where a directory has γ records. Figures are PNGs embedded as
``data:`` URIs and the style sheet is inline: the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import tempfile
from pathlib import Path

import pandas as pd

from robusteval import __version__, plan, records, reports, rundir

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#1b1f24;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
.meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:right}
th{background:#f6f8fa}td.key,th.key{text-align:left}
.verdict{padding:.7rem 1rem;border-radius:6px;margin:1rem 0;font-weight:600}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}.warn{background:#fff8c5;color:#7d4e00}
pre.note{white-space:pre-wrap;background:#f6f8fa;padding:.6rem;border-radius:6px;font-size:.85rem}
img{max-width:100%;border:1px solid #d0d7de;border-radius:6px}
code{font-size:.85rem}
"""


def render(paths, view, table: pd.DataFrame, note: str | None, title: str | None = None, gamma=()) -> str:
    """The page of the runs in ``paths`` (their :class:`robusteval.runs.View` and its table and note);
    ``gamma``: further directories of ``robusteval gamma`` runs."""
    paths = [Path(p) for p in paths]
    gamma = [Path(p) for p in gamma]
    df = view.records
    title = title or "Robust accuracy report"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class='meta'>robusteval {_e(__version__)} · written "
             f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · from "
             + ", ".join(f"<code>{_e(p)}</code>" for p in paths + gamma) + "</p>",
             _verdict(view),
             "<h2 id='robust-accuracy'>Robust accuracy</h2>", _table(table, keys=reports.row_keys(table)),
             f"<pre class='note'>{_e(note)}</pre>" if note else "",
             _alarms(view), _plans(paths, view), _models(df, paths), _cost(df), _curve(df),
             _gamma(paths + gamma)]
    body = "\n".join(p for p in parts if p)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_STYLE}</style>"
            f"</head><body>\n{body}\n</body></html>\n")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _verdict(view) -> str:
    if view.gaps:
        return (f"<div class='verdict warn'>INCOMPLETE: {len(view.gaps)} part(s) of the plan are missing; "
                "these numbers are not final.</div>")
    if view.alarms:
        models = sorted({a.model for a in view.alarms})
        return (f"<div class='verdict bad'>UNRELIABLE: {len(view.alarms)} alarm(s) on {_e(', '.join(models))}"
                " — see Alarms.</div>")
    if view.unplanned:
        return "<div class='verdict warn'>Some records have no plan beside them: completeness unknown.</div>"
    checked = "" if view.verdicts is not None else " (the masking checks did not run)"
    return f"<div class='verdict ok'>Complete, no alarm raised{_e(checked)}.</div>"


def _table(table: pd.DataFrame, keys=(), fmt=None) -> str:
    """An HTML table; a summary table's cells are formatted as in the terminal (percentages)."""
    if fmt is None and keys:
        headers, body = reports._text_rows(table)
    else:
        headers = list(table.columns)
        body = [[(fmt or str)(v) for v in r] for r in table.itertuples(index=False, name=None)]
    cls = lambda i: " class='key'" if i < len(keys) else ""
    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(headers))
    rows = "".join("<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _alarms(view) -> str:
    if view.verdicts is None:
        return "<h2 id='alarms'>Alarms</h2><p>The masking checks did not run for these records.</p>"
    raised = [a for a in view.verdicts if a.raised]
    if not raised:
        judged = sorted({v.check for v in view.verdicts})
        return (f"<h2 id='alarms'>Alarms</h2><p>None raised; {len(judged)} check(s) gave a verdict: "
                f"{_e(', '.join(judged))}.</p>")
    frame = pd.DataFrame([{"model": a.model, "ε": reports.format_eps(a.eps) if a.eps == a.eps else "–",
                           "check": a.check, "what was measured": a.detail, "remedy": a.remedy}
                          for a in raised]).drop_duplicates()
    return "<h2 id='alarms'>Alarms</h2>" + _table(frame, keys=tuple(frame.columns), fmt=str)


def _plans(paths, view) -> str:
    rows = []
    for path in paths:
        for p in plan.plans_for(path):
            for u in p.units:
                members = [a.name for a in u.attacks if a.role == "member"]
                checks = [a.name for a in u.attacks if a.role == "check"]
                rows.append({"run": str(path), "model": u.model, "norm": u.norm.upper(),
                             "ε": reports.format_eps(u.eps), "examples": len(p.ids),
                             "shard": f"{p.shard[0]}/{p.shard[1]}" if p.shard else "–",
                             "attacks": ", ".join(members)
                             + (f" (check: {', '.join(checks)})" if checks else ""),
                             "checks": len(u.checks)})
    out = ["<h2 id='plan'>Plan and completeness</h2>"]
    if rows:
        frame = pd.DataFrame(rows)
        out.append(_table(frame, keys=tuple(frame.columns), fmt=str))
    if view.gaps:
        out.append("<p>Missing:</p><ul>" + "".join(f"<li>{_e(g)}</li>" for g in view.gaps) + "</ul>")
    elif rows:
        out.append("<p>Every planned attack and check has its records and verdicts.</p>")
    if view.unplanned:
        out.append("<p>No plan beside: " + ", ".join(f"<code>{_e(p)}</code>" for p in view.unplanned)
                   + "</p>")
    return "\n".join(out)


def _models(df: pd.DataFrame, paths) -> str:
    sources = {u.model: u.source for path in paths for p in plan.plans_for(path) for u in p.units}
    cols = ["model", "checkpoint_sha256", "train_method", "dataset"]
    frame = df[cols].drop_duplicates().rename(columns={"checkpoint_sha256": "sha256",
                                                       "train_method": "training"})
    frame["source"] = frame["model"].map(lambda m: sources.get(m) or "–")
    frame["training"] = frame["training"].replace("", "–")
    return "<h2 id='models'>Models</h2>" + _table(frame, keys=tuple(frame.columns), fmt=str)


def _cost(df: pd.DataFrame) -> str:
    """Per model, ε and attack: examples attacked and gated, attack seconds, mean steps of the winning run."""
    keys = ["model", "eps", "attack"]
    attacked = df["status"] == "attacked"
    g = df.assign(attacked=attacked, gated=df["status"] == "gated",
                  secs=df["seconds"].where(attacked, 0.0), st=df["steps"].where(attacked))
    frame = g.groupby(keys, sort=False).agg(attacked=("attacked", "sum"), gated=("gated", "sum"),
                                            seconds=("secs", "sum"), steps=("st", "mean")).reset_index()
    frame["s / attacked"] = frame["seconds"] / frame["attacked"].where(frame["attacked"] > 0)
    frame["eps"] = frame["eps"].map(reports.format_eps)
    frame = frame.rename(columns={"eps": "ε", "steps": "mean steps"})
    num = lambda v: "–" if v != v else f"{v:.2f}" if isinstance(v, float) else str(v)
    return ("<h2 id='cost'>Cost per attack</h2><p>Wall seconds spent attacking (the records' per-example "
            "batch time, summed), and the mean steps of the run each attacked example ended with.</p>"
            + _table(frame, keys=("model", "ε", "attack"), fmt=num))


def _png(draw) -> str:
    """``draw(path)`` writes a PNG; returns it as an ``<img>`` with a data: URI."""
    with tempfile.TemporaryDirectory() as tmp:
        path = draw(Path(tmp) / "figure.png")
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='figure' src='data:image/png;base64,{data}'>"


def _curve(df: pd.DataFrame) -> str:
    several = df.groupby(["model", "norm"])["eps"].nunique().max() > 1
    if not (several or df["attack_config"].astype(str).str.contains("MinDistance", regex=False).any()):
        return ""
    from robusteval.figures import curve_figure

    table = reports.curve(df)
    lines = reports.curve_disagreements(df)
    img = _png(lambda p: curve_figure(table, p, title="robust accuracy against ε"))
    notes = "".join(f"<li>{_e(line)}</li>" for line in lines)
    return ("<h2 id='curve'>Robust accuracy against ε</h2><p>Each example's radius is the smallest distance "
            "of any verified adversarial point in the records; the curve is the share of examples whose "
            "radius exceeds ε.</p>" + img + (f"<ul>{notes}</ul>" if notes else ""))


def _gamma(paths) -> str:
    frames = []
    for path in paths:
        where = path if path.is_dir() else path.parent
        file = where / rundir.filename(rundir.GAMMA)
        if file.is_file():
            frames.append(records.read_gamma(file))
    if not frames:
        return ""
    from robusteval.figures import gamma_histogram

    g = pd.concat(frames, ignore_index=True)
    parts = ["<h2 id='gamma'>Local linearity √γ</h2>"]
    for eps, sub in g.groupby("eps", sort=True):
        parts.append(_png(lambda p, sub=sub, eps=eps: (gamma_histogram(sub, p, title=f"√γ at ε = "
                                                                       f"{reports.format_eps(eps)}"), p)[1]))
        stats = sub.groupby("model")["sqrt_gamma"].describe()[["count", "mean", "50%", "max"]].reset_index()
        parts.append(_table(stats.rename(columns={"50%": "median"}), keys=("model",),
                            fmt=lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)))
    return "\n".join(parts)
