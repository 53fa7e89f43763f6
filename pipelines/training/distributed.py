"""Process-group set-up and teardown, in one place, and the few collectives the loop uses.

    with process_group(config.device) as dist:   # torchrun: WORLD_SIZE, RANK, LOCAL_RANK
        ... dist.rank, dist.world, dist.device ...

Under torchrun (WORLD_SIZE > 1) `process_group` starts the group (nccl on CUDA, gloo on CPU) and
destroys it on the way out, also after an error; a group someone else started is left to them.
Every collective here is a sync point: every rank must reach it the same number of times.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Dist:
    """This process's place in the job."""

    rank: int
    """Global rank (0 in a single process)."""
    world: int
    """Number of processes (1 without torchrun)."""
    device: torch.device
    """The device this rank computes on."""


@contextmanager
def process_group(device: str = "auto") -> Iterator[Dist]:
    """Start the process group under torchrun (WORLD_SIZE > 1), yield this rank, tear it down.

    `device`: "auto" (cuda:LOCAL_RANK when there is a GPU, else cpu), "cpu" or "cuda[:i]".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        started = True
    try:
        yield Dist(rank=rank, world=world, device=dev)
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `values` over ranks, in place (a no-op in a single process)."""
    if world > 1:  # sync point: every rank waits here once per step (logging only)
        torch.distributed.all_reduce(values)
        values /= world
    return values


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world > 1:
        torch.distributed.barrier()


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
