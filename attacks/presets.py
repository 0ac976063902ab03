"""Named attacks with the LLR paper's defaults (supplementary F.1, F.4; docs/methods.md).

| preset            | optimizer | steps | schedule                        | restarts | objective            |
|-------------------|-----------|-------|---------------------------------|----------|----------------------|
| untargeted        | adam      | 200   | 0.1 → 0.01 @50% → 0.001 @75%    | 20       | margin               |
| random-targeted   | adam      | 200   | same                            | 20       | z_t − max_{j≠t} z_j  |
| multi-targeted    | adam      | 200   | 0.1 constant                    | 20 (*)   | z_t − z_y            |
| fgsm-20           | sign      | 20    | ε/10                            | 1        | margin               |
| pgd-50 (pgd-k)    | adam      | k     | 0.1 constant                    | 1        | margin               |
| local-linearity   | adam      | 50    | 0.1 constant                    | 1        | linearity gap g(δ;x) |
| apgd-ce           | apgd      | 100   | 2ε, then APGD's own rule        | 1        | cross-entropy        |
| apgd-dlr          | apgd      | 100   | same                            | 1        | DLR                  |
| apgd-t            | apgd      | 100   | same                            | 1 (**)   | targeted DLR         |
| apgd-t-margin     | apgd      | 100   | same                            | 3 (**)   | z_t − z_y            |
| apgd-dlr-odi      | apgd      | 100   | same                            | 5, ODI   | DLR                  |
| apgd-ce-odi       | apgd      | 100   | same                            | 5, ODI   | cross-entropy        |
| fab-t             | hyperplane| 100   | not used (80 steps in 10ε ball) | 1 (***)  | z_t − z_y            |

(*) round-robin over the wrong classes ranked by clean margin.
(**) every restart runs each of the 3 wrong classes nearest by linearised distance (MALT ranking),
     from an output-diversified start (ODI, 2 steps).
(***) every restart runs each of the 9 wrong classes by clean logit, from the clean input (FAB-T).

Batteries (:data:`BATTERIES`) are named sequences of presets, each run on the survivors of the ones
before it: ``standard`` (``apgd-ce``, ``apgd-t``, ``apgd-dlr-odi``, ``apgd-ce-odi``, in L2 and L1
``fab-t``, then ``apgd-t-margin`` on the near misses; the runner's checks end it with Square) and
``paper`` (the LLR paper's three attacks at 20 × 200).

Every knob can be overridden: ``get(name, eps, steps=..., restarts=..., step_size=..., objective=...)``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from typing import Callable

from . import objectives as O
from .engine import Attack, Evasion, FinalIterate, Maximize, MinDistance, SearchStall, Stall
from .optimizers import APGD, Adam, Hyperplane, MinNorm, Sign, adam, apgd, sign
from .schedules import Cosine, Piecewise, constant, paper_decay
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
from .targets import RandomTarget, RankedTargets, Untargeted
from .threats import BALLS, L1Ball, L2Ball, LinfBall


def threat_of(eps, bounds=(0.0, 1.0), norm: str = "linf"):
    """A threat value from a radius (the ``norm`` ball of radius ``eps`` in ``bounds``: ``linf``, ``l2``
    or ``l1``) or a threat itself."""
    if hasattr(eps, "project"):
        return eps
    if norm not in BALLS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(BALLS)}")
    return BALLS[norm](float(eps), bounds)


def _apgd_step(threat) -> Piecewise:
    """APGD's first step: 2ε in L∞ and L2, ε in L1 (Croce & Hein 2020, 2021)."""
    return constant(1.0 if threat.norm == "l1" else 2.0, relative=True)


def _linf(threat) -> LinfBall:
    """The paper's presets and this library's APGD/Square are defined for the L∞ ball (a number is the
    L∞ radius)."""
    threat = threat_of(threat)
    if not isinstance(threat, LinfBall):
        raise ValueError(f"this preset is defined for the L∞ threat model, not {threat!r}")
    return threat


def untargeted(threat: LinfBall) -> Attack:
    """Untargeted Adam-PGD on the margin, 200 steps, decaying step size, 20 restarts (LLR F.1)."""
    return Attack("untargeted", O.Margin(), adam(), paper_decay(0.1), _linf(threat), 200, 20)


def random_targeted(threat: LinfBall) -> Attack:
    """Random-Targeted: one random wrong class per example shared by its 20 restarts (LLR F.1, IBP)."""
    return Attack("random-targeted", O.MostLikelyTarget(), adam(), paper_decay(0.1), _linf(threat),
                  200, 20, targets=RandomTarget())


def multi_targeted(threat: LinfBall) -> Attack:
    """MultiTargeted (Gowal et al. 2019) as in the LLR paper: z_t − z_y, Adam 0.1, 200 steps, 20 restarts
    cycling round-robin over the wrong classes ranked by clean margin (docs/methods.md)."""
    return Attack("multi-targeted", O.TargetedMargin(), adam(), constant(0.1), _linf(threat),
                  200, 20, targets=RankedTargets())


def fgsm20(threat: LinfBall) -> Attack:
    """FGSM-20: 20 sign steps of ε/10 on the margin from a random start (LLR F.1)."""
    return Attack("fgsm-20", O.Margin(), sign(), constant(0.1, relative=True), _linf(threat), 20, 1)


