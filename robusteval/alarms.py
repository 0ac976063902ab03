"""Masking alarms: checks that say loudly when a robust-accuracy number cannot be trusted.

Gradient attacks are fooled by models that hide their gradients; AutoAttack's checks only warn, and
Indicators of Attack Failure (Pintor et al. 2022) measure failures per example. Here every check is a
verdict recorded with the run (``alarms.csv`` beside ``records.csv``); a model with any alarm is marked
*unreliable* in every table and report of its records, and the command exits with
:data:`UNRELIABLE_EXIT` unless the user says they know.

Before attacking (:func:`pre_checks`, on at most :data:`SUBSET` examples):

* ``randomness`` — two forwards of the same inputs differ (noise or dropout at test time);
* ``probability-outputs`` — rows are non-negative and sum to 1 (a softmax at the output flattens the
  margin's gradient; the attacks expect logits);
* ``unusable-gradients`` — the input gradient of the margin is exactly zero or non-finite for more than
  :data:`GRADIENT_SHARE` of the examples, at the clean point or at a random start in the ball;
* ``autograd-in-forward`` — the forward pass itself calls ``torch.autograd`` (it optimises or
  differentiates while predicting).

After attacking (:func:`post_checks`):

* ``black-box-beats-white-box`` — Square, run on the survivors of the gradient attacks, breaks more
  than :data:`BLACK_BOX_SHARE` of them (Square runs :data:`CHECK_QUERIES` queries, or its full
  :data:`FULL_QUERIES` once a pre-check has raised an alarm for the model; it is part of the worst case);
* ``no-convergence-at-large-eps`` — an untargeted attack at ε = :data:`LARGE_EPS` leaves more than
  :data:`LARGE_EPS_ROBUST` of the clean-correct subset robust (an unbounded attack must break nearly
  everything);
* ``non-monotone-in-eps`` — with several ε, robust accuracy is higher at a larger ε.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

import attacks
from robusteval.errors import UserError

SUBSET = 200  # examples used by the checks that need extra passes
GRADIENT_SHARE = 0.05
# Masking leaves gaps of tens of points between Square and the gradient attacks; a merely short gradient
# budget leaves about one point (measured: the demo's 2 × 40 steps against Square at 250 queries, 3 of 322
# survivors on one zoo model). The alarm sits between the two.
BLACK_BOX_SHARE = 0.02  # and at least BLACK_BOX_MIN examples
BLACK_BOX_MIN = 3
LARGE_EPS = 0.5
LARGE_EPS_ROBUST = 0.10
CHECK_QUERIES = 1000  # Square's budget when it runs as the check ...
FULL_QUERIES = 5000  # ... and once a pre-check has already raised an alarm for the model (the preset's)
UNRELIABLE_EXIT = 3
FILENAME = "alarms.csv"
COLUMNS = ("model", "checkpoint_sha256", "alarm", "eps", "detail", "remedy")

REMEDIES = {
    "randomness": "average the model's outputs (EoT: repeat each forward and average the logits) and "
                  "evaluate the averaged model; check dropout and noise layers are off in eval mode",
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
}


@dataclass(frozen=True)
class Alarm:
    """One failed check for one model (``eps`` is NaN for checks that do not depend on ε)."""

    model: str
    checkpoint_sha256: str
    alarm: str
    eps: float
    detail: str

    @property
    def remedy(self) -> str:
        return REMEDIES[self.alarm]


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


def pre_checks(name: str, sha: str, model, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0,
               ids=None, grad_model=None) -> list[Alarm]:
    """The checks before attacking, on ``x``/``y`` (clean-correct examples, at most :data:`SUBSET`).

    ``grad_model`` is what the attacks differentiate (a BPDA version), ``model`` by default.
    """
    x, y = x[:SUBSET], y[:SUBSET]
    if len(x) == 0:
        return []
    ids = torch.arange(len(x)) if ids is None else torch.as_tensor(ids)[:SUBSET]
    found = []
    alarm = lambda kind, detail: found.append(Alarm(name, sha, kind, float("nan"), detail))
    with torch.no_grad(), _autograd_calls() as calls:
        z1 = model(x)
    if calls["n"]:
        alarm("autograd-in-forward", f"one forward pass called torch.autograd {calls['n']} time(s)")
    with torch.no_grad():
        z2 = model(x)
    scale = float(z1.abs().max()) + 1.0
    if float((z1 - z2).abs().max()) > 1e-4 * scale:
        alarm("randomness", f"two forwards of the same {len(x)} inputs differ by up to "
                            f"{float((z1 - z2).abs().max()):.3g}")
    rows = z1.sum(1)
    if bool((z1 >= 0).all()) and bool(((rows - 1).abs() < 1e-3).all()):
        alarm("probability-outputs", "every output row is non-negative and sums to 1 (a softmax output)")
    threat = attacks.LinfBall(eps) if eps > 0 else None
    starts = {"the clean inputs": x}
    if threat is not None:
        gens = attacks.generators(seed, ids.tolist(), 1 << 42)
        starts["random points of the ε-ball"] = threat.sample(x, gens)
    for where, point in starts.items():
        g = _margin_grad(grad_model if grad_model is not None else model, point, y).flatten(1)
        unusable = ~torch.isfinite(g).all(1) | (g == 0).all(1)
        share = float(unusable.float().mean())
        if share > GRADIENT_SHARE:
            alarm("unusable-gradients", f"the margin's input gradient is exactly zero or non-finite for "
                                        f"{share:.0%} of {len(x)} examples at {where}")
            break
    return found


def black_box_alarm(name: str, sha: str, eps: float, white_robust: pd.Series,
                    square_robust: pd.Series) -> Alarm | None:
    """``white_robust``/``square_robust``: per example id, robust against every gradient attack / Square."""
    both = white_robust.index.intersection(square_robust.index)
    survivors = white_robust[both][white_robust[both]].index
    if len(survivors) == 0:
        return None
    broken = int((~square_robust[survivors]).sum())
    if broken >= BLACK_BOX_MIN and broken > BLACK_BOX_SHARE * len(survivors):
        return Alarm(name, sha, "black-box-beats-white-box", float(eps),
                     f"Square broke {broken} of the {len(survivors)} examples every gradient attack left "
                     f"robust ({broken / len(survivors):.1%})")
    return None


def large_eps_alarm(name: str, sha: str, model, x, y, ids, seed: int = 0) -> Alarm | None:
    """An untargeted attack at ε = :data:`LARGE_EPS` on the clean-correct ``x`` (at most :data:`SUBSET`)."""
    x, y, ids = x[:SUBSET], y[:SUBSET], torch.as_tensor(ids)[:SUBSET]
    if len(x) == 0:
        return None
    atk = attacks.get("untargeted", LARGE_EPS, steps=20, restarts=1)
    res = attacks.run(atk, model, x, y, ids=ids, seed=seed)
    robust = float((~res.success).float().mean())
    if robust > LARGE_EPS_ROBUST:
        return Alarm(name, sha, "no-convergence-at-large-eps", LARGE_EPS,
                     f"at ε = {LARGE_EPS} an untargeted attack leaves {robust:.0%} of {len(x)} examples "
                     "robust")
    return None


def monotone_alarms(name: str, sha: str, robust_by_eps: dict[float, float], n: int) -> list[Alarm]:
    """Robust accuracy (worst case) must not rise with ε (by more than one example in ``n``)."""
    found, order = [], sorted(robust_by_eps)
    for small, large in zip(order, order[1:], strict=False):
        if robust_by_eps[large] > robust_by_eps[small] + 1.0 / max(n, 1) - 1e-12:
            found.append(Alarm(name, sha, "non-monotone-in-eps", float(large),
                               f"robust accuracy {robust_by_eps[large]:.2%} at ε = {large:.4g} is higher "
                               f"than {robust_by_eps[small]:.2%} at ε = {small:.4g}"))
    return found


def write(path: str | os.PathLike, alarms: list[Alarm]) -> Path:
    """Write (replace) the alarms file; an empty list writes the header only (checks ran, none fired)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for a in alarms:
            w.writerow([a.model, a.checkpoint_sha256, a.alarm, repr(a.eps), a.detail, a.remedy])
    return path


