"""The reference trainer: nominal, adversarial (ADV-k), TRADES and LLR, with exact resume.

:func:`make_config` fills a :class:`TrainConfig` with per-dataset defaults (:data:`DATASET_DEFAULTS`:
the LLR paper's CIFAR-10 hyper-parameters, supplementary F.2 / docs/methods.md, and
documented Fashion-MNIST/MNIST values); :func:`train` runs it and writes a robusteval checkpoint.

Mechanics (docs/methods.md, "LLR training"):

* SGD, momentum 0.9 (not Nesterov); weight decay on conv/linear *weights* only (not biases, not batch norm);
  learning rate multiplied by ``lr_decay_factor`` at each epoch in ``lr_decay_epochs`` (0-based
  epoch index at which the new rate starts: the paper's "decrease after 100 and 105 epochs");
* ε ramped linearly from exactly 0 at step 0 to ``eps`` over ``eps_ramp_epochs`` epochs, per step
  (the regulariser is exactly zero at step 0); the end-of-epoch evaluation always uses the full ``eps``;
* randomness is derived, never drawn from global state: the data order of epoch e from
  ``(seed, e)``, the augmentation of step t and the inner attack's random start from ``(seed, t)``
  (the engine adds the example id). The global torch RNG only initialises the weights. So a run
  interrupted at a step boundary and resumed continues bit for bit;
* TF32 is switched off (docs/protocol.md, "Numerics of γ and LLR"): the LLR term is a small difference of
  O(1) numbers;
* held-out evaluation at every epoch end: clean accuracy and PGD-50 robust accuracy (Adam 0.1, margin,
  model in eval mode — the paper's on-the-fly check, Table F2) on the last ``eval_n`` training images,
  which are never trained on;
* a checkpoint (atomic, :func:`robusteval.models.save_checkpoint`) at every epoch end and on Ctrl-C:
  the first Ctrl-C asks the loop to stop at the next step boundary and save; the ``extra["resume"]``
  section holds the optimizer state, position (epoch, step in epoch, global step), RNG state and the
  epoch's running sums, all tensors and plain values (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import attacks
from attacks import seeding
from robusteval import distributed
from robusteval.data import canonical_name, default_eps
from robusteval.errors import UserError
from robusteval.runtime import eval_mode, strict_fp32
from robusteval.training.losses import METHODS, LossConfig, compute_loss

#: Per-dataset defaults. ``decay_at``: lr decay points as fractions of ``epochs`` (so a shorter run keeps
#: the schedule's shape); cifar10 reproduces the paper exactly (110 epochs, decays at 100 and 105).
DATASET_DEFAULTS: dict[str, dict] = {
    "cifar10": dict(arch="wrn28_8", epochs=110, batch_size=256, lr=0.1, weight_decay=2e-4,
                    decay_at=(100 / 110, 105 / 110), eps_ramp_epochs=15.0, steps=10, augment=True,
                    activation="softplus"),
    "fashion-mnist": dict(arch="small_cnn", epochs=10, batch_size=128, lr=0.05, weight_decay=2e-4,
                          decay_at=(0.7, 0.9), eps_ramp_epochs=2.0, steps=10, augment=False),
}
# WRN-28-8 with softplus is the paper's CIFAR-10 model (supplementary F.2, Table F2).
DATASET_DEFAULTS["cifar100"] = DATASET_DEFAULTS["cifar10"]
DATASET_DEFAULTS["svhn"] = {**DATASET_DEFAULTS["cifar10"], "augment": False}
DATASET_DEFAULTS["mnist"] = DATASET_DEFAULTS["fashion-mnist"]
DATASET_DEFAULTS["npz"] = DATASET_DEFAULTS["fashion-mnist"]



#: The loss fields of a training configuration: flat name (CLI option, stored metadata) → LossConfig field.
LOSS_FIELDS = {"method": "method", "steps": "steps", "inner_step_size": "step_size",
               "inner_step_relative": "relative_step", "inner_optimizer": "inner_optimizer",
               "llr_lambda": "llr_lambda", "llr_mu": "llr_mu", "nominal_weight": "nominal_weight",
               "trades_beta": "trades_beta", "grad_mode": "grad_mode"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored, flat, in the checkpoint's ``training`` section).

    ``loss`` is the training loss's :class:`LossConfig`; its fields are also readable under their flat
    names (``cfg.method``, ``cfg.steps``, ``cfg.inner_step_size``, ... — :data:`LOSS_FIELDS`), which are
    the CLI's option names and the stored keys. Build one with :meth:`create` from flat keywords.
    """

    loss: LossConfig
    arch: str
    dataset: str
    eps: float
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_decay_epochs: tuple[int, ...]
    eps_ramp_epochs: float
    augment: bool
    momentum: float = 0.9
    lr_decay_factor: float = 0.1
    activation: str | None = None
    seed: int = 0
    n_train: int | None = None
    eval_n: int = 1000
    eval_steps: int = 50
    data_dir: str | None = None
    device: str = "cpu"
    command: str = ""

    @classmethod
    def create(cls, **flat) -> TrainConfig:
        """From flat keywords: the :data:`LOSS_FIELDS` go into ``loss``, the rest are fields."""
        loss = LossConfig(**{LOSS_FIELDS[k]: flat.pop(k) for k in list(flat) if k in LOSS_FIELDS})
        return cls(loss=loss, **flat)

    def loss_config(self) -> LossConfig:
        return self.loss

    def as_dict(self) -> dict:
        """Flat: the loss fields under their flat names, then the other fields (the stored format)."""
        out = {k: getattr(self.loss, v) for k, v in LOSS_FIELDS.items()}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loss"})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)} | set(LOSS_FIELDS)
        d = {k: v for k, v in d.items() if k in names and k != "loss"}
        d["lr_decay_epochs"] = tuple(int(e) for e in d.get("lr_decay_epochs", ()))
        return cls.create(**d)


