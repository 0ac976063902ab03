"""Datasets by name, as [0, 1] float tensors with stable example ids.

:func:`load_dataset` returns a :class:`Dataset`: ``images`` ``[N, C, H, W]`` float32 in [0, 1] (never
normalised — normalisation is a layer inside the model, docs/protocol.md "Units"), ``labels`` and
``ids`` (the index in the official split, so records from different runs and slices line up).

Names: ``fashion-mnist``, ``mnist`` (IDX files read directly with numpy), ``cifar10``, ``cifar100``
(the python pickles, read with a restricted unpickler that admits numpy arrays only), ``svhn``
(torchvision; needs scipy), ``imagenet`` (a validation folder with one sub-folder per class, decoded
lazily: resize 256, centre crop 224) and ``npz`` (a user file; see :func:`load_npz`).

Offline first. A dataset is looked for in ``data_dir`` — and only there when it is given: a missing or
empty ``data_dir`` is an error, never a quiet fall-back to another copy — else in ``$ROBUSTEVAL_DATA``,
then the system locations :data:`SYSTEM_ROOTS` (``/usr/share/datasets/<name>``: Debian's
``dataset-fashion-mnist`` package puts its four ``.gz`` files flat there); it is downloaded
(torchvision) only when ``download=True``. For the Fashion-MNIST test split the last resort is the
bundled subset of its first 1,000 images (``robusteval/zoo/fmnist_test_1000.npz``; ``Dataset.bundled``
says so). Missing data is a :class:`UserError` naming the paths tried and how to get the data.

Also here: :func:`augment_crop_flip` (CIFAR training augmentation) and
:func:`iterate_batches`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robusteval.errors import UserError
from robusteval.models.normalize import NORMALIZATIONS

#: Where installed datasets are looked for, after ``data_dir`` and ``$ROBUSTEVAL_DATA``: ``ROOT/<name>``.
SYSTEM_ROOTS: list[Path] = [Path("/usr/share/datasets")]
#: The bundled Fashion-MNIST test subset (first 1,000 images, uint8) — see ``robusteval/zoo/make_subset.py``.
BUNDLED_SUBSET = Path(__file__).resolve().parent / "zoo" / "fmnist_test_1000.npz"
ENV_VAR = "ROBUSTEVAL_DATA"
SPLITS = ("train", "test")

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGITS = [str(i) for i in range(10)]

_ALIASES = {
    "fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar-100": "cifar100", "imagenet-val": "imagenet",
}  # fmt: skip
_HINTS = {
    "fashion-mnist": "install it (apt-get install dataset-fashion-mnist), pass `data_dir`=DIR with the idx "
    "files, or enable `download`",
    "mnist": "pass `data_dir`=DIR with the MNIST idx files (t10k-images-idx3-ubyte.gz, ...), "
    "or enable `download`",
    "cifar10": "pass `data_dir`=DIR containing cifar-10-batches-py, set $ROBUSTEVAL_DATA, "
    "or enable `download`",
    "cifar100": "pass `data_dir`=DIR containing cifar-100-python, set $ROBUSTEVAL_DATA, or enable `download`",
    "svhn": "pass `data_dir`=DIR containing test_32x32.mat/train_32x32.mat, or enable `download`",
    "imagenet": "ImageNet cannot be downloaded automatically; pass `data_dir`=DIR with the validation images "
    "in one folder per class (DIR/val/n01440764/*.JPEG, ...)",
}
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagenet", "npz")
#: The usual L∞ radius per dataset, as written in papers (the LLR paper: 8/255 CIFAR-10, 4/255 ImageNet;
#: 0.1 is the common Fashion-MNIST choice, 0.3 MNIST's); the default of every command and of training.
DEFAULT_EPS = {"fashion-mnist": "0.1", "mnist": "0.3", "cifar10": "8/255", "cifar100": "8/255",
               "svhn": "8/255", "imagenet": "4/255", "npz": "8/255"}


def canonical_name(name: str) -> str:
    """The dataset's canonical name: ``fmnist`` → ``fashion-mnist``, ``CIFAR-10`` → ``cifar10``."""
    key = str(name).lower()
    return _ALIASES.get(key, key)


