"""Models from other hubs, offline: RobustBench's model zoo layout and timm architectures.

``robustbench:DATASET/THREAT/NAME`` (``robustbench:cifar10/Linf/Carmon2019Unlabeled``) reads the file
RobustBench's own loader would read, ``MODEL_DIR/DATASET/THREAT/NAME.pt`` (``--model-dir``, default
``./models``), and builds the architecture with the ``robustbench`` package's code (the optional extra
``robusteval[robustbench]``). The file is loaded with ``weights_only=True``; the wrappers and prefixes
RobustBench strips (``{"state_dict": …}``, ``module.``, ``model.``) are stripped the same way, and the
load is strict. Nothing is downloaded: a missing file is one line saying where to put it.

``timm:NAME`` with ``--weights FILE`` (a safetensors file or a state dict) builds a timm architecture
without pretrained weights (the optional extra ``robusteval[timm]``), loads the file strictly, and puts
the normalisation of timm's pretrained configuration in front, so the model takes [0, 1] inputs of the
configuration's input size like every other robusteval model.

Both return a :class:`~robusteval.models.checkpoints.LoadedModel` whose ``meta`` holds the hub name,
dataset, input size and classes; its ``sha256`` is the weight file's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

from torch import nn

from robusteval.errors import UserError

ROBUSTBENCH, TIMM = "robustbench:", "timm:"
DEFAULT_MODEL_DIR = "models"
#: RobustBench's datasets: robusteval's dataset name, input size, classes.
_DATASETS = {"cifar10": ("cifar10", (3, 32, 32), 10), "cifar100": ("cifar100", (3, 32, 32), 100),
             "imagenet": ("imagenet", (3, 224, 224), 1000)}
#: RobustBench's threat names → robusteval's norm (corruptions are not an ε-ball: refused).
_THREATS = {"Linf": "linf", "L2": "l2"}


def is_hub(spec) -> bool:
    return isinstance(spec, str) and spec.startswith((ROBUSTBENCH, TIMM))


def load_hub(spec: str, device, model_dir=None, weights=None):
    """The model a ``robustbench:`` or ``timm:`` spec names (module docstring), in eval mode on ``device``."""
    if spec.startswith(ROBUSTBENCH):
        if weights is not None:
            raise UserError("`weights` is for timm: models; a robustbench: model's file is found under "
                            "`model_dir`")
        return _robustbench(spec[len(ROBUSTBENCH):], Path(model_dir or DEFAULT_MODEL_DIR), device)
    return _timm(spec[len(TIMM):], weights, device)


def _extra(package: str, module: str, hint: str):
    """Import ``module`` of an optional extra, or one line naming the extra."""
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{hint} models need the {package} package: pip install 'robusteval[{package}]'")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"the {package} package is installed but {module} does not import "
                        f"({str(exc).splitlines()[0][:160]})") from None


# ------------------------------------------------------------------------------------------ RobustBench


def _robustbench_zoo():
    """``(model_dicts, BenchmarkDataset, ThreatModel)`` from the installed ``robustbench``.

    Only the model zoo is needed. The package's ``__init__`` also imports its evaluation code, which needs
    AutoAttack from git; where that import fails, the zoo's modules are read without the package's
    ``__init__`` (a namespace with the package's path), which is what the architecture code needs."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None:
        raise UserError("robustbench: models need the robustbench package: pip install "
                        "'robusteval[robustbench]'")
    try:
        zoo = importlib.import_module("robustbench.model_zoo")
    except ImportError:
        sys.modules.pop("robustbench", None)
        package = types.ModuleType("robustbench")
        package.__path__ = list(spec.submodule_search_locations or [])
        package.__spec__ = spec
        sys.modules["robustbench"] = package
        try:
            zoo = importlib.import_module("robustbench.model_zoo")
        except ImportError as exc:
            raise UserError(f"the robustbench package is installed but its model zoo does not import "
                            f"({str(exc).splitlines()[0][:160]})") from None
    enums = importlib.import_module("robustbench.model_zoo.enums")
    return zoo.model_dicts, enums.BenchmarkDataset, enums.ThreatModel


def _robustbench(name: str, model_dir: Path, device):
    from robusteval.models.checkpoints import LoadedModel, _torch_load, sha256_file

    parts = name.split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"robustbench:{name}: expected robustbench:DATASET/THREAT/NAME, e.g. "
                        "robustbench:cifar10/Linf/Carmon2019Unlabeled")
    dataset, threat, model_name = parts
    if dataset not in _DATASETS:
        raise UserError(f"robustbench:{name}: unknown dataset {dataset!r} (known: {', '.join(_DATASETS)})")
    if threat not in _THREATS:
        raise UserError(f"robustbench:{name}: threat {threat!r} is not an ε-ball robusteval attacks "
                        f"(use one of {', '.join(_THREATS)})")
    dicts, BenchmarkDataset, ThreatModel = _robustbench_zoo()
    entries = dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if model_name not in entries:
        close = [k for k in entries if k.lower().startswith(model_name[:4].lower())][:5]
        raise UserError(f"robustbench:{name}: {model_name!r} is not in RobustBench's {dataset}/{threat} zoo"
                        + (f" (similar: {', '.join(close)})" if close else f" ({len(entries)} models)"))
    path = model_dir / dataset / threat / f"{model_name}.pt"
    if not path.is_file():
        raise UserError(f"robustbench:{name}: {path} not found; robusteval never downloads: put "
                        f"RobustBench's checkpoint for {model_name} there, or point `model_dir` at the "
                        "directory that holds <dataset>/<threat>/<name>.pt")
    try:
        model = entries[model_name]["model"]()
    except Exception as exc:  # the package's own constructor: any failure is its, reported in one line
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise UserError(f"robustbench:{name}: RobustBench's architecture code failed "
                        f"({type(exc).__name__}: {first})") from None
    obj = _torch_load(path)
    state = _unwrap_state(obj, path)
    for prefix in ("module.", "model."):  # what RobustBench strips: anywhere a key starts with it
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    _strict_load(model, state, f"robustbench:{name} ({path})")
    rb_dataset, size, classes = _DATASETS[dataset]
    meta = {"name": model_name, "hub": f"robustbench:{name}", "arch": f"robustbench:{model_name}",
            "dataset": rb_dataset, "threat_model": _THREATS[threat], "input_size": size,
            "num_classes": classes, "normalization": None, "normalization_source": "the model's own"}
    return LoadedModel(model.to(device).eval(), meta, sha256_file(path), "robustbench", path)


