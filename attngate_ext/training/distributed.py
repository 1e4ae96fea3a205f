"""Data-parallel training through ``torch.distributed`` (``torchrun --nproc_per_node=N -m attngate_ext.train``).

Every process holds the whole model and a slice of each global batch; after the backward the trainable
gradients are averaged across processes (one all-reduce), so every process takes the same optimizer step and
the parameters stay identical. Process 0 writes checkpoints, the final gates and the report. Backend: NCCL when
the device is CUDA, gloo on CPU. Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing changes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, and the device it trains on."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Whether this process writes files (checkpoints, gates, report) and prints."""
        return self.rank == 0


def init_world(device: str) -> World:
    """Joins the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...).

    On CUDA each process takes ``cuda:LOCAL_RANK``. Returns a single-process world without torchrun.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(0, 1, device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return World(rank, size, device)


def average_gradients(parameters: Iterable[torch.nn.Parameter], world: World) -> None:
    """Replaces every gradient by its mean over the processes (one flattened all-reduce)."""
    if world.size <= 1:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def mean_over_world(value: float, world: World) -> float:
    """The mean of a float over the processes (for logging)."""
    if world.size <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.size


def barrier(world: World) -> None:
    """Waits for every process (e.g. until process 0 has written a checkpoint)."""
    if world.size > 1:
        dist.barrier()


def shutdown(world: Optional[World]) -> None:
    """Leaves the process group (if this process joined one)."""
    if world is not None and world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