#: The usual L2 and L1 radii (RobustBench's CIFAR-10 L2 ε = 0.5, its L1 ε = 12; ImageNet L2 ε = 3;
#: 28×28 grey images: L2 1.0, L1 10).
DEFAULT_EPS_L2 = {"fashion-mnist": "1.0", "mnist": "1.0", "cifar10": "0.5", "cifar100": "0.5", "svhn": "0.5",
                  "imagenet": "3.0", "npz": "0.5"}
DEFAULT_EPS_L1 = {"fashion-mnist": "10", "mnist": "10", "cifar10": "12", "cifar100": "12", "svhn": "12",
                  "imagenet": "60", "npz": "12"}


def default_eps_text(name: str, norm: str = "linf") -> str:
    """The usual radius of dataset ``name`` in ``norm`` as written (``8/255``; ``8/255``, ``0.5`` or ``12``
    for an unknown dataset)."""
    table = {"linf": DEFAULT_EPS, "l2": DEFAULT_EPS_L2, "l1": DEFAULT_EPS_L1}[norm]
    return table.get(canonical_name(name), table["npz"])


def default_eps(name: str, norm: str = "linf") -> float:
    """:func:`default_eps_text` as a number (pixel units)."""
    num, _, den = default_eps_text(name, norm).partition("/")
    return float(num) / float(den or 1)


class LazyImages:
    """Images decoded on demand (ImageNet); indexes like a tensor along its first dimension.

    ``images[i]`` is one ``[C, H, W]`` tensor; ``images[a:b]`` and ``images[index_tensor]`` stack.
    """

    def __init__(self, load: Callable[[int], torch.Tensor], indices: torch.Tensor, item_shape: tuple):
        self._load, self._indices, self._item_shape = load, indices, tuple(item_shape)

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._item_shape))

    dtype = torch.float32

    def __getitem__(self, key):
        if isinstance(key, int):
            return self._load(int(self._indices[key]))
        picked = self._indices[key]
        if picked.ndim == 0:
            return self._load(int(picked))
        return (
            torch.stack([self._load(int(i)) for i in picked])
            if len(picked)
            else torch.empty(0, *self._item_shape)
        )

    def subset(self, key) -> LazyImages:
        return LazyImages(self._load, self._indices[key], self._item_shape)


@dataclass
class Dataset:
    """A labelled image set ready for attacks: [0, 1] float images with stable ids.

    ``mean``/``std`` are the per-channel constants for the model's :class:`~robusteval.models.Normalize`
    layer (not applied here); ``source`` says where the data came from; ``bundled`` is true for the
    bundled 1,000-image Fashion-MNIST subset.
    """

    name: str
    split: str
    images: torch.Tensor | LazyImages
    labels: torch.Tensor
    ids: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    bundled: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def normalization(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}``, the form :func:`robusteval.models.create_model` accepts."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def subset(self, index) -> Dataset:
        """The examples at ``index`` (slice, index tensor or boolean mask), ids preserved."""
        images = self.images.subset(index) if isinstance(self.images, LazyImages) else self.images[index]
        return replace(self, images=images, labels=self.labels[index], ids=self.ids[index])

    def fingerprints(self, batch_size: int = 512) -> list[str]:
        """:func:`example_digest` of every example, in dataset order."""
        out = []
        for x, y, _ in self.batches(batch_size):
            out += [example_digest(xi.numpy(), int(yi)) for xi, yi in zip(x, y, strict=True)]
        return out

    def shard(self, index: int, count: int) -> Dataset:
        """Shard ``index`` of ``count``: the examples at positions ``index, index + count, ...``.

        Interleaved rather than contiguous, so every shard (torchrun rank, ``shard`` job) gets a like share
        of easy and hard examples; the union of the shards is the whole set, in no other order."""
        if count > len(self):
            raise UserError(f"{count} shards (or processes) but only {len(self)} examples: use at most "
                            f"{len(self)}")
        return self.subset(torch.arange(index, len(self), count))

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels, ids)`` batches; see :func:`iterate_batches`."""
        return iterate_batches(self.images, self.labels, self.ids, batch_size, shuffle, generator, drop_last)


def example_digest(image, label: int) -> str:
    """A short fingerprint of one example: SHA-256 of its float32 pixels, shape and label (16 hex
    digits). Records carry it, so two runs agree on an example only if they saw the same image."""
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
    h = hashlib.sha256(pixels.tobytes())
    h.update(str(pixels.shape).encode() + b"|" + str(int(label)).encode())
    return h.hexdigest()[:16]


def iterate_batches(
    images,
    labels: torch.Tensor,
    ids: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
):
    """Yield ``(images, labels, ids)`` slices of ``batch_size``.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (required, so the order is
    reproducible — randomness is an argument, never global state).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    n = len(labels)
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs a torch.Generator")
        order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        yield images[index], labels[index], ids[index]


