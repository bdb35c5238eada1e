"""The model folder: everything needed to caption with a trained model, and nothing else.

    config.json              the captioner's and the LM's configuration (and, while the LM's weights are
                             unchanged, where they come from: lm_reference.py)
    model.safetensors        the weights
    generation_config.json   the decoding settings the model was validated and selected with (DecodeOptions)
    preprocessor.json        how images become its features: the backbone, its weights, image size, mean/std,
                             added stages, tokens per image and their width (the feature store's record)
    caption_bank.*           the training images' pooled features and captions, for consensus reranking
                             (decode/consensus.py; written by `vgpt train`)
    tokenizer files          as the LM's tokenizer saves them

Older folders kept the backbone record as backbone.json and the decoding settings inside config.json; they
load as before, with one line that says so (`Captioner.load_notes`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vgpt_cli.errors import ConfigError, ModelLoadError
from vgpt_cli.files import read_json
from vgpt_cli.model.config import CaptionerConfig
from vgpt_cli.model.lm_reference import (
    LM_PREFIX,
    checked_reference,
    load_new_parameters,
    load_referenced_lm,
    split_state,
    unchanged,
)

if TYPE_CHECKING:
    from vgpt_cli.model.captioner import Captioner

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# as transformers keeps generate()'s settings in generation_config.json beside config.json
GENERATION_CONFIG_FILE = "generation_config.json"
PREPROCESSOR_FILE = "preprocessor.json"
OLD_BACKBONE_FILE = "backbone.json"  # the older name of preprocessor.json's record
FORMAT = "vgpt-captioner"
FORMAT_VERSION = 1


def save_folder(model: Captioner, directory: str | os.PathLike) -> Path:
    """Write the model folder (each file atomically). An LM whose weights are still those of its source is
    not copied: config.json records the source and the weights' digest (lm_reference.py)."""
    from safetensors.torch import save_file, save_model

    from vgpt_cli.files import atomic_write, atomic_write_json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "captioner": model.config.to_dict(),
        "lm_family": model.adapter.family,
        "lm_config": {k: v for k, v in model.lm.config.to_dict().items() if k != "quantization_config"},
        "special_tokens": {"bos": model.bos_token_id, "eos": model.eos_token_id, "pad": model.pad_token_id},
    }
    by_reference = unchanged(model.lm_reference, model.lm)
    if by_reference:
        meta["lm_weights"] = dict(model.lm_reference)
        atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(split_state(model), str(tmp), metadata={"format": "pt"}))
    else:
        # save_model drops the duplicate of tied tensors (GPT-2 lm_head = wte), restored on load
        atomic_write(out / WEIGHTS_FILE, lambda tmp: save_model(model, str(tmp), metadata={"format": "pt"}))
    model.tokenizer.save_pretrained(str(out))
    from vgpt_cli.decode import DecodeOptions

    # every field, the defaults included: the folder says how it decodes whatever the defaults become
    atomic_write_json(out / GENERATION_CONFIG_FILE, asdict(DecodeOptions(**model.generation).validate()))
    if model.preprocessor:
        atomic_write_json(out / PREPROCESSOR_FILE, model.preprocessor)
        (out / OLD_BACKBONE_FILE).unlink(missing_ok=True)
    if model.caption_bank is not None:
        model.caption_bank.save(out)
    atomic_write_json(out / CONFIG_FILE, meta)
    return out