def _unwrap_state(obj, path: Path) -> dict:
    """The state dict inside a loaded file (:func:`~robusteval.models.checkpoints.unwrap_state`)."""
    from robusteval.models.checkpoints import unwrap_state

    state = unwrap_state(obj)
    if state is None or not all(isinstance(k, str) for k in state):
        raise UserError(f"{path} holds no state dict (a dict of tensors, bare or under 'state_dict')")
    return state


def _strict_load(model: nn.Module, state: dict, what: str) -> None:
    from robusteval.models.checkpoints import mismatch

    wrong = mismatch(model.state_dict(), state)
    if wrong:
        raise UserError(f"{what}: the weights do not fit the architecture: {wrong}")
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------ timm


def _timm(name: str, weights, device):
    from robusteval.models.checkpoints import (
        LoadedModel,
        _is_safetensors,
        _load_safetensors,
        _torch_load,
        sha256_file,
    )
    from robusteval.models.normalize import Normalize

    if not name:
        raise UserError("timm: needs an architecture name, e.g. timm:resnet18")
    timm = _extra("timm", "timm", "timm:")
    if weights is None:
        raise UserError(f"timm:{name} needs `weights` FILE (a safetensors file or a state dict); robusteval "
                        "never downloads pretrained weights")
    path = Path(os.fspath(weights)).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if name not in timm.list_models():
        raise UserError(f"timm:{name}: not an architecture timm {timm.__version__} knows "
                        f"(e.g. {', '.join(timm.list_models(name[:3] + '*')[:5]) or 'resnet18'})")
    obj = _load_safetensors(path) if _is_safetensors(path) else _torch_load(path)
    state = _unwrap_state(obj, path)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    net = timm.create_model(name, pretrained=False)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    classes = _classes(state, net, head)
    if classes is not None and classes != net.num_classes:  # a fine-tuned head: rebuild with its width
        net = timm.create_model(name, pretrained=False, num_classes=classes)
    _strict_load(net, state, f"timm:{name} ({path})")
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    size = tuple(int(v) for v in cfg.get("input_size") or (3, 224, 224))
    mean, std = tuple(cfg.get("mean") or (0.0,) * size[0]), tuple(cfg.get("std") or (1.0,) * size[0])
    model = nn.Sequential()
    model.add_module("normalize", Normalize(mean, std))
    model.add_module("net", net)
    meta = {"name": name, "hub": f"timm:{name}", "arch": f"timm:{name}", "dataset": None,
            "input_size": size, "num_classes": int(net.num_classes),
            "normalization": {"mean": list(mean), "std": list(std)}, "normalization_source": "timm config"}
    return LoadedModel(model.to(device).eval(), meta, sha256_file(path), "timm", path)


def _classes(state: dict, net: nn.Module, head) -> int | None:
    """The class count the weights were saved with: rows of the classifier's weight in ``state``."""
    if not isinstance(head, nn.Module):
        return None
    for key, param in net.named_parameters():
        if param is getattr(head, "weight", None) and key in state and state[key].ndim >= 1:
            return int(state[key].shape[0])
    return None
