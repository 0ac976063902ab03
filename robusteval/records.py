"""The per-example record: the one result format (ARCHITECTURE.md principle 7), defined in one place.

One row per model × attack × ε × example. Every table, worst case and figure is a group-by over these
rows (:mod:`robusteval.reports`), so a report can be redrawn without rerunning anything.

Columns (:data:`COLUMNS`)
-------------------------
identity   ``model`` (display name), ``checkpoint_sha256``, ``train_method`` / ``train_steps`` (from the
           checkpoint's training metadata when present — the "PGD steps" column of the LLR paper's
           Table F4), ``dataset``, ``example_id`` (index in the official split), ``label``
attack     ``attack`` (preset name), ``attack_config`` (the frozen :class:`attacks.Attack`'s field
           list, ARCHITECTURE.md principle 5), ``eps`` ([0, 1] pixel units), ``seed``, ``mode``
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
at most the batch in flight, and :func:`resume_key` rows already on disk are skipped by a rerun.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from robusteval.errors import UserError

COLUMNS: tuple[str, ...] = (
    "model", "checkpoint_sha256", "train_method", "train_steps", "dataset", "example_id", "label",
    "attack", "attack_config", "eps", "seed", "mode", "status",
    "clean_pred", "adv_pred", "clean_correct", "success", "robust",
    "margin", "objective", "linf", "restart", "steps", "target", "targeted_success", "seconds",
)  # fmt: skip
STRINGS = ("model", "checkpoint_sha256", "train_method", "dataset", "attack", "attack_config", "mode",
           "status")
INTS = ("example_id", "label", "seed", "clean_pred", "adv_pred", "restart", "steps", "target")
BOOLS = ("clean_correct", "success", "robust", "targeted_success")
FLOATS = ("eps", "margin", "objective", "linf", "seconds")
NULLABLE_INTS = ("train_steps",)
STATUSES = ("attacked", "clean-wrong", "skipped")
FILENAME = "records.csv"

#: The columns that identify a record; a rerun skips rows whose key is already on disk.
KEY = ("model", "attack", "eps", "example_id")


def eps_key(eps: float) -> float:
    """ε as used in keys: rounded so that CSV round-trips and 8/255 typed two ways compare equal."""
    return round(float(eps), 12)


def resume_key(row) -> tuple:
    """``(model, attack, ε, example id)`` of a record (dict or pandas row)."""
    return (str(row["model"]), str(row["attack"]), eps_key(row["eps"]), int(row["example_id"]))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return repr(value)  # exact round trip
    return str(value)


def append(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Append ``rows`` to the CSV at ``path`` (header written once), flush and fsync; return the count.

    A partial last line left by a process killed mid-write is cut off first, so the file always parses.
    """
    rows = list(rows)
    if not rows:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != COLUMNS:
            raise UserError(f"{path} has a different record schema; write to a fresh --out directory")
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        for row in rows:
            missing = set(COLUMNS) - set(row)
            if missing:
                raise ValueError(f"record is missing columns {sorted(missing)}")
            writer.writerow([_cell(row[c]) for c in COLUMNS])
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def _repair_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
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
    """Give a records frame the schema's dtypes (CSV reading loses them)."""
    df = df.copy()
    for c in STRINGS:
        df[c] = df[c].fillna("").astype(str)
    for c in INTS:
        df[c] = pd.to_numeric(df[c]).astype("int64")
    for c in NULLABLE_INTS:
        df[c] = pd.to_numeric(df[c]).astype("Int64")
    for c in FLOATS:
        df[c] = pd.to_numeric(df[c]).astype("float64")
    for c in BOOLS:
        df[c] = df[c].map(lambda v: v if isinstance(v, bool) else str(v).strip().lower() in ("true", "1"))
        df[c] = df[c].astype(bool)
    return df


def read(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Read one or more record files (a directory means its ``records.csv``) into one frame.

    A missing file is a :class:`UserError`; rows duplicated across files (same :data:`KEY`) keep the
    first occurrence.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            p = p / FILENAME
        if not p.is_file():
            raise UserError(f"records file not found: {p}")
        _repair_tail(p)
        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UserError(f"{p} is not a robusteval records file ({str(exc).splitlines()[0]})") from None
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise UserError(f"{p} is not a robusteval records file "
                            f"(missing columns: {', '.join(missing[:5])})")
        frames.append(coerce(df.replace("", None)[list(COLUMNS)]))
    df = pd.concat(frames, ignore_index=True) if frames else empty()
    df["_eps_key"] = df["eps"].map(eps_key)
    df = df.drop_duplicates(subset=["model", "attack", "_eps_key", "example_id"], keep="first")
    return df.drop(columns="_eps_key").reset_index(drop=True)


def read_if_exists(path: str | os.PathLike) -> pd.DataFrame:
    """:func:`read` for a file that may not exist yet (an empty frame then)."""
    path = Path(path)
    return read(path) if path.is_file() and path.stat().st_size > 0 else empty()