def load_folder(cls: type[Captioner], directory: str | os.PathLike) -> Captioner:
    """Load a folder written by save_folder (or an older layout). Needs neither the hub nor the training data."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise ModelLoadError(f"{d}: model folder not found; give a folder written by training "
                             f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not cfg_path.is_file():
        raise ModelLoadError(f"{cfg_path}: missing; the model folder must hold the {CONFIG_FILE} "
                             "written with the weights")
    notes: list[str] = []
    meta = read_json(cfg_path, "re-save the model or point to the right folder", error=ModelLoadError, expect=dict,
                     what="a vgpt captioner config (an object)")
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        config = CaptionerConfig.from_dict(meta["captioner"], source=str(cfg_path))
        lm_cfg = dict(meta["lm_config"])
        model_type = lm_cfg.pop("model_type")
        generation = generation_block(meta.get("generation"))  # the older layout kept it in config.json
        reference = checked_reference(meta["lm_weights"]) if "lm_weights" in meta else None
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ModelLoadError(f"{cfg_path}: not a valid vgpt captioner config ({exc}); "
                             "re-save the model or point to the right folder") from exc
    gen_path = d / GENERATION_CONFIG_FILE
    if gen_path.is_file():
        fix = "fix or delete it (the model then decodes with the built-in defaults)"
        try:
            generation = generation_block(read_json(gen_path, fix, error=ModelLoadError))
        except ValueError as exc:
            raise ModelLoadError(f"{gen_path}: not valid decoding settings ({exc}); {fix}") from None
    preprocessor, note = read_preprocessor(d)
    if note:
        notes.append(note)
    if not w_path.is_file():
        raise ModelLoadError(f"{w_path}: weights file missing; copy {WEIGHTS_FILE} from the training run "
                             "folder next to its config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{d}: cannot load the tokenizer files ({exc}); they are written by "
                             "save_pretrained next to config.json") from exc
    if len(tokenizer) < 2:
        raise ModelLoadError(f"{d}: the tokenizer files are missing or empty (tokenizer.json)")
    from vgpt_cli.model.weights_check import check_shapes

    try:  # the model the config describes, shapes only (meta device): checked against the file first
        lm_config = AutoConfig.for_model(model_type, **lm_cfg)
        with torch.device("meta"):
            skeleton = cls(config, AutoModelForCausalLM.from_config(lm_config), tokenizer)
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError, ModelLoadError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first if len(first) <= 160 else first[:160] + " ..."  # transformers lists every model type
        raise ModelLoadError(f"{cfg_path}: not a valid vgpt captioner config ({first}); re-save the model "
                             "or point to the right folder") from None
    check_shapes(skeleton, w_path, cfg_path, skip_prefix=LM_PREFIX if reference else None)
    del skeleton
    if reference:
        model = cls(config, load_referenced_lm(reference, str(d)), tokenizer)
        model.lm_reference = reference
    else:  # the LM skeleton without initialising weights that the file will overwrite
        model = cls(config, AutoModelForCausalLM.from_config(lm_config, dtype=torch.float32), tokenizer)
    try:
        if reference:
            load_new_parameters(model, w_path)
        else:
            load_model(model, str(w_path), strict=True)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{w_path}: unreadable or corrupt weights file ({exc}); re-save the "
                             "model or copy the file again") from exc
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"{w_path}: the weights do not match {cfg_path} ({first} ...); the two files "
                             "come from different models") from exc
    model.generation = generation
    model.preprocessor = preprocessor
    from vgpt_cli.decode.consensus import CaptionBank

    model.caption_bank = CaptionBank.load(d)
    model.load_notes = notes
    model.eval()
    return model


def read_preprocessor(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The folder's preprocessing record (preprocessor.json, or an older folder's backbone.json) and a
    one-line note when the layout is the older one; (None, None) when the folder has neither."""
    path = directory / PREPROCESSOR_FILE
    note = None
    if not path.is_file():
        path = directory / OLD_BACKBONE_FILE
        if not path.is_file():
            return None, None
        note = (f"{directory}: an older model folder ({OLD_BACKBONE_FILE}, no {PREPROCESSOR_FILE}); it loads as "
                "before, and saving it again (Captioner.save_pretrained) writes the current layout")
    record = read_json(path, "copy it again from the run folder", error=ModelLoadError, expect=dict,
                       what="a preprocessing record (an object, as training writes it)")
    return record, note


def require_rebuildable(record: dict[str, Any], source: str) -> dict[str, Any]:
    """A preprocessing record complete enough to rebuild the backbone from (captioning new images)."""
    weights = record.get("weights")
    if not all(k in record for k in ("backbone", "fingerprint")) or not isinstance(weights, dict) or "kind" not in weights:
        raise ModelLoadError(f"{source}: not a complete preprocessing record (backbone, weights and fingerprint, "
                             "as training writes it); copy it again from the run folder")
    return record


def generation_keys() -> dict[str, type]:
    """DecodeOptions' fields and their number types: what a saved generation config may hold."""
    from vgpt_cli.decode import DecodeOptions

    return {f.name: {"int": int, "float": float}[str(f.type)] for f in fields(DecodeOptions)}


def generation_block(block: Any) -> dict[str, Any]:
    """Saved decoding settings, checked: DecodeOptions' fields with numbers of the right kind."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError("generation must be an object")
    known = generation_keys()
    out: dict[str, Any] = {}
    for key, value in block.items():
        kind = known.get(key)
        if kind is None:
            raise ValueError(f"unknown generation setting {key!r} (known: {', '.join(known)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"generation.{key}={value!r} is not a {kind.__name__}")
        out[key] = kind(value)
    return out


def require_compatible(model: Captioner, width: int, fingerprint: str | None, what: str, fix: str,
                       error: type[Exception] = ModelLoadError) -> None:
    """The one check that features fit a model: their width, and (when both are known) that they come from
    the backbone the model was trained on. `what` names the features, `fix` says what to do."""
    if int(model.config.d_in) != int(width):
        raise error(f"the model takes {model.config.d_in}-wide features, but {what} gives {width}; {fix}")
    trained_on = (model.preprocessor or {}).get("fingerprint")
    if trained_on and fingerprint and trained_on != fingerprint:
        raise error(f"the model was trained on features {trained_on} ({(model.preprocessor or {}).get('backbone')}), "
                    f"but {what} gives {fingerprint}; {fix}")


def trained_features(directory: str | os.PathLike) -> str | None:
    """The fingerprint of the features a saved model was trained on, or None when its folder does not say."""
    try:
        record, _ = read_preprocessor(Path(directory))
    except ModelLoadError:
        return None
    return (record or {}).get("fingerprint")
