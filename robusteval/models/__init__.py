"""Models: the architecture registry, the normalisation layer, and checkpoints.

* :mod:`.registry` — ``@register`` decorator, :func:`create_model`, :func:`list_models`.
* :mod:`.normalize` — :class:`Normalize`, the first layer of every model, and per-dataset constants
  (LLR's CIFAR-10 set; ``2x − 1`` for MNIST-like data and ImageNet).
* :mod:`.small_cnn` — ``small_cnn`` for 28×28 grey images (CPU demo and tests).
* :mod:`.wide_resnet` — ``wrn16_4``, ``wrn28_8``, ``wrn28_10``, ``wrn40_8`` in DeepMind's LLR layout.
* :mod:`.resnet` — torchvision ``resnet50`` and ``resnet152`` for ImageNet.
* :mod:`.checkpoints` — :func:`save_checkpoint` (atomic) and :func:`load_model` (``weights_only``
  loading of our format, plain state_dicts, ``torch.export`` programs, TorchScript and ``zoo:NAME``).
* :mod:`.hubs` — ``robustbench:DATASET/THREAT/NAME`` and ``timm:NAME`` models, offline.
* :mod:`.loader` — :func:`load_model`: every spec, dispatched to the two above.

Every model takes [0, 1] images; attacks never see normalised inputs.
"""

from robusteval.models import resnet, small_cnn, wide_resnet  # noqa: F401  (fill the registry)
from robusteval.models.checkpoints import (
    CHECKPOINT_FORMAT,
    LoadedModel,
    in_memory,
    list_zoo,
    save_checkpoint,
    sha256_file,
)
from robusteval.models.loader import load_model
from robusteval.models.normalize import NORMALIZATIONS, Normalize, find_normalize
from robusteval.models.registry import ArchSpec, create_model, get_arch, list_models, register

__all__ = [
    "ArchSpec",
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "NORMALIZATIONS",
    "Normalize",
    "create_model",
    "find_normalize",
    "in_memory",
    "get_arch",
    "list_models",
    "list_zoo",
    "load_model",
    "register",
    "save_checkpoint",
    "sha256_file",
]
