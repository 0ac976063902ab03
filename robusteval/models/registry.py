"""The architecture registry: names -> model factories, filled by decorators (the timm pattern).

An architecture module decorates a factory::

    @register("wrn16_4", input_size=(3, 32, 32), dataset="cifar10", description="...")
    def wrn16_4(**kwargs): return WideResNet(depth=16, width=4, **kwargs)

and :func:`create_model` builds it by name. Every factory accepts ``num_classes`` and
``normalization`` (a name from :data:`robusteval.models.normalize.NORMALIZATIONS` or a
``{"mean", "std"}`` dict); :func:`create_model` fills both from the registration when they are not
given, so ``create_model("small_cnn")`` is a Fashion-MNIST model with its normalisation inside.
Tests sweep :func:`list_models`, so a new architecture is tested by registering it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from robusteval.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    ``input_size`` is ``(C, H, W)`` of the [0, 1] images it expects; ``dataset`` names the default
    normalisation; ``heavy`` marks models too big for a full-size forward pass in quick CPU tests.
    """

    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    dataset: str
    description: str = ""
    heavy: bool = False


_REGISTRY: dict[str, ArchSpec] = {}


def register(
    name: str,
    *,
    input_size: tuple[int, int, int],
    dataset: str,
    num_classes: int = 10,
    description: str = "",
    heavy: bool = False,
):
    """Decorator registering a model factory under ``name`` (duplicate names are a programming error)."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[name] = ArchSpec(name, factory, tuple(input_size), num_classes, dataset, doc, heavy)
        return factory

    return decorate


def _ensure_loaded() -> None:
    # Importing the package imports every architecture module, which fills the registry.
    import robusteval.models  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` for ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise UserError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build architecture ``name`` with ``kwargs`` (e.g. ``activation="softplus"``), in train mode.

    ``num_classes`` and ``normalization`` default to the registration's values. Arguments the factory
    does not take are a :class:`UserError` naming the ones it does.
    """
    spec = get_arch(name)
    kwargs.setdefault("num_classes", spec.num_classes)
    kwargs.setdefault("normalization", spec.dataset)
    signature = inspect.signature(spec.factory)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise UserError(f"bad arguments for architecture {name!r} ({exc}); it takes {signature}") from None
    return spec.factory(**kwargs)


#: activation name -> module constructor (softplus with β = 1 as in LLR-DM; swish = SiLU).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(),
    "softplus": lambda: nn.Softplus(beta=1.0),
    "swish": lambda: nn.SiLU(),
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu``, ``softplus``, ``swish``)."""
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