def pgd(threat: LinfBall, steps: int = 50) -> Attack:
    """PGD-k: Adam lr 0.1, k steps, margin, one restart — the paper's on-the-fly check (Table F2)."""
    return Attack(f"pgd-{steps}", O.Margin(), adam(), constant(0.1), _linf(threat), steps, 1)


def square(threat) -> Attack:
    """Square (Andriushchenko et al. 2020): 5,000 queries of score-based random search on the margin. L∞:
    corner windows from the stripe initialisation, window area from p = 0.8 (:mod:`attacks.square`); L2:
    the meta-pattern search from a random point of the ball, p from 0.3; L1: the L1 meta-pattern search
    (Croce & Hein 2021) from a sparse point on the ball's boundary (:class:`GaussianStart`), p from
    0.8. No gradient, so gradient masking cannot fool it; queries = steps + 1 (the start is the first)."""
    threat = threat_of(threat)
    if threat.norm == "l2":
        return Attack("square", O.Margin(), RandomSquaresL2(blend=True), WindowSchedule(0.3), threat, 4999, 1,
                      start=UniformStart())
    if threat.norm == "l1":
        return Attack("square", O.Margin(), RandomSquaresL1(), WindowSchedule(0.8), threat, 4999, 1,
                      start=GaussianStart())
    return Attack("square", O.Margin(), RandomSquares(), WindowSchedule(0.8), _linf(threat), 4999, 1,
                  start=StripeStart())


def fmn(threat) -> Attack:
    """The fast minimum-norm attack (Pintor et al., NeurIPS 2021) in the threat's norm: 500 steps from
    the clean input, L2-normalised gradient steps of a cosine-annealed size (from ε to ε/100), the ball's
    radius following the boundary; the nearest adversarial point is kept (``MinDistance``). Its records
    give each example's minimum-norm radius (the ``distance`` of a broken example), up to the run's ε."""
    threat = threat_of(threat)
    return Attack("fmn", O.Margin(), MinNorm(), Cosine(1.0, 0.01, relative=True), threat, 500, 1,
                  tracking=MinDistance(), start=NoStart())


def min_norm_untargeted(threat) -> Attack:
    """The untargeted half of the ``min-norm`` battery: :func:`fmn` twice per example — from the clean
    input, and from the point APGD-CE finds at the run's radius (its L1 form anneals, as ``standard``'s)
    — each example keeping the nearer adversarial point of the two, with steps along the threat's
    steepest direction where it is dense (the gradient's sign in L∞; :class:`MinNorm`). The first
    finds the boundary nearest the clean input; the second reaches far examples, for which a ball grown
    from the clean input can settle on a boundary further out than the one a fixed-radius attack finds
    (docs/methods.md, "Minimum norm"). The radius of the run is the largest radius searched."""
    threat = threat_of(threat)
    start = AttackStart(_l1_annealed(apgd_ce(threat)))
    return fmn(threat).replace(name="min-norm-untargeted", restarts=2,
                               optimizer=MinNorm(direction="steepest"),
                               start=StartsByRestart((NoStart(), start)))


def min_norm_targeted(threat) -> Attack:
    """The targeted half of the ``min-norm`` battery: the minimum-norm search on the pair margin
    ``z_t − z_y`` towards each of the 3 wrong classes nearest by linearised distance (apgd-t's ranking;
    in L1 taken inside the box), 200 steps each from the clean input, the nearest adversarial point over
    the targets kept. An untargeted search follows the one class its gradient favours; the nearest
    boundary can belong to another (measured: examples that ``standard`` breaks with apgd-t at ε and
    the untargeted search put up to 40% further out, in L2; benchmarks/RESULTS.md)."""
    threat = threat_of(threat)
    by = "linearised-box" if threat.norm == "l1" else "linearised"
    return Attack("min-norm-targeted", O.TargetedMargin(), MinNorm(direction="steepest"),
                  Cosine(1.0, 0.01, relative=True), threat, 200, 1, targets=RankedTargets(3, all=True, by=by),
                  tracking=MinDistance(), start=NoStart())


def min_norm_fab(threat) -> Attack:
    """The third member of the ``min-norm`` battery: FAB's targeted search (:class:`~attacks.optimizers.
    Hyperplane`) as a minimum-norm attack — towards each of the 9 wrong classes by clean logit, 100 steps
    from the clean input on the pair margin ``z_t − z_y``, in the run's ball, the nearest adversarial
    point over the targets kept. It jumps to the linearised boundary instead of growing a ball from the
    clean input, so it reaches boundaries the two FMN searches do not: in L1, where a sparse boundary is
    hard to approach by small steps, it put examples that fixed-ε ``standard`` broke at ε inside ε where
    both FMN searches had them outside (benchmarks/RESULTS.md, "`standard` v11")."""
    threat = threat_of(threat)
    return Attack("min-norm-fab", O.TargetedMargin(), Hyperplane(), constant(1.0), threat, 100, 1,
                  targets=RankedTargets(9, all=True), tracking=MinDistance(), start=NoStart())


