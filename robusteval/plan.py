"""The plan of an evaluation: what a run will produce, written before any work (``OUT/plan.json``).

A plan holds the *frame* of a run directory — dataset and split, how many examples were selected, the
shard layout, the seed, and the ids and fingerprints of this writer's examples — and its *units*: one
per model × ε, each with the battery's attacks (name, configuration, mode, role: a member or the
black-box check) and the masking checks that must give a verdict. Every record and every verdict of the
directory must belong to a unit of its plan.

* **Resume is the difference between plan and records**: the runner attacks only what the plan lists
  and the records lack.
* **Completeness**: :func:`coverage` compares a plan with the records and verdicts on disk; a run killed
  between two battery members, or during the checks, reads as *incomplete* (``robusteval report`` exits
  with :data:`INCOMPLETE_EXIT`), never as a finished run with a missing column.
* **Never mixed**: a later invocation into the same directory may add units (models, radii, attacks,
  checks) but not change the frame or a planned attack's configuration (:func:`merge`); shards merge
  only when their plans agree on everything but the shard index (:func:`read_dir`); a record that is
  not in the plan is refused (:func:`check_records`).

The file is JSON, written atomically (:func:`robusteval.paths.atomic_write`), and read with full
validation: a damaged, truncated or hand-edited plan is a one-line :class:`UserError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from robusteval import rundir
from robusteval.errors import UserError
from robusteval.paths import atomic_write

FORMAT, VERSION = "robusteval-plan", 1
#: Exit status of a command whose run directory does not cover its plan (interrupted or partial).
INCOMPLETE_EXIT = 4
MAX_BYTES = 256 << 20  # a plan of a million examples is about 40 MB; anything far larger is not a plan
ROLES = ("member", "check")


def eps_key(eps: float) -> float:
    """ε as used in keys: rounded so that JSON and CSV round trips and 8/255 typed two ways compare equal."""
    return round(float(eps), 12)


@dataclass(frozen=True)
class PlannedAttack:
    name: str
    config: str
    mode: str
    role: str = "member"
    gradient: bool = True


@dataclass(frozen=True)
class Unit:
    """One model at one radius: the attacks to run (in battery order) and the checks to give verdicts."""

    model: str
    checkpoint_sha256: str
    eps: float
    attacks: tuple[PlannedAttack, ...]
    checks: tuple[str, ...] = ()
    norm: str = "linf"
    eot: int = 1  # EoT samples per evaluation in the attacks (randomised models; 1 otherwise)
    judge_draws: int = 1  # draws every point is judged over (randomised models; 1 otherwise)
    #: Where the model came from: its spec (a path, zoo:, robustbench:, timm:) and the loader's kind
    source: str = ""

    @property
    def key(self) -> tuple[str, float]:
        return self.model, eps_key(self.eps)

    def attack(self, name: str) -> PlannedAttack | None:
        return next((a for a in self.attacks if a.name == name), None)


@dataclass(frozen=True)
class Plan:
    dataset: str
    split: str
    selected: int  # examples selected before sharding (the first n)
    shard: tuple[int, int] | None
    seed: int
    data_key: str  # digest of dataset, split and the selected ids: equal for every shard of one run
    ids: tuple[int, ...]  # this writer's examples, dataset order
    example_sha: tuple[str, ...]
    units: tuple[Unit, ...] = ()
    norm: str = "linf"  # the threat model's norm: one per directory

    def unit(self, model: str, eps: float) -> Unit | None:
        return next((u for u in self.units if u.key == (model, eps_key(eps))), None)

    def frame(self) -> dict:
        """What every invocation into the directory, and every shard of it, must share."""
        return {"dataset": self.dataset, "split": self.split, "selected": self.selected, "seed": self.seed,
                "data_key": self.data_key, "norm": self.norm}


def data_key(dataset: str, split: str, selected_ids) -> str:
    text = f"{dataset}|{split}|" + ",".join(str(int(i)) for i in selected_ids)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ merging


def merge(old: Plan | None, new: Plan, where: Path | str = "the output directory") -> Plan:
    """``old`` extended by the units of ``new``: a later invocation into the same directory adds models,
    radii, attacks and checks. A different frame (data, seed, shard) or a planned attack with another
    configuration is a :class:`UserError` — the directory would otherwise mix two runs into one number."""
    if old is None:
        return new
    if old.norm != new.norm:
        raise UserError(f"{where} holds an evaluation in {old.norm.upper()}, not {new.norm.upper()}; use "
                        "another output directory per norm")
    if old.seed != new.seed:
        raise UserError(f"{where} was planned with seed {old.seed}, not {new.seed}; use a fresh output "
                        "directory for another seed, or the same options to resume")
    differ = [k for k, v in old.frame().items() if new.frame()[k] != v]
    if old.shard != new.shard or old.ids != new.ids:
        differ.append("examples")
    if not differ and old.example_sha != new.example_sha:
        i = next(i for i, (a, b) in enumerate(zip(old.example_sha, new.example_sha, strict=True)) if a != b)
        raise UserError(f"{where} already has records made on different data (example {old.ids[i]} is a "
                        "different image or label now); use a fresh output directory for this dataset")
    if differ:
        what = ", ".join(differ)
        raise UserError(f"{where} was planned for another selection ({what} differ: {_describe(old)} "
                        f"before, {_describe(new)} now); use a fresh output directory for a changed setup, "
                        "or the same options to resume")
    units = {u.key: u for u in old.units}
    for u in new.units:
        units[u.key] = _merge_unit(units.get(u.key), u, where)
    return replace(old, units=tuple(units.values()))


def _describe(p: Plan) -> str:
    part = f", shard {p.shard[0]}/{p.shard[1]}" if p.shard else ""
    return f"the first {p.selected} {p.dataset} {p.split} examples, seed {p.seed}{part}"


def _merge_unit(old: Unit | None, new: Unit, where) -> Unit:
    if old is None:
        return new
    if old.checkpoint_sha256 != new.checkpoint_sha256:
        raise UserError(f"{where} already has a model named {new.model!r} with another checkpoint "
                        f"({old.checkpoint_sha256[:12]} vs {new.checkpoint_sha256[:12]}); use a fresh output "
                        "directory or give the file another name")
    if (old.eot, old.judge_draws) != (new.eot, new.judge_draws):
        raise UserError(f"{where} already evaluated {new.model} at ε={new.eps:.6g} with {old.eot} EoT "
                        f"sample(s) judged over {old.judge_draws} draw(s), not {new.eot} and "
                        f"{new.judge_draws}; use a fresh output directory, or the same options to resume")
    planned = list(old.attacks)
    for a in new.attacks:
        before = old.attack(a.name)
        if before is None:
            planned.append(a)
        elif before != a:
            field = next(f for f in ("config", "mode", "role") if getattr(before, f) != getattr(a, f))
            raise UserError(f"{where} already has {new.model} / {a.name} / ε={new.eps:.6g} records with a "
                            f"different attack {field} ({getattr(before, field)[:80]!r} vs "
                            f"{getattr(a, field)[:80]!r}); use a fresh output directory to evaluate a "
                            "changed setup, or the same options to resume")
    checks = tuple(dict.fromkeys(old.checks + new.checks))
    return replace(old, attacks=tuple(planned), checks=checks)


# ----------------------------------------------------------------------------------- file format


def to_json(plan: Plan) -> str:
    data = {"format": FORMAT, "version": VERSION, **asdict(plan)}
    data["shard"] = list(plan.shard) if plan.shard else None
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def write(path: Path, plan: Plan) -> Path:
    """Write the plan atomically: a reader sees the previous plan or this one, never a torn file."""
    return atomic_write(path, to_json(plan))


def read(path: Path) -> Plan:
    """Read and validate a plan file; every defect is a one-line :class:`UserError` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"{path} is {size:,} bytes, too large to be a robusteval plan")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not a readable robusteval plan ({_first_line(exc)})") from None
    try:
        return _from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a valid robusteval plan ({_first_line(exc)}); it was damaged or "
                        "written by another program") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _typed(value, kind, what: str):
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{what} must be an integer")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value)):
        raise TypeError(f"{what} must be a finite number")
    if kind in (str, bool, list, dict) and not isinstance(value, kind):
        raise TypeError(f"{what} must be a {kind.__name__}")
    return value


