"""Scale-out: one evaluation split over processes — ``torchrun`` ranks or ``--shard I/N`` jobs.

Every process evaluates the examples at positions ``i, i + N, i + 2N, ...`` (:func:`robusteval.runner.
evaluate`'s ``shard``) into its own ``records.shard-i-of-N.csv`` under the common ``--out``. Results do
not depend on the split: every random choice is seeded per (seed, example id, run), so the union of
the shards' records is row for row what one process writes. Readers (``robusteval report OUT``,
:func:`robusteval.records.read` of the directory) merge the shard files and name any missing shard.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the rank and world size give the shard;
each rank uses ``cuda:LOCAL_RANK`` when CUDA is available and asked for (``--device auto|cuda``), the
CPU with the gloo backend otherwise. The ranks first check that they run the same command with the same
``--out`` (``all_gather_object``); after their shards, rank 0 waits for every rank (a barrier with a
timeout, so a rank that died or hangs is an error, never a hang) and prints the merged table. A killed
rank loses nothing: rerunning the same command resumes every shard from its file.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta

from robusteval.errors import UserError

#: How long a collective operation may wait (seconds); the final barrier waits for the slowest shard.
TIMEOUT_S = float(os.environ.get("ROBUSTEVAL_DIST_TIMEOUT", 6 * 3600))


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0-based I) → ``(I, N)``; a clear error for anything else."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"`shard` must be I/N with 0 ≤ I < N (e.g. 0/4 … 3/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def from_env() -> Context | None:
    """The torchrun context when this process is one of several ranks, else ``None``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK/LOCAL_RANK are not integers: launch with torchrun"
                        ) from None


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the process group this process is in; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def session(device: str):
    """The torchrun session of a command: ``(context, device)`` — ``(None, device)`` outside torchrun.

    Under torchrun this joins the process group (:func:`start`), gives this rank's device, and leaves the
    group when the block ends, however it ends."""
    ctx = from_env()
    if ctx is None:
        yield None, device
        return
    try:
        yield ctx, start(ctx, device)
    finally:
        stop()


def start(ctx: Context, device: str) -> str:
    """Join the process group; returns this rank's device (``cuda:LOCAL_RANK`` or ``cpu``)."""
    import torch
    import torch.distributed as dist

    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UserError("`device` cuda was requested but CUDA is not available on this machine")
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return f"cuda:{ctx.local_rank}" if cuda else "cpu"


def agree(ctx: Context, what: dict) -> None:
    """Every rank must run the same command (``what``: its options, the output directory resolved)."""
    import torch.distributed as dist

    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, what)
    for rank, other in enumerate(gathered):
        if other != what:
            differ = sorted(k for k in set(what) | set(other) if what.get(k) != other.get(k))
            raise UserError(f"rank {rank} runs a different command than rank {ctx.rank} ({', '.join(differ)} "
                            "differ): every rank must get the same arguments")


def wait_all(ctx: Context) -> None:
    """Barrier after the shards: every rank must arrive within :data:`TIMEOUT_S`."""
    import torch.distributed as dist

    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=TIMEOUT_S), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"not every rank finished its shard ({first}); rerun the same command to resume"
                        ) from None


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
