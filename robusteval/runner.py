"""The evaluation runner: an :class:`~robusteval.evaluation.Evaluation` → verified per-example records.

:func:`evaluate` runs the evaluation protocol of the LLR paper's robustness tables (Qin et al. 2019,
Tables 1-3 and supplementary F3/F4) with AutoAttack's semantics, in stages (docs/design.md,
"Stages of an evaluation"; the protocol itself: docs/protocol.md):

1. **select** the models (unique display names) and the data (the first ``n`` examples, this shard);
2. **prepare** each model (:func:`prepare`): the fit check of :mod:`robusteval.fit`, BPDA, compile;
3. **pre-checks** (:func:`robusteval.alarms.pre_checks`), which decide the black-box check's budget;
4. **plan**: the run's plan is merged into the directory's and written before any attack
   (:mod:`robusteval.plan`); resume is what the plan lists and the records lack;
5. **the battery loop** (:func:`_battery`): for each ε, each member attacks the survivors of the ones
   before it (``no_skip``: every clean-correct example); every adversarial point is verified
   (:func:`verify`) before its record is appended;
6. **post-checks**, computed from the records and the model (:func:`_post_checks`);
7. the :class:`Outcome`: records, verdicts, and what of the plan is still missing.

The model is left as found: eval mode for the run, every module's own flag restored afterwards; the
engine never touches parameters, buffers or ``.grad``. Every random choice comes from a generator seeded
per (seed, example id, stream) (:mod:`attacks.seeding`), so batch size, order, shards and resume do not
change a record.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import nn

import attacks
from robusteval import alarms, fit, plan, progress, randomness, records
from robusteval.data import Dataset, default_eps_text, load_dataset
from robusteval.errors import UserError
from robusteval.evaluation import Battery, Evaluation
from robusteval.models.checkpoints import LoadedModel, in_memory
from robusteval.models.loader import load_model
from robusteval.rundir import RunDir
from robusteval.runtime import device_of, eval_mode, resolve_device

TOLERANCE = records.TOLERANCE  # ‖δ‖ slack for float32 rounding in x + δ (docs/protocol.md, "Verification")


class VerificationError(RuntimeError):
    """An attack returned a point outside the threat set: a bug in the attack, never the user's fault."""


@dataclass
class Subject:
    """A model prepared for attack: ``loaded.model`` is what every point is verified on, ``attacked`` what
    the attacks differentiate (a BPDA or compiled version, or the model itself)."""

    name: str
    loaded: LoadedModel
    attacked: nn.Module
    clean_pred: torch.Tensor
    device: torch.device
    verdicts: list = field(default_factory=list)
    #: The randomised protocol (robusteval.randomness): EoT samples in the attacks, draws per judgement,
    #: and each example's share of correct clean draws (0 or 1 for a deterministic model).
    eot: int = 1
    judge_draws: int = 1
    clean_share: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def random(self) -> bool:
        return self.judge_draws > 1

    @property
    def attackable(self) -> torch.Tensor:
        """Examples to attack: clean-correct (randomised: correct in at least one draw)."""
        return self.clean_share > 0

    @property
    def sha256(self) -> str:
        return self.loaded.sha256


@dataclass
class Outcome:
    """What :func:`evaluate` produced: this evaluation's records (resumed rows included, in order), the
    verdicts of its checks, the directory's plan (``None`` without ``out``) and what of it is missing."""

    records: pd.DataFrame
    verdicts: list
    plan: plan.Plan | None = None
    gaps: list = field(default_factory=list)
    dataset: str = ""
    selected: int = 0  # examples selected (before sharding)

    @property
    def alarms(self) -> list:
        return alarms.alarms_of(self.verdicts)


# ------------------------------------------------------------------------------------------- select


