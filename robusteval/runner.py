"""The evaluation runner: models × attacks × ε on a dataset → verified per-example records.

:func:`evaluate` implements the evaluation protocol of the LLR paper's robustness tables (Qin et al.
2019, Tables 1-3 and supplementary F3/F4) with AutoAttack's semantics (ARCHITECTURE.md):

* **clean pass first**, in eval mode; a clean-misclassified example is never attacked (``clean-wrong``);
* **battery on survivors** (default, ``no_skip=False``): for each model and ε the attacks run in the
  given order and each one only on the examples no earlier attack has broken; the others get a
  ``skipped`` record (robust = False). A per-attack column is then *cumulative*: the accuracy against
  that attack and every one before it, and the last column equals the worst case.
  ``no_skip=True`` runs every attack on every clean-correct example, so each per-attack column is that
  attack alone (as in the paper's tables) and the worst case is ``robust.all()`` per example;
* **verification**: every adversarial point is checked before it is recorded — ‖δ‖∞ ≤ ε + 1e-6, inside
  [0, 1], finite — and re-classified by the model in eval mode in a separate forward pass; ``robust``
  comes from that re-classification. A violation raises :class:`VerificationError` (a bug, never
  clipped away);
* **the model is left as found**: eval mode for the run, every module's training flag restored after
  (``try/finally``); the engine never touches parameters, buffers or ``.grad``;
* **resume**: records are appended to ``out/records.csv`` after every batch; a rerun with the same
  ``out`` skips the (model, attack, ε, example) rows already there;
* **reproducible**: every random choice comes from a generator seeded per (seed, example id, run)
  inside :func:`attacks.run` (ALGORITHMS.md decision 6), so batch size and resume do not change it.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import attacks
from robusteval import alarms, records
from robusteval import checks as fit_checks
from robusteval.data import Dataset, load_dataset
from robusteval.errors import UserError
from robusteval.models.checkpoints import LoadedModel, load_model
from robusteval.runtime import device_of, eval_mode, resolve_device

TOLERANCE = 1e-6  # ‖δ‖∞ slack for float32 rounding in x + δ (ALGORITHMS.md decision 3)
_STEP_KEYS = ("inner_steps", "steps", "attack_steps", "pgd_steps")  # the trainer's TrainConfig uses `steps`


class VerificationError(RuntimeError):
    """An attack returned a point outside the threat set: a bug in the attack, never the user's fault."""


@dataclass
class ModelEntry:
    """A model under evaluation with what its records need to identify it."""

    name: str
    model: nn.Module
    sha256: str
    meta: dict
    #: What the attacks differentiate (the BPDA version with ``bpda=True``); ``None``: :attr:`model`.
    #: Every point is verified on :attr:`model`.
    attack_model: nn.Module | None = None

    @property
    def attacked(self) -> nn.Module:
        return self.attack_model if self.attack_model is not None else self.model

    @property
    def train_method(self) -> str:
        return str((self.meta.get("training") or {}).get("method") or "")

    @property
    def train_steps(self) -> int | None:
        """Inner attack steps used in training (the "PGD steps" of Table F4); 0 for nominal training."""
        training = self.meta.get("training") or {}
        if self.train_method == "nominal":
            return 0  # no inner maximisation, whatever the config's unused `steps` says
        for key in _STEP_KEYS:
            if isinstance(training.get(key), int):
                return int(training[key])
        return None


def _adds_check(names: Sequence, checks: bool) -> bool:
    """Whether the checks append Square to the battery (they do unless it is already in it)."""
    return checks and not any(str(getattr(n, "name", n)).lower() == "square" for n in names)