def augment_crop_flip(
    x: torch.Tensor, generator: torch.Generator, padding: int = 4, padding_mode: str = "reflect"
) -> torch.Tensor:
    """Random ``padding``-pixel-padded crop and random horizontal flip, independently per image.

    The CIFAR training augmentation of DeepMind's LLR code (reflect-pad 4, random 32×32 crop,
    horizontal flip; ``padding_mode="zeros"`` gives the common zero-padded variant). ``x`` is
    ``[N, C, H, W]``; draws come from ``generator`` (on its own device) and nothing else.
    """
    if padding_mode not in ("reflect", "zeros", "replicate"):
        raise ValueError(f"padding_mode must be reflect, zeros or replicate, got {padding_mode!r}")
    n, c, h, w = x.shape
    draw = dict(generator=generator, device=generator.device)
    oy = torch.randint(0, 2 * padding + 1, (n,), **draw).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), **draw).to(x.device)
    flip = (torch.rand(n, **draw) < 0.5).to(x.device)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = F.pad(x, [padding] * 4, mode=mode)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is the crop's columns read backwards
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------- file readers

#: Larger than any IDX file of a known dataset (MNIST's training images are 47 MB): a bound on what a
#: (possibly hostile) archive may decompress to.
MAX_IDX_BYTES = 1 << 30
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format, also Fashion-MNIST), gzipped or not, into a numpy array.

    Format: two zero bytes, a type code, the number of dimensions, big-endian uint32 sizes, then data.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read(MAX_IDX_BYTES + 1)
    except (EOFError, OSError, zlib.error) as exc:  # a truncated download or a damaged archive
        raise UserError(f"{path} is truncated or damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:80] if str(exc) else 'unexpected end'})") from None
    if len(data) > MAX_IDX_BYTES:
        raise UserError(f"{path} holds more than {MAX_IDX_BYTES >> 20} MiB of data: not an image file of a "
                        "dataset robusteval reads")
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise UserError(f"{path} is not an IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    if len(data) - 4 - 4 * ndim != int(np.prod(shape)) * dtype.itemsize:
        raise UserError(f"{path}: IDX size does not match its header {shape} (truncated download?)")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches that admits numpy arrays and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): "numpy._core.multiarray",
        ("numpy._core.multiarray", "_reconstruct"): "numpy._core.multiarray",
        ("numpy", "ndarray"): "numpy",
        ("numpy", "dtype"): "numpy",
        ("_codecs", "encode"): "_codecs",  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(self._ALLOWED[module, name], name)


def _load_array_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a CIFAR python batch ({exc})") from None


# ------------------------------------------------------------------------------------------- loaders
# Each finder takes a root directory and returns an array loader, or None when the data is not there.


def _search_dirs(root: Path, name: str, extra: Sequence[str] = ()) -> list[Path]:
    return [root, root / name, *(root / e for e in extra)]


def _find_mnist_like(root: Path, name: str, split: str):
    prefix = "train" if split == "train" else "t10k"
    extra = (
        ["FashionMNIST/raw", "fashion-mnist/raw"] if name == "fashion-mnist" else ["MNIST/raw", "mnist/raw"]
    )
    for d in _search_dirs(root, name, extra):
        for suffix in (".gz", ""):
            img, lab = d / f"{prefix}-images-idx3-ubyte{suffix}", d / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.is_file() and lab.is_file():
                return lambda img=img, lab=lab: _idx_pair(img, lab)
    return None