def load_models(specs, arch: str | None = None, device: str = "cpu", model_dir=None,
                weights=None) -> list[LoadedModel]:
    """Models to evaluate: specs (paths, ``zoo:NAME``) are loaded, ``(name, module)`` pairs wrapped; two
    files with the same stem are told apart by the spec the user typed."""
    out = []
    for item in specs:
        if isinstance(item, LoadedModel):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], nn.Module):
            out.append(in_memory(*item))
        else:
            loaded = load_model(item, arch=arch, device=device, model_dir=model_dir, weights=weights)
            loaded.meta["spec"] = str(item)
            out.append(loaded)
    names = [m.name for m in out]
    for m in out:
        if names.count(m.name) > 1 and m.meta.get("spec"):
            m.label = m.meta["spec"]
    if len({m.name for m in out}) != len(out):
        raise UserError(f"the same model is given twice: {', '.join(names)}")
    return out


def select_data(ev: Evaluation, models: list[LoadedModel]) -> Dataset:
    """The evaluation's examples: its dataset (else the checkpoints' own, else Fashion-MNIST), the first
    ``n``, then this shard's."""
    ds = ev.dataset
    if not isinstance(ds, Dataset):
        if ds is None:
            found = {m.meta.get("dataset") for m in models if m.meta.get("dataset")}
            if len(found) > 1:
                names = ", ".join(sorted(found))
                raise UserError(f"the models were trained on different datasets ({names}); pass `dataset`")
            ds = found.pop() if found else "fashion-mnist"
        ds = load_dataset(str(ds), data_dir=ev.data_dir, download=ev.download)
    if ev.n is not None:
        if ev.n > len(ds):
            raise UserError(f"`n` = {ev.n} is more than the {len(ds)} examples of {ds.name} ({ds.source})")
        ds = ds.subset(slice(0, ev.n))
    elif ev.limit is not None:
        ds = ds.subset(slice(0, min(ev.limit, len(ds))))
    if len(ds) == 0:
        raise UserError("the dataset is empty")
    return ds


# ------------------------------------------------------------------------------------------ prepare


def prepare(loaded: LoadedModel, ds: Dataset, ev: Evaluation, threats, device: str) -> Subject:
    """Fit check (:func:`robusteval.fit.check_model`), then what the attacks differentiate: the BPDA
    version with ``ev.bpda`` (its name gets ``+bpda``), ``torch.compile`` of it with ``ev.compile``."""
    dev = device_of(loaded.model, device)
    with eval_mode(loaded.model):
        pred = fit.check_model(loaded.model, loaded.name, loaded.meta, ds, threats, ev.batch_size, dev,
                               ev.seed)
        name, attacked = loaded.name, loaded.model
        if ev.bpda:
            attacked, name = _bpda(loaded, ds, ev.batch_size, dev), f"{loaded.name}+bpda"
    if ev.compile:
        attacked = torch.compile(attacked)
    share = (pred == ds.labels.long()).float()
    return Subject(name, loaded, attacked, pred, dev, clean_share=share)


def _bpda(loaded: LoadedModel, ds: Dataset, batch_size: int, device) -> nn.Module:
    """The straight-through version of the model; its forward must reproduce the model's exactly."""
    from robusteval.bpda import straight_through

    x = next(iter(ds.batches(batch_size)))[0].to(device)
    st = straight_through(loaded.model, x)
    with torch.no_grad():
        same = torch.equal(st(x), loaded.model(x))
    if not same:
        raise UserError(f"the BPDA version of {loaded.name!r} does not reproduce its outputs; `bpda` refused")
    return st


def _clean_correct(ds: Dataset, s: Subject):
    keep = (s.clean_pred == ds.labels.long()).nonzero()[:, 0][: alarms.SUBSET]
    return ds.images[keep].to(s.device), ds.labels[keep].long().to(s.device), ds.ids[keep]