def build_attacks(names: Sequence, eps: float, checks: bool = False, queries: int | None = None,
                  **overrides) -> list[attacks.Attack]:
    """Presets by name (or ready :class:`attacks.Attack` objects) at radius ``eps``, with overrides.

    ``overrides``: ``steps``, ``restarts``, ``step_size``, ``relative_step`` (``None`` = preset value)
    apply to the gradient attacks; ``queries`` is the budget of the gradient-free ones (Square). With
    ``checks``, Square (:data:`alarms.CHECK_QUERIES` queries unless ``queries``) ends the battery when
    it is not in it already: the black-box check of :mod:`robusteval.alarms`, part of the worst case.
    An unknown name is a :class:`UserError`.
    """
    from robusteval import alarms

    overrides = {k: v for k, v in overrides.items() if v is not None}
    names = attacks.expand(names)  # a battery name (standard, paper) stands for its members
    if _adds_check(names, checks):
        names.append(attacks.get("square", eps, queries=queries or alarms.CHECK_QUERIES))
    built, seen = [], set()
    for item in names:
        if isinstance(item, attacks.Attack):
            atk = item.replace(eps=eps)
        else:
            try:
                preset = attacks.get(str(item), eps)
                gradient_free = {"queries": queries} if queries else {}
                changes = overrides if preset.optimizer.uses_gradient else gradient_free
                atk = attacks.get(str(item), eps, **changes)
            except KeyError as exc:
                raise UserError(exc.args[0]) from None
            except ValueError as exc:
                raise UserError(f"attack {item!r}: {exc}") from None
        if atk.steps < 1 and atk.optimizer.uses_gradient:
            raise UserError(f"attack {atk.name!r} has {atk.steps} steps: it would not attack at all and "
                            "report clean accuracy as robust accuracy; use at least 1 step")
        if atk.goal != "misclassify":
            raise UserError(f"{atk.name!r} maximises an objective without a notion of success; "
                            "it cannot give robust accuracy (use `robusteval gamma` for local linearity)")
        if atk.name in seen:
            continue
        seen.add(atk.name)
        built.append(atk)
    if not built:
        raise UserError("no attack given")
    return built


#: ε below one grey level of 8-bit images is almost always a units mistake.
SMALLEST_EPS = 1 / 255


def warn_small_eps(eps_list: Sequence[float]) -> None:
    """Warn (one line each) about ε = 0 and ε below the data's quantisation step 1/255."""
    for e in eps_list:
        if e == 0:
            warnings.warn("ε = 0: no attack can change an input, robust accuracy will equal clean accuracy",
                          UserWarning, stacklevel=3)
        elif e < SMALLEST_EPS * (1 - 1e-9):
            warnings.warn(f"ε = {e:.6g} is below one grey level of 8-bit images (1/255 ≈ 0.00392); ε is in "
                          "[0, 1] pixel units — was it divided by 255 twice?", UserWarning, stacklevel=3)


def load_entries(models, arch: str | None = None, device: str = "cpu") -> list[ModelEntry]:
    """Models to evaluate: specs (paths, ``zoo:NAME``) are loaded; names are made unique."""
    out = []
    for item in models:
        if isinstance(item, ModelEntry):
            out.append(item)
        elif isinstance(item, LoadedModel):
            out.append(ModelEntry(item.name, item.model, item.sha256, item.meta))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], nn.Module):
            out.append(ModelEntry(str(item[0]), item[1], "", {}))
        else:
            loaded = load_model(item, arch=arch, device=device)
            entry = ModelEntry(loaded.name, loaded.model, loaded.sha256, loaded.meta)
            entry.meta["spec"] = os.fspath(item)
            out.append(entry)
    names = [e.name for e in out]
    for e in out:  # two files with the same stem: fall back to the spec the user typed
        if names.count(e.name) > 1:
            e.name = str(e.meta.get("spec", e.name))
    if len({e.name for e in out}) != len(out):
        raise UserError(f"the same model is given twice: {', '.join(names)}")
    return out


def _forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, ids, name: str,
             what: str) -> torch.Tensor:
    with torch.no_grad():
        z = model(x)
    fit_checks.check_outputs(name, z, x, y, ids, what)
    return z


def fingerprints(ds: Dataset, batch_size: int = 512) -> list[str]:
    """:func:`records.example_digest` of every example of ``ds`` (dataset order)."""
    out = []
    for x, y, _ in ds.batches(batch_size):
        out += [records.example_digest(xi.numpy(), int(yi)) for xi, yi in zip(x, y, strict=True)]
    return out


