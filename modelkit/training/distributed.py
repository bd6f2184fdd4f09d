"""Distributed set-up: joining the torchrun process group, the DDP wrapper, and the collectives training uses.

Under ``torchrun`` (``WORLD_SIZE > 1``) a run joins the process group (gloo on CPU, nccl on GPU),
wraps the model in DistributedDataParallel and gives each rank its shard of every global batch. One
process is rank 0 of 1 and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..devices import resolve_device
from .config import TrainError

__all__ = ["DistContext", "close_distributed", "init_distributed", "wrap_for_ddp"]


@dataclass(frozen=True)
class DistContext:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows the progress bar."""
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or average, ``op="mean"``) ``tensor`` over all ranks, in place; no-op for one process."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            if op == "mean":
                tensor /= self.world_size
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out

    def barrier(self) -> None:
        """Wait for every rank; no-op for one process."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group if launched by torchrun with ``WORLD_SIZE > 1`` (env:// rendezvous).

    The backend is nccl when the device is CUDA, gloo otherwise. Reuses a group that is already
    initialised. Returns the context and this process's device.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    if world <= 1:
        return DistContext(), device
    if not dist.is_available():
        raise TrainError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, True), device


def close_distributed(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it (a caller's own group stays)."""
    if ctx.created_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def wrap_for_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module to train: ``model`` in DistributedDataParallel with several processes, else ``model`` itself."""
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
