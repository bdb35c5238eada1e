"""Training: the loop, checkpoints, SCST. Entry point: `train(config, workspace) -> TrainResult`."""

from __future__ import annotations

from vgpt_cli.train.config import TrainConfig as TrainConfig
from vgpt_cli.train.config import load_config_file as load_config_file
from vgpt_cli.train.loop import NonFiniteLossError as NonFiniteLossError
from vgpt_cli.train.loop import TrainResult as TrainResult
from vgpt_cli.train.loop import train as train