def check_model(entry: ModelEntry, ds: Dataset, eps_list: Sequence[float], batch_size: int, device,
                seed: int = 0) -> torch.Tensor:
    """Check a model against the data before any attack; return its clean predictions (dataset order).

    Input shape (when the checkpoint states it), logits of the right shape and number of classes, finite
    logits on the clean inputs and at a random point of each clean-correct example's ball for every ε.
    Every failure is a one-line :class:`UserError` naming the model (and the first bad example).
    """
    fit_checks.check_input_shape(entry.name, entry.meta, ds.input_shape)
    preds = []
    for x, y, ids in ds.batches(batch_size):
        x, y = x.to(device), y.to(device)
        try:
            z = _forward(entry.model, x, y, ids, entry.name, "the clean inputs")
            right = (z.argmax(1) == y).cpu()
            for e in eps_list:
                fit_checks.probe_ball(entry.model, entry.name, x[right.to(x.device)], y[right.to(y.device)],
                                  ids[right], e, seed)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # shape errors from inside the network: the model does not fit the data
            raise UserError(f"model {entry.name!r} cannot process {ds.name} images of shape "
                            f"{tuple(ds.input_shape)} ({str(exc).splitlines()[0][:160]})") from None
        preds.append(z.argmax(1).cpu())
    return torch.cat(preds)


def verify(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, threat: attacks.LinfBall | float,
           name: str = "model", ids=None) -> torch.Tensor:
    """Check adversarial points and return the model's logits on them (eval mode, separate forward).

    Feasibility is the threat model's (:meth:`attacks.LinfBall.contains`, slack :data:`TOLERANCE`; a
    number means the ε-ball in [0, 1]). Raises :class:`VerificationError` if any point is non-finite,
    outside the box or the ball — attacks must return feasible points; clipping here would hide the bug.
    """
    threat = threat if isinstance(threat, attacks.LinfBall) else attacks.LinfBall(float(threat))
    bad = ~threat.contains(x_adv, x, tol=TOLERANCE)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        flat, dist = x_adv.flatten(1), threat.distance(x_adv, x)
        raise VerificationError(
            f"attack returned an infeasible point for {name}: ‖δ‖∞ = {float(dist[i]):.6g} "
            f"(ε = {threat.eps:.6g}), range [{float(flat[i].min()):.4g}, {float(flat[i].max()):.4g}] "
            f"({int(bad.sum())} of {len(x)} points bad)")
    if any(m.training for m in model.modules()):
        raise VerificationError("the model must be in eval mode for verification")
    return _forward(model, x_adv, None, ids if ids is not None else torch.arange(len(x_adv)), name,
                    "the adversarial points")


