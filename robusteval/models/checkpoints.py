"""Checkpoints: the robusteval format, and safe loading of everything else a user may hand us.

The robusteval checkpoint is a plain dict::

    {"format": "robusteval-checkpoint", "format_version": 1, "arch": "wrn28_8",
     "arch_kwargs": {"activation": "softplus"}, "dataset": "cifar10",
     "normalization": {"mean": [...], "std": [...]}, "training": {... incl. "command"},
     "metrics": {...}, "extra": {...}, "versions": {...}, "state_dict": {...}}

made of tensors and Python primitives only, so it loads with ``torch.load(weights_only=True)``; it is
written atomically (temp file in the same directory, then ``os.replace``), so an interrupted save
never leaves a truncated checkpoint behind.

:func:`load_model` accepts a path or ``zoo:NAME`` and recognises, by looking inside the file:

* our checkpoint; a plain ``state_dict`` (needs ``arch``); both via ``torch.load(weights_only=True)``,
  never anything else — a pickle that needs code execution to load is refused, not run;
* a ``torch.export`` program (``.pt2``), which needs no Python class — after checking that the archive
  holds nothing ``torch.export.load`` would unpickle unrestricted or run (:func:`_check_export_archive`);
* a TorchScript archive (``torch.jit.load``; its code is TorchScript, not Python);
* a ``safetensors`` file (the optional ``safetensors`` package): our metadata in its header, or a bare
  state_dict that needs ``arch``. :func:`save_checkpoint` writes one for a path ending in
  ``.safetensors`` (weights and JSON metadata; no trainer resume state).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robusteval import __version__
from robusteval.errors import UserError
from robusteval.models.normalize import find_normalize
from robusteval.models.registry import create_model, get_arch, list_models
from robusteval.paths import atomic_write

CHECKPOINT_FORMAT = "robusteval-checkpoint"
FORMAT_VERSION = 1
ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
_ZOO_SUFFIXES = (".pt", ".pt2")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for evaluation.

    ``model`` is on the requested device in eval mode and takes [0, 1] inputs; ``meta`` is the
    checkpoint without its state_dict (for other kinds, what is known: arch, normalization,
    input_size); ``sha256`` identifies the file in result records; ``source`` is one of
    ``"robusteval-checkpoint"``, ``"state_dict"``, ``"torch.export"``, ``"torchscript"``.
    """

    model: nn.Module
    meta: dict
    sha256: str
    source: str
    path: Path | None
    label: str | None = None  # the display name, when given (an in-memory model, two files of one name)

    @property
    def name(self) -> str:
        """A short display name: the given label, else the zoo name or the file's stem."""
        return self.label or self.meta.get("name") or (self.path.stem if self.path else "model")

    @property
    def train_method(self) -> str:
        return str((self.meta.get("training") or {}).get("method") or "")

    @property
    def train_steps(self) -> int | None:
        """Inner attack steps used in training (the "PGD steps" of the LLR paper's Table F4): the trainer's
        ``steps``; 0 for nominal training (whose stored ``steps`` is unused); ``None`` when unknown."""
        if self.train_method == "nominal":
            return 0
        steps = (self.meta.get("training") or {}).get("steps")
        return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None


def in_memory(name: str, model: nn.Module) -> LoadedModel:
    """An ``nn.Module`` handed over in Python, as a :class:`LoadedModel` (no file, no checkpoint digest)."""
    return LoadedModel(model, {}, "", "module", None, label=str(name))


