"""Masking checks: verdicts that say loudly when a robust-accuracy number cannot be trusted.

Gradient attacks are fooled by models that hide their gradients; AutoAttack's checks only warn, and
Indicators of Attack Failure (Pintor et al. 2022) measure failures per example. Here every check gives
a *verdict* per model and ε — ``raised`` (an alarm) or ``clear`` — recorded with the run in
``alarms.csv`` (:func:`record`). A model with any alarm is marked *unreliable* in every table and
report of its records, and the command exits with :data:`UNRELIABLE_EXIT` unless the user says they
know. A verdict is data: it is written atomically, and a later run into the same directory adds
verdicts but never erases one (an alarm once raised stays raised). What each alarm means and what to
do about it: docs/alarms.md.

Before attacking (:func:`pre_checks`, on at most :data:`SUBSET` clean-correct examples):

* ``randomness`` — two forwards of the same inputs differ (noise or dropout at test time);
* ``batch-dependent`` — an example's logits change with the other examples of its batch (batch-norm
  batch statistics, buffers updated in forward): robust accuracy would depend on the batch size;
* ``probability-outputs`` — rows are non-negative and sum to 1 (a softmax at the output flattens the
  margin's gradient; the attacks expect logits);
* ``unusable-gradients`` — the input gradient of the margin is exactly zero or non-finite for more than
  :data:`GRADIENT_SHARE` of the examples, at the clean point or at a random point of the ball;
* ``autograd-in-forward`` — the forward pass itself calls ``torch.autograd``.

After attacking, as functions of the records and the model (:func:`post_checks`):

* ``black-box-beats-white-box`` — Square, run on the survivors of the gradient attacks, breaks more
  than :data:`BLACK_BOX_SHARE` of them (Square runs :data:`CHECK_QUERIES` queries, or its full
  :data:`FULL_QUERIES` once a pre-check has raised an alarm for the model; it is part of the worst case);
* ``no-convergence-at-large-eps`` — an untargeted attack at a large radius (:data:`LARGE_EPS` in L∞)
  leaves more than :data:`LARGE_EPS_ROBUST` of the clean-correct subset robust;
* ``non-monotone-in-eps`` — robust accuracy at this ε is higher than at a smaller ε of the same run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

import attacks
from attacks import seeding
from robusteval import rundir
from robusteval.errors import UserError
from robusteval.paths import atomic_write

SUBSET = 200  # examples used by the checks that need extra passes
GRADIENT_SHARE = 0.05
# Masking leaves gaps of tens of points between Square and the gradient attacks; a merely short gradient
# budget leaves about one point (measured: the demo's 2 × 40 steps against Square at 250 queries, 3 of 322
# survivors on one zoo model). The alarm sits between the two.
BLACK_BOX_SHARE = 0.02  # and at least BLACK_BOX_MIN examples
BLACK_BOX_MIN = 3
LARGE_EPS = 0.5
LARGE_EPS_ROBUST = 0.10
#: Logits of one example may differ across batch compositions by float rounding only (different kernels
#: for different batch sizes reorder sums: ~1e-6 relative); batch statistics change them by O(1).
BATCH_TOLERANCE = 1e-3
CHECK_QUERIES = 1000  # Square's budget when it runs as the check ...
FULL_QUERIES = 5000  # ... and once a pre-check has already raised an alarm for the model (the preset's)
UNRELIABLE_EXIT = 3
COLUMNS = ("model", "checkpoint_sha256", "check", "norm", "eps", "status", "detail", "remedy")
STATUSES = ("raised", "clear")
MAX_BYTES = 64 << 20

PRE = ("randomness", "batch-dependent", "probability-outputs", "unusable-gradients", "autograd-in-forward")
POST = ("black-box-beats-white-box", "no-convergence-at-large-eps", "non-monotone-in-eps")
#: The randomised protocol's own check (robusteval.randomness): EoT's sample count settled.
EOT = "eot-convergence"

REMEDIES = {
    "randomness": "average the model's outputs (EoT: repeat each forward and average the logits) and "
                  "evaluate the averaged model; check dropout and noise layers are off in eval mode",
    "batch-dependent": "save or export the model in eval mode (model.eval() before torch.export) so batch "
                       "norm uses its running statistics; an example's outputs must not depend on its batch",
    "probability-outputs": "evaluate the logits (remove the final softmax), or attack log-probabilities",
    "unusable-gradients": "run Square with a larger budget (-a square --queries 10000) and --bpda to replace "
                          "zero-gradient operations by the identity on the backward pass",
    "autograd-in-forward": "evaluate with Square (-a square) and adaptive attacks designed for the defense; "
                           "gradients through an inner optimisation are not what the attacks need",
    "black-box-beats-white-box": "the gradients are masked: trust Square's number, raise its budget "
                                 "(--queries), and try --bpda or EoT",
    "no-convergence-at-large-eps": "the gradient attacks do not work on this model: use Square and --bpda, "
                                   "and check the model's input range and preprocessing",
    "non-monotone-in-eps": "the attacks did not converge at the larger ε: raise --steps / --restarts and add "
                           "Square",
    "eot-convergence": "the robust accuracy still changed when the EoT samples doubled: raise --eot-max, and "
                       "report the number as an upper bound",
}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check for one model at one ε: ``raised`` (an alarm) or clear."""

    model: str
    checkpoint_sha256: str
    check: str
    eps: float
    raised: bool
    detail: str
    norm: str = "linf"

    @property
    def remedy(self) -> str:
        return REMEDIES[self.check]

    @property
    def key(self) -> tuple:
        return self.model, self.checkpoint_sha256, self.check, self.norm, round(float(self.eps), 12)