class _Progress:
    """A rich progress bar on stderr: one task per (model, ε, attack) with done, robust so far and ETA."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from robusteval import progress

            self.bar = progress.make(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("robust {task.fields[robust]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(),
            )  # fmt: skip

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def task(self, description: str, total: int):
        return self.bar.add_task(description, total=total, robust="-") if self.bar else None

    def update(self, task, done: int, robust: int, description: str | None = None):
        if self.bar is not None:
            text = f"{robust / done:.1%}" if done else "-"
            extra = {"description": description} if description else {}
            self.bar.update(task, completed=done, robust=text, **extra)


def _check_consistent(done: pd.DataFrame, entry: ModelEntry, atk: attacks.Attack, seed: int, mode: str,
                      dataset: str, digests: dict[int, str], path: Path) -> None:
    """Refuse to resume into records made with a different checkpoint, configuration, seed, mode or data."""
    expect = {"checkpoint_sha256": entry.sha256, "attack_config": atk.config(), "seed": seed, "mode": mode,
              "dataset": dataset}
    for col, value in expect.items():
        found = set(done[col].unique())
        if found != {value}:
            raise UserError(
                f"{path} already has {entry.name} / {atk.name} / ε={atk.eps:.6g} records with a different "
                f"{col.replace('_', ' ')} ({', '.join(sorted(map(str, found)))[:80]}); use a fresh output "
                "directory to evaluate a changed setup, or the same options to resume")
    differ = done[[digests.get(int(i)) != sha for i, sha in zip(done["example_id"], done["example_sha"],
                                                                  strict=True)]]
    if len(differ):
        raise UserError(
            f"{path} already has {entry.name} / {atk.name} / ε={atk.eps:.6g} records made on different data "
            f"(example {int(differ['example_id'].iloc[0])} is a different image or label now); use a fresh "
            "output directory for this dataset")


def evaluate(
    models: Sequence,
    attack_names: Sequence,
    eps: float | Sequence[float],
    dataset: Dataset | str,
    n: int | None = None,
    batch_size: int = 128,
    device: str = "auto",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    no_skip: bool = False,
    progress: bool = True,
    *,
    steps: int | None = None,
    restarts: int | None = None,
    step_size: float | None = None,
    relative_step: bool | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    arch: str | None = None,
    checks: bool = True,
    queries: int | None = None,
    bpda: bool = False,
    precision: str = "fp32",
    compile: bool = False,
    shard: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Evaluate ``models`` under the attack battery ``attack_names`` at each ``eps``; return the records.

    ``models``: checkpoint paths / ``zoo:NAME`` specs (loaded with ``arch`` on ``device``),
    :class:`~robusteval.models.LoadedModel`\\ s, or ``(name, nn.Module)`` pairs (used on their own device).
    ``attack_names``: preset names (``untargeted``, ``multi-targeted``, ...) or :class:`attacks.Attack`
    objects, in battery order; ``steps``/``restarts``/``step_size``/``relative_step`` override the presets.
    ``dataset``: a :class:`~robusteval.data.Dataset` or a name for :func:`~robusteval.data.load_dataset`;
    the first ``n`` examples are used (all when ``None``). ``device``: ``auto``, ``cpu`` or ``cuda``.
    ``out``: directory for ``records.csv`` (appended per batch; a rerun resumes); ``None`` keeps the
    records in memory only. ``checks`` runs the masking alarms of :mod:`robusteval.alarms` (Square ends
    the battery as the black-box check; ``queries`` sets Square's budget); the alarms are written to
    ``out/alarms.csv`` and returned in ``records.attrs["alarms"]``. ``bpda`` attacks each model through
    :func:`robusteval.bpda.straight_through` (its name gets ``+bpda``; points are verified on the
    original model). ``precision`` (``fp32``, ``bf16``, ``fp16``) runs the attacks' passes under autocast;
    the clean pass, every success decision and the verification stay fp32 on the original model.
    ``compile`` attacks through ``torch.compile`` of the model (points are verified on the model itself).
    ``shard=(i, n)`` evaluates only shard ``i`` of ``n`` (0-based): the examples at positions ``i, i + n,
    i + 2n, ...`` of the (first ``n``) examples — interleaved, so every shard gets a like share of
    robust and easy examples — into ``out/records.shard-i-of-n.csv`` (and its own alarms file); the
    union of all shards' records is what one process would have written. Returns the records of this
    evaluation (resumed rows included), in the schema of :mod:`robusteval.records`. Protocol: see the
    module docstring.
    """
    eps_list = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
    if not eps_list or any(not math.isfinite(e) or e < 0 or e > 1 for e in eps_list):
        raise UserError(f"ε must be in [0, 1] pixel units, got {eps_list}")
    unique: dict[float, float] = {}
    for e in eps_list:  # a radius given twice runs once
        unique.setdefault(records.eps_key(e), e)
    eps_list = list(unique.values())
    warn_small_eps(eps_list)
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    overrides = dict(steps=steps, restarts=restarts, step_size=step_size, relative_step=relative_step,
                     checks=checks, queries=queries)
    build_attacks(attack_names, eps_list[0], **overrides)  # fail fast on a bad name before loading
    auto_check = _adds_check(attack_names, checks)
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise UserError(f"shard {shard[0]}/{shard[1]}: the index must be in 0..{shard[1] - 1}")
    name = records.shard_filename(*shard) if shard else records.FILENAME
    path = Path(out) / name if out is not None else None
    if path is not None:
        records.check_split(path.parent, shard)
        records.check_appendable(path)  # an unwritable output fails before any work
    device = resolve_device(device)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, data_dir=data_dir, download=download, n=n)
    if n is not None:
        if n < 1 or n > len(dataset):
            raise UserError(f"n = {n} but {dataset.name} has {len(dataset)} examples here")
        dataset = dataset.subset(slice(0, n))
    if len(dataset) == 0:
        raise UserError("the dataset is empty")
    if shard is not None:
        if shard[1] > len(dataset):
            raise UserError(f"{shard[1]} shards (or processes) but only {len(dataset)} examples: use at most "
                            f"{len(dataset)}")
        dataset = dataset.subset(torch.arange(shard[0], len(dataset), shard[1]))
    entries = load_entries(models, arch, device)
    if precision not in attacks.engine.PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(attacks.engine.PRECISIONS)}, got {precision!r}")
    suffix = "" if precision == "fp32" else f"+{precision}"
    mode = ("no-skip" if no_skip else "skip") + suffix
    existing = records.read_if_exists(path) if path is not None else records.empty()
    existing["_key"] = list(zip(existing["model"], existing["attack"], existing["eps"].map(records.eps_key),
                                existing["example_id"], strict=True))
    digests = fingerprints(dataset)
    clean, found = {}, []
    for entry in entries:  # every model is checked against the data before any attack runs
        dev = device_of(entry.model, device)
        with eval_mode(entry.model):
            pred = check_model(entry, dataset, eps_list, batch_size, dev, seed)
            if bpda:
                _use_bpda(entry, dataset, batch_size, dev)  # renames the entry
            if compile:
                entry.attack_model = torch.compile(entry.attacked)
            clean[entry.name] = pred
            if checks:
                found += _pre_checks(entry, dataset, clean[entry.name], max(eps_list), seed, dev)
    collected: list[dict] = []

    with _Progress(progress) as bar:
        for entry in entries:
            dev = device_of(entry.model, device)
            with eval_mode(entry.model):
                clean_pred = clean[entry.name]
                worst = {}
                for e in eps_list:
                    alive = clean_pred == dataset.labels.long()  # survivors of the battery so far
                    white, black = alive.clone(), None
                    battery = build_attacks(attack_names, e, **_check_budget(overrides, entry, found))
                    for atk in battery:
                        # the check (Square added to the battery) always runs on the survivors only
                        check = auto_check and atk is battery[-1]
                        job = _Job(entry, atk, dataset, clean_pred, digests, seed,
                                   "skip" + suffix if check else mode, path, bar, precision)
                        robust = job.run(existing, alive if not no_skip or check else None, batch_size, dev)
                        collected.extend(job.rows)
                        alive &= robust
                        if atk.optimizer.uses_gradient:
                            white &= robust
                        else:
                            black = robust if black is None else black & robust
                    worst[e] = float(alive.float().mean())
                    if checks and black is not None:
                        ids = dataset.ids.tolist()
                        white_s, black_s = pd.Series(white.tolist(), ids), pd.Series(black.tolist(), ids)
                        alarm = alarms.black_box_alarm(entry.name, entry.sha256, e, white_s, black_s)
                        found += [alarm] if alarm else []
                if checks:
                    found += _post_checks(entry, dataset, clean_pred, worst, seed, dev)
    if path is not None and checks:
        alarm_path = path.parent / (alarms.shard_filename(*shard) if shard else alarms.FILENAME)
        keep = [a for a in alarms.read(alarm_path) if a.model not in {e.name for e in entries}]
        alarms.write(alarm_path, keep + found)

    if not collected:
        return records.empty()
    df = records.coerce(pd.DataFrame(collected, columns=list(records.COLUMNS)))
    df.attrs["alarms"] = found
    keys = list(zip(df["model"], df["attack"], df["eps"].map(records.eps_key), strict=True))
    order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    df["_order"] = [order[k] for k in keys]
    df["_pos"] = df["example_id"].map({int(i): k for k, i in enumerate(dataset.ids.tolist())})
    df = df.sort_values(["_order", "_pos"], kind="stable")
    return df.drop(columns=["_order", "_pos"]).reset_index(drop=True)


