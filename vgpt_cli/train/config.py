"""`TrainConfig`: every training option, typed, with the recipe measured best here as defaults.

Composed of parts (model, optimiser, validation, SCST, run), each checking its own options once; the model
part is the CaptionerConfig's settings, and what `--resume` may not change. The flags (and their help's
defaults) and `--config FILE` (YAML/JSON) feed it: file values, then the flags given. Saved as runs/<name>/
config.json (flat, one key per option) and read back on `--resume`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vgpt_cli.decode.options import DecodeOptions
from vgpt_cli.device import DEVICE_HELP
from vgpt_cli.errors import ConfigError
from vgpt_cli.files import check_name

SCHEDULES = ("constant", "linear", "cosine")
# Cross-entropy steps when neither --max-steps nor --epochs is given: a length that does not grow with the data
# (a few hundred photos need as many steps as a few thousand to adapt the LM), 200 of them with the LM frozen.
# On 753 Flickr8k photos: docs/results.md, "Real photographs".
DEFAULT_XE_STEPS = 600
PRECISIONS = ("fp32", "bf16", "fp16")



def flag(default: Any, help: str, *, default_text: str | None = None, paper_text: str | None = None,  # noqa: A002
         decls: tuple[str, ...] = ()) -> Any:
    """A TrainConfig field that `vgpt train` offers as a flag, declared once: its default is the field's, its
    help lives here (commands/train.py generates the flag from it, "(default X; paper Y)" added from the
    field and PRESETS["paper"]; default_text / paper_text replace those values' words; decls: the flag's
    names when not --<field-name>). Fields without it are set in a --config file only."""
    meta = {"help": help, "default_text": default_text, "paper_text": paper_text, "decls": decls}
    return field(default=default, metadata=meta)


# Named recipes: "vgpt" is the TrainConfig defaults (measured best here, docs/results.md); "paper" is the
# authors' code and README (SRAU, K = 3, random gate weights, AdamW 1e-4 for everything, no warm-up, batch 50,
# captions drawn independently, the LM trained from the first step).
PRESETS: dict[str, dict[str, Any]] = {
    "vgpt": {},
    "paper": {"gating": "srau", "encoder_layers": 3, "gate_init_bias": None, "lr": 1e-4, "lm_lr": None, "warmup": 0,
              "schedule": "constant", "batch_size": 50, "soft_gate_steps": 0, "freeze_lm_steps": 0,
              "encoder_warm_start": 0, "epochs": 100, "rerank": 0},
    # `vgpt demo`'s recipe on the shapes scenes (docs/research/grounding.md): SRAU on K = 1 with gates from
    # sigmoid(5), the LM frozen throughout (demo_config keeps freeze_lm_steps = max_steps), 10 epochs of
    # encoder warm start; supervised attention stays off (over 160 steps it binds on one seed in five; over
    # 480, `vgpt demo --steps 480 --attention-supervision 1`, on every seed tried).
    "demo": {"lm": "smollm2-135m", "gating": "srau", "encoder_layers": 1, "tau": 0.2, "gate_init_bias": 5.0,
             "lr": 1e-3, "lm_lr": 1e-4, "warmup": 20, "schedule": "cosine", "batch_size": 16, "max_steps": 160,
             "freeze_lm_steps": 160, "encoder_warm_start": 10, "attention_supervision": 0.0, "val_every": 80,
             "val_size": 40, "val_beam": 3, "max_length": 24, "patience": 100, "seed": 42, "rerank": 0},
}


# --- the parts ---------------------------------------------------------------------------------------
@dataclass
class ModelOptions:
    """The captioner (vgpt_cli.model.CaptionerConfig) as training sets it up; fixed once a run starts."""

    # Hub name, local folder, .gguf file or "smollm2-135m"; None: GPT-2 when it can be loaded offline,
    # otherwise the SmolLM2-135M GGUF that ships as a Python package.
    lm: str | None = flag(None, "Language model: hub name (gpt2), local folder, .gguf file or smollm2-135m.",
                          default_text=": GPT-2 if it loads offline, else smollm2-135m")
    lm_init: str = flag("pretrained", "pretrained (the paper) or random (ablation).")
    tau: float = flag(0.2, "SRAU gate threshold, 0 <= tau < 0.5 (authors' README: 0.2).")
    # Defaults: the recipe measured best here (docs/research/grounding.md); see PRESETS for the paper's.
    encoder_layers: int = flag(1, "K, visual encoder layers.")
    # "none": plain residual cross-attention O = A + C; "srau": the paper's gates (the options below). On real
    # photos (Flickr8k, docs/results.md "Real photographs") SRAU read the image less than plain cross-attention
    # at every recipe tried, so the default is the better model and SRAU is `--gating srau` (or --preset paper).
    gating: str = flag("none", "none (plain cross-attention) or srau (VisualGPT's self-resurrecting gates; --tau "
                       "and the gate start apply).")
    # None: the authors' gate init; b: W = 0, bias b, every gate starts at sigmoid(b) (see CaptionerConfig).
    # 5 with K = 1 starts from the pretrained LM itself.
    gate_init_bias: float | None = 5.0
    max_length: int = flag(DecodeOptions.max_length, "Caption tokens incl. EOS, for training and decoding (authors: 20).")
    # None: the paper's cross-attention; w: a learned per-head coverage penalty starting at w (CaptionerConfig).
    coverage: float | None = flag(None, "Coverage in the cross-attention (not in the paper): a learned per-head "
                                  "penalty on looking again where the caption already looked, starting at this weight.")
    # None: the model's defaults (encoder 0.1, cross-attention 0.2); 0 for exact-equality tests.
    encoder_dropout: float | None = None
    cross_attn_dropout: float | None = None

    def captioner_config(self, d_in: int, lm: str | None = None) -> Any:
        """The CaptionerConfig these options describe, for features `d_in` wide (lm: the resolved LM)."""
        from vgpt_cli.model.config import CaptionerConfig

        extra = {k: getattr(self, k) for k in ("encoder_dropout", "cross_attn_dropout") if getattr(self, k) is not None}
        return CaptionerConfig(lm=lm or self.lm or "gpt2", lm_init=self.lm_init, d_in=d_in,
                               encoder_layers=self.encoder_layers, tau=self.tau, gating=self.gating,
                               gate_init_bias=self.gate_init_bias, max_length=self.max_length,
                               coverage=self.coverage, **extra)

    def check(self) -> None:
        """CaptionerConfig's own checks, worded with the option names (--encoder-layers, not encoder_layers)."""
        try:
            self.captioner_config(d_in=1).validate()
        except ConfigError as e:
            m = re.match(r"(\w+)=(\S+?)(?=[: ])", str(e))
            if m is None or m.group(1) not in _MODEL_FLAGS:
                raise
            raise ConfigError(f"--{_MODEL_FLAGS[m.group(1)]} {m.group(2)}{str(e)[m.end():]}") from None


