"""The reference trainer: nominal, adversarial (ADV-k), TRADES and LLR (Qin et al. 2019).

* :mod:`.batchnorm` — :class:`BatchNormReplay`, batch-norm capture/replay for LLR (docs/methods.md);
* :mod:`.losses` — :func:`compute_loss` and the four losses; every inner maximisation runs through
  :func:`attacks.run` (docs/design.md, "One loop");
* :mod:`.trainer` — :func:`make_config`, :func:`train` (SGD, ε ramp, checkpoints, exact resume,
  held-out PGD-50 evaluation), used by ``robusteval train``.
"""

from robusteval.training.batchnorm import MODES, BatchNormReplay, batchnorm_modules
from robusteval.training.losses import (
    METHODS,
    LossConfig,
    LossOutput,
    TradesKL,
    adversarial_loss,
    compute_loss,
    cross_entropy,
    inner_attack,
    llr_loss,
    llr_terms,
    nominal_loss,
    trades_loss,
)
from robusteval.training.trainer import (
    DATASET_DEFAULTS,
    StepInfo,
    TrainConfig,
    build_model,
    eps_at,
    heldout_check,
    load_training_data,
    lr_at,
    make_config,
    make_optimizer,
    resume_config,
    train,
)

__all__ = [
    "MODES", "BatchNormReplay", "batchnorm_modules",
    "METHODS", "LossConfig", "LossOutput", "TradesKL", "adversarial_loss", "compute_loss",
    "cross_entropy", "inner_attack", "llr_loss", "llr_terms", "nominal_loss", "trades_loss",
    "DATASET_DEFAULTS", "StepInfo", "TrainConfig", "build_model", "eps_at", "heldout_check",
    "load_training_data", "lr_at", "make_config", "make_optimizer", "resume_config", "train",
]