for _flat, _field in LOSS_FIELDS.items():
    setattr(TrainConfig, _flat, property(lambda self, f=_field: getattr(self.loss, f),
                                         doc=f"``loss.{_field}`` (flat name)"))


def make_config(method: str, dataset: str = "fashion-mnist", **given) -> TrainConfig:
    """A :class:`TrainConfig` for ``method`` on ``dataset``: ``given`` values (``None`` = not given)
    override :data:`DATASET_DEFAULTS`. Invalid values raise :class:`UserError`."""
    dataset = canonical_name(dataset)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    base = DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["cifar10"])
    given = {k: v for k, v in given.items() if v is not None}
    kw = {k: v for k, v in base.items() if k != "decay_at"}
    kw["eps"] = default_eps(dataset)  # the usual radius of the dataset, as for evaluation
    kw.update(given)
    if "lr_decay_epochs" not in given:
        kw["lr_decay_epochs"] = tuple(sorted({round(f * kw["epochs"]) for f in base["decay_at"]}))
    kw["lr_decay_epochs"] = tuple(int(e) for e in kw["lr_decay_epochs"])
    try:
        cfg = TrainConfig.create(method=method, dataset=dataset, **kw)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid training configuration: {exc}") from None
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    from robusteval.evaluation import MAX_BATCH, MAX_STEPS, check_count, check_seed

    check_seed(cfg.seed)
    counts = ((cfg.epochs, "epochs", 100_000, 1), (cfg.batch_size, "batch_size", MAX_BATCH, 2),
              (cfg.steps, "steps", MAX_STEPS, 0), (cfg.eval_steps, "eval_steps", MAX_STEPS, 0),
              (cfg.n_train, "n_train", 1 << 40, 1), (cfg.eval_n, "eval_n", 1 << 40, 0))
    for value, what, upper, low in counts:
        check_count(value, what, upper, low)
    checks = [
        (cfg.epochs >= 1, f"`epochs` must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 2, f"`batch_size` must be >= 2 (batch norm needs a batch), got {cfg.batch_size}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"`lr` must be positive, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"`momentum` must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"`weight_decay` must be >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.eps <= 1, f"`eps` must be in [0, 1] pixel units, got {cfg.eps}"),
        (cfg.eps_ramp_epochs >= 0, f"`eps_ramp_epochs` must be >= 0, got {cfg.eps_ramp_epochs}"),
        (cfg.eval_n >= 0, f"`eval_n` must be >= 0, got {cfg.eval_n}"),
        (cfg.n_train is None or cfg.n_train >= 1, f"`n_train` must be >= 1, got {cfg.n_train}"),
        (all(e >= 0 for e in cfg.lr_decay_epochs), "`lr_decay_epochs` must be non-negative epoch numbers"),
        (min(cfg.llr_lambda, cfg.llr_mu, cfg.nominal_weight, cfg.trades_beta) >= 0,
         "loss weights (`llr_lambda`, `llr_mu`, `nominal_weight`, `trades_beta`) must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ----------------------------------------------------------------------------------------- building


def load_training_data(cfg: TrainConfig, download: bool = False):
    """``(train, heldout)``: the first ``n_train`` images of the training split, and its last ``eval_n``
    images (never trained on; ``None`` when ``eval_n == 0``)."""
    from robusteval.data import load_dataset

    full = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=download)
    total = len(full)
    pool = total - cfg.eval_n
    if pool < cfg.batch_size:
        raise UserError(f"{cfg.dataset} train has {total} images; with `eval_n` {cfg.eval_n} held out "
                        f"fewer than one batch ({cfg.batch_size}) is left to train on")
    n = cfg.n_train or pool
    if n > pool:
        raise UserError(f"`n_train` {n} exceeds the {pool} training images left after holding out "
                        f"`eval_n` {cfg.eval_n}")
    # Clone so a small subset does not keep the whole split's storage alive.
    train = full.subset(slice(0, n))
    train = dataclasses.replace(train, images=train.images.clone())
    heldout = full.subset(slice(total - cfg.eval_n, total)) if cfg.eval_n else None
    if heldout is not None:
        heldout = dataclasses.replace(heldout, images=heldout.images.clone())
    return train, heldout


def build_model(cfg: TrainConfig, data) -> tuple[nn.Module, dict]:
    """The architecture for ``data`` (classes, channels, normalisation inside), and its ``arch_kwargs``."""
    from robusteval.models import NORMALIZATIONS, create_model, get_arch

    spec = get_arch(cfg.arch)
    shape = tuple(data.images.shape[1:])
    if tuple(spec.input_size) != shape:
        raise UserError(f"architecture {cfg.arch!r} takes inputs {tuple(spec.input_size)}, but {cfg.dataset} "
                        f"images are {shape}")
    accepted = inspect.signature(spec.factory).parameters
    kwargs = {"num_classes": int(data.num_classes) if hasattr(data, "num_classes") else 10,
              "normalization": data.name if getattr(data, "name", None) in NORMALIZATIONS
              else {"mean": list(data.mean), "std": list(data.std)}}
    if "in_channels" in accepted:
        kwargs["in_channels"] = shape[0]
    if cfg.activation is not None:
        kwargs["activation"] = cfg.activation
    return create_model(cfg.arch, **kwargs), kwargs


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on convolution and linear weights only (docs/methods.md).

    Biases, batch-norm scales/offsets and anything else get no decay.
    """
    decay, other, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            kernel = name == "weight" and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
            (decay if kernel else other).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``lr · factor^(number of decay epochs ≤ epoch)``."""
    return cfg.lr * cfg.lr_decay_factor ** sum(1 for e in cfg.lr_decay_epochs if epoch >= e)


def eps_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Training radius at 0-based global ``step``: linear from exactly 0 to ``eps`` over the ramp."""
    ramp = cfg.eps_ramp_epochs * steps_per_epoch
    return cfg.eps if ramp <= 0 else cfg.eps * min(1.0, step / ramp)


def _seed(cfg: TrainConfig, index: int, tag: int) -> int:
    return seeding.example_seed(cfg.seed, index, tag)


# ---------------------------------------------------------------------------------------- evaluation


def heldout_check(model: nn.Module, data, eps: float, *, steps: int = 50, batch_size: int = 250,
                  seed: int = 0, device="cpu") -> dict:
    """The per-epoch held-out check: clean and PGD-``steps`` robust accuracy (engine preset ``pgd-K``:
    Adam 0.1, margin, one restart) of ``model`` in eval mode on ``data``; robust = clean-correct and
    still correct (docs/protocol.md). Not an evaluation of the model: use
    :func:`robusteval.runner.evaluate`."""
    attack = attacks.get(f"pgd-{steps}", eps) if eps > 0 else None
    clean = robust = 0
    with eval_mode(model):
        for x, y, ids in data.batches(batch_size):
            x, y = x.to(device), y.to(device)
            if attack is None:
                with torch.no_grad():
                    ok = model(x).argmax(1) == y
                clean += int(ok.sum())
                robust += int(ok.sum())
                continue
            res = attacks.run(attack, model, x, y, ids=ids, seed=seed)
            clean += int((res.clean_logits.argmax(1) == y).sum())
            robust += int((~res.success).sum())
    n = len(data)
    return {"clean_acc": clean / n, "pgd_acc": robust / n, "eval_n": n, "eval_attack": f"pgd-{steps}",
            "eval_eps": eps}


# ------------------------------------------------------------------------------------------ training


class _DeferredInterrupt:
    """The first Ctrl-C sets a flag (the loop saves at the next step boundary); a second one raises."""

    def __init__(self, echo: Callable[[str], None]):
        self.requested, self._echo, self._previous = False, echo, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._echo("interrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class StepInfo:
    """Passed to ``on_step`` after every completed optimisation step."""

    epoch: int
    step_in_epoch: int
    global_step: int
    eps: float
    lr: float
    loss: float
    acc: float
    parts: dict = field(default_factory=dict)


def check_writable(path: Path) -> None:
    """Raise a :class:`UserError` unless a checkpoint can be written at ``path`` (probed with a temp file)."""
    import tempfile

    if path.exists() and not path.is_file():
        raise UserError(f"cannot write the checkpoint {path}: it exists and is not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write the checkpoint {path} ({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write the checkpoint {path} (permission denied)")


def schedule_notes(cfg: TrainConfig) -> list[str]:
    """Parts of the schedule that a short run never reaches (a run that ends early says so)."""
    notes = []
    if cfg.method != "nominal" and cfg.eps > 0 and cfg.eps_ramp_epochs > cfg.epochs:
        reached = cfg.eps * min(1.0, cfg.epochs / cfg.eps_ramp_epochs)
        notes.append(f"the ε ramp lasts {cfg.eps_ramp_epochs:g} epochs but the run has {cfg.epochs}: "
                     f"training ends at ε = {reached:.4g}, below the target {cfg.eps:.4g} "
                     "(shorten the ramp: eps_ramp_epochs, --eps-ramp-epochs on the command line)")
    late = [e for e in cfg.lr_decay_epochs if e >= cfg.epochs]
    if late:
        notes.append(f"learning-rate decay at epoch(s) {', '.join(map(str, late))} falls after the last "
                     f"epoch ({cfg.epochs - 1}, 0-based) and never happens")
    return notes


def _load_resume(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"`resume`: no checkpoint at {path} to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any failure means "not a resumable checkpoint"
        raise UserError(f"`resume`: cannot read {path} ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "resume" not in (ckpt.get("extra") or {}):
        raise UserError(f"`resume`: {path} is not a checkpoint written by robusteval train")
    return ckpt


def resume_config(path: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` stored in a trainer checkpoint (for ``--resume``)."""
    return TrainConfig.from_dict(_load_resume(Path(path))["training"])


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, data=None, download: bool = False,
          progress: bool = True, on_step: Callable[[StepInfo], None] | None = None) -> dict:
    """See :func:`_train`. Runs in fp32 without TF32 and with the global RNG forked: the
    caller's TF32 flags and random state are the same afterwards."""
    devices = [torch.device(cfg.device)] if torch.device(cfg.device).type == "cuda" else []
    with strict_fp32(cfg.device), torch.random.fork_rng(devices=devices):
        return _train(cfg, out, resume=resume, data=data, download=download, progress=progress,
                      on_step=on_step)


def _sync_start(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers (they are equal by seeding; this makes sure)."""
    import torch.distributed as dist

    for t in model.state_dict().values():
        dist.broadcast(t.data, src=0)


def _average_gradients(model: nn.Module, world: int) -> None:
    """Data parallelism by hand: each parameter's gradient is averaged over the ranks (all-reduce), so
    every rank takes the optimizer step of the whole global batch. ``DistributedDataParallel``'s reducer
    assumes one forward per backward, which LLR's inner maximisation and batch-norm capture/replay break
    (several forwards of the same module per step); averaging after ``backward`` is the same arithmetic."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _reduce_epoch(ck: "_Checkpointer", world: int) -> None:
    """End of epoch, all ranks: sum the running loss/accuracy sums, average batch-norm running statistics
    (each rank normalised with its own sub-batch; the checkpoint gets the ranks' mean)."""
    import torch.distributed as dist

    sums = torch.tensor([ck.sums["loss"], ck.sums["correct"], ck.sums["seen"]], dtype=torch.float64)
    dist.all_reduce(sums)
    ck.sums = {"loss": float(sums[0]), "correct": int(sums[1]), "seen": int(sums[2])}
    for name, buf in ck.model.named_buffers():
        if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
            dist.all_reduce(buf)
            buf /= world


class _Checkpointer:
    """The resumable state of a training run — model, optimizer, position, running sums, history — and
    how it is written (:func:`save_checkpoint`, every epoch end and on interrupt) and read back."""

    def __init__(self, cfg: TrainConfig, out: Path, model: nn.Module, arch_kwargs: dict, opt,
                 steps_per_epoch: int):
        self.cfg, self.out, self.model, self.arch_kwargs, self.opt = cfg, out, model, arch_kwargs, opt
        self.steps_per_epoch = steps_per_epoch
        self.position = {"epoch": 0, "step_in_epoch": 0}
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0}
        self.history: list[dict] = []
        self.mutating = False  # True inside a step: the model has moved past the recorded position
        self.rank, self.world = distributed.world()  # only rank 0 writes the checkpoint

    def restore(self) -> None:
        """Continue the run saved at ``out``: weights, optimizer, global RNG, position, sums, history."""
        ckpt = _load_resume(self.out)
        state = ckpt["extra"]["resume"]
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.position = {"epoch": int(state["epoch"]), "step_in_epoch": int(state["step_in_epoch"])}
        self.history = list((ckpt.get("metrics") or {}).get("epochs", []))
        self.sums = dict(state.get("sums", self.sums))

    def metrics(self) -> dict:
        m = {"epochs": self.history}
        if self.history:
            last = self.history[-1]
            m.update({k: last[k] for k in ("clean_acc", "pgd_acc", "eval_n", "eval_attack", "eval_eps")
                      if k in last})
        return m

    def save(self, finished: bool = False) -> None:
        from robusteval.models import save_checkpoint

        if self.rank != 0:
            return
        p = self.position
        resume_state = {
            **p,
            "global_step": p["epoch"] * self.steps_per_epoch + p["step_in_epoch"],
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer": _to_cpu(self.opt.state_dict()),
            "rng": {"torch": torch.get_rng_state()},
            "sums": dict(self.sums),
            "finished": finished,
        }
        save_checkpoint(self.out, self.model, self.cfg.arch, self.arch_kwargs, self.cfg.dataset,
                        training=self.cfg.as_dict(), metrics=self.metrics(), extra={"resume": resume_state})

    def interrupted(self, echo) -> None:
        """On Ctrl-C: save at a step boundary; inside a step keep the last good checkpoint (the batch-norm
        buffers and maybe the parameters have moved, so that state could not be resumed exactly)."""
        if self.mutating:
            echo(f"interrupted mid-step; {self.out} keeps the last saved state" if self.out.exists()
                 else "interrupted mid-step before the first checkpoint; nothing saved")
            return
        self.save()
        echo(f"interrupted at epoch {self.position['epoch'] + 1}, step {self.position['step_in_epoch']}: "
             f"saved {self.out}; add --resume to continue")


def _train_step(cfg: TrainConfig, loss_cfg: LossConfig, ck: _Checkpointer, train_ds, order, epoch: int,
                i: int, device) -> tuple[float, int, float, dict]:
    """One optimisation step on batch ``i`` of ``epoch``: ``(loss, correct, ε, parts)``; updates the sums
    and the position (the model/optimizer mutate while ``ck.mutating``)."""
    from robusteval.data import augment_crop_flip

    t = epoch * ck.steps_per_epoch + i
    idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size][ck.rank::ck.world]  # this rank's share
    x, y, ids = train_ds.images[idx], train_ds.labels[idx], train_ds.ids[idx]
    if cfg.augment:
        x = augment_crop_flip(x, torch.Generator().manual_seed(_seed(cfg, t, seeding.TRAIN_AUGMENT)))
    x, y = x.to(device), y.to(device)
    eps_t = eps_at(cfg, t, ck.steps_per_epoch)
    ck.mutating = True
    res = compute_loss(loss_cfg, ck.model, x, y, eps=eps_t, ids=ids, seed=_seed(cfg, t, seeding.TRAIN_ATTACK))
    loss_value = float(res.loss.detach())
    if not math.isfinite(loss_value):  # before the step: the weights on disk and in memory stay finite
        _diverged(ck, f"the loss is {loss_value} at epoch {epoch + 1}, step {i + 1}")
    ck.opt.zero_grad(set_to_none=True)
    res.loss.backward()
    if ck.world > 1:
        _average_gradients(ck.model, ck.world)
    ck.opt.step()
    correct = int((res.logits.detach().argmax(1) == y).sum())
    ck.sums["loss"] += loss_value * len(y)
    ck.sums["correct"] += correct
    ck.sums["seen"] += len(y)
    ck.position.update(epoch=epoch, step_in_epoch=i + 1)
    ck.mutating = False
    return loss_value, correct, eps_t, res.parts


