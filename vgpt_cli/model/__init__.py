"""VisualGPT model core: visual encoder, SRAU decoder over a GPT-2 or Llama LM, save/load."""

from __future__ import annotations

from vgpt_cli.model.captioner import CONFIG_FILE as CONFIG_FILE
from vgpt_cli.model.captioner import WEIGHTS_FILE as WEIGHTS_FILE
from vgpt_cli.model.captioner import Captioner as Captioner
from vgpt_cli.model.captioner import CaptionerOutput as CaptionerOutput
from vgpt_cli.model.captioner import DecodeState as DecodeState
from vgpt_cli.model.captioner import VisualMemory as VisualMemory
from vgpt_cli.model.config import CaptionerConfig as CaptionerConfig
from vgpt_cli.model.lm import SMOLLM2_ALIAS as SMOLLM2_ALIAS
from vgpt_cli.model.lm import load_language_model as load_language_model