def _use_bpda(entry: ModelEntry, ds: Dataset, batch_size: int, device) -> None:
    """Attack ``entry`` through its straight-through version; its forward must equal the model's."""
    from robusteval.bpda import straight_through

    x = next(iter(ds.batches(batch_size)))[0].to(device)
    st = straight_through(entry.model, x)
    with torch.no_grad():
        same = torch.equal(st(x), entry.model(x))
    if not same:
        raise UserError(f"the BPDA version of {entry.name!r} does not reproduce its outputs; `bpda` refused")
    entry.attack_model, entry.name = st, f"{entry.name}+bpda"


def _check_budget(overrides: dict, entry: ModelEntry, found: list) -> dict:
    """The black-box check gets Square's full budget once a pre-check already doubts the model's
    gradients (masking is then likely, and Square is the attack whose number counts)."""
    doubtful = any(a.model == entry.name for a in found)
    if overrides.get("checks") and overrides.get("queries") is None and doubtful:
        return {**overrides, "queries": alarms.FULL_QUERIES}
    return overrides


def _clean_correct(ds: Dataset, clean_pred: torch.Tensor, device):
    keep = (clean_pred == ds.labels.long()).nonzero()[:, 0][: alarms.SUBSET]
    return ds.images[keep].to(device), ds.labels[keep].long().to(device), ds.ids[keep]