#: fab-t's search: 80% of its steps in the 10ε ball (in effect FAB's unconstrained minimum-norm search,
#: its nearest adversarial point kept), the rest in the ε-ball from that point projected onto it.
FAB_SEARCH = ((10.0, 0.8),)


def fab_t(threat) -> Attack:
    """FAB's targeted form at a fixed radius (:class:`~attacks.optimizers.Hyperplane`): towards each of
    the 9 wrong classes by clean logit (AutoAttack's FAB-T), 100 steps from the clean input on the pair
    margin ``z_t − z_y``: 80 of them a minimum-norm search in the 10ε ball that hands on its nearest
    adversarial point (:data:`FAB_SEARCH`), then 20 in the ε-ball ∩ box from that point projected onto
    it, where the first adversarial point counts. A different search from a loss ascent: it jumps to the
    linearised boundary, which breaks some examples no APGD run does (measured at L2 ε = 2.0 and L1 ε = 5,
    benchmarks/RESULTS.md). Every norm (the hyperplane projection in the threat's norm)."""
    threat = threat_of(threat)
    return Attack("fab-t", O.TargetedMargin(), Hyperplane(), constant(1.0), threat, 100, 1,
                  targets=RankedTargets(9, all=True), start=NoStart(), anneal=FAB_SEARCH)


def local_linearity(threat: LinfBall, grad_mode: str = "deepmind") -> Attack:
    """The γ(ε, x) search: maximise g(δ; x) with 50 Adam steps of size 0.1 (LLR F.4; docs/methods.md,
    "Local linearity")."""
    return Attack("local-linearity", O.LinearityGap(grad_mode), adam(), constant(0.1), _linf(threat),
                  50, 1, tracking=Maximize())


def apgd_ce(threat) -> Attack:
    """APGD on the cross-entropy (Croce & Hein 2020): 100 steps from a uniform random start, step size
    2ε then APGD's rule (:class:`~attacks.optimizers.APGD`). The cheap first pass of ``standard``."""
    threat = threat_of(threat)
    return Attack("apgd-ce", O.CrossEntropy(), apgd(), _apgd_step(threat), threat, 100, 1)


def apgd_dlr(threat) -> Attack:
    """APGD on the DLR loss (scale-invariant; margin fallback with fewer than 3 classes)."""
    threat = threat_of(threat)
    return Attack("apgd-dlr", O.DLR(), apgd(), _apgd_step(threat), threat, 100, 1)


def apgd_pma(threat) -> Attack:
    """APGD on the probability margin (:class:`~attacks.objectives.ProbabilityMargin`, the objective of PMA,
    Xie et al. 2025): apgd-ce's budget, step size and start with the other objective. Not a member of
    ``standard``: measured there as the first pass and as a diverse round, it broke as many examples as
    the cross-entropy but other ones, and did not pay for its steps (docs/methods.md, "Objectives")."""
    return apgd_ce(threat).replace(name="apgd-pma", objective=O.ProbabilityMargin())


def apgd_t(threat) -> Attack:
    """Targeted APGD on targeted DLR towards the 3 wrong classes nearest by linearised distance
    ``(z_y − z_t) / ‖∇(z_y − z_t)‖₁`` at the clean point (MALT's ranking), 100 steps each, on survivors
    only, each from an output-diversified start (:class:`~attacks.starts.DiverseStart`, 2 steps).
    AutoAttack's APGD-T attacks the 9 top-logit classes from uniform starts; the linearised ranking puts
    the class that breaks first far more often, so 3 suffice (measured in benchmarks/RESULTS.md)."""
    threat = threat_of(threat)
    return Attack("apgd-t", O.TargetedDLR(), apgd(), _apgd_step(threat), threat,
                  100, 1, targets=RankedTargets(3, all=True, by="linearised"), start=DiverseStart(2))


def apgd_t_margin(threat) -> Attack:
    """Targeted APGD on the pair margin ``z_t − z_y`` instead of the targeted DLR, towards apgd-t's ranked
    targets, 3 restarts of each from apgd-t's kind of start: ``standard``'s last round since v8, run only
    on the survivors nearest the boundary. Near the boundary the pair margin is the quantity that decides
    success, where the targeted DLR quotient, while the margin is negative, also rises when the third- and
    fourth-ranked logits fall; survivors that every earlier member left just short of another class were
    measured to cross with this objective and fresh starts where more runs of the earlier objectives did
    not (docs/methods.md, "The standard battery by version", v8)."""
    return apgd_t(threat).replace(name="apgd-t-margin", objective=O.TargetedMargin(), restarts=3)


def apgd_dlr_odi(threat) -> Attack:
    """APGD on DLR, 5 restarts of 100 steps from output-diversified starts (ODI), on survivors only: the
    diverse-restart round of ``standard`` (restarts from different faces of the ball find the optima
    that one start misses, which matters most at large ε)."""
    return apgd_dlr(threat).replace(name="apgd-dlr-odi", restarts=5, start=DiverseStart(2))


def apgd_ce_odi(threat) -> Attack:
    """APGD on the cross-entropy, 5 restarts of 100 steps from output-diversified starts (ODI)."""
    return apgd_ce(threat).replace(name="apgd-ce-odi", restarts=5, start=DiverseStart(2))


Builder = Callable[..., Attack]