def _diverged(ck: _Checkpointer, what: str) -> None:
    kept = f"{ck.out} keeps its last checkpoint, whose weights are finite" if ck.out.exists() else \
        "nothing was saved"
    lr = ck.opt.param_groups[0]["lr"]
    raise UserError(f"training diverged: {what} (learning rate {lr:g} at that step); {kept}; lower `lr` or "
                    "check the data")


def _end_of_epoch(cfg: TrainConfig, ck: _Checkpointer, heldout, epoch: int, lr: float, started: float,
                  device) -> str:
    """Held-out check, history record, checkpoint; returns the epoch's summary line."""
    if ck.world > 1:
        _reduce_epoch(ck, ck.world)
    bad = [name for name, t in ck.model.state_dict().items() if t.is_floating_point() and
           not bool(torch.isfinite(t).all())]
    if bad:  # never write a checkpoint of NaN weights over a good one
        _diverged(ck, f"{len(bad)} tensor(s) of the model are not finite after epoch {epoch + 1} "
                      f"(e.g. {bad[0]})")
    sums = ck.sums
    last_eps = eps_at(cfg, (epoch + 1) * ck.steps_per_epoch - 1, ck.steps_per_epoch)
    record = {"epoch": epoch + 1, "lr": lr, "train_eps": last_eps,
              "train_loss": sums["loss"] / max(sums["seen"], 1),
              "train_acc": sums["correct"] / max(sums["seen"], 1),
              "train_seconds": time.perf_counter() - started}
    if heldout is not None and len(heldout) and ck.rank == 0:
        record.update(heldout_check(ck.model, heldout, cfg.eps, steps=cfg.eval_steps,
                                    seed=_seed(cfg, epoch, seeding.TRAIN_EVAL), device=device))
    ck.history.append(record)
    ck.position.update(epoch=epoch + 1, step_in_epoch=0)
    ck.save(finished=epoch + 1 == cfg.epochs)
    summary = (f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
               f"train acc {record['train_acc']:.1%}  ε {record['train_eps']:.4f}")
    if "clean_acc" in record:
        summary += (f"  held-out clean {record['clean_acc']:.1%}  "
                    f"PGD-{cfg.eval_steps}@{cfg.eps:.4g} {record['pgd_acc']:.1%} (n={record['eval_n']})")
    return summary