def _from_dict(d: dict) -> Plan:
    _typed(d, dict, "the plan")
    if d.get("format") != FORMAT:
        raise ValueError("its format field is not robusteval-plan")
    if d.get("version") != VERSION:
        raise ValueError(f"version {d.get('version')!r}; this robusteval reads version {VERSION}")
    shard = d["shard"]
    if shard is not None:
        _typed(shard, list, "shard")
        if len(shard) != 2 or not all(isinstance(s, int) for s in shard) or not 0 <= shard[0] < shard[1]:
            raise ValueError("shard must be [I, N] with 0 ≤ I < N")
        shard = (shard[0], shard[1])
    ids = tuple(_typed(i, int, "an example id") for i in _typed(d["ids"], list, "ids"))
    shas = tuple(_typed(s, str, "an example fingerprint")
                 for s in _typed(d["example_sha"], list, "example_sha"))
    if len(ids) != len(shas) or len(set(ids)) != len(ids):
        raise ValueError("ids must be unique, one fingerprint per id")
    units = []
    for u in _typed(d["units"], list, "units"):
        _typed(u, dict, "a unit")
        planned = []
        for a in _typed(u["attacks"], list, "attacks"):
            _typed(a, dict, "an attack")
            if a["role"] not in ROLES:
                raise ValueError(f"unknown attack role {a['role']!r}")
            planned.append(PlannedAttack(_typed(a["name"], str, "name"), _typed(a["config"], str, "config"),
                                         _typed(a["mode"], str, "mode"), a["role"],
                                         _typed(a["gradient"], bool, "gradient")))
        eps = _typed(u["eps"], float, "eps")
        if not 0 <= eps or (eps > 1 and u["norm"] == "linf"):
            raise ValueError(f"eps {eps} outside [0, 1] (L∞) or negative")
        draws = (_typed(u["eot"], int, "eot"), _typed(u["judge_draws"], int, "judge_draws"))
        if min(draws) < 1:
            raise ValueError("eot and judge_draws must be ≥ 1")
        units.append(Unit(_typed(u["model"], str, "model"), _typed(u["checkpoint_sha256"], str, "sha256"),
                          float(eps), tuple(planned),
                          tuple(_typed(c, str, "a check") for c in _typed(u["checks"], list, "checks")),
                          _typed(u["norm"], str, "norm"), *draws, _typed(u.get("source", ""), str, "source")))
    seed = _typed(d["seed"], int, "seed")
    if not 0 <= seed < (1 << 63) or any(not -(1 << 63) <= i < (1 << 63) for i in ids):
        raise ValueError("a seed or an example id outside the 64-bit range")
    return Plan(_typed(d["dataset"], str, "dataset"), _typed(d["split"], str, "split"),
                _typed(d["selected"], int, "selected"), shard, seed,
                _typed(d["data_key"], str, "data_key"), ids, shas, tuple(units), _norm(d["norm"]))