def _pre_checks(entry: ModelEntry, ds: Dataset, clean_pred, eps: float, seed: int, device) -> list:
    x, y, ids = _clean_correct(ds, clean_pred, device)
    found = alarms.pre_checks(entry.name, entry.sha256, entry.model, x, y, eps, seed, ids,
                              grad_model=entry.attacked)
    if entry.attack_model is None and any(a.alarm == "unusable-gradients" for a in found):
        from robusteval.bpda import zero_gradient_ops

        ops = zero_gradient_ops(entry.model, x[:2])
        if ops:
            hint = f"; the graph has zero-gradient ops ({', '.join(ops)}): try --bpda"
            found = [alarms.Alarm(a.model, a.checkpoint_sha256, a.alarm, a.eps, a.detail + hint)
                     if a.alarm == "unusable-gradients" else a for a in found]
    return found


def _post_checks(entry: ModelEntry, ds: Dataset, clean_pred, worst: dict, seed: int, device) -> list:
    x, y, ids = _clean_correct(ds, clean_pred, device)
    found = alarms.monotone_alarms(entry.name, entry.sha256, worst, len(ds))
    big = alarms.large_eps_alarm(entry.name, entry.sha256, entry.attacked, x, y, ids, seed)
    return found + ([big] if big else [])


class _Job:
    """One (model, attack, ε) over the dataset: resume, passive records, attacked batches, progress."""

    def __init__(self, entry: ModelEntry, atk: attacks.Attack, ds: Dataset, clean_pred: torch.Tensor,
                 digests: list[str], seed: int, mode: str, path: Path | None, bar: _Progress,
                 precision: str = "fp32"):
        self.entry, self.atk, self.ds, self.seed, self.mode, self.path, self.bar = \
            entry, atk, ds, seed, mode, path, bar
        self.precision = precision
        self.digests = digests
        self.clean_pred, self.labels, self.ids = clean_pred, ds.labels.long(), ds.ids.long()
        self.rows: list[dict] = []  # resumed and new records of this job
        self.robust: dict[int, bool] = {}  # example id -> robust
        self.desc = f"{entry.name} · {atk.name} · ε={atk.eps:.4g}"
        self.task = None

    def base(self, k: int) -> dict:
        e, a = self.entry, self.atk
        return {
            "model": e.name, "checkpoint_sha256": e.sha256, "train_method": e.train_method,
            "train_steps": e.train_steps, "dataset": self.ds.name, "example_id": int(self.ids[k]),
            "label": int(self.labels[k]), "example_sha": self.digests[k], "attack": a.name,
            "attack_config": a.config(), "eps": a.eps,
            "seed": self.seed, "mode": self.mode, "clean_pred": int(self.clean_pred[k]),
            "clean_correct": bool(self.clean_pred[k] == self.labels[k]),
        }  # fmt: skip

    def emit(self, rows: list[dict], write: bool = True) -> None:
        if write and self.path is not None:
            records.append(self.path, rows)
        self.rows.extend(rows)
        self.robust.update((int(r["example_id"]), bool(r["robust"])) for r in rows)
        self.progress()

    def progress(self, description: str | None = None) -> None:
        self.bar.update(self.task, len(self.robust), sum(self.robust.values()), description)

    def run(self, existing: pd.DataFrame, alive: torch.Tensor | None, batch_size: int,
            device) -> torch.Tensor:
        """Evaluate the examples not on disk yet; ``alive=None`` attacks every clean-correct example.

        Returns the per-example robust flags (dataset order) of this attack.
        """
        self.task = self.bar.task(self.desc, len(self.ds))
        prefix = (self.entry.name, self.atk.name, records.eps_key(self.atk.eps))
        if len(existing):
            done = existing[[k[:3] == prefix for k in existing["_key"]]]
            done = done[done["example_id"].isin(set(self.ids.tolist()))]
            if len(done):
                by_id = dict(zip(self.ids.tolist(), self.digests, strict=True))
                _check_consistent(done, self.entry, self.atk, self.seed, self.mode, self.ds.name, by_id,
                                  self.path)
                self.emit(done.drop(columns="_key").to_dict("records"), write=False)
        passive, active = [], []
        for k in range(len(self.ds)):
            if int(self.ids[k]) in self.robust:
                continue
            if self.clean_pred[k] != self.labels[k]:
                passive.append({**self.base(k), **_not_attacked("clean-wrong", int(self.clean_pred[k]))})
            elif alive is not None and not alive[k]:
                passive.append({**self.base(k), **_not_attacked("skipped", -1)})
            else:
                active.append(k)
        self.emit(passive)
        on_run = lambda j, total, left: self.progress(f"{self.desc} · run {j + 1}/{total}")
        for start in range(0, len(active), batch_size):
            chunk = active[start : start + batch_size]
            rows = _attack_chunk(self.entry, self.atk, self.ds, chunk, self.base, self.seed, device, on_run,
                                 self.precision)
            self.emit(rows)
        self.progress(self.desc)
        return torch.tensor([self.robust.get(int(i), False) for i in self.ids.tolist()], dtype=torch.bool)