def _randomise(s: Subject, ds: Dataset, ev: Evaluation, threats) -> None:
    """The randomised protocol for ``s`` (:mod:`robusteval.randomness`): judge every clean input over
    ``ev.draws`` draws, choose the EoT samples on a subset, and record both in the verdicts."""
    s.judge_draws = ev.draws
    shares, preds = [], []
    with eval_mode(s.model):
        for x, y, ids in ds.batches(ev.batch_size):
            j = randomness.judge(s.model, x.to(s.device), y.long().to(s.device), ev.draws, ev.seed,
                                 int(ids[0]))
            shares.append(j.share.cpu())
            preds.append(j.pred.cpu())
        s.clean_share, s.clean_pred = torch.cat(shares), torch.cat(preds)
        keep = (s.clean_share == 1).nonzero()[:, 0][: randomness.SUBSET]
        x, y, ids = ds.images[keep].to(s.device), ds.labels[keep].long().to(s.device), ds.ids[keep]
        first = ev.build(threats[0]).members[0]
        choice = randomness.choose_draws(first, s.attacked, x, y, ids, ev.draws, ev.seed, ev.eot_max)
    s.eot = choice.draws
    protocol = f"evaluated with EoT ({choice.draws} samples) and judged over {ev.draws} draws"
    s.verdicts = [replace(v, raised=False, detail=f"{v.detail}; {protocol}") if v.check == "randomness"
                  else v for v in s.verdicts]
    s.verdicts += [alarms.Verdict(s.name, s.sha256, alarms.EOT, t.eps, not choice.converged,
                                  choice.detail(len(keep))) for t in threats]


def _pre_checks(s: Subject, ds: Dataset, threats, seed: int) -> list:
    x, y, ids = _clean_correct(ds, s)
    with eval_mode(s.model):
        found = alarms.pre_checks(s.name, s.sha256, s.model, x, y, threats, seed, ids, grad_model=s.attacked)
    unusable = any(v.raised and v.check == "unusable-gradients" for v in found)
    if unusable and s.attacked is s.model:
        from robusteval.bpda import zero_gradient_ops

        ops = zero_gradient_ops(s.model, x[:2])
        if ops:
            found = alarms.with_hint(found, "unusable-gradients",
                                     f"; the graph has zero-gradient ops ({', '.join(ops)})")
    return found


# --------------------------------------------------------------------------------------------- plan


def _searches(atk: attacks.Attack) -> bool:
    """A minimum-norm member (``MinDistance`` tracking) searches every clean-correct example, not only the
    survivors of the members before it: an example broken within ε may still have a nearer point."""
    return not getattr(atk.tracking, "compacts", True)


def _mode(ev: Evaluation, check: bool, searches: bool = False) -> str:
    """The record mode of an attack: the black-box check always runs on the survivors only, a
    minimum-norm member on every example."""
    base = "skip" if (check or not (ev.no_skip or searches)) else "no-skip"
    return base if ev.precision == "fp32" else f"{base}+{ev.precision}"


def _source(loaded: LoadedModel) -> str:
    """The model's origin for the plan: the spec as given (or the file) and the loader's kind."""
    where = loaded.meta.get("hub") or loaded.meta.get("spec") or (str(loaded.path) if loaded.path else "")
    return f"{where} ({loaded.source})" if where else loaded.source


def _plan(ev: Evaluation, ds: Dataset, selected: Dataset, subjects, batteries, digests) -> plan.Plan:
    units = []
    for s in subjects:
        for threat, battery in batteries[s.name]:
            checks = (*alarms.PRE, *_post_names(battery)) if ev.checks else ()
            checks += (alarms.EOT,) if s.random else ()
            planned = tuple(plan.PlannedAttack(a.name, a.config(), _mode(ev, battery.role(a) == "check",
                                                                          _searches(a)),
                                               battery.role(a), a.optimizer.uses_gradient)
                            for a in battery.attacks)
            units.append(plan.Unit(s.name, s.sha256, float(threat.eps), planned, checks, threat.norm,
                                   eot=s.eot, judge_draws=s.judge_draws, source=_source(s.loaded)))
    return plan.Plan(ds.name, ds.split, len(selected), ev.shard, ev.seed,
                     plan.data_key(ds.name, ds.split, selected.ids.tolist()), tuple(ds.ids.tolist()),
                     tuple(digests), tuple(units), ev.norm)


