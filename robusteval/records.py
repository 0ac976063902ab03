"""The per-example record: the one result format (docs/records.md), defined in one place.

One row per model × attack × ε × example. Every table, worst case and figure is a group-by over these
rows (:mod:`robusteval.reports`), so a report can be redrawn without rerunning anything.

Columns (:data:`COLUMNS`)
-------------------------
identity   ``model`` (display name), ``checkpoint_sha256``, ``train_method`` / ``train_steps`` (from the
           checkpoint's training metadata when present — the "PGD steps" column of the LLR paper's
           Table F4), ``dataset``, ``example_id`` (index in the official split), ``label``,
           ``example_sha`` (fingerprint of the example's pixels and label,
           :func:`robusteval.data.example_digest`: two runs agree on an example only if they saw the same
           image)
attack     ``attack`` (preset name), ``attack_config`` (the frozen :class:`attacks.Attack`'s field
           list, :meth:`attacks.Attack.config`), ``eps`` ([0, 1] pixel units), ``seed``, ``mode``
           (``skip``: battery on survivors; ``no-skip``: every attack on every clean-correct example)
outcome    ``status``: ``attacked``; ``clean-wrong`` (misclassified clean, never attacked, x_adv = x);
           ``skipped`` (skip mode: already broken by an earlier attack of the battery for this model and
           ε, not attacked again). ``clean_pred``, ``adv_pred`` (the verified point re-classified in eval
           mode; -1 when skipped), ``clean_correct``, ``success`` (this attack found a verified
           adversarial example; False when not attacked), ``robust`` (clean-correct AND the verified
           point is still classified as the label; False for clean-wrong and skipped rows)
details    ``margin`` (max_{j≠y} z_j − z_y at the verified point), ``objective`` (the attack's
           objective there), ``linf`` (‖δ‖∞), ``restart`` (run that won; -1: none), ``steps`` (gradient
           steps spent), ``target`` (-1 if untargeted), ``targeted_success`` (``adv_pred == target``),
           ``seconds`` (wall time of the example's batch divided by its size)

Files are appended one batch at a time (header once, flush + fsync per append), so a killed run loses
at most the batch in flight, and rows already on disk (same :data:`KEY`) are skipped by a rerun.

Readers never write. :func:`read` validates the header, every field's type, each row's internal
consistency (a robust row is clean-correct, attacked and re-classified as its label; a clean-wrong or
skipped row is never robust; the distance is inside the radius), the records against their run's plan
(:func:`robusteval.plan.check_records`) and the consistency of the files it is given
(:func:`check_compatible`), and names the file and line of the first problem in one
:class:`~robusteval.errors.UserError`. A torn last line (a run killed mid-write) is ignored by readers and
cut only by :func:`append`, after the header proved the file is a records file.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from robusteval import plan as plans
from robusteval import rundir
from robusteval.errors import UserError
from robusteval.paths import output_dir

COLUMNS: tuple[str, ...] = (
    "model", "checkpoint_sha256", "train_method", "train_steps", "dataset", "example_id", "label",
    "example_sha", "attack", "attack_config", "norm", "eps", "seed", "mode", "status",
    "clean_pred", "adv_pred", "clean_correct", "success", "robust",
    "margin", "objective", "distance", "restart", "steps", "target", "targeted_success", "seconds",
    "draws", "clean_share", "robust_share", "closeness",
)  # fmt: skip
STRINGS = ("model", "checkpoint_sha256", "train_method", "dataset", "example_sha", "attack", "attack_config",
           "norm", "mode", "status")
INTS = ("example_id", "label", "seed", "clean_pred", "adv_pred", "restart", "steps", "target", "draws")
BOOLS = ("clean_correct", "success", "robust", "targeted_success")
FLOATS = ("eps", "margin", "objective", "distance", "seconds", "clean_share", "robust_share", "closeness")
NULLABLE_INTS = ("train_steps",)
#: NaN for rows that were not attacked (closeness: for rows that were not scored)
NULLABLE_FLOATS = ("margin", "objective", "distance", "robust_share", "closeness")
STATUSES = ("attacked", "clean-wrong", "skipped", "gated")
#: ``+bf16``/``+fp16``: the attack's passes ran under autocast (points still verified in fp32).
MODES = ("skip", "no-skip", "skip+bf16", "no-skip+bf16", "skip+fp16", "no-skip+fp16")
FILENAME = rundir.filename(rundir.RECORDS)
#: The threat models' norms (``attacks.BALLS``); a directory holds one.
NORMS = ("linf", "l2", "l1")
#: Slack of the distance check on read, as in verification (float32 rounding of x + δ).
TOLERANCE = 1e-6

#: The columns that identify a record; a rerun skips rows whose key is already on disk.
KEY = ("model", "attack", "norm", "eps", "example_id")
#: What must be the same for records of one (model, attack, ε) to come from one run.
RUN_FIELDS = ("checkpoint_sha256", "attack_config", "seed", "mode")
_TRUE, _FALSE = ("True", "true", "1"), ("False", "false", "0")


@dataclass(frozen=True)
class Schema:
    """A per-example result format: its columns in order and each column's type."""

    kind: str  # for messages: "records", "γ records"
    columns: tuple[str, ...]
    strings: tuple[str, ...] = ()
    ints: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    bools: tuple[str, ...] = ()
    nullable_ints: tuple[str, ...] = ()
    nullable_floats: tuple[str, ...] = ()
    choices: dict = field(default_factory=dict)  # column -> allowed values