def _idx_pair(images: Path, labels: Path):
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise UserError(f"{images.parent}: expected images [N, H, W] and labels [N], got {x.shape} and "
                        f"{y.shape}")
    if len(x) != len(y):
        raise UserError(f"{images.parent}: {images.name} holds {len(x)} images but {labels.name} {len(y)} "
                        "labels; one of them is from another download or truncated")
    return x[:, None], y, str(images.parent)


def _find_cifar(root: Path, name: str, split: str):
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]
    for d in [root / folder, root / name / folder, root / name, root]:
        if all((d / f).is_file() for f in files):

            def load(d=d):
                parts = [_load_array_pickle(d / f) for f in files]
                key = "labels" if name == "cifar10" else "fine_labels"
                try:
                    x = np.concatenate([np.asarray(p["data"], np.uint8).reshape(-1, 3, 32, 32)
                                        for p in parts])
                    y = np.concatenate([np.asarray(p[key], np.int64) for p in parts])
                except (KeyError, ValueError, TypeError, IndexError) as exc:
                    raise UserError(f"{d} does not hold CIFAR python batches ({type(exc).__name__}: "
                                    f"{str(exc)[:80]})") from None
                if len(x) != len(y):
                    raise UserError(f"{d}: {len(x)} images but {len(y)} labels")
                return x, y, str(d)

            return load
    return None


def _find_svhn(root: Path, name: str, split: str):
    for d in _search_dirs(root, name):
        if (d / f"{split}_32x32.mat").is_file():

            def load(d=d):
                try:
                    import torchvision

                    ds = torchvision.datasets.SVHN(str(d), split=split, download=False)
                except ImportError as exc:
                    raise UserError(
                        f"reading SVHN's .mat files needs scipy ({exc}); pip install scipy"
                    ) from None
                return ds.data, np.asarray(ds.labels, np.int64), str(d)

            return load
    return None


_FINDERS = {"fashion-mnist": _find_mnist_like, "mnist": _find_mnist_like, "cifar10": _find_cifar,
            "cifar100": _find_cifar, "svhn": _find_svhn}  # fmt: skip


def _download(name: str, split: str, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[name]  # fmt: skip
    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        cls(str(root), download=True, **kwargs)
    except ImportError as exc:
        raise UserError(f"downloading {name} needs an extra package ({exc})") from None
    except Exception as exc:  # noqa: BLE001 — network and archive errors come in many types
        raise UserError(f"downloading {name} into {root} failed: {exc}") from None


def _check_data_dir(data_dir, what: str) -> None:
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"{what} data not found: `data_dir` {data_dir} does not exist")
    if not path.is_dir():
        raise UserError(f"{what} data not found: `data_dir` {data_dir} is not a directory")


def _roots(data_dir) -> list[Path]:
    roots = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]).expanduser())
    return roots


def _classes(name: str, data_path: str) -> list[str]:
    if name == "fashion-mnist":
        return list(FASHION_CLASSES)
    if name == "cifar10":
        return list(CIFAR10_CLASSES)
    if name == "cifar100":
        meta = Path(data_path) / "meta"
        if meta.is_file():
            return [str(c) for c in _load_array_pickle(meta)["fine_label_names"]]
        return [str(i) for i in range(100)]
    return list(DIGITS)


def _window(total: int, n: int | None, offset: int, what: str) -> slice:
    if offset < 0 or (n is not None and n < 1):
        raise UserError(f"need offset >= 0 and n >= 1, got offset={offset}, n={n}")
    stop = total if n is None else offset + n
    if offset >= total or stop > total:
        raise UserError(f"requested examples {offset}..{stop - 1} but {what} has {total}")
    return slice(offset, stop)


