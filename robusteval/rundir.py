"""The run directory: which file holds what (one set per shard), and one writer at a time.

::

    OUT/plan.json        what the run will produce, written before any work      (robusteval.plan)
    OUT/records.csv      one row per model × attack × ε × example, appended      (robusteval.records)
    OUT/alarms.csv       one verdict per model × ε × check, never erased          (robusteval.alarms)
    OUT/summary.csv|md   the table of everything in OUT, rewritten atomically    (robusteval.reports)
    OUT/gamma.csv        γ records of ``robusteval gamma``, appended              (robusteval.records)
    OUT/.lock            held by the one process writing OUT

A run split into N shards (``shard`` I/N, or N torchrun ranks) gives each shard its own set —
``plan.shard-I-of-N.json``, ``records.shard-I-of-N.csv``, ``alarms.shard-I-of-N.csv`` and its own lock —
so the shards never write the same file; readers merge a complete set of shards (:func:`files`) and
name a missing one. This module is the one place that knows these names.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from robusteval.errors import UserError
from robusteval.paths import output_dir

RECORDS, ALARMS, PLAN, GAMMA = ("records", ".csv"), ("alarms", ".csv"), ("plan", ".json"), ("gamma", ".csv")
_SHARD = re.compile(r"(?P<stem>[a-z]+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)(?P<suffix>\.[a-z]+)")


def filename(kind: tuple[str, str], shard: tuple[int, int] | None = None) -> str:
    """``records.csv``, or ``records.shard-I-of-N.csv`` for shard ``(I, N)`` (0-based)."""
    stem, suffix = kind
    return f"{stem}{suffix}" if shard is None else f"{stem}.shard-{shard[0]}-of-{shard[1]}{suffix}"


def writer_of(path: Path) -> RunDir:
    """The writer whose file ``path`` is: its directory and shard (``records.shard-1-of-2.csv`` → shard
    (1, 2); any other name → the unsplit writer)."""
    path = Path(path)
    m = _SHARD.fullmatch(path.name)
    return RunDir(path.parent, (int(m["i"]), int(m["n"])) if m else None)


def splits(directory: Path, kind: tuple[str, str]) -> dict[int, set[int]]:
    """The shard files of ``kind`` in ``directory``: shard count → the shard indices present."""
    found: dict[int, set[int]] = {}
    stem, suffix = kind
    for p in directory.glob(f"{stem}.shard-*-of-*{suffix}"):
        m = _SHARD.fullmatch(p.name)
        if m and m["stem"] == stem and m["suffix"] == suffix:
            found.setdefault(int(m["n"]), set()).add(int(m["i"]))
    return found


def files(directory: Path, kind: tuple[str, str], required: bool = True) -> list[Path]:
    """The files of ``kind`` in a run directory: the unsplit file and every shard's, in shard order.

    A shard set must be complete (0..N−1 of one N) and a directory holds one split only: a missing shard
    or two splits are a :class:`UserError` (a partial union would be a number over part of the data).
    With ``required=False`` a directory without the files gives ``[]``.
    """
    shards = splits(directory, kind)
    if len(shards) > 1:
        splits_ = ", ".join(f"of {n}" for n in sorted(shards))
        raise UserError(f"{directory} holds shards of different splits ({splits_}); use one output "
                        "directory per split")
    out = [directory / filename(kind)] if (directory / filename(kind)).is_file() else []
    for count, have in shards.items():
        missing = sorted(set(range(count)) - have)
        if missing and required:
            names = ", ".join(f"{i}/{count} ({filename(kind, (i, count))})" for i in missing)
            raise UserError(f"{directory}: shard(s) {names} missing; run them (`shard` I/N) before reporting")
        out += [directory / filename(kind, (i, count)) for i in sorted(have)]
    return out


@dataclass(frozen=True)
class RunDir:
    """The files of one writer (an unsplit run, or one shard) in the run directory ``root``."""

    root: Path
    shard: tuple[int, int] | None = None

    def path(self, kind: tuple[str, str]) -> Path:
        return self.root / filename(kind, self.shard)

    @property
    def records(self) -> Path:
        return self.path(RECORDS)

    @property
    def alarms(self) -> Path:
        return self.path(ALARMS)

    @property
    def plan(self) -> Path:
        return self.path(PLAN)

    @property
    def lock_file(self) -> Path:
        return self.root / (".lock" if self.shard is None else f".lock.shard-{self.shard[0]}-of-"
                                                                 f"{self.shard[1]}")

    def check_split(self) -> None:
        """Refuse to mix a split and an unsplit run (or two splits) in one directory: resuming reads only
        this writer's files, so the other files' examples would be evaluated again and count twice."""
        counts = set(splits(self.root, RECORDS)) | set(splits(self.root, PLAN))
        unsplit = any((self.root / filename(k)).is_file() for k in (RECORDS, PLAN))
        if self.shard is None and counts:
            raise UserError(f"{self.root} holds the records of a run split into {max(counts)} shards; finish "
                            "it with `shard` (or torchrun) or use another output directory")
        if self.shard is not None and (unsplit or counts - {self.shard[1]}):
            raise UserError(f"{self.root} already holds the records of a run not split into {self.shard[1]} "
                            "shards; use another output directory")

    @contextlib.contextmanager
    def writing(self):
        """Hold this writer's lock for the block: one process writes these files at a time.

        A second process is refused at once with one line naming the holder (waiting could leave a
        job queued for hours behind a run it duplicates). The lock is released when the block ends or
        the process dies, so a killed run never leaves the directory locked.
        """
        output_dir(self.root)
        with hold(self.lock_file, f"{self.root}" + ("" if self.shard is None else
                                                     f" (shard {self.shard[0]}/{self.shard[1]})")):
            self.check_split()
            yield self


@contextlib.contextmanager
def hold(lock_file: Path, what: str):
    """An exclusive advisory lock on ``lock_file`` (``flock``), or a :class:`UserError` naming its holder."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one writer is then the user's responsibility
        yield
        return
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot create the lock file {lock_file} ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"{what} is being written by another robusteval run ({holder}); wait for it to "
                            "finish, or use another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