#: Attack records (``records.csv``), one row per model × attack × ε × example.
RECORDS = Schema("records", COLUMNS, STRINGS, INTS, FLOATS, BOOLS, NULLABLE_INTS, NULLABLE_FLOATS,
                 {"status": STATUSES, "mode": MODES, "norm": NORMS})
#: γ records (``gamma.csv``), one row per model × example: the same identity and prediction columns as
#: attack records, ε exactly (full precision) and as the user wrote it (``eps_text``), then γ's fields.
GAMMA_COLUMNS: tuple[str, ...] = (
    "model", "checkpoint_sha256", "dataset", "example_id", "label", "example_sha", "clean_pred",
    "clean_correct", "eps", "eps_text", "gamma", "sqrt_gamma", "lin_abs", "loss", "loss_adv", "steps",
    "step_size", "restarts", "bn", "grad_mode", "seed",
)  # fmt: skip
GAMMA = Schema(
    "γ records", GAMMA_COLUMNS,
    strings=("model", "checkpoint_sha256", "dataset", "example_sha", "eps_text", "step_size", "bn",
             "grad_mode"),
    ints=("example_id", "label", "clean_pred", "steps", "restarts", "seed"),
    floats=("eps", "gamma", "sqrt_gamma", "lin_abs", "loss", "loss_adv"), bools=("clean_correct",),
)  # fmt: skip
GAMMA_FILENAME = rundir.filename(rundir.GAMMA)
#: The columns that identify a γ record, and what must agree for a rerun to resume into it.
GAMMA_KEY = ("model", "example_id")
GAMMA_RUN_FIELDS = ("checkpoint_sha256", "dataset", "eps", "steps", "step_size", "restarts", "bn",
                    "grad_mode", "seed")
eps_key = plans.eps_key


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return repr(float(value))  # exact round trip (numpy floats too: no "np.float64(...)")
    return str(value)


def write_rows(f, rows: Iterable[dict], schema: Schema, header: bool = True) -> None:
    """CSV rows of ``schema`` (its header first if ``header``); floats exact; a missing column is an error."""
    writer = csv.writer(f)
    if header:
        writer.writerow(schema.columns)
    for row in rows:
        missing = set(schema.columns) - set(row)
        if missing:
            raise ValueError(f"{schema.kind[:-1]} is missing columns {sorted(missing)}")
        writer.writerow([_cell(row[c]) for c in schema.columns])