def _post_names(battery: Battery) -> tuple[str, ...]:
    kinds = {a.optimizer.uses_gradient for a in battery.attacks}
    return tuple(c for c in alarms.POST if c != "black-box-beats-white-box" or kinds == {True, False})


# ---------------------------------------------------------------------------------------- the run


def evaluate(ev: Evaluation, notify=None) -> Outcome:
    """Run the evaluation ``ev`` (the stages of the module docstring) and return its :class:`Outcome`.

    With ``ev.out``, records are appended per batch to the run directory, the plan and the verdicts are
    written there, and a rerun with the same evaluation resumes; one process writes a directory (or a
    shard of it) at a time. ``notify(line)`` receives what a user should know before the long work
    starts (the default ε, the bundled data, where the records go).
    """
    notify = notify or (lambda line: None)
    device = resolve_device(ev.device)
    models = load_models(ev.models, ev.arch, device, ev.model_dir, ev.weights)
    selected = select_data(ev, models)
    if selected.bundled:
        notify(f"note: using the {selected.source} of the Fashion-MNIST test split")
    ds = selected.shard(*ev.shard) if ev.shard else selected
    if not ev.eps:
        norm = "" if ev.norm == "linf" else f" ({ev.norm.upper()})"
        text = default_eps_text(ds.name, ev.norm)
        notify(f"using the default ε = {text}{norm} for {ds.name} (set it with `eps`)")
    threats = ev.threats(ds.name)
    where = RunDir(ev.out, ev.shard) if ev.out is not None else None
    if where is not None:
        notify(f"writing {where.records} (rerun with `out` {where.root} to resume)")
    with where.writing() if where is not None else contextlib.nullcontext():
        if where is not None:
            records.check_appendable(where.records)  # an unwritable output fails before any work
        subjects = [prepare(m, ds, ev, threats, device) for m in models]  # every fit check first
        built = [_batteries(s, ds, ev, threats) for s in subjects]  # (may rename a subject: "+bpda")
        batteries = {s.name: b for s, b in zip(subjects, built, strict=True)}
        digests = ds.fingerprints()
        planned = _plan(ev, ds, selected, subjects, batteries, digests)
        existing = records.empty()
        if where is not None:
            old = plan.read(where.plan) if where.plan.is_file() else None
            planned = plan.merge(old, planned, where.root)
            existing = records.read_if_exists(where.records)
            plan.check_records([planned], existing, str(where.records))
            plan.write(where.plan, planned)
            if ev.checks or any(s.random for s in subjects):
                alarms.record(where.alarms, [v for s in subjects for v in s.verdicts])
        collected: list[dict] = []
        with progress.bar(ev.progress, robust=True) as bar:
            for s in subjects:
                with eval_mode(s.model):
                    collected += _battery(ev, s, ds, batteries[s.name], existing, digests, where, bar)
        df = _ordered(collected, ds)
        verdicts = [v for s in subjects for v in s.verdicts]
        if ev.checks:
            post = [v for s in subjects for v in _post_checks(s, ds, batteries[s.name], df, ev.seed)]
            verdicts += post
            if where is not None:
                alarms.record(where.alarms, post)
    gaps = []
    if where is not None:
        on_disk = records.read_if_exists(where.records)
        judged = alarms.read_file(where.alarms) if where.alarms.is_file() else []
        gaps = plan.coverage(planned, on_disk, judged)
    return Outcome(df, verdicts, planned if where is not None else None, gaps, ds.name, len(selected))