class ExportedModel(nn.Module):
    """Wraps ``ExportedProgram.module()`` so it behaves like an ordinary module.

    The exported graph's batch-norm/dropout behaviour was fixed when it was exported (export in eval
    mode), and the graph refuses ``.train()``/``.eval()``; this wrapper records the mode without
    forwarding it.
    """

    def __init__(self, module: nn.Module, batch: int | None = None):
        super().__init__()
        self.program = module
        self.batch = batch  # a program exported with a static batch dimension runs at exactly this size
        for m in module.modules():
            object.__setattr__(m, "training", False)
        self.training = False

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or len(x) == self.batch:
            return self.program(x)
        # Fixed-size program: run ``batch`` rows at a time, the last block padded with copies of its last
        # row (dropped from the output). Slicing and concatenation keep the gradient to every input row.
        if len(x) == 0:
            return self.program(torch.zeros((self.batch, *x.shape[1:]), dtype=x.dtype, device=x.device))[:0]
        out = []
        for start in range(0, len(x), self.batch):
            block = x[start:start + self.batch]
            short = self.batch - len(block)
            if short:
                block = torch.cat([block, block[-1:].expand(short, *block.shape[1:])])
            out.append(self.program(block)[: self.batch - short])
        return torch.cat(out)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_zoo() -> list[str]:
    """Names usable as ``zoo:NAME``: the bundled ``.pt``/``.pt2`` files in ``robusteval/zoo``."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted({p.stem for p in ZOO_DIR.iterdir() if p.suffix in _ZOO_SUFFIXES})


# --------------------------------------------------------------------------------------------- saving


def _plain(value, where: str = "checkpoint"):
    """Convert metadata to what ``weights_only`` loading accepts: tensors and Python primitives."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, np.generic):  # before the subclass checks: np.float64 is a float subclass
        return value.item()
    for kind in (bool, int, float, str):  # subclasses (e.g. torch's TorchVersion) would need their class
        if isinstance(value, kind):
            return kind(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, dict):
        return {
            str(k) if not isinstance(k, int) else k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        out = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if isinstance(value, tuple) else out
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v, where) for v in value)
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint")


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps in `_orig_mod`, DataParallel/DDP in `module`; save the bare model's keys.
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    arch_kwargs: dict | None = None,
    dataset: str | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a robusteval checkpoint atomically and return its path.

    ``training`` is the training configuration (including the ``command`` that produced it),
    ``metrics`` e.g. per-epoch clean/robust accuracy, ``extra`` anything else made of tensors and
    primitives (the trainer's optimizer state and RNG states for ``--resume``). Dataclasses, paths and
    numpy values are converted; anything that would need pickled code raises ``TypeError``.
    """
    path = Path(path)
    model = _unwrap(model)
    norm = find_normalize(model)
    if path.suffix == ".safetensors":
        meta = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "arch": arch,
                "arch_kwargs": _plain(dict(arch_kwargs or {}), "arch_kwargs"), "dataset": dataset,
                "normalization": norm.as_dict() if norm is not None else None,
                "training": _plain(training or {}, "training"), "metrics": _plain(metrics or {}, "metrics"),
                "extra": _plain(extra or {}, "extra"),
                "versions": {"robusteval": __version__, "torch": str(torch.__version__)}}
        return _save_safetensors(path, model.state_dict(), meta)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": _plain(dict(arch_kwargs or {}), "arch_kwargs"),
        "dataset": dataset,
        "normalization": norm.as_dict() if norm is not None else None,
        "training": _plain(training or {}, "training"),
        "metrics": _plain(metrics or {}, "metrics"),
        "extra": _plain(extra or {}, "extra"),
        "versions": {"robusteval": __version__, "torch": str(torch.__version__)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return _write(path, lambda f: torch.save(payload, f))


def _write(path: Path, write) -> Path:
    """:func:`atomic_write`, with a failed write (a full disk: torch's serializer raises a RuntimeError,
    the file system an OSError) as one :class:`UserError` line; the previous file is left as it was."""
    try:
        return atomic_write(path, write)
    except (RuntimeError, OSError) as exc:
        why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:120]
        kept = "the previous checkpoint is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"cannot write the checkpoint {path} ({why}; is the disk full?); {kept}") from None


_SAFETENSORS_MISSING = ("safetensors files need the optional 'safetensors' package: "
                        "pip install 'robusteval[safetensors]'")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(_SAFETENSORS_MISSING) from None
    return safetensors.torch


def _save_safetensors(path: Path, state: dict, meta: dict) -> Path:
    st = _safetensors()
    try:
        header = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError):
        raise TypeError("a safetensors checkpoint holds weights and JSON metadata only (no tensors in "
                        "training/metrics/extra, e.g. trainer resume state): save it as .pt") from None
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    blob = st.save(tensors, metadata={"robusteval": header})
    return _write(path, lambda f: f.write(blob))


# -------------------------------------------------------------------------------------------- loading


def _resolve(spec: str | os.PathLike) -> tuple[Path, str | None]:
    text = os.fspath(spec)
    if text.startswith("zoo:"):
        name = text[4:]
        for suffix in _ZOO_SUFFIXES:
            if (ZOO_DIR / f"{name}{suffix}").is_file():
                return ZOO_DIR / f"{name}{suffix}", name
        raise UserError(f"unknown zoo model {name!r}; available: {', '.join(list_zoo()) or 'none'}")
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"model file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    return path, None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header size, then that many bytes of JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= path.stat().st_size - 8


def _sniff(path: Path) -> str:
    """Which loader fits: 'export', 'torchscript', 'pickle', 'safetensors' or 'unknown', from the bytes."""
    if _is_safetensors(path):
        return "safetensors"
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("/archive_format") or "/models/" in n and n.endswith(".json") for n in names):
            return "export"
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "pickle" if any(n.endswith("data.pkl") for n in names) else "unknown"
    with open(path, "rb") as f:
        head = f.read(2)
    # Legacy (non-zip) torch.save files and raw pickles start with the PROTO opcode 0x80.
    return "pickle" if head[:1] == b"\x80" else "unknown"


# Members of a plain torch.export.save archive (paths below its top folder); anything else is refused.
_EXPORT_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/[\w.-]+|models/[\w.-]+\.json|extra/[^/]+"
    r"|data/(?:weights|constants)/[\w.-]+_config\.json|data/weights/weight_\d+|data/constants/tensor_\d+"
    r"|data/sample_inputs/[\w.-]+\.pt"
)


def _check_export_archive(path: Path) -> None:
    """Refuse a ``.pt2`` that ``torch.export.load`` would load by running code from the file.

    ``torch.export.load`` unpickles payloads marked ``use_pickle`` and opaque constants with
    ``weights_only=False``, retries the sample inputs with ``weights_only=False`` when the safe load
    fails, and loads AOTInductor shared libraries — its documentation says never to load untrusted
    files. We accept only the members of a plain ``torch.export.save`` archive whose weights are raw
    tensor bytes and whose sample inputs load with ``weights_only=True``.
    """

    def refuse(why: str):
        raise UserError(f"{path}: {why}, which torch.export.load would run or unpickle unrestricted; refused")

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        top = names[0].split("/")[0] + "/" if names else ""
        strip = len(top) if all(n.startswith(top) for n in names) else 0
        for name in names:
            member = name[strip:]
            if member.endswith("/"):
                continue
            if not _EXPORT_MEMBERS.fullmatch(member):
                refuse(f"it contains {member}")
            if member.endswith("_config.json"):
                for key, entry in json.loads(archive.read(name)).get("config", {}).items():
                    raw = str(entry.get("path_name", "")).startswith(("weight_", "tensor_"))
                    if entry.get("use_pickle") or not raw:
                        refuse(f"it stores {key} as a pickled object")
            elif member.startswith("data/sample_inputs/"):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 — any failure triggers torch's unrestricted retry
                    refuse(f"its {member} is not weights-only loadable")


_NOT_A_MODEL = ("is not a robusteval checkpoint, state_dict, safetensors, torch.export program (.pt2) or "
                "TorchScript file")


def _load_safetensors(path: Path):
    """Our checkpoint dict (metadata in the header) or a bare state_dict; the format runs no code."""
    st = _safetensors()
    try:
        state = st.load_file(str(path), device="cpu")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 — a damaged file fails in the Rust reader with various types
        raise UserError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if "robusteval" not in header:
        return state
    try:
        meta = json.loads(header["robusteval"])
    except ValueError:
        raise UserError(f"{path}: its robusteval metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its robusteval metadata is not a JSON object")
    return {**meta, "state_dict": state}


def _torch_load(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle-protocol chatter from the unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
            what = f" (it references {found.group(1)})" if found else ""
            raise UserError(
                f"{path} needs arbitrary code execution to load{what}; refused, nothing was run "
                "(save a state_dict, a robusteval checkpoint or a torch.export program instead)"
            ) from None
        raise UserError(f"{path} {_NOT_A_MODEL} (unreadable pickle: {exc})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path} {_NOT_A_MODEL} ({str(exc).splitlines()[0][:120]})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _fit_state_dict(model: nn.Module, state: dict, arch: str) -> tuple[dict, str]:
    """Adapt harmless key differences, then report real mismatches in one line.

    Returns the state_dict to load and where the normalisation came from. Harmless: prefixes added by
    DataParallel (``module.``) or ``torch.compile`` (``_orig_mod.``); a state_dict of the bare network
    without our ``normalize.`` buffers (the architecture's default normalisation is kept, and torchvision
    ResNet weights map onto ``net.``); missing ``num_batches_tracked`` counters.
    """
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    own = model.state_dict()
    norm_source = "checkpoint"
    if not any(k.startswith("normalize.") for k in state):
        norm_source = "architecture default"
        state.update({k: v for k, v in own.items() if k.startswith("normalize.")})
        if all(k.startswith(("normalize.", "net.")) for k in own) and not any(
            k.startswith("net.") for k in state
        ):
            state = {k if k.startswith("normalize.") else f"net.{k}": v for k, v in state.items()}
    wrong = mismatch(own, state, optional=lambda k: k.endswith("num_batches_tracked"))
    if wrong:
        raise UserError(f"state_dict does not fit architecture {arch!r}: {wrong}")
    return state, norm_source


def mismatch(own: dict, state: dict, optional=lambda key: False) -> str | None:
    """How ``state`` fails to fit a model whose state_dict is ``own`` (missing keys, unexpected keys,
    shape mismatches, a few of each named), or ``None`` when it fits; ``optional`` keys may be missing."""
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = [f"{len(items)} {label} (e.g. {'; '.join(items[:3])})"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatches", shapes)) if items]
    return ", ".join(parts) or None


def unwrap_state(obj) -> dict | None:
    """The state_dict in a loaded file: bare, or under ``state_dict`` / ``model`` / ``model_state_dict``
    (other tools' wrappers, RobustBench's included); ``None`` when there is none."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            return obj[key]
    return obj if _is_state_dict(obj) else None


def _build(arch: str, arch_kwargs: dict, state: dict, path: Path | None = None):
    spec = get_arch(arch)
    try:
        model = create_model(arch, **arch_kwargs)
    except (TypeError, ValueError) as exc:
        where = f"{path}: " if path is not None else ""
        raise UserError(f"{where}architecture options {arch_kwargs} do not fit {arch!r} "
                        f"({str(exc).splitlines()[0][:120]})") from None
    state, norm_source = _fit_state_dict(model, state, arch)
    model.load_state_dict(state, strict=False)  # strictness was checked, with a readable message
    return model, spec, norm_source


def load_model(
    spec: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu", arch_kwargs=None
) -> LoadedModel:
    """Load a model for evaluation from a path or ``zoo:NAME``; never executes code from the file
    (:func:`robusteval.models.load_model` also takes the specs of other hubs).

    ``arch`` (and ``arch_kwargs``) are needed for a plain state_dict and ignored for files that carry
    their own structure; for a robusteval checkpoint a different ``arch`` is an error. Every problem is
    a one-line :class:`UserError`.
    """
    path, zoo_name = _resolve(spec)
    digest = sha256_file(path)
    kind = _sniff(path)
    meta: dict = {"name": zoo_name} if zoo_name else {}
    if kind == "export":
        return LoadedModel(_load_export(path, meta, device), meta, digest, "torch.export", path)
    if kind == "torchscript":
        return LoadedModel(_load_torchscript(path, device), {**meta, "arch": None}, digest, "torchscript",
                           path)
    if kind == "safetensors":
        obj = _load_safetensors(path)
    elif kind == "pickle":
        obj = _torch_load(path)
    else:
        raise UserError(f"{path} {_NOT_A_MODEL}")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model, spec, norm_source = _from_checkpoint(path, obj, arch, meta)
        source = "robusteval-checkpoint"
    else:
        model, spec, norm_source = _from_state_dict(path, obj, arch, arch_kwargs, meta)
        source = "state_dict"
    _describe(path, model, spec, norm_source, arch or meta.get("arch"), meta)
    return LoadedModel(model.to(device).eval(), meta, digest, source, path)


def _load_export(path: Path, meta: dict, device) -> nn.Module:
    """A ``torch.export`` program (after :func:`_check_export_archive`), on ``device``; a program exported
    with a fixed batch size runs at that size (:class:`ExportedModel`)."""
    _check_export_archive(path)
    try:
        program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 — any failure here means "not a loadable program"
        raise UserError(f"{path}: cannot load the torch.export program ({str(exc).splitlines()[0][:160]})") \
            from None
    if torch.device(device).type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, torch.device(device))
    shapes = [n.meta["val"].shape for n in program.graph.nodes
              if n.op == "placeholder" and n.name in program.graph_signature.user_inputs and "val" in n.meta]
    meta.update(arch=None, note="train/eval behaviour fixed at export time")
    batch = None
    if shapes:
        meta["input_size"] = tuple(int(s) for s in shapes[0][1:])
        if len(shapes[0]) and isinstance(shapes[0][0], int):  # a static batch dimension (export's default)
            batch = int(shapes[0][0])
            meta["fixed_batch"] = batch
            warnings.warn(f"{path.name} was exported with a fixed batch of {batch} (no dynamic batch "
                          f"dimension): robusteval runs it {batch} inputs at a time, padding the last batch",
                          UserWarning, stacklevel=3)
    return ExportedModel(program.module(), batch).eval()