def _header(path: Path) -> tuple[str, ...] | None:
    """The first line of ``path`` as CSV fields (``None`` for an empty file or one that is not text)."""
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        return tuple(next(csv.reader([first.decode("utf-8").rstrip("\r\n")]), ()))
    except UnicodeDecodeError:
        return None


def check_appendable(path: str | os.PathLike, schema: Schema = RECORDS) -> None:
    """Raise a :class:`UserError` unless ``schema`` rows can be appended at ``path`` (before any work).

    The directory must be creatable and writable; an existing file must be a file of this schema and
    version (its header) and writable.
    """
    path = Path(path)
    output_dir(path.parent)
    if path.exists():
        if not path.is_file():
            raise UserError(f"{path} exists and is not a file")
        if path.stat().st_size and _header(path) != schema.columns:
            raise UserError(f"{path} is not a {schema.kind} file of this robusteval version (its header "
                            "differs); write to a fresh output directory")
        if not os.access(path, os.W_OK):
            raise UserError(f"cannot write to {path} (permission denied)")


def append(path: str | os.PathLike, rows: Iterable[dict], schema: Schema = RECORDS) -> int:
    """Append ``rows`` to the CSV at ``path`` (header written once), flush and fsync; return the count.

    Only a file whose header is this schema's is appended to; its partial last line, left by a process
    killed mid-write, is cut off first, so the file always parses.
    """
    rows = list(rows)
    if not rows:
        return 0
    path = Path(path)
    check_appendable(path, schema)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _repair_tail(path)
    with open(path, "a", newline="") as f:
        write_rows(f, rows, schema, header=new)
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def _repair_tail(path: Path) -> None:
    """Cut a partial last line; only ever called on a file whose header was checked (:func:`append`)."""
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def empty() -> pd.DataFrame:
    """An empty records frame with the schema's columns and dtypes."""
    return coerce(pd.DataFrame({c: [] for c in COLUMNS}))


def coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Give a records frame the schema's dtypes (frames built in memory; files go through :func:`read`)."""
    df = df.copy()
    for c in STRINGS:
        df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    for c in INTS:
        df[c] = pd.to_numeric(df[c]).astype("int64")
    for c in NULLABLE_INTS:
        df[c] = pd.to_numeric(df[c]).astype("Int64")
    for c in FLOATS:
        df[c] = pd.to_numeric(df[c]).astype("float64")
    for c in BOOLS:
        df[c] = df[c].map(lambda v: v if isinstance(v, bool) else str(v).strip() in _TRUE).astype(bool)
    return df


def _bad(path: Path, line: int, message: str) -> UserError:
    return UserError(f"{path}: line {line}: {message}")


def _parse_float(text: str) -> float | None:
    """Python's exact decimal-to-double conversion (``repr`` round-trips); ``None`` if not a number."""
    try:
        return float(text) if text != "" else math.nan
    except ValueError:
        return None


def _fits_int64(text: str) -> bool:
    try:
        return -(1 << 63) <= int(text) < (1 << 63)
    except ValueError:
        return False


