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


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter], world: World) -> None:
    """Copies process 0's values of ``parameters`` to every process (the same start, whatever the seeds did)."""
    if world.size <= 1:
        return
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)


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


def sum_over_world(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the processes (a new tensor; ``tensor`` itself is unchanged)."""
    total = tensor.detach().clone()
    if world.size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def batch_share(count: float, world: World) -> float:
    """``processes * count / (count summed over the processes)``: the factor that turns this process's mean loss
    over its ``count`` items into its share of the global batch's mean, once gradients are averaged."""
    if world.size <= 1:
        return 1.0
    total = float(sum_over_world(torch.tensor([float(count)], dtype=torch.float64, device=_reduce_device()), world))
    return world.size * float(count) / max(total, 1.0)


def _reduce_device() -> str:
    return "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def mean_over_world(value: float, world: World) -> float:
    """The mean of a float over the processes (for logging)."""
    if world.size <= 1:
        return value
    return float(sum_over_world(torch.tensor([value], dtype=torch.float64, device=_reduce_device()), world)) / world.size


def barrier(world: World) -> None:
    """Waits for every process (e.g. until process 0 has written a checkpoint)."""
    if world.size > 1:
        dist.barrier()


def shutdown(world: Optional[World]) -> None:
    """Leaves the process group (if this process joined one)."""
    if world is not None and world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
