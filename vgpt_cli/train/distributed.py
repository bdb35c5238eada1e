"""torch.distributed set-up for `torchrun ... vgpt train` (gloo on the CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vgpt_cli.runtime import resolve_device as resolve_device  # the one device rule


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_here: bool = False  # we called init_process_group, so we also tear it down

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
        t = value.detach().clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_from_main(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        t = value.detach().clone().to(self.device)
        dist.broadcast(t, src=0)
        return t

    def broadcast_str(self, value: str) -> str:
        if not self.enabled:
            return value
        # bytes in a fixed-size tensor (broadcast_object_list would pickle)
        raw = value.encode("utf-8")[:255]
        t = torch.zeros(256, dtype=torch.uint8)
        t[0] = len(raw)
        t[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        t = self.broadcast_from_main(t).cpu()
        return bytes(t[1:1 + int(t[0])].tolist()).decode("utf-8")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_option: str) -> DistInfo:
    """Read torchrun's environment; start the process group when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        started = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, started_here=started)