def _validate(raw: pd.DataFrame, lines: list[int], path: Path, schema: Schema = RECORDS) -> pd.DataFrame:
    """Check every field's type (raising at the first bad one, with its line) and return typed columns.

    Floats are converted by Python's ``float`` (correctly rounded), never a faster approximate parser,
    so a value written with ``repr`` reads back bit for bit (``eps == 8/255`` holds) on any pandas.
    """

    def first_bad(mask, col: str, expected: str):
        mask = np.asarray(mask, dtype=bool)
        if bool(mask.any()):
            i = int(np.flatnonzero(mask)[0])
            raise _bad(path, lines[i], f"{col} is {raw[col].iloc[i]!r}, expected {expected}")

    out = pd.DataFrame(index=raw.index)
    for c in schema.strings:
        out[c] = raw[c].astype(str)
    for c, allowed in schema.choices.items():
        first_bad(~raw[c].isin(allowed), c, " or ".join(allowed))
    for c in schema.ints + schema.nullable_ints:
        ok = raw[c].str.fullmatch(r"-?\d{1,19}") & raw[c].map(_fits_int64)  # a 64-bit integer
        if c in schema.nullable_ints:
            ok |= raw[c] == ""
        first_bad(~ok, c, "an integer (64-bit)")
        nullable = c in schema.nullable_ints
        out[c] = pd.to_numeric(raw[c].replace("", None)).astype("Int64" if nullable else "int64")
    for c in schema.floats:
        parsed = [_parse_float(v) for v in raw[c]]
        empty_ok = c in schema.nullable_floats
        first_bad([v is None or (v != v and not empty_ok) for v in parsed], c, "a number")
        out[c] = np.array(parsed, dtype="float64") if parsed else np.array([], dtype="float64")
    if "eps" in schema.columns:
        wide = (out["norm"] != "linf") if "norm" in out.columns else False  # L2/L1 radii may exceed 1
        first_bad(~np.isfinite(out["eps"]) | (out["eps"] < 0) | ((out["eps"] > 1) & ~wide), "eps",
                  "a radius (in [0, 1] for L∞)")
    for c in schema.bools:
        first_bad(~raw[c].isin(_TRUE + _FALSE), c, "True or False")
        out[c] = raw[c].isin(_TRUE)
    rules = _record_rules(out) if schema is RECORDS else _gamma_rules(out) if schema is GAMMA else []
    for mask, why in rules:
        mask = np.asarray(mask, dtype=bool)
        if bool(mask.any()):
            raise _bad(path, lines[int(np.flatnonzero(mask)[0])], f"inconsistent record: {why}")
    return out[list(schema.columns)]


def _gamma_rules(df: pd.DataFrame) -> list:
    """A γ record: clean_correct is clean_pred == label; γ a finite non-negative number and √γ its root."""
    return [
        (df["clean_correct"] != (df["clean_pred"] == df["label"]), "clean_correct disagrees with clean_pred "
                                                                    "and label"),
        (~np.isfinite(df["gamma"]) | (df["gamma"] < 0), "gamma is not a finite non-negative number"),
        (~np.isclose(df["sqrt_gamma"], np.sqrt(df["gamma"].clip(lower=0)), rtol=1e-6, atol=1e-12),
         "sqrt_gamma is not the square root of gamma"),
    ]


def _slack(df: pd.DataFrame):
    """What a recorded distance may exceed ε by: one float32 rounding in L∞ (verification's slack); in L2
    and L1, whose distances sum the rounding of every coordinate (verification checked them against the
    image's own size), a thousandth of ε plus a thousandth."""
    return np.where(df["norm"] == "linf", TOLERANCE, 1e-3 * df["eps"] + 1e-3)


def _record_rules(df: pd.DataFrame) -> list:
    """Each record must be internally consistent: a number can only be inflated by a row that says
    ``robust`` for an example that was misclassified, skipped, or re-classified as another class."""
    attacked, wrong, skipped, gated = (df["status"] == s for s in STATUSES)
    single = df["draws"] == 1
    share = df["robust_share"]
    return [
        (gated & ~(df["clean_correct"] & df["robust"] & ~df["success"] & (df["adv_pred"] == df["label"])),
         "a gated row (a survivor that skipped this attack) is not a clean-correct, robust non-success"),
        (df["draws"] < 1, "draws is below 1"),
        ((df["clean_share"] < 0) | (df["clean_share"] > 1) | (share < 0) | (share > 1),
         "a share of draws outside [0, 1]"),
        (df["clean_correct"] != (df["clean_share"] == 1), "clean_correct disagrees with clean_share"),
        (df["robust"] & ~gated & ~(share == 1),
         "a robust row is not correct in every draw (robust_share < 1)"),
        (single & ~skipped & ~gated & (share != df["robust"].astype(float)),
         "robust_share disagrees with robust"),
        (df["clean_correct"] != (df["clean_pred"] == df["label"]), "clean_correct disagrees with clean_pred "
                                                                    "and label"),
        (wrong & (df["clean_correct"] | df["robust"] | df["success"]), "a clean-wrong row is clean-correct, "
                                                                        "robust or a success"),
        (skipped & ((single & ~df["clean_correct"]) | df["robust"] | df["success"]),
         "a skipped row is not clean-correct, or is robust or a success"),
        (attacked & single & ~df["clean_correct"], "an attacked row is not clean-correct"),
        (attacked & (df["clean_share"] == 0), "an attacked row was never classified correctly"),
        (wrong & (df["clean_share"] > 0), "a clean-wrong row is sometimes classified correctly"),
        (attacked & single & (df["robust"] != (df["adv_pred"] == df["label"])),
         "robust disagrees with adv_pred and label"),
        (attacked & df["robust"] & (df["adv_pred"] != df["label"]), "a robust row has another adv_pred"),
        (attacked & ~single & (df["robust"] != ((share == 1) & df["clean_correct"])),
         "robust is not 'correct in every draw, clean and adversarial'"),
        (attacked & (df["success"] == df["robust"]), "success and robust agree (one negates the other)"),
        (attacked & ~(df["distance"] <= df["eps"] + _slack(df)),
         "the point is outside the ε-ball (distance > eps)"),
    ]


