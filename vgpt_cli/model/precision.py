"""Narrower weights for captioning: a trained model stays fp32 on disk and is narrowed at load time.

- fp32: as trained.
- bf16: every weight cast to bfloat16 (logits and beam scores stay float32). Pays where the device
  multiplies bf16 natively (CUDA, CPUs with AMX or AVX-512 BF16); elsewhere the CPU converts every
  product and it runs slower than fp32, which `check_precision` says in one line.
- int8: torch's dynamic quantization (int8 weights, activations quantized per call) of every Linear
  of the decoder: the LM, the cross-attention, the SRAU gates and the vocabulary head. The visual
  encoder runs once per image and stays fp32. CPU only (fbgemm / onednn kernels). The fastest on a
  CPU, but its 8-bit activations round away the LM's outlier channels: captions change (measured).
- fp16: on the CPU, the same decoder Linears with fp16 weights through torch's dynamic quantization
  (fbgemm's fp16 GEMM: weights read at half the bytes, products and activations in fp32), which
  moves logits by about 2e-4 relative; on CUDA and MPS, every weight cast to float16.

How far the captions move is measured, not assumed: `vgpt evaluate --precision int8 --compare-fp32`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vgpt_cli.errors import ConfigError

if TYPE_CHECKING:
    from vgpt_cli.model.captioner import Captioner

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpuinfo_field(name: str) -> str | None:
    """The first CPU's `name` line of /proc/cpuinfo (e.g. "model name", "flags"); None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == name), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where that cannot be read."""
    return set((cpuinfo_field("flags") or "").split())


def cpu_has_fast_bf16() -> bool:
    """bf16 pays on a CPU with AMX or AVX-512 BF16 (4-6x the fp32 matmul rate); without them each
    bf16 product is converted to fp32 and back (3-7x slower than fp32 on an AVX2 CPU)."""
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def check_precision(precision: str, device: torch.device | str, option: str = "--precision") -> str | None:
    """Refuse a precision that cannot run on `device` (ConfigError, one line); return a one-line
    notice when it runs but will not pay, else None."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{option} {precision}: use one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "int8" and kind != "cpu":
        raise ConfigError(f"{option} int8: dynamic int8 quantization runs on the CPU only; use --device cpu, "
                          f"or {option} bf16 on {kind}")
    if precision == "fp16" and kind == "cpu" and not ({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)):
        raise ConfigError(f"{option} fp16: this torch build has no fbgemm kernels for fp16 weights on the CPU "
                          f"(an x86 build has them); use {option} int8 or fp32")
    if precision == "bf16" and kind == "cpu" and not cpu_has_fast_bf16():
        return (f"{option} bf16: this CPU has no bf16 units (AMX or AVX-512 BF16), so bf16 runs slower than "
                f"fp32 here; {option} fp16 (fp16 weights, fp32 arithmetic) is the fast choice on this CPU")
    return None


def dynamic_quantize(module: nn.Module, dtype: torch.dtype = torch.qint8) -> nn.Module:
    """torch's dynamic quantization of every nn.Linear inside `module` to int8 (torch.qint8) or fp16
    (torch.float16) weights, in place. torch marks the eager API deprecated in favour of torchao (not a
    dependency); it is still torch's own kernel."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {nn.Linear}, dtype=dtype, inplace=True)


def conv1d_as_linear(module: nn.Module) -> None:
    """GPT-2 keeps its projections in transformers' Conv1D (weight (in, out)); dynamic quantization
    knows nn.Linear (weight (out, in)): swap each for the Linear that computes the same function."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Conv1D" and hasattr(child, "nf"):
            linear = nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(module, name, linear)
        else:
            conv1d_as_linear(child)


class QuantizedLevelGates(nn.Module):
    """LevelGates with each level's Linear(2D -> D) dynamically quantized (same interface)."""

    def __init__(self, gates: nn.Module, dtype: torch.dtype = torch.qint8):
        super().__init__()
        K, D, _ = gates.weight.shape
        levels = nn.ModuleList()
        for k in range(K):
            linear = nn.Linear(2 * D, D)
            with torch.no_grad():
                linear.weight.copy_(gates.weight[k])
                linear.bias.copy_(gates.bias[k])
            levels.append(linear)
        self.level_linears = dynamic_quantize(levels, dtype)

    @property
    def levels(self) -> int:
        return len(self.level_linears)

    def level_logits(self, x: torch.Tensor) -> torch.Tensor:
        # x (K, R, 2D) -> (K, R, D), before the sigmoid
        return torch.stack([lin(x[k]) for k, lin in enumerate(self.level_linears)])

    def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # a (B, T, D), c (B, K, T, D) -> g (B, K, T, D), as LevelGates.forward
        x = torch.cat([a.unsqueeze(1).expand_as(c), c], dim=-1)
        return torch.stack([lin(x[:, k]) for k, lin in enumerate(self.level_linears)], dim=1).sigmoid()


def narrow_model(model: Captioner, precision: str) -> Captioner:
    """The model (eval mode) with its weights narrowed to `precision`, in place. fp32: unchanged."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    model.eval()
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision == "fp16" and next(model.parameters()).device.type != "cpu":
        model.to(torch.float16)
    elif precision in ("int8", "fp16"):
        dtype = torch.qint8 if precision == "int8" else torch.float16
        conv1d_as_linear(model.lm)
        dynamic_quantize(model.lm, dtype)
        dynamic_quantize(model.xattn, dtype)
        if model.gates is not None:
            model.gates = nn.ModuleList([QuantizedLevelGates(g, dtype) for g in model.gates])
    model.precision = precision
    return model
