"""Which device a command runs on: `--device auto` is CUDA (the process's LOCAL_RANK GPU under torchrun),
then Apple's MPS, then the CPU; a named device is checked to exist here."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vgpt_cli.errors import ConfigError

if TYPE_CHECKING:
    import torch

# the help of every command's --device (commands/common.py DeviceOption, vgpt train's from TrainConfig)
DEVICE_HELP = ("auto (the default: CUDA, under torchrun the process's GPU; then Apple's MPS; then the CPU), cpu, cuda, "
               "cuda:N or mps.")


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(option: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` (or None): cuda:LOCAL_RANK if CUDA is there, else mps, else cpu. Otherwise check the
    named device exists here and say what to use instead when it does not."""
    import torch

    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    text = str(option or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {option}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {option}: no CUDA GPU is visible here; use --device cpu (or auto)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {option}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not mps_available():
            raise ConfigError(f"--device {option}: Apple's MPS is not available here; use --device cpu (or auto)")
        return device
    if device.type != "cpu":
        raise ConfigError(f"--device {option}: use auto, cpu, cuda, cuda:N or mps")
    return device