def _to_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    n: int | None = None,
    offset: int = 0,
) -> Dataset:
    """Load examples ``offset .. offset + n − 1`` of a dataset split (all of it when ``n`` is None).

    ``name`` is one of :data:`DATASET_NAMES` (or ``npz:PATH`` / a path ending in ``.npz``; for ``npz``
    the file is ``data_dir``). See the module docstring for the search order; missing data is a
    :class:`UserError` that names every path tried and how to get the data.
    """
    # Long: one place decides where a dataset comes from (user file, data_dir, $ROBUSTEVAL_DATA, system
    # copy, download, bundled subset), so every command finds data the same way.
    key = canonical_name(name)
    if key.startswith("npz:") or key.endswith(".npz"):
        return load_npz(name[4:] if key.startswith("npz:") else name, n=n, offset=offset)
    if key == "npz":
        if data_dir is None:
            raise UserError(
                "the npz dataset needs a file: pass `data_dir`=FILE.npz (or `dataset`=npz:FILE.npz)"
            )
        return load_npz(data_dir, n=n, offset=offset)
    if key not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")
    if key == "imagenet":
        return _load_imagenet(split, data_dir, n, offset)

    user_roots = _roots(data_dir)
    finder = _FINDERS[key]
    if data_dir is not None:  # an explicit directory is the only place looked in: never another copy
        _check_data_dir(data_dir, f"{key} {split}")
        candidates = [Path(data_dir).expanduser()]
    else:
        candidates = user_roots + [r / key for r in SYSTEM_ROOTS]
    loader = next((f for f in (finder(r, key, split) for r in candidates) if f is not None), None)
    if loader is None and download:
        target = user_roots[0] if user_roots else Path.home() / ".cache" / "robusteval" / "data"
        _download(key, split, target)
        loader = finder(target, key, split)
    mean, std = NORMALIZATIONS[key]
    if loader is None and data_dir is not None and not download:
        raise UserError(f"{key} {split} data not found in `data_dir` {data_dir} (and no other copy is used "
                        f"when it is given); {_HINTS[key]}")
    if loader is None:
        if key == "fashion-mnist" and split == "test" and BUNDLED_SUBSET.is_file():
            full = load_npz(BUNDLED_SUBSET)
            what = "the bundled Fashion-MNIST test subset (install dataset-fashion-mnist for all 10,000)"
            ds = full.subset(_window(len(full), n, offset, what))
            return replace(
                ds,
                name=key,
                split=split,
                classes=list(FASHION_CLASSES),
                mean=mean,
                std=std,
                source=f"bundled subset ({len(full)} images)",
                bundled=True,
            )
        tried = ", ".join(str(c) for c in candidates)
        raise UserError(f"{key} {split} data not found (tried: {tried}); {_HINTS[key]}")

    x, y, where = loader()
    window = _window(len(y), n, offset, f"{key} {split} ({where})")
    labels = torch.from_numpy(y[window].astype(np.int64))
    return Dataset(
        name=key, split=split, images=_to_float(x[window]), labels=labels,
        ids=torch.arange(window.start, window.stop), classes=_classes(key, where), mean=mean, std=std,
        source=where,
    )  # fmt: skip


