"""The four interfaces an :class:`~attacks.Attack` is made of, as typed protocols.

Any value with these methods plugs into the one engine (:func:`attacks.run`): the library's own
implementations are small frozen dataclasses (:mod:`attacks.objectives`, :mod:`attacks.optimizers`,
:mod:`attacks.schedules`, :mod:`attacks.threats`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    """A per-example value that the attack *maximises*: ``objective(logits, y, delta, aux) -> [N]``.

    ``delta`` (``x_adv − x``, attached to the graph) is passed only when ``needs_delta``; ``aux`` holds
    per-example tensors — the objective's own data from :meth:`prepare` (e.g. ``loss0``/``grad0``) and,
    for ``needs_target`` objectives, the engine's ``"target"``. :meth:`untargeted_margin` gives the
    margin ``max_{j≠y} z_j − z_y`` that decides success (it may reuse ``value`` when they coincide).
    """

    needs_delta: bool
    needs_target: bool

    def __call__(self, z: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None,
                 aux: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def prepare(self, model, x: torch.Tensor, y: torch.Tensor,
                aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def untargeted_margin(self, z: torch.Tensor, y: torch.Tensor, value: torch.Tensor) -> torch.Tensor: ...


class Optimizer(Protocol):
    """Proposes the next iterate of each example from the current one.

    ``state = init(x, generators, steps=..., box=...)``: one generator per example (for optimizers that
    draw random proposals), the run's number of steps and the feasible interval ``(lo, hi)`` of every
    coordinate (for rules with checkpoints or an inner projection; an ``init`` that does not name
    ``steps``/``box`` is not given them). ``x_next, state = step(x, grad, value, state, lr)`` with
    ``grad`` the gradient of the objective at ``x`` when ``uses_gradient`` (``None`` otherwise: a
    gradient-free search, which may accept or reject a proposal per example from ``value``). The engine
    projects ``x_next`` onto the threat set, unless the optimizer has ``projected(state, threat)`` and it
    says ``step`` returned that projection already. Every state field with a leading batch dimension is a
    tensor, so the engine can drop rows (:func:`attacks.optimizers.select`).
    """

    uses_gradient: bool

    def init(self, x: torch.Tensor, generators=None, **run) -> Any: ...

    def step(self, x: torch.Tensor, grad: torch.Tensor | None, value: torch.Tensor, state: Any,
             lr: float) -> tuple[torch.Tensor, Any]: ...


class Schedule(Protocol):
    """Step size at 0-based ``step`` of a run of ``steps`` steps (``eps`` scales relative schedules)."""

    def __call__(self, step: int, steps: int, eps: float = 1.0) -> float: ...


class Threat(Protocol):
    """The feasible set around each input: sampling, projection, membership."""

    eps: float
    bounds: tuple[float, float]

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, box=None) -> torch.Tensor: ...

    def sample(self, x: torch.Tensor, generators) -> torch.Tensor: ...

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor: ...
