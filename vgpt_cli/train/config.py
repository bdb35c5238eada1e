"""`TrainConfig`: every training option, typed, with the paper's defaults.

The CLI flags and a `--config FILE` (YAML or JSON) both feed this one dataclass: file values first,
then the flags that were given (an unset flag never overrides). The resolved config is saved as
runs/<name>/config.json and read back on `--resume`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vgpt_cli.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")

# Named recipes: "vgpt" is the TrainConfig defaults (measured best here, docs/results.md); "paper" is the
# authors' code and README (K = 3, random gate weights, AdamW 1e-4 for everything, no warm-up, batch 50,
# captions drawn independently, the LM trained from the first step).
PRESETS: dict[str, dict[str, Any]] = {
    "vgpt": {},
    "paper": {"encoder_layers": 3, "gate_init_bias": None, "lr": 1e-4, "lm_lr": None, "warmup": 0,
              "schedule": "constant", "batch_size": 50, "soft_gate_steps": 0, "freeze_lm_steps": 0},
}

# Keys that fix the architecture: a resumed run must keep them.
ARCHITECTURE_KEYS = ("lm", "lm_init", "tau", "encoder_layers", "gating", "max_length")


@dataclass
class TrainConfig:
    # --- what to train on (None: the workspace's current dataset / feature store) ------------------
    dataset: str | None = None
    # --- the model (see vgpt_cli.model.CaptionerConfig) --------------------------------------------
    # Hub name, local folder, .gguf file or "smollm2-135m"; None: GPT-2 when it can be loaded offline,
    # otherwise the SmolLM2-135M GGUF that ships as a Python package.
    lm: str | None = None
    lm_init: str = "pretrained"  # "pretrained" (the paper) or "random"
    tau: float = 0.2  # SRAU threshold, 0 <= tau < 0.5 (authors' README: 0.2)
    # The defaults below are the recipe measured best on this project's CPU runs (docs/results.md,
    # "Grounding"); --preset paper gives the authors' (K = 3, their gate init, lr 1e-4, batch 50).
    encoder_layers: int = 1  # K (paper: 3)
    gating: str = "srau"  # "srau" or "none" (plain residual cross-attention, for ablations)
    # None: the authors' gate init; b: W = 0, bias b, every gate starts at sigmoid(b) (see CaptionerConfig).
    # 5 with K = 1 starts from the pretrained LM itself.
    gate_init_bias: float | None = 5.0
    max_length: int = 20  # caption tokens incl. EOS, for training and decoding (authors: 20)
    # --- how the new parts are started (docs/results.md, "Grounding") -------------------------------
    # The first N cross-entropy steps use soft gates (tau 0): with gates that start linguistic (g near 1)
    # and tau 0.2 the visual branch is switched off and the cross-attention gets no gradient at all.
    soft_gate_steps: int = 0
    # The first N cross-entropy steps train only the new parameters (the LM frozen: cheaper steps, and
    # the image has to carry what the LM cannot guess).
    freeze_lm_steps: int = 200
    # None: the model's defaults (encoder 0.1, cross-attention 0.2); 0 for exact-equality tests.
    encoder_dropout: float | None = None
    cross_attn_dropout: float | None = None
    # --- optimisation (authors: AdamW 1e-4, betas 0.9/0.999, no warm-up, clip 1.0, batch 50) ------
    lr: float = 1e-3  # the new parameters (encoder, cross-attention, gates) (paper: 1e-4)
    lm_lr: float | None = 1e-4  # the pretrained LM's own parameters; None: same as lr
    weight_decay: float = 0.01  # torch's AdamW default, which the authors' code kept
    warmup: int = 20  # optimiser steps of linear warm-up (paper: 0)
    schedule: str = "cosine"  # after warm-up: constant, linear decay to 0, or cosine to 0 (paper: constant)
    batch_size: int = 16  # captions per micro-batch per process (paper: 50)
    grad_accum: int = 1  # micro-batches per optimiser step (effective batch = batch x accum x processes)
    epochs: int = 100  # upper bound on cross-entropy epochs (early stopping usually ends sooner)
    max_steps: int | None = None  # optimiser steps of cross-entropy; overrides epochs; 0 + scst: SCST only
    # Batches of few images, each with its captions one after another: the image memory (the visual
    # encoder and every block's cross-attention keys/values) is computed once per image. False: captions
    # are drawn independently (the paper).
    group_by_image: bool = False
    label_smoothing: float = 0.0
    clip_grad: float = 1.0  # max global gradient norm; 0 switches clipping off
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast (fp16 only on CUDA)
    seed: int = 42
    # --- validation and early stopping -------------------------------------------------------------
    patience: int = 5  # validations without a better CIDEr before cross-entropy stops
    val_every: int | None = None  # optimiser steps between validations (None: at each epoch end)
    val_size: int | None = None  # cap on validation items (None: the whole split)
    val_beam: int = 5
    save_every: int | None = None  # steps between `last` checkpoints besides validations
    # --- self-critical sequence training after cross-entropy ---------------------------------------
    scst: bool = False
    scst_lr: float = 1e-5
    scst_epochs: int = 5
    scst_samples: int = 5  # sampled captions per image; their mean reward is the baseline
    scst_batch_size: int = 10  # images per SCST step
    # --- where and how -----------------------------------------------------------------------------
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    name: str | None = None  # run folder name (None: a timestamp)
    log_every: int = 10  # steps between progress-bar / metrics.jsonl loss records

    # The recipe these options started from (recorded in the run's config.json): "vgpt" (the defaults
    # above) or "paper"; see PRESETS.
    preset: str = "vgpt"

    # --- helpers -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_preset(cls, name: str) -> TrainConfig:
        """The defaults of a named recipe (PRESETS); other options can then override them."""
        if name not in PRESETS:
            raise ConfigError(f"--preset {name!r}: unknown; use one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name], preset=name)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        # Accept dashes as in the flags (--lm-lr) as well as underscores.
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown training option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        cfg = cls(**d)
        cfg._coerce_types(source)
        return cfg

    def _coerce_types(self, source: str) -> None:
        """Turn YAML/JSON values into the declared types, with one clear error when impossible."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            kind = str(f.type)
            try:
                if kind.startswith("float"):
                    value = float(value)
                elif kind.startswith("int"):
                    if isinstance(value, bool) or float(value) != int(float(value)):
                        raise ValueError(value)
                    value = int(float(value))
                elif kind == "bool":
                    if not isinstance(value, bool):
                        raise ValueError(value)
                elif kind.startswith("str"):
                    value = str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: option {f.name}={value!r} is not a valid {kind}") from None
            setattr(self, f.name, value)

    def override(self, **flags: Any) -> TrainConfig:
        """A copy with every flag that is not None applied."""
        d = self.to_dict()
        d.update({k: v for k, v in flags.items() if v is not None})
        return TrainConfig.from_dict(d, source="flags")

    @property
    def resolved_lm_lr(self) -> float:
        return self.lr if self.lm_lr is None else self.lm_lr

    def validate(self) -> TrainConfig:
        """Raise ConfigError for the first invalid option; cheap, no model or data touched."""

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if not (0.0 <= self.tau < 0.5):
            bad(f"--tau {self.tau}: the SRAU threshold must satisfy 0 <= tau < 0.5 (tau >= 0.5 switches "
                "both gates off for g in [1 - tau, tau]); the paper uses 0.2")
        for name in ("lr", "lm_lr", "scst_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                bad(f"--{name.replace('_', '-')} {v}: a learning rate must be a positive number (paper: 1e-4)")
        if self.weight_decay < 0:
            bad(f"weight_decay={self.weight_decay}: must be >= 0")
        if self.preset not in PRESETS:
            bad(f"--preset {self.preset}: use one of {', '.join(PRESETS)}")
        if self.schedule not in SCHEDULES:
            bad(f"--schedule {self.schedule}: use one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            bad(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")
        if self.lm_init not in ("pretrained", "random"):
            bad(f"--lm-init {self.lm_init}: use pretrained or random")
        if self.gating not in ("srau", "none"):
            bad(f"--gating {self.gating}: use srau or none")
        for name in ("batch_size", "grad_accum", "epochs", "encoder_layers", "val_beam", "scst_samples",
                     "scst_batch_size", "log_every"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.max_steps is not None and (self.max_steps < 0 or (self.max_steps == 0 and not self.scst)):
            bad(f"--max-steps {self.max_steps}: must be at least 1 (0 only with --scst: SCST alone)")
        for name in ("val_every", "val_size", "save_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"--{name.replace('_', '-')} {v}: must be at least 1 (or leave it unset)")
        if self.scst_epochs < 0:
            bad(f"--scst-epochs {self.scst_epochs}: must be >= 0")
        for name in ("soft_gate_steps", "freeze_lm_steps"):
            if getattr(self, name) < 0:
                bad(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if self.warmup < 0:
            bad(f"--warmup {self.warmup}: must be >= 0")
        if self.patience < 1:
            bad(f"--patience {self.patience}: must be at least 1")
        if self.max_length < 2:
            bad(f"--max-length {self.max_length}: needs room for a word and EOS (>= 2)")
        if not (0.0 <= self.label_smoothing < 1.0):
            bad(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if self.clip_grad < 0:
            bad(f"clip_grad={self.clip_grad}: must be >= 0 (0 switches clipping off)")
        for name in ("encoder_dropout", "cross_attn_dropout"):
            v = getattr(self, name)
            if v is not None and not (0.0 <= v < 1.0):
                bad(f"{name}={v}: a dropout probability must be in [0, 1)")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            bad(f"--name {self.name!r}: use a plain folder name such as r1")
        return self


def load_config_file(path: Path, preset: str | None = None) -> TrainConfig:
    """Read a YAML or JSON file of training options (keys as in TrainConfig or as the flags), on top of
    its own `preset` key, else `preset`, else the defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear line
        raise ConfigError(f"{path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    preset = raw.get("preset", preset)
    if preset is not None:  # the file's values apply on top of its preset
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"{path}: preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
        raw = {**PRESETS[preset], **raw, "preset": preset}
    return TrainConfig.from_dict(raw, source=str(path))
