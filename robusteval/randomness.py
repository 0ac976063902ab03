"""The randomised protocol: an honest number for a model whose outputs are random.

A model with randomness in its forward pass (input noise, dropout at test time, random resizing,
purification) is evaluated differently from a deterministic one (docs/protocol.md,
"Randomised models"):

* **EoT gradients** — every evaluation inside an attack averages the objective, and so its input
  gradient, over K draws of the model (:func:`attacks.eot_value`); Square's accept decision uses the
  margin averaged over the same K draws. K is chosen by :func:`choose_draws`: it starts at
  :data:`FIRST_K` and doubles on a subset until the worst-case robust accuracy of the battery's first
  member changes by at most :data:`TOLERANCE`; not converging by ``eot_max`` is an alarm.
* **Judged over many draws** — every returned point and every clean input is classified in M
  independent draws (:func:`judge`, default 20). An example is robust only if every draw classifies it
  correctly (the worst case over draws: the headline); the share of correct draws gives the expected
  accuracy beside it.
* **Determinism** — a model that draws from torch's global generator cannot take ours, so that
  generator is forked and seeded per batch from (seed, the batch's first example id, a stream)
  (:func:`seeded`): a rerun gives the same records; other batch sizes, or the batches after a resumed
  interruption, see other draws.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch

import attacks
from attacks import seeding

FIRST_K = 2
#: The convergence check's tolerance: worst-case robust accuracy on the subset may move by at most
#: this much when K doubles (two points, or one example of a smaller subset: :func:`tolerance`).
TOLERANCE = 0.02
SUBSET = 100
DEFAULT_DRAWS = 20
DEFAULT_EOT_MAX = 32


def stream(name: str) -> int:
    """A stable per-attack stream for the model's own draws during that attack."""
    return seeding.MODEL_DRAWS + (zlib.crc32(name.encode()) & 0xFFFFF)


@contextlib.contextmanager
def seeded(seed: int, first_id: int, stream_: int, device):
    """Torch's global generator (and the device's) forked for the block and seeded from (seed, the
    batch's first example id, stream): a model drawing from it draws the same numbers on a rerun."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeding.example_seed(seed, first_id, stream_))
        yield


@dataclass
class Judgement:
    """Per example: the share of draws classifying it as its label, the prediction to record (the label
    when every draw gives it, else the most frequent wrong class) and the mean logits."""

    share: torch.Tensor
    pred: torch.Tensor
    logits: torch.Tensor


def judge(model, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int, first_id: int,
          stream_: int = seeding.JUDGE, chunk: int = 4096) -> Judgement:
    """Classify every row of ``x`` in ``draws`` independent draws of the model (eval mode, no gradient,
    batched: every row repeated ``draws`` times, ``chunk`` rows per forward)."""
    n = x.shape[0]
    preds, logits = [], []
    with seeded(seed, first_id, stream_, x.device), torch.no_grad():
        rep = x.repeat_interleave(draws, 0)
        for start in range(0, rep.shape[0], chunk):
            z = model(rep[start:start + chunk]).float()
            preds.append(z.argmax(1))
            logits.append(z)
    pred = torch.cat(preds).view(n, draws) if n else \
        torch.zeros((0, draws), dtype=torch.long, device=x.device)
    z = torch.cat(logits).view(n, draws, -1).mean(1) if n else x.new_zeros((0, 1))
    right = pred == y[:, None]
    share = right.float().mean(1)
    wrong = pred.masked_fill(right, -1)
    classes = z.shape[1] if n else 1
    counts = torch.zeros((n, classes + 1), dtype=torch.long, device=x.device)
    counts.scatter_add_(1, wrong + 1, torch.ones_like(wrong))
    most_wrong = counts[:, 1:].argmax(1)
    return Judgement(share, torch.where(share == 1, y, most_wrong), z)


@dataclass
class Choice:
    """The number of EoT samples chosen, the worst-case robust accuracy at each K tried, and whether
    the last doubling stayed within :data:`TOLERANCE`."""

    draws: int
    tried: list[tuple[int, float]]
    converged: bool
    tolerance: float = TOLERANCE

    def detail(self, n: int) -> str:
        steps = ", ".join(f"K={k} {ra:.1%}" for k, ra in self.tried)
        verdict = (f"converged at K={self.draws}" if self.converged else
                   f"still moving more than {self.tolerance:.1%} at K={self.draws}")
        return (f"worst-case robust accuracy of the first attack on {n} examples by EoT samples: {steps} "
                f"({verdict}, tolerance {self.tolerance:.1%})")


def tolerance(n: int) -> float:
    """Two points, or one example when the subset has fewer than 50 (a change of one example cannot be
    told from the noise of the draws)."""
    return max(TOLERANCE, 1.0 / max(n, 1)) if TOLERANCE >= 0 else TOLERANCE


def choose_draws(atk: attacks.Attack, model, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
                 judge_draws: int, seed: int, eot_max: int) -> Choice:
    """Double K from :data:`FIRST_K` while the worst-case robust accuracy (``atk`` with K EoT samples,
    every point judged over ``judge_draws`` draws) moves by more than :data:`TOLERANCE`."""
    tried: list[tuple[int, float]] = []
    k, tol = FIRST_K, tolerance(len(x))
    while True:
        first = int(ids[0]) if len(ids) else 0
        with seeded(seed, first, seeding.EOT_SEARCH + k, x.device):
            res = attacks.run(atk.replace(draws=k), model, x, y, ids=ids, seed=seed)
        verdict = judge(model, res.x_adv, y, judge_draws, seed, first)
        tried.append((k, float((verdict.share == 1).float().mean())))
        if len(tried) > 1 and abs(tried[-1][1] - tried[-2][1]) <= tol:
            return Choice(k, tried, True, tol)
        if k * 2 > eot_max:
            return Choice(k, tried, False, tol)
        k *= 2