def _batteries(s: Subject, ds: Dataset, ev: Evaluation, threats) -> list:
    """Pre-checks, the randomised protocol where the model is random, then one battery per threat: the
    black-box check gets its full budget once a pre-check doubts the model's gradients.

    No blind members (docs/protocol.md, "Unusable gradients"): where the input gradient is unusable at a
    radius, a graph with zero-gradient operations is attacked through BPDA (the model's name gets
    ``+bpda``), and otherwise the gradient members are dropped for Square at its full budget. The alarm
    stays either way."""
    s.verdicts = _pre_checks(s, ds, threats, ev.seed) if ev.checks else []
    random = any(v.raised and v.check == "randomness" for v in s.verdicts)
    if ev.randomized or (ev.randomized is None and random):
        _randomise(s, ds, ev, threats)
    blind = {plan.eps_key(v.eps) for v in s.verdicts if v.raised and v.check == "unusable-gradients"}
    if blind and s.attacked is s.model and _auto_bpda(s, ds, ev):
        blind = set()
    s.verdicts = [replace(v, norm=ev.norm, model=s.name) for v in s.verdicts]
    doubtful = any(v.raised for v in s.verdicts)
    out = []
    for t in threats:
        battery = ev.build(t, full_check=doubtful, draws=s.eot)
        if plan.eps_key(t.eps) in blind and battery.check is not None:
            battery = Battery((), ev.build(t, full_check=True, draws=s.eot).check)
            s.verdicts = alarms.with_hint(s.verdicts, "unusable-gradients", "; the gradient attacks were "
                                          "skipped: Square ran at its full budget")
        out.append((t, battery))
    return out


def _auto_bpda(s: Subject, ds: Dataset, ev: Evaluation) -> bool:
    """Attack through BPDA when the graph has zero-gradient operations and their straight-through copy
    reproduces the model's outputs; ``False`` when it cannot."""
    from robusteval.bpda import zero_gradient_ops

    x = next(iter(ds.batches(ev.batch_size)))[0].to(s.device)
    with eval_mode(s.model):
        if not zero_gradient_ops(s.model, x[:2]):
            return False
        try:
            s.attacked = _bpda(s.loaded, ds, ev.batch_size, s.device)
        except UserError:
            return False
    s.name = f"{s.name}+bpda"
    s.verdicts = alarms.with_hint(s.verdicts, "unusable-gradients", ", so the attacks ran through BPDA "
                                  "(--bpda, automatically; every point verified on the model itself)")
    return True


def _battery(ev: Evaluation, s: Subject, ds: Dataset, batteries, existing: pd.DataFrame, digests,
             where: RunDir | None, bar) -> list[dict]:
    """For each ε, each member of the battery on the survivors of the ones before it; returns the rows."""
    rows: list[dict] = []
    for _, battery in batteries:
        alive = s.attackable.clone()  # survivors of the battery so far
        scores: dict[int, float] = {}  # example id -> smallest closeness so far (docs/methods.md)
        gated = not ev.no_skip  # (--no-skip attacks every example with every member: no gates)
        for atk in battery.attacks:
            check = battery.role(atk) == "check"
            job = _Job(s, atk, ds, digests, ev, _mode(ev, check, _searches(atk)), where, bar,
                       battery.gate(atk) if gated else None, gated and battery.scores(atk), scores)
            robust = job.run(existing, alive if (check or not (ev.no_skip or _searches(atk))) else None)
            rows += job.rows
            alive &= robust
    return rows


def _ordered(collected: list[dict], ds: Dataset) -> pd.DataFrame:
    """The records in run order: by (model, attack, ε) as first attacked, then by dataset position."""
    if not collected:
        return records.empty()
    df = records.coerce(pd.DataFrame(collected, columns=list(records.COLUMNS)))
    keys = list(zip(df["model"], df["attack"], df["eps"].map(records.eps_key), strict=True))
    order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    df["_order"] = [order[k] for k in keys]
    df["_pos"] = df["example_id"].map({int(i): k for k, i in enumerate(ds.ids.tolist())})
    df = df.sort_values(["_order", "_pos"], kind="stable")
    return df.drop(columns=["_order", "_pos"]).reset_index(drop=True)


