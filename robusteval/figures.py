"""Figures of the LLR paper's supplementary, drawn from records (matplotlib, Agg backend).

* :func:`gamma_histogram` — overlaid √γ(ε, x) histograms of several models on shared bins (Figure F3);
* :func:`surface_figure` — the loss around one image on the adversarial × random plane, as a 3D surface
  and a contour map (Figure A1);
* :func:`perturbation_figure` — original, adversarial image and the scaled perturbation with the true,
  predicted and adversarial labels (Figures F2 and F4).

Everything here is a pure function of tables or tensors already computed (docs/records.md: records are the
one result format), so a figure can be redrawn from ``gamma.csv`` or a surface CSV without rerunning a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


@dataclass
class Histogram:
    """Shared bin ``edges`` and per-group ``counts`` (``{group: int array of len(edges) − 1}``)."""

    edges: np.ndarray
    counts: dict

    def to_frame(self) -> pd.DataFrame:
        """One row per (group, bin): ``model, bin, left, right, count``."""
        rows = [
            {"model": name, "bin": i, "left": self.edges[i], "right": self.edges[i + 1], "count": int(c)}
            for name, cs in self.counts.items() for i, c in enumerate(cs)
        ]
        return pd.DataFrame(rows, columns=["model", "bin", "left", "right", "count"])


def gamma_histogram(
    df: pd.DataFrame,
    path: str | Path | None,
    log: bool = False,
    bins: int = 30,
    value: str = "sqrt_gamma",
    by: str = "model",
    title: str | None = None,
) -> Histogram:
    """Overlay the histograms of ``df[value]`` (default √γ) for each ``df[by]`` group on shared bins.

    As supplementary Figure F3: one translucent histogram per model, the same bin edges for all (edges
    from ``np.histogram_bin_edges`` over every value, so heights are comparable), legend, axis labels,
    and optionally log-scaled counts. Returns the edges and counts; writes a PNG when ``path`` is given.
    """
    if value not in df.columns or by not in df.columns:
        raise ValueError(f"the table needs columns {value!r} and {by!r}; it has {list(df.columns)}")
    values = df[value].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(finite if finite.size else np.zeros(1), bins=bins)
    counts = {}
    for name, group in df.groupby(by, sort=False):
        counts[str(name)] = np.histogram(group[value].to_numpy(dtype=float), bins=edges)[0]
    hist = Histogram(edges, counts)
    if path is None:
        return hist
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in counts.items():
        patch = ax.stairs(c, edges, fill=True, alpha=0.45, label=f"{name} (n={int(c.sum())})")
        ax.stairs(c, edges, linewidth=1.2, color=patch.get_facecolor()[:3])  # crisp outline, same hue
    eps = df["eps"].iloc[0] if "eps" in df.columns and len(df) else None
    symbol = "√γ(ε, x)" if value == "sqrt_gamma" else value
    ax.set_xlabel(f"{symbol}" + (f" at ε = {eps:.4g}" if eps is not None else ""))
    ax.set_ylabel("number of test examples" + (" (log scale)" if log else ""))
    if log:
        ax.set_yscale("log")
    ax.set_title(title or f"Local linearity per example ({symbol}); lower is more linear")
    ax.legend(frameon=False)
    fig.tight_layout()
    _save(fig, path)
    return hist


def surface_figure(grid, path: str | Path, title: str | None = None) -> Path:
    """3D surface and contour map of a :class:`robusteval.linearity.SurfaceGrid` (supplementary Figure A1).

    Axes are in units of ε: ``a`` along the adversarial direction (the attack's point at a = 1, marked),
    ``b`` along the random sign direction.
    """
    a, b = np.asarray(grid.a), np.asarray(grid.b)
    loss = np.asarray(grid.loss)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    fig = plt.figure(figsize=(11, 4.6))
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax3.plot_surface(aa, bb, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel("adversarial (ε)")
    ax3.set_ylabel("random (ε)")
    ax3.set_zlabel("loss ℓ")
    ax2 = fig.add_subplot(1, 2, 2)
    cs = ax2.contourf(aa, bb, loss, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax2, label="loss ℓ")
    ax2.plot([0], [0], "wo", label=f"x (ℓ = {grid.center:.3g})")
    ax2.plot([1], [0], "r*", markersize=10, label=f"x_adv (ℓ = {grid.adv:.3g})")
    ax2.add_patch(plt.Rectangle((-1, -1), 2, 2, fill=False, ls="--", ec="w", lw=0.8))  # the ε-ball's face
    ax2.set_xlabel("adversarial direction (units of ε)")
    ax2.set_ylabel("random direction (units of ε)")
    ax2.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or f"Loss surface around x (ε = {grid.eps:.4g})")
    fig.tight_layout()
    return _save(fig, path)


def _image(t) -> tuple[np.ndarray, str | None]:
    arr = np.asarray(t.detach().cpu() if hasattr(t, "detach") else t, dtype=float)
    arr = arr.reshape(arr.shape[-3:]) if arr.ndim >= 3 else arr
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    return np.clip(arr, 0, 1), ("gray" if arr.ndim == 2 else None)


def perturbation_figure(
    x,
    x_adv,
    path: str | Path,
    true_label: int,
    pred_label: int,
    adv_label: int,
    classes: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Original, adversarial image and the perturbation scaled to the full range (Figures F2/F4).

    The perturbation is shown as ``0.5 + δ / (2·max|δ|)``: mid-grey is no change and the largest change
    reaches black or white, keeping the sign (the paper shows it "scaled"). Labels use ``classes`` names
    when given (e.g. ``Dataset.classes``).
    """
    name = lambda k: f"{classes[k]} ({k})" if classes and 0 <= k < len(classes) else str(k)
    img, cmap = _image(x)
    adv, _ = _image(x_adv)
    delta = np.asarray(x_adv.detach().cpu() if hasattr(x_adv, "detach") else x_adv, dtype=float) - \
        np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=float)
    peak = float(np.abs(delta).max())
    scaled, _ = _image(0.5 + delta / (2 * peak) if peak > 0 else np.full_like(delta, 0.5))
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.9), layout="constrained")  # room for the suptitle
    panels = [(img, f"original\nlabel: {name(true_label)}\nprediction: {name(pred_label)}"),
              (adv, f"adversarial\nprediction: {name(adv_label)}"),
              (scaled, f"perturbation (scaled)\n‖δ‖∞ = {peak:.4g}")]
    for ax, (im, label) in zip(axes, panels, strict=True):
        ax.imshow(im, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title or f"Label: {name(true_label)} - Prediction: {name(pred_label)} - "
                          f"Adversarial: {name(adv_label)}", fontsize=10)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Save a figure atomically (a figure half-written by a killed run is never left behind)."""
    import io

    from robusteval.paths import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def curve_figure(table: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Robust accuracy against ε (:func:`robusteval.reports.curve`), one step curve per model and norm."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (model, norm), sub in table.groupby(["model", "norm"], sort=False):
        ax.step(sub["eps"], 100 * sub["robust_accuracy"], where="post", label=f"{model} ({norm.upper()})")
    ax.set_xlabel("ε")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