def _train(cfg: TrainConfig, out: str | Path, *, resume: bool, data, download: bool, progress: bool,
           on_step: Callable[[StepInfo], None] | None) -> dict:
    """Train ``cfg`` and write the checkpoint ``out`` (every epoch end and on interrupt); return metrics.

    ``resume=True`` continues from the checkpoint at ``out`` with its stored position, optimizer state
    and RNG state (the configuration should be :func:`resume_config`'s; ``epochs`` may be raised).
    ``data`` = ``(train, heldout)`` datasets (objects with ``images``, ``labels``, ``ids``, ``batches``,
    ``num_classes``, ``name``/``mean``/``std``; ``heldout`` may be ``None``) replaces
    :func:`load_training_data`. ``on_step(StepInfo)`` runs after each step; a ``KeyboardInterrupt`` from
    it (or a Ctrl-C) saves the checkpoint at that step boundary and propagates.
    """
    from rich.console import Console

    from robusteval import progress as progress_bars

    # Long: the epoch loop, its checkpoints and the interrupt protocol stay together, so that a resumed
    # run continues at exactly the step where the interrupted one saved.
    out = Path(out)
    check_writable(out)  # before any data loading or training step
    device = torch.device(cfg.device)
    train_ds, heldout = data if data is not None else load_training_data(cfg, download)
    steps_per_epoch = len(train_ds) // cfg.batch_size  # drop_last: batch statistics need full batches
    if steps_per_epoch < 1:
        raise UserError(f"{len(train_ds)} training images is less than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)  # weight initialisation (the global RNG is forked by train())
    model, arch_kwargs = build_model(cfg, train_ds)
    model.to(device)
    ck = _Checkpointer(cfg, out, model, arch_kwargs, make_optimizer(model, cfg), steps_per_epoch)
    if ck.world > 1:
        if cfg.batch_size % ck.world:
            raise UserError(f"batch size {cfg.batch_size} does not split over {ck.world} processes: use a "
                            f"multiple of {ck.world}")
        _sync_start(model)
    if resume:
        ck.restore()
    start_epoch, start_step = ck.position["epoch"], ck.position["step_in_epoch"]
    loss_cfg = cfg.loss_config()
    console = Console(stderr=True)
    echo = lambda msg: console.print(msg, highlight=False, soft_wrap=True, markup=False) if ck.rank == 0 \
        else None
    progress = progress and ck.rank == 0
    for note in schedule_notes(cfg):
        echo(f"note: {note}")
    if start_epoch >= cfg.epochs:
        echo(f"{out}: already trained for {start_epoch} epochs (`epochs` {cfg.epochs}); nothing to do")
        return ck.metrics()

    bar = progress_bars.bar(progress, info=True)
    with _DeferredInterrupt(echo) as interrupt, bar:
        try:
            for epoch in range(start_epoch, cfg.epochs):
                lr = lr_at(cfg, epoch)
                for group in ck.opt.param_groups:
                    group["lr"] = lr
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    ck.sums = {"loss": 0.0, "correct": 0, "seen": 0}
                order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(
                    _seed(cfg, epoch, seeding.TRAIN_ORDER)))
                task = bar.add_task(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch,
                                    completed=first, info="")
                started = time.perf_counter()
                model.train()
                for i in range(first, steps_per_epoch):
                    loss_value, correct, eps_t, parts = _train_step(cfg, loss_cfg, ck, train_ds, order,
                                                                    epoch, i, device)
                    avg, acc = ck.sums["loss"] / ck.sums["seen"], ck.sums["correct"] / ck.sums["seen"]
                    info = f"loss {avg:.4f}  acc {acc:.1%}  ε {eps_t:.4f}  lr {lr:g}"
                    bar.update(task, advance=1, info=info)
                    if on_step is not None:
                        on_step(StepInfo(epoch, i + 1, epoch * steps_per_epoch + i + 1, eps_t, lr,
                                         loss_value, correct / cfg.batch_size, parts))
                    if interrupt.requested:
                        raise KeyboardInterrupt
                summary = _end_of_epoch(cfg, ck, heldout, epoch, lr, started, device)
                bar.remove_task(task)
                echo(summary)
                if interrupt.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            ck.interrupted(echo)
            raise
    return ck.metrics()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def command_line() -> str:
    """The current process's command line as one shell-quoted string (stored in checkpoints)."""
    import shlex

    args = list(sys.argv)
    if args and Path(args[0]).name in ("robusteval", "__main__.py"):
        args[0] = "robusteval"
    return shlex.join(args)