def _post_checks(s: Subject, ds: Dataset, batteries, df: pd.DataFrame, seed: int) -> list:
    """The checks after attacking, from the records of this model and the model itself."""
    mine = df[df["model"] == s.name]
    found, worst = [], {}
    for threat, battery in batteries:
        unit = mine[mine["eps"].map(records.eps_key) == records.eps_key(threat.eps)]
        worst[threat.eps] = float(unit.groupby("example_id")["robust"].all().mean())
        free = {a.name for a in battery.attacks if not a.optimizer.uses_gradient}
        if "black-box-beats-white-box" in _post_names(battery):
            found.append(alarms.black_box(s.name, s.sha256, threat.eps, unit, free))
    x, y, ids = _clean_correct(ds, s)
    with eval_mode(s.model), randomness.seeded(seed, 0, randomness.stream("large-eps"), s.device):
        raised, detail = alarms.large_eps(s.name, s.sha256, s.attacked, x, y, ids, seed, draws=s.eot,
                                          norm=batteries[0][0].norm if batteries else "linf")
    found += [alarms.Verdict(s.name, s.sha256, "no-convergence-at-large-eps", t.eps, raised, detail)
              for t, _ in batteries]
    norm = batteries[0][0].norm if batteries else "linf"
    return [replace(v, norm=norm) for v in found + alarms.monotone(s.name, s.sha256, worst, len(ds))]


# ------------------------------------------------------------------------------------ one attack


def verify(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, threat, name: str = "model",
           ids=None) -> torch.Tensor:
    """Check adversarial points and return the model's logits on them (eval mode, separate forward).

    Feasibility is the threat model's (``threat.contains``, slack :data:`TOLERANCE`; a number means the
    L∞ ball of that radius in [0, 1]). Raises :class:`VerificationError` if any point is non-finite,
    outside the box or the ball — attacks must return feasible points; clipping here would hide the bug.
    """
    check_feasible(x_adv, x, threat, name)
    if any(m.training for m in model.modules()):
        raise VerificationError("the model must be in eval mode for verification")
    return fit.forward(model, name, x_adv, None, ids if ids is not None else torch.arange(len(x_adv)),
                       "the adversarial points")


def check_feasible(x_adv: torch.Tensor, x: torch.Tensor, threat, name: str = "model") -> None:
    """Every point finite, inside the box and within the threat's radius (slack :data:`TOLERANCE`), else a
    :class:`VerificationError`."""
    threat = attacks.threat_of(threat)
    bad = ~threat.contains(x_adv, x, tol=TOLERANCE)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        flat, dist = x_adv.flatten(1), threat.distance(x_adv, x)
        raise VerificationError(
            f"attack returned an infeasible point for {name}: distance {float(dist[i]):.6g} "
            f"(ε = {threat.eps:.6g}), range [{float(flat[i].min()):.4g}, {float(flat[i].max()):.4g}] "
            f"({int(bad.sum())} of {len(x)} points bad)")


