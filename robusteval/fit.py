"""Does a model fit the data? Checked before any attack, so a mismatch is an error, never a wrong number.

The one place where a model's outputs are judged — every command that runs a model (``attack``,
``gamma``, ``surface``, ``show``, ``demo``) goes through :func:`check_model` first:

* :func:`check_input_shape` — the model's known input size against the data's image shape;
* :func:`check_outputs` — a floating-point tensor of logits ``[batch, classes]`` (not a tuple, a dict,
  integers or booleans), enough classes for the labels, every value finite;
* :func:`probe_ball` — finite logits at a random point of every example's ε-ball (a model that is NaN
  only on perturbed inputs would otherwise leave every attack stuck and every example "robust").

Each failure is a one-line :class:`~robusteval.errors.UserError` naming the model and the first bad
example.
"""

from __future__ import annotations

import torch

import attacks
from attacks import seeding
from robusteval.errors import UserError


def check_input_shape(name: str, meta: dict, input_shape) -> None:
    """A model whose checkpoint states its input size must get images of exactly that shape."""
    want = meta.get("input_size")
    have = tuple(int(s) for s in input_shape)
    if want and tuple(int(s) for s in want) != have:
        raise UserError(f"model {name!r} takes images of shape {tuple(want)} but the data's images are "
                        f"{have}; pick the matching dataset")


def _kind(z) -> str:
    if isinstance(z, (tuple, list)):
        return f"a {type(z).__name__} of {len(z)}"
    if isinstance(z, dict):
        return f"a dict (keys {', '.join(map(str, list(z)[:4]))})"
    return f"a {type(z).__name__}"


def check_outputs(name: str, z, x: torch.Tensor, labels: torch.Tensor | None, ids, what: str) -> None:
    """The outputs ``z`` of the batch ``x``: type, dtype, shape, classes against ``labels``, finiteness."""
    if not isinstance(z, torch.Tensor):
        raise UserError(f"model {name!r} returned {_kind(z)}, not a tensor of logits; wrap it so that "
                        "forward returns the [batch, classes] logits")
    if not z.is_floating_point():
        kind = str(z.dtype).replace("torch.", "")
        raise UserError(f"model {name!r} returned {kind} outputs; robusteval needs floating-point logits "
                        "(scores before any argmax or one-hot)")
    if z.ndim != 2 or z.shape[0] != x.shape[0]:
        raise UserError(f"model {name!r} returned shape {tuple(z.shape)} for {x.shape[0]} inputs, not "
                        "[batch, classes] logits")
    if labels is not None and len(labels) and z.shape[1] <= int(labels.max()):
        raise UserError(f"model {name!r} has {z.shape[1]} outputs but the data has labels up to "
                        f"{int(labels.max())}")
    bad = ~torch.isfinite(z).all(1)
    if bool(bad.any()):
        first = int(torch.as_tensor(ids)[bad.cpu()][0])
        raise UserError(f"model {name!r} returned non-finite logits (NaN or inf) on {what}, first at example "
                        f"{first}; the checkpoint is broken or does not fit this data")


def forward(model, name: str, x: torch.Tensor, labels, ids, what: str) -> torch.Tensor:
    """``model(x)`` without gradients, its outputs checked (:func:`check_outputs`)."""
    with torch.no_grad():
        z = model(x)
    check_outputs(name, z, x, labels, ids, what)
    return z


def probe_ball(model, name: str, x: torch.Tensor, labels: torch.Tensor, ids, threat, seed: int) -> None:
    """One forward at a random point of each example's threat set; non-finite logits are an error."""
    if threat.eps <= 0 or len(x) == 0:
        return
    xs = threat.sample(x, seeding.generators(seed, torch.as_tensor(ids).tolist(), seeding.PROBE))
    forward(model, name, xs, labels, ids, f"random points within ε = {threat.eps:.6g} of the inputs")


def check_model(model, name: str, meta: dict, ds, threats, batch_size: int, device, seed: int = 0
                ) -> torch.Tensor:
    """Check a model against the data before any attack; return its clean predictions (dataset order).

    Input shape (when the checkpoint states it), outputs of the right type, dtype, shape and number of
    classes, finite logits on the clean inputs and at a random point of each clean-correct example's
    threat set for every radius. ``model`` must be in eval mode. A shape error raised inside the network
    means the model does not fit the data: one line, like every other failure here.
    """
    check_input_shape(name, meta, ds.input_shape)
    threats = [attacks.threat_of(t) for t in threats]
    preds = []
    for x, y, ids in ds.batches(batch_size):
        x, y = x.to(device), y.to(device)
        try:
            z = forward(model, name, x, y, ids, "the clean inputs")
            right = (z.argmax(1) == y).cpu()
            for t in threats:
                probe_ball(model, name, x[right.to(x.device)], y[right.to(y.device)], ids[right], t, seed)
        except (torch.OutOfMemoryError, UserError):
            raise
        except Exception as exc:  # noqa: BLE001 — whatever a user's network raises on the data
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UserError(f"model {name!r} cannot process {ds.name} images of shape "
                            f"{tuple(ds.input_shape)} ({type(exc).__name__}: {first})") from None
        preds.append(z.argmax(1).cpu())
    return torch.cat(preds)
