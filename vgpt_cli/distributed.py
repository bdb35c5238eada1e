"""This process's place in a `torchrun` job: rank, world size and device from one DistContext
(setup_distributed), with the collective operations training needs (no-ops in one process)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vgpt_cli.device import resolve_device

if TYPE_CHECKING:
    import torch


@dataclass
class DistContext:
    """This process's place in a `torchrun` job (one process: rank 0 of 1): rank, world size, its
    device, and the collective operations training needs. One process: every operation is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device; None: the CPU
    started_here: bool = False  # we called init_process_group, so close() tears it down

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a no-op in one process). Works on a copy on the process's device."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = value.detach().clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_from_main(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = value.detach().clone().to(self.device)
        dist.broadcast(t, src=0)
        return t

    def broadcast_str(self, value: str) -> str:
        if not self.enabled:
            return value
        import torch

        # bytes in a fixed-size tensor (broadcast_object_list would pickle)
        raw = value.encode("utf-8")[:255]
        t = torch.zeros(256, dtype=torch.uint8)
        t[0] = len(raw)
        t[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        t = self.broadcast_from_main(t).cpu()
        return bytes(t[1:1 + int(t[0])].tolist()).decode("utf-8")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_option: str | None = "auto") -> DistContext:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); with several processes, start the
    process group (NCCL on GPUs, gloo on CPUs) unless the caller already did."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option, local_rank)
    if world <= 1:
        return DistContext(device=device)
    import torch
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        started = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, started_here=started)
