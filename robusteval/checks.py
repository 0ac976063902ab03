"""Checks that a model fits the data before any attack, so a mismatch is an error, never a wrong number.

* :func:`check_input_shape` — the model's known input size against the data's image shape;
* :func:`check_outputs` — logits of shape ``[batch, classes]``, enough classes for the labels, finite;
* :func:`probe_ball` — finite logits at a random point of every example's ε-ball (a model that is NaN
  only on perturbed inputs would otherwise leave every attack stuck and every example "robust").

Each failure is a one-line :class:`~robusteval.errors.UserError` naming the model and the first bad
example.
"""

from __future__ import annotations

import torch

import attacks
from robusteval.errors import UserError

#: The generator stream of the ball probe (far from the engine's run indices and target stream).
PROBE_STREAM = (1 << 40) + 7


def check_input_shape(name: str, meta: dict, input_shape) -> None:
    """A model whose checkpoint states its input size must get images of exactly that shape."""
    want = meta.get("input_size")
    have = tuple(int(s) for s in input_shape)
    if want and tuple(int(s) for s in want) != have:
        raise UserError(f"model {name!r} takes images of shape {tuple(want)} but the data's images are "
                        f"{have}; pick the matching dataset")


def check_outputs(name: str, z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None, ids,
                  what: str) -> None:
    """Logits ``z`` of the batch ``x``: shape, number of classes against ``labels`` (if given), finiteness."""
    if z.ndim != 2 or z.shape[0] != x.shape[0]:
        raise UserError(f"model {name!r} returned shape {tuple(z.shape)}, not [batch, classes] logits")
    if labels is not None and len(labels) and z.shape[1] <= int(labels.max()):
        raise UserError(f"model {name!r} has {z.shape[1]} outputs but the data has labels up to "
                        f"{int(labels.max())}")
    bad = ~torch.isfinite(z).all(1)
    if bool(bad.any()):
        first = int(torch.as_tensor(ids)[bad.cpu()][0])
        raise UserError(f"model {name!r} returned non-finite logits (NaN or inf) on {what}, first at example "
                        f"{first}; the checkpoint is broken or does not fit this data")


def probe_ball(model, name: str, x: torch.Tensor, labels: torch.Tensor, ids, eps: float, seed: int) -> None:
    """One forward at a random point of each example's ε-ball; non-finite logits are a :class:`UserError`."""
    if eps <= 0 or len(x) == 0:
        return
    threat = attacks.LinfBall(eps)
    xs = threat.sample(x, attacks.generators(seed, torch.as_tensor(ids).tolist(), PROBE_STREAM))
    with torch.no_grad():
        z = model(xs)
    check_outputs(name, z, xs, labels, ids, f"random points within ε = {eps:.6g} of the inputs")
