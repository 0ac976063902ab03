"""attacks — Adam-driven PGD attacks for PyTorch classifiers (imports torch only).

A tour
------
An attack is a frozen :class:`Attack`: *objective × optimizer × schedule × threat × restarts*.
One loop, :func:`run`, executes every attack with AutoAttack's semantics (clean pass first, survivors
only, a found adversarial example is never lost) and returns a per-example :class:`Result`::

    import attacks
    atk = attacks.get("multi-targeted", eps=8/255)            # paper defaults (Qin et al. 2019, F.1)
    res = attacks.run(atk, model.eval(), x, y, ids=ids, seed=0)
    robust = ~res.success                                     # clean-correct and still correct

Pieces, each a small value you can swap:

* threat models — :class:`LinfBall` (sampling, projection, membership);
* objectives (maximised) — :data:`margin`, :data:`cross_entropy`, :data:`targeted_margin`,
  :data:`most_likely_target`, :class:`LinearityGap` (γ(ε, x) of the LLR paper);
* optimizers — :func:`adam` (DeepMind's Adam, ε = 1e-9), :func:`sign` and :func:`apgd` (Auto-PGD's
  step-size rule), with explicit state;
* schedules — :func:`constant`, :func:`piecewise` (boundaries as fractions of the run);
* presets — ``untargeted``, ``random-targeted``, ``multi-targeted``, ``fgsm-20``, ``pgd-K``,
  ``local-linearity``, ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``square`` (:data:`PRESETS`, :func:`get`);
  batteries ``standard`` and ``paper`` (:data:`BATTERIES`, :func:`expand`).

The package name is generic; it ships inside the ``robusteval`` distribution and is not published on
its own. Design and sources: docs/design.md and docs/methods.md in the repository.
"""

from . import seeding
from .engine import (
    Attack,
    Evasion,
    FinalIterate,
    Maximize,
    MinDistance,
    NonFiniteLogits,
    Result,
    SearchStall,
    Stall,
    eot_value,
    expected_logits,
    run,
)
from .objectives import (
    DLR,
    OBJECTIVES,
    CrossEntropy,
    LinearityGap,
    Margin,
    MostLikelyTarget,
    ObjectiveBase,
    ProbabilityMargin,
    TargetedDLR,
    TargetedMargin,
    cross_entropy,
    linearity_gap,
    margin,
    margin_of,
    most_likely_target,
    per_example_cross_entropy,
    targeted_margin,
)
from .optimizers import (
    APGD,
    Adam,
    AdamState,
    APGDState,
    Hyperplane,
    MinNorm,
    Sign,
    adam,
    apgd,
    apgd_checkpoints,
    min_norm,
    project_on_hyperplane,
    sign,
)
from .presets import (
    BATTERIES,
    GATES,
    PRESETS,
    STANDARD,
    Registry,
    apgd_ce,
    apgd_dlr,
    apgd_t,
    expand,
    fgsm20,
    fmn,
    from_config,
    gates,
    get,
    local_linearity,
    multi_targeted,
    names,
    pgd,
    random_targeted,
    square,
    threat_of,
    untargeted,
)
from .protocols import Objective, Optimizer, Schedule, Threat
from .schedules import Cosine, Piecewise, constant, paper_decay, piecewise
from .seeding import example_seed, generators
from .square import RandomSquares, RandomSquaresL1, RandomSquaresL2, WindowSchedule
from .starts import (
    AttackStart,
    DiverseStart,
    GaussianStart,
    NoStart,
    StartsByRestart,
    StripeStart,
    UniformStart,
)
from .targets import (
    RandomTarget,
    RankedTargets,
    Untargeted,
    boxed_l1_distance,
    closeness,
    l1_knapsack,
    linearised_distance,
)
from .threats import BALLS, L1Ball, L2Ball, LinfBall

__all__ = [
    "Attack", "NonFiniteLogits", "Result", "run",
    "Objective", "Optimizer", "Schedule", "Threat", "ObjectiveBase",
    "Untargeted", "RandomTarget", "RankedTargets", "Evasion", "Maximize", "FinalIterate", "Stall",
    "SearchStall",
    "UniformStart", "NoStart", "StripeStart", "DiverseStart", "GaussianStart", "AttackStart",
    "StartsByRestart", "linearised_distance", "boxed_l1_distance", "l1_knapsack", "RandomSquares",
    "WindowSchedule", "square",
    "example_seed", "generators", "seeding", "threat_of", "eot_value", "expected_logits",
    "LinfBall", "L2Ball", "L1Ball", "BALLS", "MinNorm", "min_norm", "MinDistance", "Cosine",
    "Hyperplane", "project_on_hyperplane",
    "RandomSquaresL2", "RandomSquaresL1", "fmn",
    "Margin", "CrossEntropy", "TargetedMargin", "MostLikelyTarget", "LinearityGap", "OBJECTIVES",
    "DLR", "TargetedDLR", "ProbabilityMargin",
    "margin", "cross_entropy", "targeted_margin", "most_likely_target", "linearity_gap", "margin_of",
    "per_example_cross_entropy",
    "Adam", "AdamState", "Sign", "adam", "sign", "APGD", "APGDState", "apgd", "apgd_checkpoints",
    "Piecewise", "constant", "piecewise", "paper_decay",
    "PRESETS", "BATTERIES", "GATES", "STANDARD", "Registry", "get", "names", "from_config", "expand",
    "gates", "closeness",
    "apgd_ce", "apgd_dlr", "apgd_t",
    "untargeted", "random_targeted", "multi_targeted", "fgsm20", "pgd", "local_linearity",
]