class Registry(dict):
    """Preset name → builder, every builder called the same way: ``PRESETS[name](threat)``.

    Families are registered by pattern: ``pgd-K`` for any K ≥ 0 resolves on lookup (``PRESETS["pgd-7"]``,
    ``"pgd-7" in PRESETS``) to a builder of that K; :func:`names` lists them as ``pgd-K``.
    """

    def __init__(self, fixed: dict[str, Builder], families: dict[str, tuple[str, Callable[[int], Builder]]]):
        super().__init__(fixed)
        self.families = families  # shown name -> (regex with one integer group, K -> builder)

    def _family(self, key):
        for pattern, make in self.families.values():
            m = re.fullmatch(pattern, str(key))
            if m:
                return make(int(m.group(1)))
        return None

    def __missing__(self, key):
        builder = self._family(key)
        if builder is None:
            raise KeyError(f"unknown attack {key!r}; known: {', '.join(names())}")
        return builder

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or self._family(key) is not None

    def get(self, key, default=None):
        return self[key] if key in self else default


def _pgd_family(steps: int) -> Builder:
    def build(threat: LinfBall) -> Attack:
        return pgd(threat, steps)

    build.__name__ = build.__qualname__ = f"pgd_{steps}"
    return build


PRESETS = Registry(
    {
        "untargeted": untargeted,
        "random-targeted": random_targeted,
        "multi-targeted": multi_targeted,
        "fgsm-20": fgsm20,
        "pgd-50": _pgd_family(50),
        "square": square,
        "local-linearity": local_linearity,
        "apgd-ce": apgd_ce,
        "apgd-dlr": apgd_dlr,
        "apgd-pma": apgd_pma,
        "apgd-t": apgd_t,
        "apgd-dlr-odi": apgd_dlr_odi,
        "apgd-ce-odi": apgd_ce_odi,
        "apgd-t-margin": apgd_t_margin,
        "fmn": fmn,
        "fab-t": fab_t,
        "min-norm-untargeted": min_norm_untargeted,
        "min-norm-targeted": min_norm_targeted,
        "min-norm-fab": min_norm_fab,
    },
    families={"pgd-K": (r"pgd-(\d+)", _pgd_family)},
)
_SPELLINGS = {"fgsm20": "fgsm-20", "multitargeted": "multi-targeted", "randomtargeted": "random-targeted"}

#: Named batteries: presets run in order, each on the survivors of the ones before it. A battery whose
#: members differ by threat model maps the norm to its members (``"*"``: every other norm).
Members = tuple[str, ...]
BATTERIES: dict[str, Members | dict[str, Members]] = {
    "standard-v1": ("apgd-ce", "apgd-t"),
    "standard-v2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi"),
    "standard-v3": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi"),
    "standard-v4": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi"),
    "standard-v5": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi"),
    # in L2, FAB's targeted search ends the battery (docs/methods.md, "The standard battery by version")
    "standard-v6": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t"),
                    "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi")},
    # v7: v6's members; in L2 apgd-t and fab-t gated at 2 and 1 (GATES)
    "standard-v7": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t"),
                    "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi")},
    # v8: v7's members, then apgd-t-margin on the survivors nearest the boundary (GATES)
    "standard-v8": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                    "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v9: v8's members and gates; the runs of the APGD members between the first pass and the near round
    # end early when they stall (FORMS)
    "standard-v9": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                    "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v10: v9's members and gates; fab-t ends at its search's projected point, and in L1 the first pass
    # probes its annealing stages (FORMS)
    "standard-v10": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v11: v10's members and forms; in L1 fab-t joins (its hyperplane step now has an L1 projection) and
    # the targeted members are not gated (GATES)
    "standard-v11": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "l1": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v12: v11's members and gates; fab-t's search ends early where it will not come within ε (FORMS)
    "standard-v12": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "l1": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v13: v12's members and gates; in L1 the members draw from streams of their own, apgd-t attacks six
    # targets and apgd-ce-odi runs many short runs (FORMS)
    "standard-v13": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "l1": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v14: v13's members and gates; in L1 fab-t attacks six targets (FORMS)
    "standard-v14": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "l1": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    # v15: v14's members and gates; in L1 the diverse rounds and the near round end with a last approach
    # (FORMS)
    "standard-v15": {"l2": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "l1": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "fab-t", "apgd-t-margin"),
                     "*": ("apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")},
    "paper": ("untargeted", "random-targeted", "multi-targeted"),
    # a minimum-norm member searches every example, not only the survivors of the one before it
    "min-norm": ("min-norm-untargeted", "min-norm-targeted", "min-norm-fab"),
}
#: The version ``standard`` stands for: a number is quoted as "robusteval standard v15".
STANDARD = "standard-v15"
BATTERIES["standard"] = BATTERIES[STANDARD]
#: Radius annealing of the L1 members of ``standard-v4``: 30% of the steps in the 3ε ball, 30% in 2ε,
#: the rest in the ε-ball (:attr:`Attack.anneal`).
L1_ANNEAL = ((3.0, 0.3), (2.0, 0.3))


