"""Check a model folder's config against its weights file BEFORE building the model.

A crafted config.json (say lm_config.n_embd = 65536) would otherwise make the loader allocate many
gigabytes before the weights are ever looked at. The safetensors header (a few KB of JSON at the
start of the file) holds every tensor's shape; the model the config describes is built on torch's
meta device (shapes only, no memory); the two must agree before anything real is allocated.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from torch import nn

from vgpt_cli.errors import ModelLoadError

MAX_HEADER = 100 << 20  # a safetensors header is JSON of a few KB per thousand tensors


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the header of a .safetensors file, checked against the file size."""
    path = Path(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n:,} does not fit the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        shapes, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape, offsets = info["shape"], info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"{name}: shape {shape!r}")
            shapes[name] = tuple(shape)
            end = max(end, int(offsets[1]))
        if end > size - 8 - n:
            raise ValueError(f"the tensors need {end:,} bytes, the file holds {size - 8 - n:,}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable or corrupt weights file ({exc}); re-save the model or copy "
                             "the file again") from None
    return shapes


def check_shapes(model: nn.Module, weights: Path, config: Path, skip_prefix: str | None = None) -> None:
    """Every tensor of `model` (built on the meta device) in the file with the same shape, every
    tensor of the file in the model; tied parameters (GPT-2's lm_head = wte) may be stored once.
    skip_prefix: tensors under it are not in the file (an LM kept by reference) and must not be."""
    stored = safetensors_shapes(weights)
    state = model.state_dict(keep_vars=True)
    if skip_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(skip_prefix)}
    first_name: dict[int, str] = {}
    for name, t in state.items():
        first_name.setdefault(id(t), name)
    problems = []
    for name, t in state.items():
        if name in stored:
            if tuple(t.shape) != stored[name]:
                problems.append(f"{name} is {list(stored[name])} in the file, {list(t.shape)} by the config")
        elif not any(other in stored for other, u in state.items() if u is t):
            problems.append(f"{name} is missing from the file")
    problems += [f"{name} in the file is not part of the model" for name in stored if name not in state]
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ModelLoadError(f"{weights}: the weights do not match {config} ({'; '.join(problems[:2])}{more}); "
                             "the two files come from different models")
