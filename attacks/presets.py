"""Named attacks with the LLR paper's defaults (supplementary F.1, F.4; ALGORITHMS.md §4 and §7).

| preset            | optimizer | steps | schedule                        | restarts | objective            |
|-------------------|-----------|-------|---------------------------------|----------|----------------------|
| untargeted        | adam      | 200   | 0.1 → 0.01 @50% → 0.001 @75%    | 20       | margin               |
| random-targeted   | adam      | 200   | same                            | 20       | z_t − max_{j≠t} z_j  |
| multi-targeted    | adam      | 200   | 0.1 constant                    | 20 (*)   | z_t − z_y            |
| fgsm-20           | sign      | 20    | ε/10                            | 1        | margin               |
| pgd-50 (pgd-k)    | adam      | k     | 0.1 constant                    | 1        | margin               |
| local-linearity   | adam      | 50    | 0.1 constant                    | 1        | linearity gap g(δ;x) |

(*) round-robin over the wrong classes ranked by clean margin.

Every knob can be overridden: ``get(name, eps, steps=..., restarts=..., step_size=..., objective=...)``.
"""

from __future__ import annotations

import re

from . import objectives as O
from .engine import Attack
from .optimizers import adam, sign
from .schedules import constant, paper_decay
from .threats import LinfBall


def untargeted(eps: float, bounds=(0.0, 1.0)) -> Attack:
    """Untargeted Adam-PGD on the margin, 200 steps, decaying step size, 20 restarts (LLR F.1)."""
    return Attack("untargeted", O.Margin(), adam(), paper_decay(0.1), LinfBall(eps, bounds), 200, 20)


def random_targeted(eps: float, bounds=(0.0, 1.0)) -> Attack:
    """Random-Targeted: one random wrong class per example shared by its 20 restarts (LLR F.1, IBP)."""
    return Attack("random-targeted", O.MostLikelyTarget(), adam(), paper_decay(0.1), LinfBall(eps, bounds),
                  200, 20, targets="random")


def multi_targeted(eps: float, bounds=(0.0, 1.0)) -> Attack:
    """MultiTargeted (Gowal et al. 2019) as in the LLR paper: z_t − z_y, Adam 0.1, 200 steps, 20 restarts
    cycling round-robin over the wrong classes ranked by clean margin (project decision 7)."""
    return Attack("multi-targeted", O.TargetedMargin(), adam(), constant(0.1), LinfBall(eps, bounds),
                  200, 20, targets="ranked")


def fgsm20(eps: float, bounds=(0.0, 1.0)) -> Attack:
    """FGSM-20: 20 sign steps of ε/10 on the margin from a random start (LLR F.1; project decision 9)."""
    return Attack("fgsm-20", O.Margin(), sign(), constant(0.1, relative=True), LinfBall(eps, bounds), 20, 1)


def pgd(eps: float, steps: int = 50, bounds=(0.0, 1.0)) -> Attack:
    """PGD-k: Adam lr 0.1, k steps, margin, one restart — the paper's on-the-fly check (Table F2)."""
    return Attack(f"pgd-{steps}", O.Margin(), adam(), constant(0.1), LinfBall(eps, bounds), steps, 1)


def local_linearity(eps: float, bounds=(0.0, 1.0), grad_mode: str = "deepmind") -> Attack:
    """The γ(ε, x) search: maximise g(δ; x) with 50 Adam steps of size 0.1 (LLR F.4, ALGORITHMS §5)."""
    return Attack("local-linearity", O.LinearityGap(grad_mode), adam(), constant(0.1), LinfBall(eps, bounds),
                  50, 1, goal="maximize")


PRESETS = {
    "untargeted": untargeted,
    "random-targeted": random_targeted,
    "multi-targeted": multi_targeted,
    "fgsm-20": fgsm20,
    "pgd-50": pgd,
    "local-linearity": local_linearity,
}


def names() -> list[str]:
    """Preset names (``pgd-K`` for any K is accepted too)."""
    return list(PRESETS)


def get(name: str, eps: float, *, steps: int | None = None, restarts: int | None = None,
        step_size: float | None = None, relative_step: bool | None = None, objective=None,
        bounds=(0.0, 1.0), **changes) -> Attack:
    """Build preset ``name`` at radius ``eps`` and apply overrides.

    ``step_size`` sets the first value of the schedule, keeping its shape (``relative_step=True``: in
    units of ε). ``objective`` may be an objective or its name. Other keyword arguments replace
    :class:`Attack` fields (``targets``, ``num_targets``, ``all_targets``, ``final_iterate``, ...).
    """
    key = name.strip().lower().replace("_", "-")
    key = {"fgsm20": "fgsm-20", "multitargeted": "multi-targeted", "randomtargeted": "random-targeted"}.get(
        key, key)
    m = re.fullmatch(r"pgd-?(\d+)", key)
    if m:
        attack = pgd(eps, int(m.group(1)), bounds)
    elif key in PRESETS:
        attack = PRESETS[key](eps, bounds)
    else:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(names())} (and pgd-K)")
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