def _l1_annealed(atk: Attack) -> Attack:
    """``standard-v4``'s form of a member: in L1, every APGD member anneals its radius (3ε → 2ε → ε) and
    the runs that start at random start from a Gaussian projected onto the (3ε) ball ∩ box — a sparse
    point on its boundary; in L∞ and L2 the member is unchanged (version 3's)."""
    if atk.threat.norm != "l1" or not isinstance(atk.optimizer, APGD):
        return atk
    changes = {"anneal": L1_ANNEAL, "start": GaussianStart()}
    if isinstance(atk.targets, RankedTargets) and atk.targets.by == "linearised":
        changes["targets"] = replace(atk.targets, by="linearised-box")
    return atk.replace(**changes)


#: The wrong classes ``standard-v5``'s targeted member attacks in L1 (AutoAttack's number for every norm).
L1_TARGETS = 9


def _l1_v5(atk: Attack) -> Attack:
    """``standard-v5``'s form of a member: v4's, and in L1 a ranked-target member attacks
    :data:`L1_TARGETS` classes instead of 3. At the L1 radii where examples survive APGD-CE the
    first-order model is far outside its range (examples were measured breaking at boxed first-order
    distances of 4 to 11 ε), so the ranking is a poor guide to the class that breaks and the targets it
    leaves out are where missed examples are (benchmarks/RESULTS.md, "L1: nine targets"); L∞ and L2
    keep 3."""
    atk = _l1_annealed(atk)
    if atk.threat.norm == "l1" and isinstance(atk.targets, RankedTargets) and atk.targets.k is not None:
        atk = atk.replace(targets=replace(atk.targets, k=max(atk.targets.k, L1_TARGETS)))
    return atk


def _v6(atk: Attack) -> Attack:
    """``standard-v6``'s form of a member: v5's, and in L2 a ranked-target member attacks
    :data:`L1_TARGETS` classes too. At the L2 radii where robust models keep a quarter of their
    examples (ε = 2.0 on Fashion-MNIST), survivors that AutoAttack's nine targets break were measured
    breaking towards classes ranked fourth to eighth by the first-order distance, at first-order
    distances of 1.9 to 3.7 ε (benchmarks/RESULTS.md, "`standard` v6"): the ranking is out of its range there
    as it is in L1. L∞ keeps 3."""
    atk = _l1_v5(atk)
    if atk.threat.norm == "l2" and isinstance(atk.targets, RankedTargets) and atk.targets.k is not None:
        atk = atk.replace(targets=replace(atk.targets, k=max(atk.targets.k, L1_TARGETS)))
    return atk


#: ``standard-v9``'s rule for runs that stall (:class:`~attacks.engine.Stall`, its defaults).
STALL = Stall()
#: The members of ``standard-v9`` whose runs end when they stall: the APGD members between the first pass
#: and the near-miss round. The near round keeps every step: it runs only on survivors the score puts
#: next to the boundary, and its breaks were measured late in late runs (an example broken at step 64
#: of its twentieth run was lost when its runs could stop; benchmarks/RESULTS.md).
STALLING = ("apgd-t", "apgd-dlr-odi", "apgd-ce-odi")


def _v9(atk: Attack) -> Attack:
    """``standard-v9``'s form of a member: v6's, and the members of :data:`STALLING` end a run at the
    :data:`STALL` rule: a run still far from the boundary (relative margin below −0.5) that would not
    reach it even at five times its recent pace stops, and the example goes on to its next run
    (docs/methods.md, "Runs that stall"). The first pass keeps every step (its best points score the
    survivors for the gates), and so do fab-t and the near-miss round."""
    atk = _v6(atk)
    return atk.replace(stall=STALL) if atk.name in STALLING else atk


#: ``standard-v10``'s probes of the first pass's annealing stages in L1 (:attr:`Attack.probe`): every 10
#: steps. A probe costs a forward pass and a projection, about half a step in L1, so a row no probe breaks
#: pays about 5% more over the annealing stages, and a row whose projection is already misclassified
#: leaves within 10 steps of that instead of waiting for the ε-ball stage at 60% of the run.
PROBE = 10


def _v10(atk: Attack) -> Attack:
    """``standard-v10``'s form of a member: v9's, and two members stop spending steps that were measured
    never to break an example (docs/methods.md, "The standard battery by version", v10):

    * ``fab-t`` keeps its search (80% of its steps) and ends at the search's nearest adversarial point
      projected onto the ε-ball, without the ascent steps in the ε-ball after it: every break of fab-t in
      the v8 and v9 records (L2, ε = 2.0, five models, n = 500) came at that projected point;
    * in L1, the first pass (``apgd-ce``) probes its annealing stages every :data:`PROBE` steps
      (:attr:`Attack.probe`): an example whose iterate projected onto the ε-ball is already
      misclassified is broken there, instead of after the 60 annealing steps every L1 example took. A
      probe leaves the other rows' iterates untouched, so every example v9 breaks, v10 breaks."""
    atk = _v9(atk)
    if atk.name == "fab-t" and len(atk.anneal) == 1:
        (multiple, share), = atk.anneal
        return atk.replace(steps=int(share * atk.steps), anneal=((multiple, 1.0),))
    if atk.name == "apgd-ce" and atk.anneal:
        return atk.replace(probe=PROBE)
    return atk


