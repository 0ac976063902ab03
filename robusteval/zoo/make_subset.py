"""Regenerate ``fmnist_test_1000.npz``: the first 1,000 Fashion-MNIST test images, bundled offline default.

Usage: ``python -m robusteval.zoo.make_subset [SOURCE_DIR] [--n 1000]``; SOURCE_DIR holds the IDX files
(default ``/usr/share/datasets/fashion-mnist``, Debian's ``dataset-fashion-mnist``). The file stores
``x`` (uint8 ``[N, 28, 28]``), ``y`` (uint8 labels) and ``ids`` (0..N−1, the index in the official test
split) and is read with :func:`robusteval.data.load_npz` when no full copy of the data is found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robusteval.data import read_idx

OUT = Path(__file__).resolve().parent / "fmnist_test_1000.npz"


def make_fmnist_subset(
    source: str | Path = "/usr/share/datasets/fashion-mnist", out: Path = OUT, n: int = 1000
) -> Path:
    """Write the first ``n`` test images and labels of Fashion-MNIST found in ``source`` to ``out``."""
    source = Path(source)
    find = lambda stem: next(p for p in (source / f"{stem}.gz", source / stem) if p.is_file())
    x = read_idx(find("t10k-images-idx3-ubyte"))[:n]
    y = read_idx(find("t10k-labels-idx1-ubyte"))[:n]
    np.savez_compressed(out, x=x.astype(np.uint8), y=y.astype(np.uint8), ids=np.arange(n, dtype=np.int64))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    print(make_fmnist_subset(args.source, n=args.n))