def _read_one(path: Path, schema: Schema = RECORDS) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{schema.kind} file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a robusteval {schema.kind} file (not text)") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, None)
    except csv.Error as exc:
        raise UserError(f"{path} is not a robusteval {schema.kind} file ({exc})") from None
    if header is None or tuple(header) != schema.columns:
        raise UserError(f"{path} is not a robusteval {schema.kind} file (its first line is not the "
                        f"{schema.kind} header)")
    torn = not text.endswith("\n")
    last_line = text.count("\n") + 1
    body, lines, dropped = [], [], False
    try:
        for fields in rows:
            if not fields:
                continue
            if len(fields) != len(header):
                if torn and rows.line_num == last_line:
                    dropped = True
                    break  # the partial last line of a killed run: ignored here, cut by the next append
                raise _bad(path, rows.line_num, f"{len(fields)} fields, expected {len(header)}")
            body.append(fields)
            lines.append(rows.line_num)
    except csv.Error as exc:
        if not (torn and rows.line_num == last_line):
            raise _bad(path, rows.line_num, str(exc)) from None
        dropped = True  # an unterminated quote in the partial last line
    raw = pd.DataFrame(body, columns=header, dtype=str) if body else pd.DataFrame(columns=header, dtype=str)
    if torn and body and lines[-1] == last_line:
        try:  # a last line without its newline: keep it only if it is a complete, valid row
            _validate(raw.iloc[-1:], lines[-1:], path, schema)
        except UserError:
            raw, lines, dropped = raw.iloc[:-1], lines[:-1], True
    if dropped:
        warnings.warn(f"{path}: ignoring its incomplete last line {last_line} (a run killed mid-write; "
                      "resuming the run repairs the file)", RuntimeWarning, stacklevel=3)
    df = _validate(raw.reset_index(drop=True), lines, path, schema)
    df["_file"] = str(path)
    df["_line"] = lines
    return df


def _distinct(values) -> str:
    return ", ".join(sorted(map(str, set(values))))[:160]


