"""The options several commands share, each declared once: `from vgpt_cli.commands import options as opt`,
then `device: opt.Device = None` in a command's signature (tests/test_cli.py checks they stay one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgpt_cli.decode.options import DecodeOptions
from vgpt_cli.device import DEVICE_HELP

# --device of every command that runs a model, declared once; vgpt_cli.device.resolve_device reads it
Device = Annotated[str | None, typer.Option("--device", show_default=False, help=DEVICE_HELP)]

# --model of caption, evaluate and serve
ModelDir = Annotated[Path | None, typer.Option("--model", show_default=False, help=(
    "A model folder (runs/<run>/best, or any Captioner.save_pretrained folder); default: the workspace's best "
    "model."))]

# the decoding settings of caption and evaluate: unset, the model's own (its generation_config.json), else
# DecodeOptions' defaults (vgpt_cli.model_folders.decode_options)
_DECODE = DecodeOptions()
BeamSize = Annotated[int | None, typer.Option("--beam-size", min=1, show_default=False, help=(
    f"Beam width (1: greedy). Default: the model's own, saved with it (else {_DECODE.beam_size})."))]
MaxLength = Annotated[int | None, typer.Option("--max-length", min=1, show_default=False, help=(
    f"At most this many tokens, EOS included. Default: the model's own, saved with it (else {_DECODE.max_length})."))]

Rerank = Annotated[int | None, typer.Option("--rerank", min=0, show_default=False, help=(
    "Consensus reranking: of the beam's captions, the one the captions of the N nearest training images agree "
    "with most (needs the caption bank `vgpt train` saves with the model); 0: the beam's best. Default: the "
    "model's own (else 0)."))]

RerankSamples = Annotated[int | None, typer.Option("--rerank-samples", min=0, show_default=False, help=(
    "With --rerank: also sample N captions per image (temperature 0.8, seeded) as candidates: a more varied "
    "choice (+6% CIDEr on Flickr8k dev at 10), about 5x slower. Default: the model's own (else 0)."))]

# --json of every command that reports a result
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (the messages stay on "
                                          "stderr).")]

# --precision of caption, evaluate and serve, declared once (vgpt_cli.model.precision)
Precision = Annotated[str, typer.Option("--precision", help=(
    "Weights to caption with: fp32 (as trained); fp16 (on a CPU: the decoder's weights read as fp16, "
    "arithmetic in fp32: faster, nearly always fp32's captions); int8 (the decoder's Linear layers dynamically "
    "quantized: fastest on a CPU, but captions change); bf16 (pays on CUDA and on CPUs with AMX or "
    "AVX-512 BF16). The saved model stays fp32."))]
