"""Model folders that do not repeat an unchanged language model.

A captioner trained with its LM frozen still holds the LM's published weights, unchanged: 540 MB of
SmolLM2-135M in float32 that every checkpoint would copy. Such a model is saved with only its own new
parameters (visual encoder, cross-attention, gates) and a record of where its LM comes from and the
SHA-256 of the LM's tensors; loading takes the LM from there and refuses it when the digest differs
(another release of the weights, another dequantisation), so a model never runs on other LM weights
without a word. An LM that training changed is saved whole, as before.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from vgpt_cli.errors import ModelLoadError

LM_PREFIX = "lm."  # the captioner's LM submodule, in its state_dict names


def tensors_digest(module: nn.Module) -> str:
    """SHA-256 over the module's tensors (name, dtype, shape, bytes), each tied tensor once."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(module.state_dict().items()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def reference_for(source: str, lm: nn.Module) -> dict[str, str]:
    """The record of an LM loaded from `source` (hub name, folder, .gguf file or smollm2-135m)."""
    return {"source": source, "sha256": tensors_digest(lm)}


def unchanged(reference: dict[str, str] | None, lm: nn.Module) -> bool:
    """True when `lm` still holds exactly the weights `reference` recorded."""
    return reference is not None and tensors_digest(lm) == reference["sha256"]


def checked_reference(block: Any) -> dict[str, str]:
    """A config.json "lm_weights" block, checked (ValueError names what is wrong)."""
    if not isinstance(block, dict) or not all(isinstance(block.get(k), str) and block[k] for k in ("source", "sha256")):
        raise ValueError("lm_weights must be an object with the strings source and sha256")
    return {"source": block["source"], "sha256": block["sha256"]}


def load_referenced_lm(reference: dict[str, str], where: str) -> nn.Module:
    """The LM a model folder refers to, loaded from its source and checked against the recorded digest."""
    from vgpt_cli.model.lm import load_language_model

    try:
        lm, _ = load_language_model(reference["source"])
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where}: this model keeps its language model's unchanged weights by reference, "
                             f"and they cannot be loaded from {reference['source']!r} here ({exc})") from None
    if tensors_digest(lm) != reference["sha256"]:
        raise ModelLoadError(f"{where}: the language model loaded from {reference['source']!r} is not the one this "
                             f"model was trained with (SHA-256 {reference['sha256'][:12]}...); install the same "
                             "release of it, or use a model folder saved with its LM weights")
    return lm


def split_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors outside the LM, contiguous, for a folder that refers to its LM."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(LM_PREFIX)}


def load_new_parameters(model: nn.Module, path) -> None:
    """Load a folder's weights file that holds every tensor but the LM's (RuntimeError when it does not)."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.startswith(LM_PREFIX)]
    if missing or unexpected:
        raise RuntimeError(f"missing {missing[:2]}, unexpected {list(unexpected)[:2]}")
