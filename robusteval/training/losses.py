"""Training losses: nominal, adversarial (PGD-k), TRADES and LLR (Qin et al. 2019).

Every inner maximisation — the PGD-k attack of adversarial training, TRADES' KL maximisation and the
LLR linearity search — is a configuration of the one attack engine, :func:`attacks.run`
(docs/design.md, "One loop"); nothing here steps a perturbation itself.

* :func:`nominal_loss` — mean cross-entropy.
* :func:`adversarial_loss` — Madry et al. 2018 with the LLR paper's Adam-PGD (ADV-k): the inner attack
  maximises the margin with k steps (Adam lr 0.1, or sign steps) from a uniform random start, keeping
  the final iterate; the model is in **eval mode** during the inner attack (attacks see running
  statistics and never update them, docs/protocol.md), then CE on the adversarial batch in train mode.
* :func:`trades_loss` — Zhang et al. 2019: ``CE(x) + β·KL(p(x) ‖ p(x'))`` with x' maximising the same KL
  (:class:`TradesKL`); inner attack in eval mode as in the TRADES code.
* :func:`llr_loss` — supplementary Algorithm 1 (docs/methods.md, "LLR training"):
  ``w_nom·mean ℓ(x) + λ·mean g(δ*; x) + μ·mean |δ*ᵀ∇ₓℓ(x)|`` with ``g = |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)|``,
  ∇ₓℓ from ``autograd.grad(ℓ.sum(), x, create_graph=True)`` (the sum, not the mean) so the μ-term and g are
  differentiated through it (double backprop), δ* from M Adam steps of the engine's
  ``local-linearity`` preset with batch norm replaying the nominal statistics (:mod:`.batchnorm`).

:func:`compute_loss` dispatches on a :class:`LossConfig`; all return a :class:`LossOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import attacks
from robusteval.runtime import eval_mode
from robusteval.training.batchnorm import BatchNormReplay

METHODS = ("nominal", "adversarial", "trades", "llr")


#: Per-example cross-entropy (the ℓ of the LLR paper), defined once in :mod:`attacks`.
cross_entropy = attacks.per_example_cross_entropy


@dataclass
class LossOutput:
    """``loss``: the scalar to minimise; ``logits``: the logits the progress accuracy is computed from
    (clean for nominal/TRADES/LLR, adversarial for adversarial training); ``parts``: named components
    (floats) for logging; ``delta``: the inner perturbation used (``None`` when there was none)."""

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict = field(default_factory=dict)
    delta: torch.Tensor | None = None


@dataclass(frozen=True)
class LossConfig:
    """Method and hyper-parameters of the training loss (see the module docstring).

    ``steps``: inner steps (k for PGD-k and TRADES, M for LLR); ``step_size``: inner step (absolute,
    or in units of ε when ``relative_step``); ``None`` means Adam 0.1 absolute (the paper, F.2) or, for
    sign steps, 2.5ε/k (Madry et al.). ``llr_lambda`` = λ, ``llr_mu`` = μ (the paper's coefficient of
    mean |δᵀ∇ℓ|), ``nominal_weight`` = weight of mean ℓ(x); ``grad_mode`` of the linearity search:
    ``"deepmind"`` (δ stop-gradiented in the linear term, as DeepMind's code) or ``"exact"``.
    """

    method: str = "nominal"
    steps: int = 10
    step_size: float | None = None
    relative_step: bool = False
    inner_optimizer: str = "adam"
    llr_lambda: float = 4.0
    llr_mu: float = 3.0
    nominal_weight: float = 2.0
    trades_beta: float = 6.0
    grad_mode: str = "deepmind"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.inner_optimizer not in ("adam", "sign"):
            raise ValueError("inner_optimizer must be 'adam' or 'sign'")
        if self.steps < 1:
            raise ValueError("inner steps must be >= 1")


@dataclass(frozen=True)
class TradesKL(attacks.ObjectiveBase):
    """TRADES' inner objective ``KL(p(x) ‖ p(x'))`` per example (Zhang et al. 2019, Eq. 5), maximised.

    Same call signature as the engine's objectives; the clean probabilities come in ``aux["p_clean"]``
    (computed by :meth:`prepare` from the model when absent, in whatever mode the model is in).
    """

    name = "trades-kl"

    def prepare(self, model, x, y, aux):
        if "p_clean" in aux:
            return aux
        with torch.no_grad():
            return {**aux, "p_clean": F.softmax(model(x), 1)}

    def __call__(self, z, y, delta, aux):
        return F.kl_div(F.log_softmax(z, 1), aux["p_clean"], reduction="none").sum(1)


def inner_attack(preset: str, eps: float, cfg: LossConfig, objective=None) -> attacks.Attack:
    """The engine configuration of a training-time inner maximisation.

    One restart, maximisation with the final iterate kept (``FinalIterate(evades=False)``: PGD-k /
    Algorithm 1 semantics, every example takes every step), ``cfg.steps`` steps, Adam (lr 0.1 unless
    ``cfg.step_size``) or sign steps.
    """
    step, relative = cfg.step_size, cfg.relative_step
    if step is None:
        step, relative = (0.1, False) if cfg.inner_optimizer == "adam" else (2.5 / cfg.steps, True)
    changes = {"objective": objective} if objective is not None else {}
    if cfg.inner_optimizer == "sign":
        changes["optimizer"] = attacks.sign()
    return attacks.get(preset, eps, steps=cfg.steps, restarts=1, step_size=step, relative_step=relative,
                       tracking=attacks.FinalIterate(evades=False), **changes)




def nominal_loss(model, x, y, **_) -> LossOutput:
    """Mean cross-entropy on the clean batch."""
    z = model(x)
    loss = cross_entropy(z, y).mean()
    return LossOutput(loss, z, {"ce": loss.item()})


def adversarial_loss(model, x, y, *, eps: float, cfg: LossConfig, ids=None, seed: int = 0,
                     delta: torch.Tensor | None = None) -> LossOutput:
    """Adversarial training (Madry et al. 2018; the LLR paper's ADV-k baseline): CE at the PGD-k point.

    The inner attack is the engine's ``pgd-k`` preset (margin objective, Adam 0.1 or sign steps),
    run with the model in eval mode; ``delta`` skips the attack and uses the given perturbation.
    """
    if delta is None:
        if eps > 0:
            with eval_mode(model):  # running statistics, never updated
                res = attacks.run(inner_attack(f"pgd-{cfg.steps}", eps, cfg), model, x, y, ids=ids, seed=seed)
            delta = (res.x_adv - x).detach()
        else:
            delta = torch.zeros_like(x)
    z = model(x + delta)
    loss = cross_entropy(z, y).mean()
    return LossOutput(loss, z, {"adv_ce": loss.item()}, delta)


def trades_loss(model, x, y, *, eps: float, cfg: LossConfig, ids=None, seed: int = 0,
                delta: torch.Tensor | None = None) -> LossOutput:
    """TRADES (Zhang et al. 2019): ``mean CE(x) + β · mean KL(p(x) ‖ p(x'))``.

    x' maximises the KL with ``cfg.steps`` engine steps (model in eval mode, clean probabilities from
    the eval-mode model, as in the TRADES code); the outer terms run in train mode. Deviation from the
    TRADES code: the engine's uniform random start in the ε-ball instead of ``0.001·N(0, 1)``.
    """
    if delta is None:
        if eps > 0:
            with eval_mode(model):  # running statistics, never updated
                attack = inner_attack("pgd-1", eps, cfg, TradesKL())
                res = attacks.run(attack, model, x, y, ids=ids, seed=seed)
            delta = (res.x_adv - x).detach()
        else:
            delta = torch.zeros_like(x)
    z = model(x)
    ce = cross_entropy(z, y).mean()
    z_adv = model(x + delta)
    kl = TradesKL()(z_adv, y, delta, {"p_clean": F.softmax(z, 1)}).mean()
    loss = ce + cfg.trades_beta * kl
    return LossOutput(loss, z, {"ce": ce.item(), "kl": kl.item()}, delta)


def llr_terms(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta: torch.Tensor,
              loss0: torch.Tensor, grad0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``g(δ; x) = |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)|`` and ``δᵀ∇ₓℓ(x)`` (Qin et al. Eq. 5, 8).

    ``loss_fn(x) -> [B]`` is the per-example loss; ``loss0``/``grad0`` are ℓ(x) and ∇ₓℓ(x) — pass them
    attached (``create_graph=True``) for the training loss, so both terms are differentiated through the
    input gradient. ``delta`` is used as given (detach it for the regulariser).
    """
    return attacks.LinearityGap.terms(loss_fn(x + delta), loss0, delta, grad0)


def llr_loss(model, x, y, *, eps: float, cfg: LossConfig, ids=None, seed: int = 0,
             delta: torch.Tensor | None = None, criterion: Callable = cross_entropy) -> LossOutput:
    """The LLR training loss, as supplementary Algorithm 1 (docs/methods.md, "LLR training"):

    ``L = w_nom · mean ℓ(x) + λ · mean g(δ*; x) + μ · mean |δ*ᵀ∇ₓℓ(x)|``.

    1. nominal pass under ``capture_train`` BN: ℓ(x) per example, G = ∇ₓ Σℓ with ``create_graph=True``;
    2. if ε > 0: δ* from the engine's ``local-linearity`` preset (M = ``cfg.steps`` Adam steps of size
       0.1, uniform start, final iterate) with ``aux = {loss0: ℓ(x), grad0: G}`` detached, under
       ``replay_detached`` BN (the model stays in train mode: ``allow_train_mode=True``);
    3. regulariser under ``replay_attached`` BN with G attached (double backprop).

    At ε = 0 the regulariser is exactly 0 and no search runs (never divided by ε). The model should be in
    train mode (its BN modules are patched either way). ``criterion(logits, y) -> [B]`` is ℓ (cross-entropy).
    """
    with BatchNormReplay(model) as bn:
        x0 = x.detach().clone().requires_grad_(True)
        z = model(x0)
        loss0 = criterion(z, y)
        (grad0,) = torch.autograd.grad(loss0.sum(), x0, create_graph=True)
        nominal = loss0.mean()
        parts = {"ce": nominal.item()}
        if eps <= 0:
            zero = nominal.new_zeros(())
            parts.update(g=0.0, lin=0.0)
            return LossOutput(cfg.nominal_weight * nominal + zero, z, parts, torch.zeros_like(x))
        if delta is None:
            bn.mode = "replay_detached"
            gap = attacks.LinearityGap(cfg.grad_mode, criterion)
            res = attacks.run(inner_attack("local-linearity", eps, cfg, gap), model, x.detach(), y, ids=ids,
                              seed=seed, aux={"loss0": loss0.detach(), "grad0": grad0.detach()},
                              allow_train_mode=True)
            delta = res.x_adv - x.detach()
        delta = delta.detach()
        bn.mode = "replay_attached"
        g, lin = llr_terms(lambda xx: criterion(model(xx), y), x.detach(), delta, loss0, grad0)
        g_mean, lin_mean = g.mean(), lin.abs().mean()
        loss = cfg.nominal_weight * nominal + cfg.llr_lambda * g_mean + cfg.llr_mu * lin_mean
        parts.update(g=g_mean.item(), lin=lin_mean.item())
        return LossOutput(loss, z, parts, delta)


_LOSSES = {"nominal": nominal_loss, "adversarial": adversarial_loss, "trades": trades_loss, "llr": llr_loss}


def compute_loss(cfg: LossConfig, model, x, y, *, eps: float, ids=None, seed: int = 0,
                 delta: torch.Tensor | None = None) -> LossOutput:
    """The training loss of ``cfg.method`` on the batch ``(x, y)`` at radius ``eps``.

    ``ids`` (stable example ids) and ``seed`` fix the inner attack's random start (the engine draws one
    generator per (seed, id)); ``delta`` reuses a given inner perturbation instead of searching.
    """
    if cfg.method == "nominal":
        return nominal_loss(model, x, y)
    return _LOSSES[cfg.method](model, x, y, eps=eps, cfg=cfg, ids=ids, seed=seed, delta=delta)
