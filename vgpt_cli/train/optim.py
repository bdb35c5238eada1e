"""The optimiser, its schedule, and the one optimiser step both phases use: gradients accumulate
through `backward` (one call per micro-batch), then `step` unscales (fp16), clips, steps AdamW, zeroes
the gradients and moves the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from vgpt_cli.train.checkpoint import optimizer_from_parts, optimizer_to_parts


def make_optimizer(model: Any, lr: float, lm_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the LM's parameters at lm_lr and the new ones at lr; no decay on biases and norms."""
    groups = []
    # biases by name too: the SRAU gates' bias is (K, D), and decaying it pulls every gate towards 0.5
    biases = {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    for part, rate in (("lm", lm_lr), ("new", lr)):
        params = [p for p in model.param_groups()[part] if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and id(p) not in biases]
        no_decay = [p for p in params if p.dim() < 2 or id(p) in biases]
        groups += [{"params": decay, "lr": rate, "weight_decay": weight_decay, "name": f"{part}.decay"},
                   {"params": no_decay, "lr": rate, "weight_decay": 0.0, "name": f"{part}.no_decay"}]
    params = [p for g in groups for p in g["params"]]
    # The fused kernel is the same AdamW in one pass over memory: 5x faster than the per-tensor loop on
    # the CPU (0.11 vs 0.51 s for 88M parameters), a quarter of a SmolLM2 step there.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), fused=fused or None)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def constant_factor(step: int) -> float:
    return 1.0


class OptimiserStep:
    """AdamW (make_optimizer), a LambdaLR schedule, the fp16 grad scaler and clipping, for one phase."""

    def __init__(self, model: Any, *, lr: float, lm_lr: float, weight_decay: float,
                 factor: Callable[[int], float], clip_grad: float, device_type: str, fp16: bool):
        self.model = model  # the unwrapped captioner: clipping sees every parameter once
        self.clip_grad = clip_grad
        self.optimizer = make_optimizer(model, lr, lm_lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(device_type, enabled=fp16)

    @property
    def lr(self) -> float:
        """The rate of the new parameters that the next step uses."""
        return self.optimizer.param_groups[-1]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate one micro-batch's gradient (scaled by the grad scaler under fp16)."""
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # .. as a checkpoint holds it: JSON-able state and named tensors (no pickle) ...................
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        opt_meta, tensors = optimizer_to_parts(self.optimizer)
        meta = {"optimizer": opt_meta,
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "scaler": self.scaler.state_dict()}
        return meta, tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        optimizer_from_parts(self.optimizer, meta["optimizer"], tensors)
        self.scheduler.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups)))
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
