"""DistributedDataParallel under torchrun: one process per GPU (nccl) or per CPU worker (gloo).

``torchrun --nproc_per_node N $(which covnet_train) FOLD`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them
training runs in one process. Each rank samples its own patches (its own seed) from its share of the global
batch; gradients are averaged by DDP; only rank 0 writes files and logs. A stop (SIGINT/SIGTERM to any rank) is
agreed by all ranks at every iteration, so that they stop together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from covnet.runtime.errors import CovnetError
from covnet.runtime.log import logger


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share_of_batch(self, global_batch_size: int) -> int:
        """This rank's samples of the plan's batch (the global batch is split across ranks)."""
        return len(self.batch_slots(global_batch_size))

    def batch_slots(self, global_batch_size: int) -> range:
        """The positions in the global batch that this rank's samples fill."""
        if global_batch_size < self.world_size:
            raise CovnetError(None, f"batch size {global_batch_size} cannot be split across {self.world_size} "
                                    "processes; use fewer processes")
        base, extra = divmod(global_batch_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank, the same answer on every rank (an all-reduce: every rank must
        ask at the same point; ``device`` is where the process group's backend wants its tensors)."""
        if not self.enabled:
            return flag
        vote = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item())


def context_from_environment() -> DistributedContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedContext(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def initialise(context: DistributedContext, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU); a no-op for a single process."""
    if not context.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=context.rank,
                            world_size=context.world_size)


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(context: DistributedContext, device: torch.device) -> torch.device:
    """Under DDP on CUDA each rank takes its local GPU; a GPU named with ``--device cuda:N`` is ignored, with a
    warning."""
    if device.type == "cuda" and context.enabled:
        if device.index is not None:
            logger(__name__).warning(
                f"--device {device} is ignored under torchrun: each of the {context.world_size} processes uses its "
                "own GPU, cuda:LOCAL_RANK; pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        return torch.device("cuda", context.local_rank)
    return device
