"""Multi-process data-parallel training (``torchrun``) for the shared training loop in :mod:`kp_rl.train`.

Nothing to call by hand: launched by ``torchrun`` (``WORLD_SIZE > 1``), :func:`kp_rl.train.fit` joins the process
group (NCCL on CUDA, gloo on CPU), puts each rank on ``cuda:LOCAL_RANK``, wraps the loss in DistributedDataParallel
and shards the data; rank 0 alone logs and writes checkpoints. A plain process is a world of one::

    torchrun --standalone --nproc_per_node 4 -m kp_rl.cli train keypoints --data data/cartpole --out runs/kp

Example (no launcher: a world of one):
    >>> context_from_env({}).enabled, context_from_env({"WORLD_SIZE": "2", "RANK": "1"}).is_main
    (False, False)
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torchrun`` world (a world of one without a launcher)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, validates and writes checkpoints."""
        return self.rank == 0


def context_from_env(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``); absent means a world of one."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"bad torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank} with WORLD_SIZE={world}")
    return DistributedContext(world, rank, local)


def local_device(device: torch.device, context: DistributedContext | None = None) -> torch.device:
    """Under ``torchrun`` a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process); else unchanged."""
    context = context or context_from_env()
    if not context.enabled or device.type != "cuda":
        return device
    if context.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {context.local_rank} has no GPU: {torch.cuda.device_count()} CUDA device(s); "
                         f"use --nproc_per_node <= the GPU count")
    return torch.device("cuda", context.local_rank)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _leave_together() -> None:
    """At a normal exit: wait (at most a minute) for every rank, then destroy the group (a gloo group torn down
    while another rank still uses it aborts that rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # another rank is gone: leave anyway
    _destroy()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistributedContext]:
    """Join the ``torchrun`` process group for the block (a no-op in a world of one).

    The group is kept for later stages of the process (torchrun's store cannot re-create it) and destroyed at
    exit, or at once when the block raises, so that torchrun stops the other ranks.
    """
    context = context_from_env()
    if not context.enabled:
        yield context
        return
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_together)
    try:
        yield context
    except BaseException:
        _destroy()
        raise


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average scalars over the ranks (one all-reduce; every rank must call it at the same step)."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    return dict(zip(values, stacked.unbind()))


def broadcast_int(value: int) -> int:
    """Rank 0's decision (a small int), for every rank (each must call it at the same step); the value itself in a
    world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(float(value), device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())
