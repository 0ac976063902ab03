"""``robusteval train``: parse options, call :func:`robusteval.training.train`, print the result."""

from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

from robusteval.cli import cli
from robusteval.cli.common import parse_eps, parse_step_size, resolve_device
from robusteval.errors import UserError

_RESUME_MAY_CHANGE = {"epochs", "device", "data_dir"}


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(sorted(int(t) for t in text.replace(" ", "").split(",") if t))
    except ValueError:
        raise UserError(f"--lr-decay-epochs expects epochs like 100,105; got {text!r}") from None


@cli.command("train")
@click.option("--method", required=True, type=click.Choice(["nominal", "adversarial", "trades", "llr"]),
              help="Training loss.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write (and resume).")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, mnist, cifar10, cifar100, svhn.")
@click.option("--arch", default=None, help="Architecture [default: small_cnn (28×28), wrn28_8 (CIFAR)].")
@click.option("--activation", default=None,
              help="relu, softplus or swish [default: softplus CIFAR (paper), else the architecture's].")
@click.option("--eps", default=None, help="Training/evaluation radius, L∞ in [0,1] units: 0.1 or 8/255 "
              "[default: 0.1 FMNIST, 0.3 MNIST, 8/255 CIFAR].")
@click.option("--eps-scale", type=float, default=1.0, show_default=True,
              help="Divide --eps by this (255: --eps 8 means 8/255).")
@click.option("--epochs", type=int, default=None, help="[default: 10 FMNIST, 110 CIFAR].")
@click.option("--batch-size", type=int, default=None, help="[default: 128 FMNIST, 256 CIFAR].")
@click.option("--lr", type=float, default=None, help="SGD learning rate [default: 0.05 FMNIST, 0.1 CIFAR].")
@click.option("--momentum", type=float, default=None, help="SGD momentum [default: 0.9].")
@click.option("--weight-decay", type=float, default=None, help="On conv/linear weights only [default: 2e-4].")
@click.option("--lr-decay-epochs", default=None,
              help="Comma-separated 0-based epochs where lr is multiplied by --lr-decay-factor, or "
              "'none' [default: 70%,90% of --epochs FMNIST; 100,105 of 110 CIFAR].")
@click.option("--lr-decay-factor", type=float, default=None, help="[default: 0.1].")
@click.option("--eps-ramp-epochs", type=float, default=None,
              help="ε grows linearly from 0 over this many epochs, per step [default: 2 FMNIST, 15 CIFAR].")
@click.option("--steps", type=int, default=None,
              help="Inner steps: k of PGD-k / TRADES, M of LLR [default: 10].")
@click.option("--inner-step-size", default=None,
              help="Inner step: absolute (0.1) or relative to ε (0.25eps) "
              "[default: Adam 0.1; sign 2.5eps/k].")
@click.option("--inner-optimizer", type=click.Choice(["adam", "sign"]), default=None,
              help="Inner maximisation update [default: adam].")
@click.option("--llr-lambda", type=float, default=None, help="LLR λ: weight of mean g(δ;x) [default: 4].")
@click.option("--llr-mu", type=float, default=None, help="LLR μ: weight of mean |δᵀ∇ℓ(x)| [default: 3].")
@click.option("--nominal-weight", type=float, default=None, help="LLR weight of mean ℓ(x) [default: 2].")
@click.option("--trades-beta", type=float, default=None, help="TRADES β [default: 6].")
@click.option("--grad-mode", type=click.Choice(["deepmind", "exact"]), default=None,
              help="LLR linearity-search gradient: deepmind stops the gradient through δ in the linear term "
              "(DeepMind's code), exact differentiates it [default: deepmind].")
@click.option("--augment/--no-augment", default=None, help="Random crop + flip [default: on for CIFAR].")
@click.option("--seed", type=int, default=None, help="[default: 0].")
@click.option("--n-train", type=int, default=None, help="Train on the first N images only (quick runs).")
@click.option("--eval-n", type=int, default=None,
              help="Hold out the last N training images for the per-epoch clean/PGD-50 check; 0 = off "
              "[default: 1000].")