def _norm(value) -> str:
    if value not in ("linf", "l2", "l1"):
        raise ValueError(f"unknown norm {value!r}")
    return value


def read_dir(directory: Path) -> list[Plan]:
    """The plans of a run directory (one, or one per shard; ``[]`` when it has none).

    Shards merge only when their plans agree on the frame and on every unit: plans of different runs
    (another ``n``, seed, ε, battery) are refused with the first difference, never merged into one table.
    """
    plans = [read(p) for p in rundir.files(Path(directory), rundir.PLAN)]
    for p in plans[1:]:
        first = plans[0]
        name = lambda q: f"shard {q.shard[0]}/{q.shard[1]}" if q.shard else "the unsplit run"
        differ = [k for k, v in first.frame().items() if p.frame()[k] != v]
        if not differ and {u.key: u for u in p.units} != {u.key: u for u in first.units}:
            keys_a, keys_b = {u.key for u in first.units}, {u.key for u in p.units}
            only = sorted(keys_a ^ keys_b)
            differ = [f"models/ε ({', '.join(f'{m} ε={e:g}' for m, e in only[:3])})" if only
                      else "attacks or checks"]
        if differ:
            raise UserError(f"{directory}: {name(p)} and {name(first)} were planned differently "
                            f"({', '.join(differ)} differ); shards of different runs are never merged — "
                            "rerun every shard with the same options")
    return plans


# ------------------------------------------------------------------------------- records vs plan