def alarms_of(verdicts) -> list[Verdict]:
    """The raised verdicts, one per (model, check, detail) — an ε-independent alarm is stored per ε."""
    out, seen = [], set()
    for v in verdicts:
        if v.raised and (v.model, v.check, v.detail) not in seen:
            seen.add((v.model, v.check, v.detail))
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------- before


def _margin_grad(model, x, y):
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        m = attacks.margin_of(model(leaf), y)
        if not m.requires_grad:  # the output does not depend on the input through the graph at all
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(m.sum(), leaf, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


@contextlib.contextmanager
def _autograd_calls():
    """Count calls of ``torch.autograd.grad`` / ``backward`` made inside the block."""
    calls = {"n": 0}
    originals = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)

    def counted(f):
        def wrapper(*a, **k):
            calls["n"] += 1
            return f(*a, **k)
        return wrapper

    torch.autograd.grad, torch.autograd.backward = counted(originals[0]), counted(originals[1])
    torch.Tensor.backward = counted(originals[2])
    try:
        yield calls
    finally:
        torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward = originals


def _batch_dependence(model, x: torch.Tensor, z: torch.Tensor, seed: int) -> float:
    """The largest change of any example's logits when its batch is regrouped: the examples in a seeded
    order, in three batches, against all of them in one batch."""
    if len(x) < 2:
        return 0.0
    order = torch.randperm(len(x), generator=seeding.generator(seed, 0, seeding.BATCH_ORDER))
    size = max(1, -(-len(x) // 3))
    with torch.no_grad():
        parts = [model(x[order[s:s + size].to(x.device)]) for s in range(0, len(x), size)]
    regrouped = torch.empty_like(z)
    regrouped[order.to(z.device)] = torch.cat(parts).to(z.dtype)
    return float((regrouped - z).abs().max())


def pre_checks(name: str, sha: str, model, x: torch.Tensor, y: torch.Tensor, threats, seed: int = 0,
               ids=None, grad_model=None) -> list[Verdict]:
    """The checks before attacking, on ``x``/``y`` (clean-correct examples, at most :data:`SUBSET`): one
    verdict per check in :data:`PRE` and radius of ``threats``. ``grad_model`` is what the attacks
    differentiate (a BPDA version), ``model`` by default."""
    x, y = x[:SUBSET], y[:SUBSET]
    ids = torch.arange(len(x)) if ids is None else torch.as_tensor(ids)[:SUBSET]
    out: dict[str, tuple[bool, str]] = {}
    if len(x) == 0:
        return [Verdict(name, sha, c, t.eps, False, "no clean-correct example to check")
                for t in threats for c in PRE]
    with torch.no_grad(), _autograd_calls() as calls:
        z1 = model(x)
    out["autograd-in-forward"] = (calls["n"] > 0, f"one forward pass called torch.autograd {calls['n']} "
                                                  "time(s)" if calls["n"] else "no autograd call in forward")
    with torch.no_grad():
        z2 = model(x)
    scale = float(z1.abs().max()) + 1.0
    spread = float((z1 - z2).abs().max())
    random = spread > 1e-4 * scale
    out["randomness"] = (random, f"two forwards of the same {len(x)} inputs differ by up to {spread:.3g}")
    if random:
        out["batch-dependent"] = (False, "not measurable: the outputs are random (see randomness)")
    else:
        moved = _batch_dependence(model, x, z1, seed)
        out["batch-dependent"] = (moved > BATCH_TOLERANCE * scale,
                                  f"regrouping the {len(x)} inputs into other batches changes logits by up "
                                  f"to {moved:.3g}")
    rows = z1.sum(1)
    softmax = bool((z1 >= 0).all()) and bool(((rows - 1).abs() < 1e-3).all())
    out["probability-outputs"] = (softmax, "every output row is non-negative and sums to 1 (a softmax "
                                           "output)" if softmax else "outputs are not probabilities")
    verdicts = [Verdict(name, sha, c, t.eps, *out[c]) for t in threats for c in PRE if c in out]
    gmodel = grad_model if grad_model is not None else model
    clean = _unusable_share(gmodel, x, y)
    for t in threats:
        share, where = clean, "the clean inputs"
        if share <= GRADIENT_SHARE and t.eps > 0:
            share = _unusable_share(gmodel, t.sample(x, seeding.generators(seed, ids.tolist(),
                                                                              seeding.ALARM_START)), y)
            where = "random points of the ε-ball"
        verdicts.append(Verdict(name, sha, "unusable-gradients", t.eps, share > GRADIENT_SHARE,
                                f"the margin's input gradient is exactly zero or non-finite for {share:.0%} "
                                f"of {len(x)} examples at {where}"))
    return verdicts


def _unusable_share(model, x, y) -> float:
    g = _margin_grad(model, x, y).flatten(1)
    return float((~torch.isfinite(g).all(1) | (g == 0).all(1)).float().mean())


# ----------------------------------------------------------------------------------------- after


def black_box(name: str, sha: str, eps: float, df: pd.DataFrame, gradient_free: set[str]) -> Verdict:
    """From the records ``df`` of one model at one ε: of the examples every gradient attack left robust,
    how many did the gradient-free ones (``gradient_free``: attack names) break?"""
    per = df.groupby(["example_id", df["attack"].isin(gradient_free)])["robust"].all().unstack()
    if True not in per.columns or False not in per.columns:
        return Verdict(name, sha, "black-box-beats-white-box", eps, False, "no gradient-free attack ran")
    survivors = per[per[False]]
    broken = int((~survivors[True]).sum())
    raised = broken >= BLACK_BOX_MIN and broken > BLACK_BOX_SHARE * max(len(survivors), 1)
    share = f" ({broken / len(survivors):.1%})" if len(survivors) else ""
    return Verdict(name, sha, "black-box-beats-white-box", eps, raised,
                   f"Square broke {broken} of the {len(survivors)} examples every gradient attack left "
                   f"robust{share}")


def large_eps(name: str, sha: str, model, x, y, ids, seed: int = 0, draws: int = 1,
              norm: str = "linf") -> tuple[bool, str]:
    """An untargeted attack at a large radius on the clean-correct ``x`` (at most :data:`SUBSET`;
    ``draws`` EoT samples for a randomised model): :data:`LARGE_EPS` in L∞, and in L2 and L1 the radius of
    the ball that holds that L∞ ball (``LARGE_EPS·√d``, ``LARGE_EPS·d``), with APGD-CE (the paper's
    untargeted attack is L∞ only)."""
    x, y, ids = x[:SUBSET], y[:SUBSET], torch.as_tensor(ids)[:SUBSET]
    if len(x) == 0:
        return False, "no clean-correct example to check"
    d = x[0].numel()
    radius = {"linf": LARGE_EPS, "l2": LARGE_EPS * math.sqrt(d), "l1": LARGE_EPS * d}[norm]
    name_ = "untargeted" if norm == "linf" else "apgd-ce"
    atk = attacks.get(name_, radius, norm=norm, steps=20, restarts=1, draws=draws)
    res = attacks.run(atk, model, x, y, ids=ids, seed=seed)
    robust = float((~res.success).float().mean())
    where = f"ε = {LARGE_EPS}" if norm == "linf" else f"{norm.upper()} ε = {radius:.4g}"
    return robust > LARGE_EPS_ROBUST, (f"at {where} an untargeted attack leaves {robust:.0%} of "
                                       f"{len(x)} examples robust")


def monotone(name: str, sha: str, robust_by_eps: dict[float, float], n: int) -> list[Verdict]:
    """Robust accuracy (worst case) must not rise with ε by more than one example in ``n``: one verdict
    per radius (the smallest is clear by definition)."""
    out, order = [], sorted(robust_by_eps)
    for k, large in enumerate(order):
        higher = [s for s in order[:k] if robust_by_eps[large] > robust_by_eps[s] + 1.0 / max(n, 1) - 1e-12]
        if higher:
            s = higher[0]
            detail = (f"robust accuracy {robust_by_eps[large]:.2%} at ε = {large:.4g} is higher than "
                      f"{robust_by_eps[s]:.2%} at ε = {s:.4g}")
        else:
            detail = f"not above the robust accuracy at any smaller ε of the run ({len(order)} radii)"
        out.append(Verdict(name, sha, "non-monotone-in-eps", large, bool(higher), detail))
    return out


# ------------------------------------------------------------------------------------------ files


def merge(old: list[Verdict], new: list[Verdict]) -> list[Verdict]:
    """Verdicts of both lists, one per key; an alarm once raised stays raised (its first detail kept)."""
    out: dict[tuple, Verdict] = {v.key: v for v in old}
    for v in new:
        prev = out.get(v.key)
        if prev is None or (v.raised and not prev.raised):
            out[v.key] = v
        elif not prev.raised and not v.raised:
            out[v.key] = v  # a clear verdict measured again: the latest measurement
    return list(out.values())


def record(path: str | os.PathLike, verdicts: list[Verdict]) -> list[Verdict]:
    """Add ``verdicts`` to the alarms file at ``path`` (:func:`merge`), written atomically; returns the
    file's verdicts. Never erases a verdict already there."""
    path = Path(path)
    merged = merge(read_file(path) if path.exists() else [], verdicts)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for v in merged:
        w.writerow([v.model, v.checkpoint_sha256, v.check, v.norm, repr(float(v.eps)),
                    "raised" if v.raised else "clear", v.detail, v.remedy if v.raised else ""])
    atomic_write(path, buf.getvalue())
    return merged


def read_file(path: str | os.PathLike) -> list[Verdict]:
    """The verdicts of one alarms file; any defect (empty, torn, foreign, edited) is one clear line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{path} is too large to be a robusteval alarms file")
        text = path.read_bytes().decode("utf-8")
    except UserError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable robusteval alarms file ({exc})") from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise UserError(f"{path} is not a robusteval alarms file ({exc})") from None
    if not rows or tuple(rows[0]) != COLUMNS:
        raise UserError(f"{path} is not a robusteval alarms file (empty, or its header differs); it was "
                        "damaged — rerun the same command to measure the checks again")
    out = []
    for line, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        bad = lambda why, line=line: UserError(f"{path}: line {line}: {why}")
        if len(r) != len(COLUMNS):
            raise bad(f"{len(r)} fields, expected {len(COLUMNS)}")
        model, sha, check, norm, eps, status, detail, _ = r
        if check not in REMEDIES:
            raise bad(f"unknown check {check!r}")
        if norm not in ("linf", "l2", "l1"):
            raise bad(f"unknown norm {norm!r}")
        if status not in STATUSES:
            raise bad(f"status is {status!r}, expected raised or clear")
        try:
            value = float(eps)
        except ValueError:
            raise bad(f"eps is {eps!r}, expected a number") from None
        if not (math.isfinite(value) and 0 <= value and (value <= 1 or norm != "linf")):
            raise bad(f"eps is {eps!r}, expected a radius (in [0, 1] for L∞)")
        out.append(Verdict(model, sha, check, value, status == "raised", detail, norm))
    return out


def read(directory: str | os.PathLike) -> list[Verdict]:
    """The verdicts of a run directory: its alarms file and every shard's (without repeats)."""
    found: list[Verdict] = []
    for p in rundir.files(Path(directory), rundir.ALARMS, required=False):
        found = merge(found, read_file(p))
    return found


def exists(directory: str | os.PathLike) -> bool:
    """Whether the masking checks gave verdicts in this run directory (an alarms file: unsplit or a
    shard's)."""
    return bool(rundir.files(Path(directory), rundir.ALARMS, required=False))


def by_model(verdicts) -> dict[str, list[Verdict]]:
    out: dict[str, list[Verdict]] = {}
    for v in verdicts:
        out.setdefault(v.model, []).append(v)
    return out


def as_dicts(verdicts) -> list[dict]:
    return [{"model": v.model, "checkpoint_sha256": v.checkpoint_sha256, "check": v.check, "norm": v.norm,
             "eps": v.eps,
             "status": "raised" if v.raised else "clear", "detail": v.detail, "remedy": v.remedy}
            for v in verdicts]


def with_hint(verdicts: list[Verdict], check: str, hint: str) -> list[Verdict]:
    """``verdicts`` with ``hint`` appended to the detail of each raised ``check``."""
    return [replace(v, detail=v.detail + hint) if v.raised and v.check == check else v for v in verdicts]
