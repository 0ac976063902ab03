"""``robusteval models``: the architecture registry and the bundled model zoo."""

from __future__ import annotations

from robusteval.cli import cli


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metrics_summary(metrics, limit: int = 3) -> str:
    """A short ``key=value`` summary of checkpoint metrics (the last epoch when metrics are per epoch)."""
    if isinstance(metrics, list) and metrics:
        metrics = metrics[-1]
    if not isinstance(metrics, dict):
        return ""
    items = []
    for k, v in metrics.items():
        if isinstance(v, list) and v and isinstance(v[-1], (int, float)):
            v = v[-1]  # a per-epoch history: the final value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            items.append(f"{k}={_number(v)}")
    return ", ".join(items[:limit])


def zoo_rows() -> list[list[str]]:
    """One row per bundled checkpoint: name, arch, dataset, method, train ε, PGD steps, metrics."""
    from robusteval.models import list_zoo, load_model

    rows = []
    for name in list_zoo():
        try:
            loaded = load_model(f"zoo:{name}")
        except Exception as exc:  # noqa: BLE001 — one unreadable file must not hide the others
            rows.append([name, "?", "?", f"unreadable: {str(exc).splitlines()[0][:60]}", "", "", ""])
            continue
        training = loaded.meta.get("training") or {}
        steps = loaded.train_steps
        arch = str(loaded.meta.get("arch") or loaded.source)
        eps = _number(training["eps"]) if "eps" in training else ""
        rows.append([name, arch, str(loaded.meta.get("dataset") or ""), loaded.train_method, eps,
                     "" if steps is None else str(steps), metrics_summary(loaded.meta.get("metrics"))])
    return rows


@cli.command("models")
def models_command():
    """List the registered architectures and the bundled zoo checkpoints.

    An architecture name goes to --arch (for bare state_dicts) or `robusteval train --arch`; a zoo
    checkpoint is used as --model zoo:NAME.

    \b
    Examples:
      robusteval models
      robusteval attack --model zoo:fmnist-llr2 --eps 0.1
    """
    from rich.console import Console
    from rich.table import Table

    from robusteval.models import get_arch, list_models

    console = Console()
    if not console.is_terminal:  # piped: do not wrap names (tables are data here)
        console.width = max(console.width, 160)
    archs = Table(title="Architectures (--arch)", title_justify="left")
    for col in ("name", "input (C,H,W)", "classes", "dataset", "description"):
        archs.add_column(col)
    for name in list_models():
        spec = get_arch(name)
        archs.add_row(name, str(spec.input_size), str(spec.num_classes), spec.dataset, spec.description)
    console.print(archs)
    rows = zoo_rows()
    if not rows:
        console.print("Bundled zoo: no checkpoints yet (robusteval/zoo/*.pt); "
                      "see robusteval/zoo/README.md for how they are trained.")
        return
    zoo = Table(title="Bundled zoo (--model zoo:NAME)", title_justify="left")
    for col in ("name", "arch", "dataset", "method", "train ε", "PGD steps", "metrics"):
        zoo.add_column(col)
    for row in rows:
        zoo.add_row(*row)
    console.print(zoo)