def check_compatible(df: pd.DataFrame, merge_runs: bool = False) -> None:
    """Refuse records that would mix different runs into one number.

    Records of one (model, attack, ε) must share the checkpoint, attack configuration, seed and mode
    (:data:`RUN_FIELDS`), hold at most one row per example, and agree with every other record on each
    example's fingerprint. ``merge_runs=True`` accepts different runs of one model (each example then counts
    as robust only if it is robust in all of them), never different images under one example id.
    """
    if df.empty:
        return
    files = lambda sub: _distinct(sub["_file"]) if "_file" in sub else "the records"
    for col in ("example_sha",):
        known = df[df[col] != ""]
        n = known.groupby(["dataset", "example_id"])[col].nunique()
        if bool((n > 1).any()):
            dataset, example = n[n > 1].index[0]
            sub = known[(known["dataset"] == dataset) & (known["example_id"] == example)]
            raise UserError(f"{dataset} example {example} is a different image in {files(sub)}: these runs "
                            "used different data and cannot be combined")
    if merge_runs:
        return
    eps = df["eps"].map(eps_key)
    for key, sub in df.groupby([df["model"], df["attack"], eps, df["norm"]], sort=False):
        for col in RUN_FIELDS:
            if sub[col].nunique() > 1:
                raise UserError(
                    f"records of {key[0]} / {key[1]} / ε={key[2]:.6g} come from different runs: {col} "
                    f"differs ({_distinct(sub[col])}) in {files(sub)}; report them separately, or pass "
                    "`merge_runs` to count an example as robust only if it is robust in every run")
        dup = sub["example_id"].duplicated(keep=False)
        if bool(dup.any()):
            first = sub[dup].iloc[0]
            where = (f" ({first['_file']} line {first['_line']})" if "_file" in sub else "")
            raise UserError(f"{key[0]} / {key[1]} / ε={key[2]:.6g}: example {first['example_id']} has "
                            f"conflicting records{where}; pass `merge_runs` to take the worst case over them")


def _disambiguate(df: pd.DataFrame) -> pd.DataFrame:
    """Different checkpoints under one display name become ``name [sha256 prefix]`` (kept apart)."""
    shas = df.groupby("model")["checkpoint_sha256"].nunique()
    clash = set(shas[shas > 1].index)
    if clash:
        pick = df["model"].isin(clash)
        df.loc[pick, "model"] = df.loc[pick, "model"] + " [" + df.loc[pick, "checkpoint_sha256"].str[:8] + "]"
    return df


def files_in(directory: Path) -> list[Path]:
    """The records files of a run directory: ``records.csv`` or every shard's (a shard set must be
    complete, :func:`robusteval.rundir.files`); a directory without records means its ``records.csv``."""
    return rundir.files(Path(directory), rundir.RECORDS) or [Path(directory) / FILENAME]


def read(paths: str | os.PathLike | Sequence[str | os.PathLike], merge_runs: bool = False) -> pd.DataFrame:
    """Read one or more record files (a directory means its ``records.csv`` and its shard files,
    :func:`files_in`) into one frame.

    Never writes. Every file is validated (header, field types, row consistency; the first problem names
    the file and line), and so are the records of a run directory against its plan (records that are
    not in the plan, or shards of different plans, are refused: :mod:`robusteval.plan`); rows repeated
    exactly (the same file given twice) are kept once; different checkpoints with the same display name
    are kept apart (``name [sha prefix]``); records that would mix different runs are refused unless
    ``merge_runs`` (see :func:`check_compatible`).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames, seen = [], set()
    for given in paths:
        given = Path(given).expanduser()
        read_here = []
        for p in files_in(given) if given.is_dir() else [given]:
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            read_here.append(_read_one(p))
        if read_here:
            here = pd.concat(read_here, ignore_index=True)
            plans.check_records(plans.plans_for(given), here, str(given))
            frames.append(here)
    if not frames:
        return empty()
    df = pd.concat(frames, ignore_index=True)
    df = df.drop_duplicates(subset=list(COLUMNS), keep="first")
    df = _disambiguate(df)
    check_compatible(df, merge_runs=merge_runs)
    return df.drop(columns=["_file", "_line"]).reset_index(drop=True)


def read_gamma(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a ``gamma.csv`` (a directory means its ``gamma.csv``); never writes."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / GAMMA_FILENAME
    return _read_one(path, GAMMA).drop(columns=["_file", "_line"])


def read_if_exists(path: str | os.PathLike, schema: Schema = RECORDS) -> pd.DataFrame:
    """The rows of one file of ``schema`` that may not exist yet (an empty frame then)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        return _read_one(path, schema).drop(columns=["_file", "_line"])
    return empty() if schema is RECORDS else pd.DataFrame({c: [] for c in schema.columns})
