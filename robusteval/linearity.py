"""Local linearity γ(ε, x), the Proposition 4.1 check, and loss-surface grids.

Qin et al. 2019 ("Adversarial Robustness through Local Linearization") measure how far the loss is
from its first-order Taylor model inside the ε-ball,

    g(δ; x) = |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)|,      γ(ε, x) = max_{δ∈B(ε)} g(δ; x)         (Eq. 5)

and show (Proposition 4.1, supplementary B) that for *every* δ in the ball
|ℓ(x+δ) − ℓ(x)| ≤ |δᵀ∇ₓℓ(x)| + γ(ε, x).

* :func:`gamma` estimates γ per example with the attack engine's ``local-linearity`` preset (50 Adam
  steps of size 0.1 from a uniform start, supplementary F.4; docs/methods.md, "Local linearity") —
  no second ascent loop lives here (docs/design.md, "One loop"). It runs in fp32 with TF32 off and
  autocast disabled (docs/protocol.md, "Numerics of γ and LLR"), with batch norm in eval mode or, with
  ``bn="nominal"``, normalising every forward with the nominal batch's statistics as the LLR trainer
  does (docs/protocol.md, "Batch norm").
* :func:`prop41_check` tests the proposition on the δ found by any attack: a violation proves that the
  estimated γ is too small (the search is a lower bound on the true maximum).
* :func:`loss_surface` evaluates ℓ on the plane spanned by an adversarial and a random sign direction
  (supplementary Figure A1).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import attacks
from robusteval.runtime import device_of, eval_mode, strict_fp32

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BN_MODES = ("eval", "nominal")
GRAD_MODES = ("deepmind", "exact")


#: Per-example cross-entropy, the loss ℓ of the paper (defined once, in :mod:`attacks`).
cross_entropy = attacks.per_example_cross_entropy


# ----------------------------------------------------------------------------------- numerics & modes


@contextlib.contextmanager
def _bn_context(model: torch.nn.Module, bn: str, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn):
    """Yield ``(loss0, grad0)`` at the nominal point with the requested batch-norm convention active.

    ``eval``: running statistics (post-hoc measurement; the default). ``nominal``: the
    statistics of the nominal batch ``x`` normalise every forward pass (the LLR trainer's convention,
    docs/methods.md, "LLR training"), so the measured γ is the one the regulariser saw; ``∇ℓ(x)`` then
    includes the
    coupling through the batch statistics, as in DeepMind's ``local_linearity``. Running statistics are
    never updated.
    """
    if bn == "eval":
        with eval_mode(model):
            yield _loss_and_grad(model, x, y, loss_fn)
        return
    from robusteval.training.batchnorm import BatchNormReplay, batchnorm_modules

    # The capture pass updates running statistics (the trainer wants that once per step); a measurement
    # must leave the model untouched, so the buffers are restored afterwards.
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in batchnorm_modules(model)]
    try:
        with eval_mode(model), BatchNormReplay(model, "capture_train") as replay:
            out = _loss_and_grad(model, x, y, loss_fn)
            replay.mode = "replay_detached"  # every perturbed pass: nominal statistics, no graph into them
            yield out
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def _loss_and_grad(model, x, y, loss_fn):
    """Per-example ℓ(x) and ∇ₓℓ(x) (the gradient of the sum), as the engine computes them."""
    return attacks.LinearityGap(loss=loss_fn).loss_and_grad(model, x, y)


# ------------------------------------------------------------------------------------------------- γ


@dataclass
class GammaResult:
    """Per-example γ estimate (tensors of length B on the model's device).

    ``gamma`` = g(δ; x) at the returned ``delta`` (recomputed there, so ``gamma`` ==
    |``loss_adv`` − ``loss`` − δᵀ``grad``| exactly); ``lin`` = |δᵀ∇ₓℓ(x)|; ``loss`` = ℓ(x);
    ``loss_adv`` = ℓ(x+δ); ``grad`` = ∇ₓℓ(x); ``clean_logits`` = logits at x in eval mode (for
    clean accuracy, whatever ``bn``); ``search_value`` = the engine's best objective.
    """

    gamma: torch.Tensor
    delta: torch.Tensor
    lin: torch.Tensor
    loss: torch.Tensor
    loss_adv: torch.Tensor
    grad: torch.Tensor
    clean_logits: torch.Tensor
    search_value: torch.Tensor
    eps: float
    steps: int
    bn: str
    grad_mode: str

    @property
    def sqrt_gamma(self) -> torch.Tensor:
        """√γ, the quantity histogrammed in supplementary Figure F3."""
        return self.gamma.clamp(min=0).sqrt()


def _check_fp32(model) -> None:
    if not isinstance(model, torch.nn.Module):
        return
    bad = {str(t.dtype) for t in [*model.parameters(), *model.buffers()]
           if t.is_floating_point() and t.dtype != torch.float32}
    if bad:
        raise ValueError(f"γ is measured in fp32; the model has {', '.join(sorted(bad))} "
                         "tensors — call model.float()")


def gamma(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 50,
    step_size: float = 0.1,
    restarts: int = 1,
    bn: str = "eval",
    grad_mode: str = "deepmind",
    seed: int = 0,
    ids: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    relative_step: bool = False,
) -> GammaResult:
    """Estimate γ(ε, x) = max_{δ∈B(ε)} |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)| per example (Qin et al. 2019, Eq. 5).

    The search is the engine's ``local-linearity`` preset: Adam with step ``step_size`` (paper: 0.1,
    absolute pixel units) for ``steps`` (paper: 50) from a uniform start, ``restarts`` independent starts,
    keeping the best iterate (supplementary F.4; docs/methods.md). The result is a *lower bound* on the
    true γ. ``grad_mode="deepmind"`` stops the gradient through δ in the linear term as DeepMind's code
    does; ``"exact"`` ascends the true gradient of g. ``bn``: ``"eval"`` (running statistics)
    or ``"nominal"`` (the nominal batch's statistics, as in LLR training — then γ depends on the batch).
    ``loss_fn(logits, y) -> [N]`` replaces cross-entropy (for analytic tests); ``relative_step=True`` reads
    ``step_size`` in units of ε. Random starts come from
    ``(seed, ids)``, so a result does not depend on batching (except with ``bn="nominal"``). Runs on the
    model's device in fp32 with TF32 and autocast off; every module's train/eval flag is restored after.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    _check_fp32(model)
    loss_fn = loss_fn or cross_entropy
    device = device_of(model)
    x = x.detach().to(device=device, dtype=torch.float32)
    y = y.detach().to(device).long()
    attack = attacks.get("local-linearity", eps, steps=steps, restarts=restarts, step_size=step_size,
                         relative_step=relative_step, objective=attacks.LinearityGap(grad_mode, loss_fn))
    with strict_fp32(device), eval_mode(model), torch.no_grad():
        clean_logits = model(x)  # clean accuracy is always judged in eval mode (docs/protocol.md)
    with strict_fp32(device), _bn_context(model, bn, x, y, loss_fn) as (loss0, grad0):
        res = attacks.run(attack, model, x, y, ids=ids, seed=seed, aux={"loss0": loss0, "grad0": grad0})
        with torch.no_grad():
            # Recompute the pieces at the returned point, so γ, |δᵀ∇ℓ|, ℓ(x) and ℓ(x+δ) are consistent.
            delta = res.x_adv - x
            loss_adv = loss_fn(model(res.x_adv), y)
            g, lin = attacks.LinearityGap.terms(loss_adv, loss0, delta, grad0)
    return GammaResult(g, delta, lin.abs(), loss0, loss_adv, grad0, clean_logits, res.value, float(eps),
                       steps, bn, grad_mode)


# ----------------------------------------------------------------------------------- Proposition 4.1


@dataclass
class Prop41Result:
    """Per-example terms of |ℓ(x+δ) − ℓ(x)| ≤ |δᵀ∇ℓ(x)| + γ(ε, x) and the verdict.

    ``slack`` = bound − lhs (negative: violated); ``violated`` = slack < −tol; ``fraction`` of examples
    violating; ``shortfall`` = how much γ would have to grow to restore the bound (0 where it holds).
    """

    lhs: torch.Tensor
    bound: torch.Tensor
    slack: torch.Tensor
    violated: torch.Tensor
    shortfall: torch.Tensor
    fraction: float


def prop41_check(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    gamma_result: GammaResult,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    loss_fn: LossFn | None = None,
    warn: bool = True,
) -> Prop41Result:
    """Check Proposition 4.1 (supplementary B) for the points ``x_adv`` found by any attack.

    For δ = x_adv − x in the same ε-ball, |ℓ(x+δ) − ℓ(x)| ≤ |δᵀ∇ₓℓ(x)| + γ(ε, x) must hold for the true
    γ; the estimate is a lower bound, so a violation beyond ``atol + rtol·|ℓ|`` proves that the γ search
    under-estimated γ by at least the shortfall (then ``g(δ; x)`` of the attack's δ is a better
    estimate). ℓ and ∇ℓ are evaluated under ``gamma_result.bn`` (``x`` must be the batch γ was measured
    on). Warns with the size of the worst violation.
    """
    loss_fn = loss_fn or cross_entropy
    device = gamma_result.gamma.device
    x = x.detach().to(device, torch.float32)
    x_adv = x_adv.detach().to(device, torch.float32)
    y = y.detach().to(device).long()
    delta = x_adv - x
    ball = attacks.LinfBall(gamma_result.eps)
    if not bool(ball.contains(x_adv, x).all()):
        worst = ball.distance(x_adv, x).max().item()
        raise ValueError(f"x_adv leaves the ε-ball of the γ estimate (‖δ‖∞ up to {worst:.4g} > ε = "
                         f"{gamma_result.eps:.4g}, or outside [0, 1]); Proposition 4.1 only covers δ ∈ B(ε)")
    # ℓ is evaluated under the γ estimate's batch-norm convention (with "nominal", the statistics of the
    # batch x), so both sides of the inequality concern the same function.
    with strict_fp32(device), _bn_context(model, gamma_result.bn, x, y, loss_fn) as (loss0, grad0):
        with torch.no_grad():
            loss_adv = loss_fn(model(x_adv), y)
    lhs = (loss_adv - loss0).abs()
    lin = attacks.LinearityGap.terms(loss_adv, loss0, delta, grad0)[1].abs()
    bound = lin + gamma_result.gamma
    slack = bound - lhs
    tol = atol + rtol * torch.maximum(loss0.abs(), loss_adv.abs())
    violated = slack < -tol
    shortfall = (-slack).clamp(min=0) * violated
    fraction = float(violated.float().mean()) if violated.numel() else 0.0
    if warn and bool(violated.any()):
        warnings.warn(
            f"Proposition 4.1 violated for {int(violated.sum())} of {violated.numel()} examples: the γ "
            f"search under-estimated γ(ε={gamma_result.eps:.4g}, x) by up to {shortfall.max().item():.4g} "
            f"(mean over violations {shortfall[violated].mean().item():.4g}); use more steps or restarts",
            RuntimeWarning, stacklevel=2)
    return Prop41Result(lhs, bound, slack, violated, shortfall, fraction)


# ------------------------------------------------------------------------------------- loss surface


def random_direction(shape, seed: int = 0) -> torch.Tensor:
    """A random sign direction (entries ±1, ‖v‖∞ = 1) drawn from a seeded CPU generator."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, tuple(shape), generator=g).float().mul_(2).sub_(1)


@dataclass
class SurfaceGrid:
    """ℓ over the plane x + a·ε·u + b·ε·v (clipped to the box), supplementary Figure A1.

    ``a``, ``b``: the grid coordinates in units of ε (``a = 1, b = 0`` is the attack's point exactly);
    ``loss[i, j]`` = ℓ at ``(a[i], b[j])``; ``center`` = ℓ(x); ``adv`` = ℓ at the attack's point.
    """

    a: torch.Tensor
    b: torch.Tensor
    loss: torch.Tensor
    center: float
    adv: float
    eps: float

    def to_frame(self):
        """Long-format table ``a, b, loss`` (one row per grid point) for CSV export."""
        import pandas as pd

        aa, bb = torch.meshgrid(self.a, self.b, indexing="ij")
        return pd.DataFrame({"a": aa.flatten().numpy(), "b": bb.flatten().numpy(),
                             "loss": self.loss.flatten().numpy()})


def loss_surface(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | int,
    adv_direction: torch.Tensor,
    rand_direction: torch.Tensor | int = 0,
    eps: float = 8 / 255,
    grid: int = 41,
    extent: float = 2.0,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
) -> SurfaceGrid:
    """ℓ(clip(x + a·ε·u + b·ε·v, 0, 1)) on a ``grid``×``grid`` plane (supplementary Figure A1).

    ``u = adv_direction / ε`` where ``adv_direction`` is the attack's δ = x_adv − x (e.g. from the
    ``untargeted`` preset), so ``a = 1`` is exactly the adversarial point; ``v`` is a random sign direction
    (``rand_direction``: a tensor, or an int seed for :func:`random_direction`). Both axes run over
    ``[−extent, extent]`` in units of ε; ``grid`` must be odd so the centre ``(0, 0)`` = ℓ(x) is a grid
    point, and with the default extent 2 and grid 41 the point ``a = 1`` is one too. ``x`` is one image
    ``[C, H, W]`` (or ``[1, C, H, W]``). The model is evaluated in eval mode, fp32, no TF32.
    """
    if grid < 3 or grid % 2 == 0:
        raise ValueError(f"grid must be an odd number ≥ 3 (so the centre is a grid point), got {grid}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive for a loss surface, got {eps!r}")
    if not (extent > 0 and math.isfinite(extent)):
        raise ValueError(f"extent must be a positive finite number (units of ε), got {extent!r}")
    loss_fn = loss_fn or cross_entropy
    device = device_of(model)
    x = x.detach().to(device, torch.float32).reshape(1, *x.shape[-3:])
    y = torch.as_tensor(y, device=device).long().reshape(1)
    u = adv_direction.detach().to(device, torch.float32).reshape(x.shape) / eps
    v = rand_direction if torch.is_tensor(rand_direction) else random_direction(x.shape, rand_direction)
    v = v.detach().to(device, torch.float32).reshape(x.shape)
    half = (grid - 1) // 2
    # Coordinates k·extent/half computed in float64: exact at k = ±half and wherever extent·k/half is a
    # short binary fraction, so a = 1 lands on the attack's point (test: surface matches ℓ(x_adv)).
    coords = torch.arange(-half, half + 1, dtype=torch.float64) * extent / half
    aa, bb = torch.meshgrid(coords, coords, indexing="ij")
    pa = aa.flatten().float().to(device).view(-1, 1, 1, 1) * eps
    pb = bb.flatten().float().to(device).view(-1, 1, 1, 1) * eps
    out = []
    with strict_fp32(device), eval_mode(model), torch.no_grad():
        for s in range(0, pa.shape[0], batch_size):
            pts = (x + pa[s:s + batch_size] * u + pb[s:s + batch_size] * v).clamp(0, 1)
            out.append(loss_fn(model(pts), y.expand(pts.shape[0])))
        center = loss_fn(model(x), y)
        adv = loss_fn(model((x + eps * u).clamp(0, 1)), y)
    loss = torch.cat(out).view(grid, grid).cpu()
    return SurfaceGrid(coords.float(), coords.float(), loss, float(center), float(adv), float(eps))


# ------------------------------------------------------------------------------------------ summaries


def gamma_records(model, name: str, sha256: str, ds, eps: float, eps_text: str | None = None, *,
                  batch_size: int = 100, steps: int = 50, step_size: float = 0.1, relative_step: bool = False,
                  restarts: int = 1, bn: str = "eval", grad_mode: str = "deepmind", seed: int = 0,
                  step_size_text: str | None = None, on_batch=None, emit=None) -> list[dict]:
    """γ(ε, x) of ``model`` on every example of the dataset ``ds``, as γ records (:data:`records.GAMMA`).

    Batches of ``batch_size``; after each, ``emit(rows)`` (to append them to a file) and
    ``on_batch(n)``. A model that returns NaN or inf anywhere in the search is a :class:`UserError`
    naming it and the first example (γ of a NaN is not 0).
    """
    from robusteval.data import example_digest
    from robusteval.errors import UserError

    rows: list[dict] = []
    text = eps_text if eps_text is not None else repr(float(eps))
    num = lambda t: t.detach().cpu().double().tolist()
    for x, y, ids in ds.batches(batch_size):
        first = len(rows)
        try:
            r = gamma(model, x, y, eps, steps=steps, step_size=step_size, relative_step=relative_step,
                      restarts=restarts, bn=bn, grad_mode=grad_mode, seed=seed, ids=ids)
        except attacks.NonFiniteLogits as exc:
            raise UserError(f"model {name!r} returns non-finite logits (NaN or inf) inside the ε = {eps:.6g} "
                            f"ball of example {int(exc.example_ids[0])}; γ cannot be measured (a NaN is "
                            "never 'perfectly linear')") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        pred = r.clean_logits.argmax(1).cpu().tolist()
        values = {k: num(getattr(r, a)) for k, a in (("gamma", "gamma"), ("sqrt_gamma", "sqrt_gamma"),
                                                      ("lin_abs", "lin"), ("loss", "loss"),
                                                      ("loss_adv", "loss_adv"))}
        for i, (xi, yi, idi) in enumerate(zip(x, y.tolist(), ids.tolist(), strict=True)):
            rows.append({
                "model": name, "checkpoint_sha256": sha256, "dataset": ds.name, "example_id": int(idi),
                "label": int(yi), "example_sha": example_digest(xi.numpy(), yi),
                "clean_pred": int(pred[i]), "clean_correct": pred[i] == yi, "eps": float(eps),
                "eps_text": text,
                **{k: v[i] for k, v in values.items()}, "steps": steps,
                "step_size": step_size_text if step_size_text is not None else repr(step_size),
                "restarts": restarts, "bn": bn, "grad_mode": grad_mode, "seed": seed,
            })  # fmt: skip
        if emit is not None:
            emit(rows[first:])
        if on_batch is not None:
            on_batch(len(y))
        del r
    return rows


def gamma_summary(df):
    """Per-model summary of γ records (the ``gamma.csv`` rows): n, ε, clean accuracy and the mean,
    median and 90th percentile of √γ (the statistics behind supplementary Figure F3), and mean γ."""
    import pandas as pd

    rows = []
    for name, g in df.groupby("model", sort=False):
        s = g["sqrt_gamma"]
        rows.append({"model": name, "n": len(g), "eps": float(g["eps"].iloc[0]),
                     "clean_acc": float(g["clean_correct"].mean()), "sqrt_gamma_mean": float(s.mean()),
                     "sqrt_gamma_median": float(s.median()), "sqrt_gamma_p90": float(s.quantile(0.9)),
                     "gamma_mean": float(g["gamma"].mean())})
    return pd.DataFrame(rows)