class _Job:
    """One (model, attack, ε) over the dataset: resumed rows, passive records, attacked batches, progress."""

    def __init__(self, s: Subject, atk: attacks.Attack, ds: Dataset, digests: list[str], ev: Evaluation,
                 mode: str, where: RunDir | None, bar, gate: float | None = None, score: bool = False,
                 scores: dict | None = None):
        self.s, self.atk, self.ds, self.digests, self.ev, self.mode, self.where, self.bar = \
            s, atk, ds, digests, ev, mode, where, bar
        # Reallocation: a gated attack runs only on survivors whose smallest closeness so far is at most
        # ``gate``; the attacks before a gate score their survivors (the ``closeness`` column, so a
        # resumed run decides the same way)
        self.gate, self.score, self.scores = gate, score, scores if scores is not None else {}
        self.labels, self.ids = ds.labels.long(), ds.ids.long()
        self.rows: list[dict] = []  # resumed and new records of this job
        self.robust: dict[int, bool] = {}  # example id -> robust
        self.desc = f"{s.name} · {atk.name} · ε={atk.eps:.4g}"
        self.task = None

    def base(self, k: int) -> dict:
        s, a, pred = self.s, self.atk, int(self.s.clean_pred[k])
        return {
            "model": s.name, "checkpoint_sha256": s.sha256, "train_method": s.loaded.train_method,
            "train_steps": s.loaded.train_steps, "dataset": self.ds.name, "example_id": int(self.ids[k]),
            "label": int(self.labels[k]), "example_sha": self.digests[k], "attack": a.name,
            "attack_config": a.config(), "norm": a.threat.norm, "eps": a.eps, "seed": self.ev.seed,
            "mode": self.mode,
            "clean_pred": pred, "clean_correct": pred == int(self.labels[k]), "draws": s.judge_draws,
            "clean_share": float(s.clean_share[k]),
        }  # fmt: skip

    def emit(self, rows: list[dict], write: bool = True) -> None:
        if write and self.where is not None:
            records.append(self.where.records, rows)
        self.rows.extend(rows)
        self.robust.update((int(r["example_id"]), bool(r["robust"])) for r in rows)
        if self.score:
            for r in rows:
                if r["robust"] and r["closeness"] == r["closeness"]:  # (NaN: not scored)
                    key = int(r["example_id"])
                    self.scores[key] = min(self.scores.get(key, math.inf), float(r["closeness"]))
        self.progress()

    def progress(self, description: str | None = None) -> None:
        self.bar.update(self.task, completed=len(self.robust), description=description,
                        robust=f"{sum(self.robust.values()) / len(self.robust):.1%}" if self.robust else "-")

    def run(self, existing: pd.DataFrame, alive: torch.Tensor | None) -> torch.Tensor:
        """Evaluate the examples not on disk yet; ``alive=None`` attacks every clean-correct example.

        Returns the per-example robust flags (dataset order) of this attack.
        """
        self.task = self.bar.add_task(self.desc, total=len(self.ds), robust="-")
        if len(existing):
            done = existing[(existing["model"] == self.s.name) & (existing["attack"] == self.atk.name)
                            & (existing["eps"].map(records.eps_key) == records.eps_key(self.atk.eps))]
            self.emit(done.to_dict("records"), write=False)
        passive, active = [], []
        for k in range(len(self.ds)):
            if int(self.ids[k]) in self.robust:
                continue
            if not self.s.attackable[k]:
                passive.append({**self.base(k), **_not_attacked("clean-wrong", int(self.s.clean_pred[k]))})
            elif alive is not None and not alive[k]:
                passive.append({**self.base(k), **_not_attacked("skipped", -1)})
            elif self.gate is not None and self.scores.get(int(self.ids[k]), 0.0) > self.gate:
                passive.append({**self.base(k), **_gated(int(self.labels[k]))})
            else:
                active.append(k)
        self.emit(passive)
        on_run = lambda j, total, left: self.progress(f"{self.desc} · run {j + 1}/{total}")
        for start in range(0, len(active), self.ev.batch_size):
            chunk = active[start : start + self.ev.batch_size]
            self.emit(_attack_chunk(self.s, self.atk, self.ds, chunk, self.base, self.ev, on_run, self.score))
        self.progress(self.desc)
        return torch.tensor([self.robust.get(int(i), False) for i in self.ids.tolist()], dtype=torch.bool)


def _gated(label: int) -> dict:
    """A survivor that a gated attack skipped: still robust (nothing broke it), not attacked here."""
    nan = float("nan")
    return {"status": "gated", "adv_pred": label, "success": False, "robust": True, "margin": nan,
            "objective": nan, "distance": nan, "restart": -1, "steps": 0, "target": -1,
            "targeted_success": False, "seconds": 0.0, "robust_share": nan, "closeness": nan}


def _not_attacked(status: str, adv_pred: int) -> dict:
    nan = float("nan")
    wrong = status == "clean-wrong"
    return {"status": status, "adv_pred": adv_pred, "success": False, "robust": False, "margin": nan,
            "objective": nan, "distance": 0.0 if wrong else nan, "restart": -1, "steps": 0,
            "target": -1, "targeted_success": False, "seconds": 0.0, "robust_share": 0.0 if wrong else nan,
            "closeness": nan}