def shard_filename(index: int, count: int) -> str:
    """The alarms file of shard ``index`` of ``count``: each shard judges its own examples."""
    return f"alarms.shard-{index}-of-{count}.csv"


def exists(directory: str | os.PathLike) -> bool:
    """Whether the masking checks ran for this run directory (an alarms file, of the run or a shard)."""
    d = Path(directory)
    return (d / FILENAME).is_file() or any(d.glob("alarms.shard-*-of-*.csv"))


def read(path: str | os.PathLike) -> list[Alarm]:
    """Alarms of a run (``path``: the alarms file, or its directory: the run's file and every shard's,
    without repeats); none when no file exists."""
    path = Path(path)
    if path.is_dir():
        found: list[Alarm] = []
        for p in [path / FILENAME, *sorted(path.glob("alarms.shard-*-of-*.csv"))]:
            found += [a for a in read(p) if a not in found]
        return found
    if not path.is_file():
        return []
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a robusteval alarms file ({str(exc).splitlines()[0]})") from None
    if tuple(df.columns) != COLUMNS:
        raise UserError(f"{path} is not a robusteval alarms file (its header differs)")
    bad = df[~df["alarm"].isin(REMEDIES)]
    if len(bad):
        raise UserError(f"{path}: unknown alarm {bad['alarm'].iloc[0]!r}")
    return [Alarm(r.model, r.checkpoint_sha256, r.alarm, float(r.eps), r.detail) for r in df.itertuples()]


def by_model(alarms: list[Alarm]) -> dict[str, list[Alarm]]:
    out: dict[str, list[Alarm]] = {}
    for a in alarms:
        out.setdefault(a.model, []).append(a)
    return out


def as_dicts(alarms: list[Alarm]) -> list[dict]:
    return [asdict(a) | {"remedy": a.remedy} for a in alarms]