def _load_torchscript(path: Path, device) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: cannot load the TorchScript archive ({str(exc).splitlines()[0][:160]})") \
            from None
    return model.eval()


def _field(path: Path, obj: dict, key: str, kind, what: str, required: bool = True):
    """A field of a robusteval checkpoint, of type ``kind``; a missing or mistyped one names the field."""
    if key not in obj or obj[key] is None:
        if required:
            raise UserError(f"{path}: damaged robusteval checkpoint: its field {key!r} is missing")
        return None
    if not isinstance(obj[key], kind):
        raise UserError(f"{path}: damaged robusteval checkpoint: its field {key!r} is "
                        f"{type(obj[key]).__name__}, not {what}")
    return obj[key]


def _from_checkpoint(path: Path, obj: dict, arch: str | None, meta: dict):
    """Build the model of a robusteval checkpoint; every field is checked before it is used."""
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format version {version!r} is not one this robusteval reads "
                        f"(1..{FORMAT_VERSION})")
    name = _field(path, obj, "arch", str, "an architecture name")
    kwargs = _field(path, obj, "arch_kwargs", dict, "a dict of architecture options", required=False) or {}
    state = _field(path, obj, "state_dict", dict, "a dict of tensors")
    if not _is_state_dict(state):
        raise UserError(f"{path}: damaged robusteval checkpoint: its field 'state_dict' is not a dict of "
                        "tensors")
    for key in ("training", "metrics", "extra"):
        _field(path, obj, key, dict, "a dict", required=False)
    if arch is not None and arch != name:
        raise UserError(f"{path} is a {name!r} checkpoint, but arch {arch!r} was given")
    if name not in list_models():
        raise UserError(f"{path}: its architecture {name!r} is not one robusteval knows "
                        f"(known: {', '.join(list_models())})")
    built = _build(name, dict(kwargs), state, path)
    meta.update({k: v for k, v in obj.items() if k != "state_dict"})
    return built


