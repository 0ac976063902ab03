"""Progress on stderr: a rich bar on a terminal, plain periodic lines in a log file, nothing when off.

A rich bar redrawn in a file that is not a terminal is cut to ``500/…`` and ``ETA 0:00:…``; there,
:class:`PlainProgress` prints one complete line per task every :data:`INTERVAL` seconds and when the
task finishes. :func:`bar` is the one constructor every command and the runner use; both kinds offer
the subset of :class:`rich.progress.Progress` that robusteval uses (``add_task``, ``update``,
``advance``, ``remove_task``, context manager).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

#: Seconds between two plain progress lines of one task.
INTERVAL = 30.0


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    fields: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)
    finished: bool = False


class PlainProgress:
    """Periodic one-line progress reports on a stream (stderr by default)."""

    def __init__(self, stream=None, interval: float = INTERVAL):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.tasks: dict[int, _Task] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        key = len(self.tasks)
        self.tasks[key] = _Task(description, total, completed, dict(fields))
        return key

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, completed=None, advance=None, total=None, description=None, **fields):
        t = self.tasks.get(task)
        if t is None:
            return
        if completed is not None:
            t.completed = completed
        if advance is not None:
            t.completed += advance
        if total is not None:
            t.total = total
        if description is not None:
            t.description = description
        t.fields.update(fields)
        now = time.monotonic()
        done = t.total is not None and t.completed >= t.total
        if (done and not t.finished) or now - t.printed >= self.interval:
            t.finished, t.printed = done, now
            self._print(t, now)

    def _print(self, t: _Task, now: float) -> None:
        elapsed = now - t.started
        parts = [t.description]
        if t.total:
            parts.append(f"{t.completed:g}/{t.total:g}")
            if 0 < t.completed < t.total:
                parts.append(f"ETA {_clock(elapsed * (t.total - t.completed) / t.completed)}")
        else:
            parts.append(f"{t.completed:g}")
        parts += [str(v) if k == "info" else f"{k} {v}" for k, v in t.fields.items() if v not in ("", None)]
        parts.append(f"elapsed {_clock(elapsed)}")
        print("  ".join(parts), file=self.stream, flush=True)


def bar(enabled: bool = True, *, robust: bool = False, info: bool = False, transient: bool = False):
    """Progress on stderr: description, bar, done/total, elapsed, ETA, and the task's ``robust`` share so
    far (``robust=True``, the runner) or free ``info`` text (``info=True``, training). A rich bar on a
    terminal, :class:`PlainProgress` lines otherwise, nothing when not ``enabled``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, highlight=False)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("robust {task.fields[robust]}")] if robust else []
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    columns += [TextColumn("{task.fields[info]}")] if info else []
    if not enabled:
        return Progress(*columns, console=console, disable=True)
    if not console.is_terminal:
        return PlainProgress(stream=console.file)
    return Progress(*columns, console=console, transient=transient)
