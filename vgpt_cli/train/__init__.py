"""Training: the loop, checkpoints, SCST. Entry point: `train(config, workspace) -> TrainResult`.

Layout (each module one concern): config (TrainConfig and its parts), loop (train(): the run from start
to end), trainer (the phases, step by step), objectives (cross-entropy and SCST losses), optim (the one
optimiser step), validation (scoring and early stopping), callbacks (progress and log events; console
prints them), checkpoint and run_folder (what is on disk), data (batches).
"""

from __future__ import annotations

from typing import Any

from vgpt_cli.train.config import TrainConfig as TrainConfig
from vgpt_cli.train.config import load_config_file as load_config_file

_LOOP = ("train", "TrainResult", "NonFiniteLossError")


def __getattr__(name: str) -> Any:
    # The loop imports torch: load it when it is used, so `vgpt --help` and TrainConfig stay light.
    if name in _LOOP:
        from vgpt_cli.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'vgpt_cli.train' has no attribute {name!r}")


__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "load_config_file", "train"]