def _not_attacked(status: str, adv_pred: int) -> dict:
    nan = float("nan")
    return {"status": status, "adv_pred": adv_pred, "success": False, "robust": False, "margin": nan,
            "objective": nan, "linf": 0.0 if status == "clean-wrong" else nan, "restart": -1, "steps": 0,
            "target": -1, "targeted_success": False, "seconds": 0.0}  # fmt: skip


def _attack_chunk(entry: ModelEntry, atk: attacks.Attack, ds: Dataset, chunk: list[int], base, seed: int,
                  device, on_run, precision: str = "fp32") -> list[dict]:
    """Attack one batch of clean-correct examples, verify every point, and build its records."""
    index = torch.tensor(chunk, dtype=torch.long)
    x = ds.images[index].to(device)
    y = ds.labels[index].long().to(device)
    ids = ds.ids[index].long()
    t0 = time.perf_counter()
    try:
        res = attacks.run(atk, entry.attacked, x, y, ids=ids, seed=seed, on_run=on_run, precision=precision)
    except attacks.NonFiniteLogits as exc:
        raise UserError(f"model {entry.name!r} returns non-finite logits (NaN or inf) inside the "
                        f"ε = {atk.eps:.6g} ball of example {int(exc.example_ids[0])} (found by {atk.name}); "
                        "it cannot be evaluated: a NaN is never a robust verdict") from None
    z = verify(entry.model, res.x_adv, x, atk.threat, entry.name, ids)
    seconds = (time.perf_counter() - t0) / len(chunk)
    true = z.gather(1, y[:, None])[:, 0]
    cols = {  # one device-to-host copy per column, not one per example
        "adv_pred": z.argmax(1), "margin": z.scatter(1, y[:, None], float("-inf")).amax(1) - true,
        "objective": res.value, "linf": atk.threat.distance(res.x_adv, x), "restart": res.run,
        "steps": res.steps, "target": res.target, "label": y,
    }  # fmt: skip
    cols = {k: v.detach().cpu().tolist() for k, v in cols.items()}
    flips = int((res.success.cpu() == (z.argmax(1) == y).cpu()).sum())
    if flips:
        # The engine judged these points inside its own batch; the separate re-classification here disagrees.
        # Only float rounding on the decision boundary can do that; the re-classification is what counts.
        warnings.warn(f"{entry.name} / {atk.name}: {flips} adversarial point(s) lie on the decision boundary "
                      "(engine and re-classification disagree by float rounding); recorded as re-classified",
                      RuntimeWarning, stacklevel=2)
    rows = []
    for i, k in enumerate(chunk):
        pred, target = cols["adv_pred"][i], cols["target"][i]
        robust = pred == cols["label"][i]
        rows.append({
            **base(k), "status": "attacked", "adv_pred": pred, "success": not robust, "robust": robust,
            "margin": cols["margin"][i], "objective": cols["objective"][i], "linf": cols["linf"][i],
            "restart": cols["restart"][i], "steps": cols["steps"][i], "target": target,
            "targeted_success": target >= 0 and pred == target, "seconds": seconds,
        })  # fmt: skip
    return rows