def _from_state_dict(path: Path, obj, arch: str | None, arch_kwargs, meta: dict):
    obj = unwrap_state(obj)
    if obj is None:
        raise UserError(f"{path} {_NOT_A_MODEL}")
    if arch is None:
        raise UserError(f"{path} is a plain state_dict; pass `arch`=NAME to say which architecture it "
                        f"belongs to (known: {', '.join(list_models())})")
    built = _build(arch, dict(arch_kwargs or {}), obj, path)
    meta.update(arch=arch, arch_kwargs=dict(arch_kwargs or {}), dataset=None)
    return built


def _describe(path: Path, model: nn.Module, spec, norm_source: str, arch: str | None, meta: dict) -> None:
    """What the records and checks need to know of a built model: normalisation, input size, classes."""
    norm = find_normalize(model)
    meta["normalization"] = norm.as_dict() if norm is not None else None
    if norm_source != "checkpoint":
        shown = {k: [round(float(v), 4) for v in vals] for k, vals in (meta["normalization"] or {}).items()}
        warnings.warn(f"{path} has no normalisation layer; assuming {arch}'s default input normalisation "
                      f"{shown or 'none'} — if the model was trained with another, its numbers will be wrong",
                      UserWarning, stacklevel=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    size = tuple(spec.input_size)
    meta.update(normalization_source=norm_source,
                input_size=(convs[0].in_channels, *size[1:]) if convs else size,
                num_classes=linears[-1].out_features if linears else spec.num_classes)
