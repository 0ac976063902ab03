"""``robusteval surface`` (loss around one image, LLR Figure A1) and ``robusteval show`` (an image, its
adversarial version and the scaled perturbation, Figures F2/F4)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from robusteval.cli import cli
from robusteval.cli.common import resolve_device
from robusteval.cli.options import check_fits, dataset_name, load, model_options, progress, resolve_eps
from robusteval.errors import UserError
from robusteval.paths import atomic_write, output_dir


def _example(name: str, data_dir, index: int):
    """The test example whose id is ``index`` (its position in the official test split)."""
    from robusteval.data import load_dataset

    ds = load_dataset(name, split="test", data_dir=data_dir)
    hit = (ds.ids == index).nonzero()[:, 0]
    if hit.numel() == 0:
        raise UserError(f"--index {index} is out of range: {ds.name} test ({ds.source}) has example ids "
                        f"{int(ds.ids.min())}..{int(ds.ids.max())}")
    return ds, ds.subset(hit[:1])


def _attack(name: str, eps: float, steps, restarts, maximize: bool = False):
    import attacks

    changes = {"tracking": attacks.Maximize()} if maximize else {}
    try:
        return attacks.get(name, eps, steps=steps, restarts=restarts, **changes)
    except (KeyError, ValueError) as exc:
        raise UserError(str(exc).strip("'\"")) from None


def _run(attack, model, x, y, ids, seed):
    """Run an attack from the one engine with the model in eval mode (its mode is restored after)."""
    import attacks
    from robusteval.runtime import eval_mode

    with progress() as bar, eval_mode(model):
        task = bar.add_task(f"{attack.name} (ε = {attack.eps:.4g})", total=attack.restarts)
        return attacks.run(attack, model, x, y, ids=ids, seed=seed,
                           on_run=lambda j, total, left: bar.update(task, completed=j + 1, total=total))


def _setup(model, index, eps, eps_scale, dataset, data_dir, device, arch, seed=0, steps=None,
           restarts=None):
    from robusteval.evaluation import MAX_RESTARTS, MAX_STEPS, check_count, check_seed

    check_seed(seed)
    check_count(steps, "steps", MAX_STEPS)
    check_count(restarts, "restarts", MAX_RESTARTS)
    device = resolve_device(device)
    lm = load(model, arch, device)
    full, one = _example(dataset_name(lm, dataset), data_dir, index)
    radius = resolve_eps(eps, eps_scale, full.name)
    check_fits(lm, one, device, radius)
    return lm, full, one, radius, device


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


figure_options = [
    click.option("--model", "-m", required=True, help="Checkpoint path or zoo:NAME."),
    click.option("--index", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Example id in the test split."),
    click.option("--eps", default=None, help="Radius ε: 8/255, 0.1 (default: per dataset)."),
    click.option("--attack", "attack_name", default="untargeted", show_default=True,
                 help="Attack preset (untargeted, multi-targeted, pgd-50, ...)."),
    click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the preset's steps."),
    click.option("--restarts", type=click.IntRange(min=1), default=None,
                 help="Override the preset's restarts."),
    click.option("--out", type=click.Path(file_okay=False), default="runs/figures", show_default=True,
                 help="Output directory."),
]


def _with(options):
    def wrap(f):
        for opt in reversed(options):
            f = opt(f)
        return model_options(f)

    return wrap


@cli.command("surface")
@_with(figure_options)
@click.option("--grid", type=click.IntRange(min=3), default=41, show_default=True,
              help="Grid points per axis (odd, so x itself is the centre).")
@click.option("--extent", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Half-width of the plane in units of ε.")
def surface_command(model, index, eps, attack_name, steps, restarts, out, eps_scale, dataset, data_dir,
                    device, arch, seed, grid, extent):
    """Plot the loss around one test image (LLR supplementary Figure A1).

    ℓ(x + a·δ_adv + b·ε·v) over a grid, with δ_adv the point the attack finds in the ε-ball (a = 1) and
    v a random sign direction (seeded by --seed); both axes in units of ε, clipped to [0, 1]. Writes a
    PNG (3D surface + contour map) and the grid as CSV (columns a, b, loss). The attack maximises its
    objective for all its steps, so the direction exists even for an example the model misclassifies.

    \b
    Examples:
      robusteval surface --model zoo:fmnist-adv2 --index 126 --eps 0.1
      robusteval surface --model ckpt.pt --index 126 --eps 8/255 --grid 41 --out runs/surface
    """
    from robusteval.figures import surface_figure
    from robusteval.linearity import loss_surface

    if grid % 2 == 0 or grid > 1001:
        raise UserError(f"--grid must be odd (x itself is the centre of the grid) and at most 1001, got "
                        f"{grid}")
    if not (math.isfinite(extent) and extent > 0):
        raise UserError(f"--extent must be a positive finite number (units of ε), got {extent}")
    output_dir(out)
    lm, full, one, radius, device = _setup(model, index, eps, eps_scale, dataset, data_dir, device, arch,
                                           seed, steps, restarts)
    if radius <= 0:
        raise UserError("--eps must be positive for a loss surface")
    x, y = one.images.to(device), one.labels.to(device)
    atk = _attack(attack_name, radius, steps, restarts, maximize=True)
    res = _run(atk, lm.model, x, y, one.ids, seed)
    surf = loss_surface(lm.model, x[0], y[0], res.x_adv[0] - x[0], rand_direction=seed, eps=radius,
                        grid=grid, extent=extent)
    stem = Path(out) / f"surface_{_slug(lm.name)}_{index}"
    atomic_write(stem.with_suffix(".csv"), surf.to_frame().to_csv(index=False))
    label = full.classes[int(y)] if int(y) < len(full.classes) else str(int(y))
    surface_figure(surf, stem.with_suffix(".png"),
                   title=f"{lm.name}: loss around {full.name} test #{index} ({label}), ε = {radius:.4g}")
    click.echo(f"loss at x: {surf.center:.6g}   at the attack's point (a=1): {surf.adv:.6g}   "
               f"max on the grid: {float(surf.loss.max()):.6g}")
    click.echo(str(stem.with_suffix(".png")))
    click.echo(str(stem.with_suffix(".csv")))


@cli.command("show")
@_with(figure_options)
def show_command(model, index, eps, attack_name, steps, restarts, out, eps_scale, dataset, data_dir, device,
                 arch, seed):
    """Show a test image, its adversarial version and the scaled perturbation (LLR Figures F2/F4).

    Prints the true, predicted and adversarial labels (class names where the dataset has them) and
    writes a PNG.

    \b
    Examples:
      robusteval show --model zoo:fmnist-llr2 --index 0 --attack untargeted --eps 0.1
      robusteval show --model ckpt.pt --index 0 --attack multi-targeted --eps 8/255 --out runs/show
    """
    from robusteval.figures import perturbation_figure

    output_dir(out)
    lm, full, one, radius, device = _setup(model, index, eps, eps_scale, dataset, data_dir, device, arch,
                                           seed, steps, restarts)
    x, y = one.images.to(device), one.labels.to(device)
    atk = _attack(attack_name, radius, steps, restarts)
    res = _run(atk, lm.model, x, y, one.ids, seed)
    true, pred, adv = int(y[0]), int(res.clean_logits[0].argmax()), int(res.logits[0].argmax())
    name = lambda k: full.classes[k] if k < len(full.classes) else str(k)
    path = Path(out) / f"show_{_slug(lm.name)}_{index}_{_slug(atk.name)}.png"
    perturbation_figure(x[0], res.x_adv[0], path, true, pred, adv, classes=full.classes,
                        title=f"{lm.name}, {atk.name} at ε = {radius:.4g}: label {name(true)} - "
                              f"prediction {name(pred)} - adversarial {name(adv)}")
    click.echo(f"true: {name(true)}   predicted: {name(pred)}   adversarial: {name(adv)}")
    if pred != true:
        click.echo("note: the model already misclassifies this example, so the attack kept it unchanged")
    elif adv == true:
        click.echo(f"the attack did not change the prediction within ε = {radius:.4g}")
    click.echo(str(path))
