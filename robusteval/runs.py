"""Run directories read as a whole: records, verdicts and what of the plan is still missing.

:func:`read` is what ``robusteval report`` and ``robusteval attack`` show: the records of the given
files and directories (validated, and checked against their plans), the verdicts of the masking checks
beside them, and the gaps between each writer's plan and what is on disk (:func:`robusteval.plan.
coverage`, shard by shard). Never writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from robusteval import alarms, plan, records, rundir


@dataclass
class View:
    """``verdicts`` is ``None`` when no directory has an alarms file (the checks never ran there);
    ``unplanned`` lists the paths without a plan (their completeness cannot be judged)."""

    records: pd.DataFrame
    verdicts: list | None
    gaps: list = field(default_factory=list)
    unplanned: list = field(default_factory=list)
    planned: set = field(default_factory=set)  # (model, ε key) of every planned unit

    @property
    def complete(self) -> bool:
        return not self.gaps

    @property
    def alarms(self) -> list:
        return alarms.alarms_of(self.verdicts or [])


def _writers(path: Path) -> list[tuple[plan.Plan, rundir.RunDir]]:
    """The planned writers behind ``path``: every writer of a directory, or the writer of one file."""
    if path.is_dir():
        return [(p, rundir.RunDir(path, p.shard)) for p in plan.read_dir(path)]
    writer = rundir.writer_of(path)
    return [(plan.read(writer.plan), writer)] if writer.plan.is_file() else []


def read(paths, merge_runs: bool = False) -> View:
    """The records of ``paths`` (files or run directories) with their verdicts and gaps."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    paths = [Path(os.fspath(p)).expanduser() for p in paths]
    df = records.read(paths, merge_runs=merge_runs)
    verdicts, gaps, unplanned, checked, planned = [], [], [], False, set()
    for path in paths:
        if path.is_dir():
            if alarms.exists(path):
                checked, verdicts = True, alarms.merge(verdicts, alarms.read(path))
        elif rundir.writer_of(path).alarms.is_file():
            checked = True
            verdicts = alarms.merge(verdicts, alarms.read_file(rundir.writer_of(path).alarms))
        per_writer = []
        for p, writer in _writers(path):
            planned |= {u.key for u in p.units}
            mine = records.read_if_exists(writer.records)
            judged = alarms.read_file(writer.alarms) if writer.alarms.is_file() else []
            per_writer.append((p, plan.coverage(p, mine, judged)))
        if per_writer:
            gaps += plan.combine(per_writer)
        else:
            unplanned.append(path)
    return View(df, verdicts if checked else None, gaps, unplanned, planned)