#: ``standard-v12``'s rule for fab-t's search (:class:`~attacks.engine.SearchStall`, its defaults).
SEARCH_STALL = SearchStall()


def _v12(atk: Attack) -> Attack:
    """``standard-v12``'s form of a member: v10's (v11's), and ``fab-t``'s search ends early, handing its
    nearest adversarial point on to the ε-ball, when it has found none by 30% of its steps or when, at
    twice its recent geometric pace, it would still end outside 1ε and is now outside 1.5ε
    (:data:`SEARCH_STALL`; docs/methods.md, "Runs that stall"). Per-step traces of every fab-t run on
    the survivors it attacked showed the breaking searches converging steadily and ending within the
    ε-ball, most of the others at several ε (benchmarks/RESULTS.md, "`standard` v12")."""
    atk = _v10(atk)
    return atk.replace(search_stall=SEARCH_STALL) if atk.name == "fab-t" else atk


#: ``standard-v13``'s number of targets of ``apgd-t`` in L1 (AutoAttack's L1 APGD-T attacks 5): every
#: example apgd-t broke in the v12 records of the six zoo models at L1 ε = 5 and 10 (212 of them) broke
#: towards one of its first six ranked targets; the runs towards the seventh to ninth were a third of its
#: steps. ``fab-t`` and the near round keep all nine.
L1_APGD_T_TARGETS = 6
#: ``standard-v13``'s diverse cross-entropy round in L1: many short runs instead of a few long ones,
#: ``(runs per run, steps per step)`` of the preset's (5 runs of 100 steps become 20 of 50; a budget
#: override scales the same way). On survivors that only a second attack had broken, fresh starts were
#: what broke them: at the same 1,000 steps per example, 20 runs of 50 steps broke more than 10 of 100,
#: 3 of 300 or 1 of 1,000 (benchmarks/RESULTS.md, "`standard` v13").
L1_CE_SHORT = (4, 0.5)
#: ``standard-v13``'s generator streams per member (:attr:`Attack.stream`): disjoint for up to 1,024 runs
#: per member (the presets' budgets take at most 27), so no member repeats another's start. Before, run
#: ``j`` of every member drew from stream ``j``: in L1, where every APGD member starts from a Gaussian
#: point, the first run of ``apgd-ce-odi`` repeated ``apgd-ce``'s run exactly, on examples it had
#: already failed to break.
STREAMS = {"apgd-ce": 0, "apgd-t": 1 << 10, "apgd-dlr-odi": 2 << 10, "apgd-ce-odi": 3 << 10,
           "fab-t": 4 << 10, "apgd-t-margin": 5 << 10}


def _v13(atk: Attack) -> Attack:
    """``standard-v13``'s form of a member: v12's, and in L1
    (docs/methods.md, "The standard battery by version", v13):

    * every member draws its runs' starts from streams of its own (:data:`STREAMS`);
    * ``apgd-t`` attacks its first :data:`L1_APGD_T_TARGETS` ranked targets, not nine;
    * ``apgd-ce-odi`` runs four times as many runs of half the steps (:data:`L1_CE_SHORT`): 20 of 50
      instead of 5 of 100.

    L∞ and L2 keep v12's form."""
    atk = _v12(atk)
    if atk.threat.norm != "l1":
        return atk
    changes = {"stream": STREAMS.get(atk.name, 0)}
    if atk.name == "apgd-t" and isinstance(atk.targets, RankedTargets):
        changes["targets"] = replace(atk.targets, k=L1_APGD_T_TARGETS)
    if atk.name == "apgd-ce-odi":
        runs, steps = L1_CE_SHORT
        changes.update(restarts=runs * atk.restarts, steps=max(1, int(steps * atk.steps)))
    return atk.replace(**changes)


#: ``standard-v14``'s number of targets of ``fab-t`` in L1, by clean logit (AutoAttack's L1 FAB-T attacks
#: 9). Every example fab-t broke in the v11, v12 and v13 records at L1 ε = 5 and 10 (19 of them) broke
#: towards one of its first six targets, as apgd-t's did (:data:`L1_APGD_T_TARGETS`); the searches towards
#: the seventh to ninth were about a third of its steps. The near round keeps all nine: it was measured
#: breaking towards its eighth (benchmarks/RESULTS.md, "`standard` v14").
L1_FAB_TARGETS = 6


def _v14(atk: Attack) -> Attack:
    """``standard-v14``'s form of a member: v13's, and in L1 ``fab-t`` searches towards its first
    :data:`L1_FAB_TARGETS` targets by clean logit, not nine
    (docs/methods.md, "The standard battery by version", v14). Its best point, now the best of six
    searches, still scores the survivors for the near round. L∞ and L2 keep v13's form (v12's)."""
    atk = _v13(atk)
    if atk.threat.norm == "l1" and atk.name == "fab-t" and isinstance(atk.targets, RankedTargets):
        return atk.replace(targets=replace(atk.targets, k=L1_FAB_TARGETS))
    return atk


#: ``standard-v15``'s last approach (:attr:`Attack.polish`): its steps, and the members that end with it.
POLISH = 50
POLISHED = ("apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin")