_MODEL_FLAGS = {"tau": "tau", "gating": "gating", "coverage": "coverage", "lm_init": "lm-init", "encoder_layers": "encoder-layers",
                "max_length": "max-length"}


@dataclass
class OptimiserOptions:
    """The optimiser, its schedule and the batches it steps on (authors: AdamW 1e-4, betas 0.9/0.999,
    no warm-up, clip 1.0, batch 50)."""

    lr: float = flag(1e-3, "AdamW learning rate of the new parameters (encoder, cross-attention, gates).")
    lm_lr: float | None = flag(1e-4, "Learning rate of the pretrained LM's own parameters; unset: as --lr.",
                               paper_text="same as --lr")
    weight_decay: float = 0.01  # torch's AdamW default, which the authors' code kept
    warmup: int = flag(20, "Linear warm-up steps.")
    schedule: str = flag("cosine", "After warm-up: cosine (to 0), linear (to 0) or constant.")
    batch_size: int = flag(16, "Captions per micro-batch per process.")
    grad_accum: int = flag(1, "Micro-batches per optimiser step; effective batch = batch x accum x processes.")
    # The length of cross-entropy: max_steps, else epochs, else DEFAULT_XE_STEPS steps (xe_steps); early
    # stopping may end it sooner. max_steps 0 + scst: SCST only.
    epochs: int | None = flag(None, "Cross-entropy epochs.", default_text=f": {DEFAULT_XE_STEPS} steps, whatever the "
                              "data's size", paper_text="100 with early stopping")
    max_steps: int | None = flag(None, "Cross-entropy optimiser steps (overrides --epochs).", default_text="")
    # Batches of few images, each with its captions one after another: the image memory (the visual
    # encoder and every block's cross-attention keys/values) is computed once per image. False: captions
    # are drawn independently (the paper).
    group_by_image: bool = False
    label_smoothing: float = flag(0.0, "Label smoothing of the cross-entropy.")
    unlikelihood: float = flag(0.0, "Weight of token-level unlikelihood training against repeating an earlier word "
                               "of the caption (objectives.py), 0 = off.")
    attention_supervision: float = flag(0.0, "Weight of supervised cross-attention: the query before each shape word "
                                        "is pushed onto that object's grid cells (train/attention_supervision.py; "
                                        "needs scenes that record their objects: `vgpt prepare shapes`), 0 = off.")
    clip_grad: float = 1.0  # max global gradient norm; 0 switches clipping off
    precision: str = flag("fp32", "fp32, bf16 or fp16 (autocast; fp16 needs CUDA).")
    seed: int = flag(42, "Seed of initialisation, data order and dropout.")
    # How the new parts start (docs/research/grounding.md): the first N cross-entropy steps with soft
    # gates (tau 0; gates that start near 1 with tau 0.2 give the cross-attention no gradient at all) ...
    soft_gate_steps: int = 0
    # ... and with the LM frozen (cheaper steps; the image has to carry what the LM cannot guess).
    freeze_lm_steps: int = 200
    # Epochs of the visual encoder alone under a small word decoder first (train/warm_start.py); 0: none.
    encoder_warm_start: int = flag(10, "Epochs of training the visual encoder alone under a small word decoder "
                                   "before the captioner's own steps (train/warm_start.py), 0 = none.")

    @property
    def resolved_lm_lr(self) -> float:
        return self.lr if self.lm_lr is None else self.lm_lr

    def xe_steps(self, steps_per_epoch: int) -> int:
        """Cross-entropy optimiser steps: --max-steps, else --epochs epochs, else DEFAULT_XE_STEPS."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * steps_per_epoch if self.epochs is not None else DEFAULT_XE_STEPS

    @property
    def length_limit(self) -> str:
        """What ends cross-entropy when early stopping does not: "epochs" or "max_steps"."""
        return "epochs" if self.max_steps is None and self.epochs is not None else "max_steps"

    def check(self) -> None:
        for name in ("lr", "lm_lr"):
            _positive_rate(name, getattr(self, name))
        if self.weight_decay < 0:
            _bad(f"weight_decay={self.weight_decay}: must be >= 0")
        if self.schedule not in SCHEDULES:
            _bad(f"--schedule {self.schedule}: use one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            _bad(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")
        _at_least_1(self, "batch_size", "grad_accum")
        _at_least_1(self, "epochs", unset_ok=True)
        for name in ("soft_gate_steps", "freeze_lm_steps", "warmup", "encoder_warm_start"):
            if getattr(self, name) < 0:
                _bad(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if not (0.0 <= self.unlikelihood < math.inf):
            _bad(f"--unlikelihood {self.unlikelihood}: must be a finite weight >= 0 (0: off)")
        if not (0.0 <= self.attention_supervision < math.inf):
            _bad(f"--attention-supervision {self.attention_supervision}: must be a finite weight >= 0 (0: off)")
        if not (0.0 <= self.label_smoothing < 1.0):
            _bad(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if self.clip_grad < 0:
            _bad(f"clip_grad={self.clip_grad}: must be >= 0 (0 switches clipping off)")


@dataclass
class ValidationOptions:
    """Validation, model selection, early stopping, and the decoding saved with the model."""

    patience: int = flag(5, "Stop cross-entropy after this many validations without a better CIDEr.")
    val_every: int | None = flag(None, "Validate every N steps and at the end.", default_text=": at each epoch's end")
    val_size: int | None = flag(None, "Validate on at most N items.", default_text=": the whole split")
    val_beam: int = DecodeOptions.beam_size
    # Decoding saved with the model (its generation_config.json): consensus reranking over the captions of
    # the nearest training images, whose bank the model folder then carries (decode/consensus.py).
    rerank: int = flag(20, "Decode with consensus reranking: of the beam's captions, the one the captions of "
                       "the N nearest training images agree with most (saved with the model; 0 = the beam's best).")

    def check(self) -> None:
        _at_least_1(self, "patience", "val_beam")
        if self.rerank < 0:
            _bad(f"--rerank {self.rerank}: use 0 (off) or the number of nearest training images")
        _at_least_1(self, "val_every", "val_size", unset_ok=True)


@dataclass
class ScstOptions:
    """Self-critical sequence training after cross-entropy."""

    scst: bool = flag(False, "Self-critical training (CIDEr-D reward) after cross-entropy, from the best "
                      "checkpoint.", decls=("--scst/--no-scst",))
    scst_lr: float = flag(1e-5, "SCST learning rate.")
    scst_epochs: int = flag(5, "SCST epochs.")
    scst_samples: int = flag(5, "Sampled captions per image in SCST; their mean reward is the baseline.")
    scst_batch_size: int = 10  # images per SCST step

    def check(self) -> None:
        _positive_rate("scst_lr", self.scst_lr)
        _at_least_1(self, "scst_samples", "scst_batch_size")
        if self.scst_epochs < 0:
            _bad(f"--scst-epochs {self.scst_epochs}: must be >= 0")


@dataclass
class RunOptions:
    """What to train on, where, and what the run folder records."""

    dataset: str | None = flag(None, "Dataset name in the workspace.", default_text=": the current one, from the "
                               "last `vgpt prepare`")
    device: str = flag("auto", DEVICE_HELP, default_text="")
    name: str | None = flag(None, "Run folder name under runs/.", default_text=": a timestamp")
    save_every: int | None = flag(None, "Also write last/ every N steps.", default_text=": at each validation and "
                                  "at the end")
    log_every: int = 10  # steps between progress-bar / metrics.jsonl loss records
    preset: str = flag("vgpt", "Start from a named recipe (PRESETS): vgpt (the defaults, measured best here), paper "
                       "(the authors' code and README) or demo (`vgpt demo`'s shapes "
                       "recipe: SRAU, the LM frozen). Other options override it.", default_text="")

    def check(self) -> None:
        if self.preset not in PRESETS:
            _bad(f"--preset {self.preset}: use one of {', '.join(PRESETS)}")
        _at_least_1(self, "log_every")
        _at_least_1(self, "save_every", unset_ok=True)
        if self.name is not None:
            check_name(self.name, "--name", ConfigError)


def _bad(message: str) -> None:
    raise ConfigError(message)


def _positive_rate(name: str, v: float | None) -> None:
    if v is not None and not (math.isfinite(v) and v > 0):
        _bad(f"--{name.replace('_', '-')} {v}: a learning rate must be a positive number (paper: 1e-4)")


def _at_least_1(part: Any, *names: str, unset_ok: bool = False) -> None:
    for name in names:
        v = getattr(part, name)
        if not (unset_ok and v is None) and v < 1:
            _bad(f"--{name.replace('_', '-')} {v}: must be at least 1" + (" (or leave it unset)" if unset_ok else ""))


PARTS: dict[str, type] = {"model": ModelOptions, "optimiser": OptimiserOptions, "validation": ValidationOptions,
                          "scst": ScstOptions, "run": RunOptions}
# The model part: what a resumed run must keep (its weights were built with them).
RESUME_LOCKED = tuple(f.name for f in fields(ModelOptions))


@dataclass
class TrainConfig(RunOptions, ScstOptions, ValidationOptions, OptimiserOptions, ModelOptions):
    """Every training option: the parts above side by side, flat as the flags and config.json have them
    (TrainConfig(lm=..., encoder_layers=..., lr=...)), with the recipe measured best here as defaults."""

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
        return TrainConfig.from_dict({**self.to_dict(), **{k: v for k, v in flags.items() if v is not None}},
                                     source="flags")

    def part(self, name: str) -> Any:
        """One part (PARTS) of this config as its own object, e.g. part("model")."""
        cls = PARTS[name]
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def validate(self) -> TrainConfig:
        """Raise ConfigError for the first invalid option; cheap, no data touched. Each part checks its own
        options (the model part through CaptionerConfig.validate); only these rules span two parts."""
        for cls in PARTS.values():
            cls.check(self)
        if self.max_steps is not None and (self.max_steps < 0 or (self.max_steps == 0 and not self.scst)):
            _bad(f"--max-steps {self.max_steps}: must be at least 1 (0 only with --scst: SCST alone)")
        if self.attention_supervision and self.coverage is not None:
            _bad("--attention-supervision supervises the plain softmax attention; with --coverage the model "
                 "attends otherwise: use one or the other")
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
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    preset = raw.get("preset", preset)
    if preset is not None:  # the file's values apply on top of its preset
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"{path}: preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
        raw = {**PRESETS[preset], **raw, "preset": preset}
    return TrainConfig.from_dict(raw, source=str(path))