@click.option("--eval-steps", type=int, default=None, help="Steps of the held-out PGD check [default: 50].")
@click.option("--data-dir", default=None, type=click.Path(), help="Where the dataset lives.")
@click.option("--download", is_flag=True, help="Download the dataset through torchvision if missing.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out exactly where it stopped "
              "(its stored configuration is used; --epochs may be raised).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out checkpoint and start afresh.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (1 is often fastest for small models on a busy machine).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train_command(ctx, method, out, quiet, resume, overwrite, download, threads, eps_scale, **opts):
    """Train a model with nominal, adversarial (PGD-k), TRADES or LLR training and save a checkpoint.

    LLR is Qin et al. 2019 (docs/methods.md, "LLR training"): w·ℓ(x) + λ·g(δ;x) + μ·|δᵀ∇ℓ(x)|, δ from M inner
    Adam steps. Defaults are the paper's CIFAR-10 hyper-parameters (supplementary F.2) or documented
    Fashion-MNIST ones. A checkpoint is written after every epoch and on Ctrl-C; --resume continues it
    bit for bit. An existing --out is never replaced unless --overwrite. Progress goes to stderr; the
    checkpoint path and final metrics to stdout.

    Cost on a CPU, scaled from the zoo's measured times (robusteval/zoo/README.md: 4 epochs on 15,000
    images took 85 s nominal, 705 s ADV-10, 897 s LLR-10 on one thread): the Fashion-MNIST defaults (10
    epochs on 59,000 images) take about 15 minutes nominal and 2 to 2.5 hours for ADV-10 or LLR-10. Use
    --n-train and --epochs for a quick run; the paper's CIFAR-10 recipe needs a GPU.

    \b
    Examples:
      robusteval train --method llr --arch small_cnn --dataset fashion-mnist --eps 0.1 --out llr.pt
      robusteval train --method adversarial --steps 2 --out adv2.pt
      robusteval train --method trades --trades-beta 6 --n-train 5000 --epochs 3 --out trades.pt
      robusteval train --method llr --dataset cifar10 --out llr-c10.pt    # the paper's WRN-28-8 recipe
      robusteval train --method llr --out llr.pt --resume          # after Ctrl-C
      torchrun --nproc-per-node=4 -m robusteval train --method llr --dataset cifar10 --out llr.pt

    Under torchrun each rank trains on its share of every global batch (--batch-size is the global
    batch), gradients are averaged over the ranks, the ε ramp and lr schedule follow the global step,
    and rank 0 alone writes the checkpoint; --resume works with the same number of processes.
    Batch-norm batch statistics are per rank (not synchronised); running statistics are averaged over
    the ranks at each epoch end.
    """
    from robusteval import distributed

    dist_ctx = distributed.from_env()
    if dist_ctx is None:
        return _train_command(ctx, method, out, quiet, resume, overwrite, download, threads, eps_scale, opts)
    try:  # torchrun: every rank trains on its share of each global batch; rank 0 writes the checkpoint
        opts["device"] = distributed.start(dist_ctx, opts.get("device") or "auto")
        _train_command(ctx, method, out, quiet or dist_ctx.rank != 0, resume, overwrite, download, threads,
                       eps_scale, opts, echo=dist_ctx.rank == 0)
        distributed.wait_all(dist_ctx)  # no rank leaves while another still has collective work in flight
    finally:
        distributed.stop()


def _train_command(ctx, method, out, quiet, resume, overwrite, download, threads, eps_scale, opts, echo=True):
    from pathlib import Path

    from robusteval.training import make_config, resume_config, train
    from robusteval.training.trainer import check_writable, command_line

    if resume and overwrite:
        raise UserError("--resume continues the checkpoint in --out and --overwrite replaces it: choose one")
    if not resume and not overwrite and Path(out).exists():
        raise UserError(f"{out} already exists; add --resume to continue that run, --overwrite to replace "
                        "it, or choose another --out")
    check_writable(Path(out))

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    given = {k: v for k, v in opts.items() if v is not None}
    if "eps" in given:
        given["eps"] = parse_eps(given["eps"], eps_scale)
    if "lr_decay_epochs" in given:
        given["lr_decay_epochs"] = _int_list(given["lr_decay_epochs"])
    if "inner_step_size" in given:
        given["inner_step_size"], given["inner_step_relative"] = parse_step_size(given["inner_step_size"])
    given["device"] = resolve_device(given["device"])

    if resume:
        cfg = resume_config(out)
        explicit = {k for k in opts if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        explicit |= {"inner_step_relative"} if "inner_step_size" in explicit else set()
        clash = [k for k in explicit - _RESUME_MAY_CHANGE
                 if k in given and getattr(cfg, k, given[k]) != given[k]]
        if method != cfg.method:
            clash.insert(0, "method")
        if clash:
            stored = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in clash)
            raise UserError(f"--resume continues {out} with its stored configuration ({stored}); drop the "
                            "differing options or start a new --out")
        cfg = dataclasses.replace(cfg, **{k: given[k] for k in _RESUME_MAY_CHANGE if k in given})
    else:
        given["command"] = command_line()
        cfg = make_config(method, given.pop("dataset"), **given)

    metrics = train(cfg, out, resume=resume, download=download, progress=not quiet)
    if not echo:
        return
    line = f"{out}"
    if "clean_acc" in metrics:
        line += (f"\theld-out clean {metrics['clean_acc']:.2%}\tPGD-{cfg.eval_steps}@{cfg.eps:.4g} "
                 f"{metrics['pgd_acc']:.2%}\t(n={metrics['eval_n']})")
    click.echo(line)