def _v15(atk: Attack) -> Attack:
    """``standard-v15``'s form of a member: v14's, and in L1 the two diverse rounds and the near round end
    with a last approach (:attr:`Attack.polish`, :data:`POLISH` steps of APGD on the margin at ε/10 from
    each unbroken example's best point). The survivors these rounds leave nearest the boundary were
    measured a hair from it (margins of −0.001 to −0.03) at points whose runs followed another class, and
    the short ascent on the margin from there broke them
    (docs/methods.md, "The standard battery by version", v15). It adds only successes: every example
    v14 breaks, v15 breaks, and an example no polish breaks has v14's records but for the polish's steps.
    L∞ and L2 keep v14's form."""
    atk = _v14(atk)
    if atk.threat.norm == "l1" and atk.name in POLISHED:
        return atk.replace(polish=POLISH)
    return atk


#: Per battery, the form its members take (applied after any budget override).
FORMS: dict[str, Callable[[Attack], Attack]] = {"standard-v4": _l1_annealed, "standard-v5": _l1_v5,
                                                "standard-v6": _v6, "standard-v7": _v6, "standard-v8": _v6,
                                                "standard-v9": _v9, "standard-v10": _v10,
                                                "standard-v11": _v10, "standard-v12": _v12,
                                                "standard-v13": _v13, "standard-v14": _v14,
                                                "standard-v15": _v15}
FORMS["standard"] = FORMS[STANDARD]
#: Per member of a battery, the closeness (:func:`attacks.closeness`, in units of ε) above which a
#: survivor skips that member. Every member before a gated one scores its survivors at the best point
#: it found, and a survivor's score is the smallest so far: the targeted round goes to survivors whose
#: boundary the first-order model puts within 1ε of a best point, the diverse-restart rounds to those
#: within ε/2 and ε/4 (docs/methods.md, "The standard battery by version"). A battery whose gates differ
#: by threat model maps the norm to its gates (``"*"``: every other norm). ``standard-v6`` does not gate
#: its targeted member in L2: there, a single untargeted run's first-order score was measured to skip
#: survivors the targeted member breaks (scores of 1.0 to 1.9 ε at L2 ε = 2.0); the targeted member's
#: own nine class-directed best points then score the survivors for the two diverse-restart rounds.
#: Nor ``fab-t``: the examples it broke there had scores of 0.12 to 0.87, no better separated.
#: ``standard-v7`` gates both in L2, looser than in L∞: apgd-t at 2 and fab-t at 1, above every score
#: at which they were measured to break an example there (1.91 and 0.87; in L∞ the targeted round's
#: breaks scored at most 0.2). The score is a first-order distance and its error is the model's
#: curvature over the distance extrapolated; the L2 gates sit where that error was measured to end
#: (docs/methods.md, "The standard battery by version").
#: ``standard-v8``'s last gate: the near-miss round (``apgd-t-margin``) goes to the survivors whose
#: smallest closeness is at most this (docs/methods.md, "The standard battery by version", v8).
#: ``standard-v11`` gates neither targeted member in L1 (apgd-t, and fab-t, which joins there): at
#: L1 ε = 5 the first pass's scores do not separate the survivors (94–99% of them score at most 2.5 on
#: the robust models) and apgd-t and fab-t were measured breaking examples that scored 2.13 and 1.05,
#: so a gate saved little and lost examples (docs/methods.md, "The standard battery by version", v11).
NEAR = 0.05
Gates = tuple[float | None, ...]
GATES: dict[str, Gates | dict[str, Gates]] = {
    "standard-v3": (None, 1.0, 0.5, 0.25),
    "standard-v4": (None, 1.0, 0.5, 0.25),
    "standard-v5": (None, 1.0, 0.5, 0.25),
    "standard-v6": {"l2": (None, None, 0.5, 0.25, None), "*": (None, 1.0, 0.5, 0.25)},
    "standard-v7": {"l2": (None, 2.0, 0.5, 0.25, 1.0), "*": (None, 1.0, 0.5, 0.25)},
    "standard-v8": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v9": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v10": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v11": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "l1": (None, None, 0.5, 0.25, None, NEAR),
                     "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v12": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "l1": (None, None, 0.5, 0.25, None, NEAR),
                     "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v13": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "l1": (None, None, 0.5, 0.25, None, NEAR),
                     "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v14": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "l1": (None, None, 0.5, 0.25, None, NEAR),
                     "*": (None, 1.0, 0.5, 0.25, NEAR)},
    "standard-v15": {"l2": (None, 2.0, 0.5, 0.25, 1.0, NEAR), "l1": (None, None, 0.5, 0.25, None, NEAR),
                     "*": (None, 1.0, 0.5, 0.25, NEAR)},
}
GATES["standard"] = GATES[STANDARD]


def by_norm(entry, norm: str):
    """A :data:`BATTERIES` or :data:`GATES` entry in the threat model ``norm`` (an entry that maps norms
    to values gives ``norm``'s, else its ``"*"``)."""
    return entry.get(norm, entry.get("*")) if isinstance(entry, dict) else entry


def gates(names, norm: str = "linf") -> dict[str, float]:
    """Member name → closeness gate in the threat model ``norm``, for the gated batteries among ``names``
    (:data:`GATES`)."""
    out: dict[str, float] = {}
    for item in names:
        key = str(item).strip().lower() if not isinstance(item, Attack) else None
        if key in GATES:
            chosen = by_norm(GATES[key], norm)
            out.update({m: g for m, g in zip(by_norm(BATTERIES[key], norm), chosen, strict=True)
                        if g is not None})
    return out