def _load_imagenet(split: str, data_dir, n: int | None, offset: int) -> Dataset:
    import torchvision
    from torchvision import transforms

    folder_name = "val" if split == "test" else "train"
    if data_dir is not None:
        _check_data_dir(data_dir, f"imagenet {split}")
        roots = [Path(data_dir).expanduser()]
    else:
        roots = _roots(None) + [r / "imagenet" for r in SYSTEM_ROOTS]
    candidates = [d for r in roots for d in (r / folder_name, r / "imagenet" / folder_name, r)]
    # A class folder is any sub-directory, so a root holding train/ and val/ must not count as one.
    is_folder = lambda d: d.is_dir() and any(p.is_dir() for p in d.iterdir()) and not (d / "train").is_dir()
    found = next((d for d in candidates if is_folder(d) and not (d / "val").is_dir()), None)
    if found is None:
        tried = ", ".join(str(c) for c in candidates)
        raise UserError(f"imagenet {split} data not found (tried: {tried}); {_HINTS['imagenet']}")
    # Resize 256 + centre crop 224: the standard ImageNet evaluation view (also the LLR paper's).
    view = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    try:
        folder = torchvision.datasets.ImageFolder(str(found))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{found} is not an image folder with one sub-folder per class ({exc})") from None
    window = _window(len(folder), n, offset, f"imagenet {split} ({found})")
    ids = torch.arange(window.start, window.stop)
    def load(i: int) -> torch.Tensor:
        file = folder.samples[i][0]
        try:
            return view(folder.loader(file).convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for a damaged or foreign file
            raise UserError(f"cannot decode image {file} ({type(exc).__name__}: {str(exc)[:80]})") from None

    mean, std = NORMALIZATIONS["imagenet"]
    return Dataset(
        name="imagenet", split=split, images=LazyImages(load, ids, (3, 224, 224)),
        labels=torch.tensor(folder.targets, dtype=torch.long)[window], ids=ids, classes=list(folder.classes),
        mean=mean, std=std, source=str(found),
    )  # fmt: skip


def load_npz(path: str | os.PathLike, n: int | None = None, offset: int = 0) -> Dataset:
    """Load a user ``.npz`` file of images and labels (never unpickling: ``allow_pickle=False``).

    Keys: ``x`` or ``images`` (uint8 in 0..255, or float in [0, 1]; ``[N, H, W]``, ``[N, C, H, W]`` or
    ``[N, H, W, C]`` with C in {1, 3}), ``y`` or ``labels`` (non-negative integers, length N); optional
    ``ids`` (default 0..N−1) and ``classes`` (strings). Anything else is a :class:`UserError`.
    """
    # Long: one check per defect a user's file can have, each with its own one-line message.
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"npz file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path} holds a single array; save an .npz with arrays x and y (np.savez)")
        with archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise UserError(f"{path}: not an .npz of plain arrays ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise UserError(f"{path} is not a readable .npz file (truncated or damaged? {exc})") from None
    xk = next((k for k in ("x", "images") if k in arrays), None)
    yk = next((k for k in ("y", "labels") if k in arrays), None)
    if xk is None or yk is None:
        raise UserError(
            f"{path} needs arrays 'x' (or 'images') and 'y' (or 'labels'); found: {sorted(arrays)}"
        )
    x, y = arrays[xk], arrays[yk]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise UserError(f"{path}: images must be [N,H,W], [N,C,H,W] or [N,H,W,C], got shape {x.shape}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # HWC -> CHW
    if x.shape[1] not in (1, 3):
        raise UserError(f"{path}: images need 1 or 3 channels (CHW or HWC), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or len(x) == 0:
        raise UserError(f"{path}: labels must be 1-D with one per image, got {y.shape} for {len(x)} images")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))
    )
    if not integral:
        raise UserError(f"{path}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise UserError(f"{path}: labels must be non-negative, found {y.min()}")
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise UserError(f"{path}: integer images must be in 0..255, found {x.min()}..{x.max()}")
        scale = 255.0
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))[0])
            raise UserError(f"{path}: images contain NaN or infinite pixels (first in image {bad})")
        if x.min() < 0 or x.max() > 1:
            raise UserError(
                f"{path}: float images must be in [0, 1] (uint8 images are scaled by 1/255), "
                f"found {np.nanmin(x):g}..{np.nanmax(x):g}"
            )
        scale = 1.0
    else:
        raise UserError(f"{path}: images must be uint8 or float, got dtype {x.dtype}")
    ids = arrays.get("ids", np.arange(len(y)))
    if ids.shape != y.shape or not np.issubdtype(ids.dtype, np.integer) or len(np.unique(ids)) != len(ids):
        raise UserError(f"{path}: 'ids' must be unique integers, one per image")
    window = _window(len(y), n, offset, str(path))
    images = torch.from_numpy(np.ascontiguousarray(x[window])).float().div_(scale)
    classes = (
        [str(c) for c in arrays["classes"]]
        if "classes" in arrays
        else [str(i) for i in range(int(y.max()) + 1)]
    )
    mean, std = NORMALIZATIONS["mnist"] if images.shape[1] == 1 else NORMALIZATIONS["imagenet"]  # both 2x - 1
    return Dataset(
        name="npz", split="test", images=images, labels=torch.from_numpy(y[window]),
        ids=torch.from_numpy(ids[window].astype(np.int64)), classes=classes, mean=mean, std=std,
        source=str(path),
    )  # fmt: skip