def check_records(plans: list[Plan], df: pd.DataFrame, where: str) -> None:
    """Every record must be in a plan: a planned unit and attack with the same checkpoint, configuration,
    mode and seed, on a planned example with the same fingerprint. Anything else is refused (records
    written by another run, or edited), naming the first offending line when the frame has one."""
    if df.empty or not plans:
        return
    attacks = {(u.model, eps_key(u.eps), a.name): (u.checkpoint_sha256, a.config, a.mode, p.seed)
               for p in plans for u in p.units for a in u.attacks}
    examples = {i: s for p in plans for i, s in zip(p.ids, p.example_sha, strict=True)}
    eps = df["eps"].map(eps_key)
    for key, sub in df.groupby([df["model"], eps, df["attack"]], sort=False):
        want = attacks.get(key)
        line = lambda rows: f" (line {int(rows['_line'].iloc[0])})" if "_line" in rows else ""
        if want is None:
            raise UserError(f"{where}: records of {key[0]} / {key[2]} / ε={key[1]:.6g}{line(sub)} are not in "
                            "the run's plan; they come from another run or were edited")
        for col, value in zip(("checkpoint_sha256", "attack_config", "mode", "seed"), want, strict=True):
            bad = sub[sub[col] != value]
            if len(bad):
                raise UserError(f"{where}: records of {key[0]} / {key[2]} / ε={key[1]:.6g}{line(bad)} have a "
                                f"{col.replace('_', ' ')} other than the plan's; they come from another run")
    known = df["example_id"].map(examples)
    bad = df[known.isna() | (known != df["example_sha"])]
    if len(bad):
        first = bad.iloc[:1]
        raise UserError(f"{where}: example {int(first['example_id'].iloc[0])}{line(first)} is not one of the "
                        "planned examples (or is another image); the records come from another run")


# ------------------------------------------------------------------------------------ coverage


@dataclass(frozen=True)
class Gap:
    """Something a plan promises that is not on disk yet."""

    model: str
    eps: float
    what: str  # an attack name, or "checks"
    done: int
    total: int

    def __str__(self) -> str:
        if self.what == "checks":
            left = self.total - self.done
            return f"{self.model} / ε={self.eps:.4g}: {left} of {self.total} checks without a verdict"
        return f"{self.model} / {self.what} / ε={self.eps:.4g}: {self.done} of {self.total} examples"


def coverage(plan: Plan, df: pd.DataFrame, verdicts) -> list[Gap]:
    """What one writer's plan promises and its records and verdicts do not hold yet (``[]``: complete).

    An attack is covered when it has a record for every planned example; a unit's checks when each
    planned check has a verdict for its model and ε. Shards are covered one by one (:func:`combine`)."""
    have = df.groupby([df["model"], df["eps"].map(eps_key), df["attack"]])["example_id"].nunique() \
        if len(df) else pd.Series(dtype=int)
    judged = {(v.model, v.check, eps_key(v.eps)) for v in verdicts}
    gaps = []
    for u in plan.units:
        for a in u.attacks:
            done = int(have.get((u.model, eps_key(u.eps), a.name), 0))
            if done < len(plan.ids):
                gaps.append(Gap(u.model, u.eps, a.name, done, len(plan.ids)))
        missing = [c for c in u.checks if (u.model, c, eps_key(u.eps)) not in judged]
        if missing:
            gaps.append(Gap(u.model, u.eps, "checks", len(u.checks) - len(missing), len(u.checks)))
    return gaps


def combine(per_writer: list[tuple[Plan, list[Gap]]]) -> list[Gap]:
    """The gaps of a whole directory from each writer's (shard's) gaps: counts summed over the shards."""
    out: dict[tuple, Gap] = {}
    for _, gaps in per_writer:
        for g in gaps:
            key = (g.model, eps_key(g.eps), g.what)
            prev = out.get(key)
            out[key] = g if prev is None else replace(prev, done=prev.done + g.done,
                                                      total=prev.total + g.total)
    # a shard without gaps still contributes its examples to the totals of the others' gaps
    for key, g in list(out.items()):
        extra = sum(len(p.ids) if g.what != "checks" else len(p.unit(g.model, g.eps).checks)
                    for p, gaps in per_writer
                    if not any((x.model, eps_key(x.eps), x.what) == key for x in gaps))
        out[key] = replace(g, done=g.done + extra, total=g.total + extra)
    return list(out.values())


def plans_for(path: Path) -> list[Plan]:
    """The plans that cover ``path``: every writer's for a run directory, the writer's own for one of its
    records files (``records.shard-1-of-2.csv`` → ``plan.shard-1-of-2.json``); ``[]`` without a plan."""
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        return read_dir(path)
    own = rundir.writer_of(path).plan
    return [read(own)] if own.is_file() else []