def expand(names, norm: str = "linf") -> list:
    """Battery names replaced by their members in the threat model ``norm`` (other names and
    :class:`Attack` objects kept), in order."""
    return [item for item, _ in members(names, norm)]


def members(names, norm: str = "linf") -> list[tuple[object, Callable[[Attack], Attack]]]:
    """:func:`expand` with, for each item, the form it takes in its battery (:data:`FORMS`; the identity
    for a member of a battery without one and for a name or attack given by itself)."""
    out = []
    for item in names:
        key = str(item).strip().lower() if not isinstance(item, Attack) else None
        if key in BATTERIES:
            out.extend((m, FORMS.get(key, _same)) for m in by_norm(BATTERIES[key], norm))
        else:
            out.append((item, _same))
    return out


def _same(atk: Attack) -> Attack:
    return atk


def names() -> list[str]:
    """Preset names, families as their pattern (``pgd-K``)."""
    return [*dict.keys(PRESETS), *PRESETS.families]


def get(name: str, eps, *, steps: int | None = None, restarts: int | None = None,
        step_size: float | None = None, relative_step: bool | None = None, objective=None,
        bounds=(0.0, 1.0), queries: int | None = None, norm: str = "linf", **changes) -> Attack:
    """Build preset ``name`` for the threat ``eps`` and apply overrides.

    ``eps``: a threat value (:class:`LinfBall`, :class:`L2Ball`, :class:`L1Ball`) or a radius (the
    ``norm`` ball of that radius in ``bounds``).
    ``step_size`` sets the first value of the schedule, keeping its shape (``relative_step=True``: in
    units of ε; for Square it is the initial window fraction ``p_init``). ``queries`` sets the forward
    passes per run of a search that evaluates its start (``steps = queries − 1``; Square's budget).
    ``objective`` may be an objective or its name. Other keyword arguments replace :class:`Attack`
    fields (``targets``, ``tracking``, ``start``, ...).
    """
    key = name.strip().lower().replace("_", "-")
    key = re.sub(r"^pgd(\d+)$", r"pgd-\1", _SPELLINGS.get(key, key))
    attack = PRESETS[key](threat_of(eps, bounds, norm))
    if queries is not None:
        if int(queries) < 1:
            raise ValueError("queries must be ≥ 1")
        changes["steps"] = int(queries) - 1
    if steps is not None:
        changes["steps"] = int(steps)
    if restarts is not None:
        changes["restarts"] = int(restarts)
    if step_size is not None:
        changes["schedule"] = attack.schedule.scaled_to(step_size, relative_step)
    if objective is not None:
        if isinstance(objective, str):
            if objective not in O.OBJECTIVES:
                raise KeyError(f"unknown objective {objective!r}; known: {', '.join(O.OBJECTIVES)}")
            objective = O.OBJECTIVES[objective]()
        changes["objective"] = objective
    return attack.replace(**changes) if changes else attack


# What a stored configuration may name: these types, and these functions by qualified name. Nothing
# else is ever constructed or looked up, so reading a configuration runs no code.
_CONFIG_TYPES = {c.__name__: c for c in (Attack, O.Margin, O.CrossEntropy, O.TargetedMargin, O.DLR,
                                         O.TargetedDLR, O.ProbabilityMargin, O.MostLikelyTarget,
                                         O.LinearityGap, Adam, Sign, APGD,
                                         Piecewise, LinfBall, L2Ball, L1Ball, Cosine, MinNorm, MinDistance,
                                         Hyperplane, RandomSquaresL2, RandomSquaresL1,
                                         Untargeted, RandomTarget, RankedTargets, Evasion, Maximize,
                                         FinalIterate, Stall, SearchStall, UniformStart,
                                         NoStart, StripeStart, DiverseStart,
                                         GaussianStart, AttackStart, StartsByRestart,
                                         RandomSquares,
                                         WindowSchedule)}
_CONFIG_FUNCTIONS = {f"{f.__module__}.{f.__qualname__}": f for f in (O.per_example_cross_entropy,)}


def from_config(text: str) -> Attack:
    """The :class:`Attack` whose :meth:`Attack.config` is ``text`` (a stored record's ``attack_config``).

    Only the library's own configuration types and functions are accepted; anything else is a
    ``ValueError``.
    """

    def build(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            if node.func.id not in _CONFIG_TYPES:
                raise ValueError(f"unknown configuration type {node.func.id!r}")
            return _CONFIG_TYPES[node.func.id](**{k.arg: build(k.value) for k in node.keywords})
        if isinstance(node, ast.Tuple):
            return tuple(build(e) for e in node.elts)
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            if dotted not in _CONFIG_FUNCTIONS:
                raise ValueError(f"unknown function {dotted!r} in an attack configuration")
            return _CONFIG_FUNCTIONS[dotted]
        return ast.literal_eval(node)

    try:
        tree = ast.parse(f"Attack({text})", mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an attack configuration: {exc.msg}") from None
    return build(tree.body)