def _attack_chunk(s: Subject, atk: attacks.Attack, ds: Dataset, chunk: list[int], base, ev: Evaluation,
                  on_run, score: bool = False) -> list[dict]:
    """Attack one batch of clean-correct examples, verify every point, and build its records."""
    index = torch.tensor(chunk, dtype=torch.long)
    x = ds.images[index].to(s.device)
    y = ds.labels[index].long().to(s.device)
    ids = ds.ids[index].long()
    t0 = time.perf_counter()
    draws = randomness.seeded(ev.seed, int(ids[0]), randomness.stream(atk.name), s.device) if s.random \
        else contextlib.nullcontext()
    try:
        with draws:
            res = attacks.run(atk, s.attacked, x, y, ids=ids, seed=ev.seed, on_run=on_run,
                              precision=ev.precision)
    except attacks.NonFiniteLogits as exc:
        raise UserError(f"model {s.name!r} returns non-finite logits (NaN or inf) inside the "
                        f"ε = {atk.eps:.6g} ball of example {int(exc.example_ids[0])} (found by {atk.name}); "
                        "it cannot be evaluated: a NaN is never a robust verdict") from None
    if s.random:  # the verdict of a randomised model: every point judged over many draws
        check_feasible(res.x_adv, x, atk.threat, s.name)
        j = randomness.judge(s.model, res.x_adv, y, s.judge_draws, ev.seed, int(ids[0]))
        z, pred, share = j.logits, j.pred, j.share
    else:
        z = verify(s.model, res.x_adv, x, atk.threat, s.name, ids)
        pred = z.argmax(1)
        share = (pred == y).float()
        _warn_flips(s, atk, res, pred == y)
    near = torch.full_like(share, math.nan)
    alive = (share == 1).nonzero()[:, 0]  # only survivors are scored: the broken ones leave the battery
    if score and alive.numel():
        with randomness.seeded(ev.seed, int(ids[0]), randomness.stream("closeness"), s.device) if s.random \
                else contextlib.nullcontext():
            near[alive] = attacks.closeness(s.attacked, res.x_adv[alive], y[alive], atk.threat).to(near.dtype)
    seconds = (time.perf_counter() - t0) / len(chunk)
    cols = {  # one device-to-host copy per column, not one per example
        "adv_pred": pred, "margin": attacks.margin_of(z, y), "objective": res.value,
        "distance": atk.threat.distance(res.x_adv, x), "restart": res.run, "steps": res.steps,
        "target": res.target, "robust_share": share, "closeness": near,
    }  # fmt: skip
    cols = {k: v.detach().cpu().tolist() for k, v in cols.items()}
    rows = []
    for i, k in enumerate(chunk):
        row = base(k)
        pred, target = cols["adv_pred"][i], cols["target"][i]
        robust = cols["robust_share"][i] == 1.0 and row["clean_correct"]
        rows.append({
            **row, "status": "attacked", "adv_pred": pred, "success": not robust, "robust": robust,
            "margin": cols["margin"][i], "objective": cols["objective"][i], "distance": cols["distance"][i],
            "restart": cols["restart"][i], "steps": cols["steps"][i], "target": target,
            "targeted_success": target >= 0 and pred == target, "seconds": seconds,
            "robust_share": cols["robust_share"][i], "closeness": cols["closeness"][i],
        })  # fmt: skip
    return rows


def _warn_flips(s: Subject, atk: attacks.Attack, res: attacks.Result, robust: torch.Tensor) -> None:
    flips = int((res.success.cpu() == robust.cpu()).sum())
    if flips:
        # The engine judged these points inside its own batch; the separate re-classification here disagrees.
        # Only float rounding on the decision boundary can do that; the re-classification is what counts.
        warnings.warn(f"{s.name} / {atk.name}: {flips} adversarial point(s) lie on the decision boundary "
                      "(engine and re-classification disagree by float rounding); recorded as re-classified",
                      RuntimeWarning, stacklevel=3)
