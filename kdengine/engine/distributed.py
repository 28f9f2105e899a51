"""torch.distributed under torchrun: process-group set-up from the environment and the few
collectives the engine needs. A single process is the world of size 1 and calls nothing."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def local_rank_from_env() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "DistContext":
        """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on CUDA, bound to
        ``device`` (which must already be the current CUDA device), gloo on the CPU. An already
        initialised group (e.g. a test's) is used as it is.

        Args:
            device: this process's device (see :func:`.setup.device_and_processes`).

        Returns:
            The context; a world of one when ``WORLD_SIZE`` is unset or 1.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank_from_env())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if device.type == "cuda":
            # device_id: NCCL sets up its communicator for this GPU now, not for whichever device
            # is current at the first collective.
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank_from_env(), True)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average_gradients(self, params) -> None:
        """Mean of the gradients over ranks for parameters outside DDP (the method's own)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, modules) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank: DDP syncs them at each
        forward's start, so after the last step the ranks' copies differ by one update."""
        if not self.enabled:
            return
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
