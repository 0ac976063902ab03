"""Options and helpers shared by the commands: defaults, data and model loading, checks, progress.

One home for each: the default number of examples, the data loader (one behaviour for ``gamma``,
``surface`` and ``show``; ``attack`` and ``demo`` select through their
:class:`~robusteval.evaluation.Evaluation`), the model checks, ``-m/--model``. The default ε per
dataset lives with the data (:data:`robusteval.data.DEFAULT_EPS`).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from robusteval.cli.common import parse_eps
from robusteval.errors import UserError

DEFAULT_N = 1000
#: ``-m/--model``, the same on every command that takes models.
model_option = click.option("--model", "-m", "models", multiple=True, required=True,
                            help="Checkpoint path or zoo:NAME (repeat for several models).")

def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def progress(enabled: bool = True):
    """The commands' progress bar (:func:`robusteval.progress.bar`), gone when done."""
    from robusteval.progress import bar

    return bar(enabled, transient=True)


def load(spec: str, arch: str | None, device: str):
    """Load a model (path or ``zoo:NAME``) for evaluation; every problem is one :class:`UserError` line."""
    from robusteval.models import load_model

    return load_model(spec, arch=arch, device=device)


def dataset_name(loaded, dataset: str | None) -> str:
    """``--dataset`` if given, else the checkpoint's own dataset, else Fashion-MNIST."""
    return dataset or loaded.meta.get("dataset") or "fashion-mnist"


def resolve_eps(eps: str | None, scale: float, dataset: str, with_text: bool = False):
    """``--eps`` (or the dataset's default) in [0, 1] units; with ``with_text`` also the text as given
    (``8/255``; ``8/255`` too for ``--eps 8 --eps-scale 255``)."""
    if eps is None:
        from robusteval.data import default_eps_text

        eps = default_eps_text(dataset)
        click.echo(f"using the default ε = {eps} for {dataset} (set it with --eps)", err=True)
    value = parse_eps(eps, scale)
    text = str(eps).strip() if scale == 1 else f"{str(eps).strip()}/{scale:g}"
    return (value, text) if with_text else value


def check_fits(loaded, ds, device: str, eps: float = 0.0, seed: int = 0, batch_size: int = 256) -> None:
    """The checks of ``robusteval attack`` (:func:`robusteval.fit.check_model`): input shape, outputs and
    classes, finite logits on the data and at a random point of each ε-ball — a clear error, never a
    traceback or a number computed from NaN."""
    from robusteval.fit import check_model
    from robusteval.runtime import eval_mode

    with eval_mode(loaded.model):
        check_model(loaded.model, loaded.name, loaded.meta, ds, [eps], batch_size, device, seed)


def load_data(name: str, data_dir, n: int | None, download: bool = False):
    """The first ``n`` test examples of ``name``; ``n=None`` means :data:`DEFAULT_N`, or all if fewer.

    One behaviour for every command: an ``n`` the data cannot give is an error, the default shrinks.
    """
    from robusteval.data import load_dataset

    if n is not None and n < 1:
        raise UserError(f"--n must be positive, got {n}")
    ds = load_dataset(name, split="test", data_dir=data_dir, download=download)
    if n is not None and n > len(ds):
        raise UserError(f"--n {n} is more than the {len(ds)} test examples of {ds.name} ({ds.source})")
    if ds.bundled:
        click.echo(f"note: using the {ds.source} of the Fashion-MNIST test split", err=True)
    return ds.subset(slice(0, min(n or DEFAULT_N, len(ds))))


def default_out(prefix: str) -> Path:
    """``runs/<prefix>-YYYYmmdd-HHMMSS``: a fresh directory per run unless ``--out`` names one."""
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def unique_names(names: list[str], specs: list[str]) -> list[str]:
    """Display names for the records: the zoo name or file stem, else the spec, else spec#k."""
    names = [spec if names.count(nm) > 1 else nm for nm, spec in zip(names, specs, strict=True)]
    return [f"{nm}#{names[:i].count(nm) + 1}" if names.count(nm) > 1 else nm for i, nm in enumerate(names)]


def model_options(f):
    """Options shared by gamma, surface and show."""
    for opt in reversed([
        click.option("--eps-scale", type=float, default=1.0, show_default=True,
                      help="Divide --eps by this (e.g. 255 to give ε in pixel levels)."),
        click.option("--dataset", default=None,
                     help="Dataset name (default: the checkpoint's, else fashion-mnist)."),
        click.option("--data-dir", type=click.Path(), default=None, help="Where the dataset lives."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:k]."),
        click.option("--arch", default=None, help="Architecture name, for a plain state_dict."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random starts."),
    ]):
        f = opt(f)
    return f
