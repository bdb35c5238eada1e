"""Supervised cross-attention (Liu et al., 2017, "Attention correctness in neural image captioning").

Where the training scenes record their objects (the shapes data), the query that predicts a shape word
is told which object that word names: each block's cross-attention (mean over levels and heads) is
pushed onto the object's grid cells by a loss of -log(attention mass on them), mean over blocks, summed
over the supervised words and added to the token cross-entropy with weight `--attention-supervision`.
Nothing changes at inference.

Only the shape word is supervised: the colour written just before it says which object it is. The
colour word is not, since a caption names its objects in any order and the image alone cannot say which
comes next (docs/research/grounding.md 1h: supervising it as well halved object F1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vgpt_cli.errors import ConfigError

# (item id, caption) -> [(token index into the caption's tokens, (N,) bool cells of the named object)]
Targets = dict[tuple[str, str], list[tuple[int, np.ndarray]]]


def caption_targets(caption: str, objects: Sequence[dict[str, Any]], tokenizer: Any,
                    cells_of: Callable[[dict[str, Any]], np.ndarray],
                    words: tuple[str, ...] = ("shape",)) -> list[tuple[int, np.ndarray]]:
    """The supervised tokens of one caption: for every shape word that names an object of the scene
    (vgpt_cli.data.shapes.naming_words), the index of the word's first token among the caption's tokens
    (as Captioner.tokenize makes them, without BOS) and the cells of that object, with the cells of any
    other object of the same colour and shape (the words cannot tell them apart). words=("colour",
    "shape") also supervises the colour word before it (sizes skipped; measured worse, see the module)."""
    from vgpt_cli.data.shapes import SIZES, naming_words

    named = naming_words(caption, objects)
    if not named:
        return []
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    found = [(m.start(), re.sub(r"[^a-z]", "", m.group().lower())) for m in re.finditer(r"\S+", caption)]
    out = []
    for k, obj in named:
        colour = k - 1
        while colour >= 0 and found[colour][1] in SIZES:
            colour -= 1
        same = [o for o in objects if (o["colour"], o["shape"]) == (obj["colour"], obj["shape"])]
        cells = np.logical_or.reduce([cells_of(o) for o in same])
        for w in [w for w, kind in ((colour, "colour"), (k, "shape")) if kind in words]:
            j = next((j for j, (_, end) in enumerate(spans) if end > found[w][0]), None)
            if j is not None:
                out.append((j, cells))
    return out


def require_objects(items: Sequence[Any], store_meta: dict[str, Any] | None = None) -> None:
    """ConfigError naming the first item that records no objects (only the shapes data does), or a feature
    store without the backbone data config that places them on the token grid."""
    for it in items:
        if not (getattr(it, "extra", None) or {}).get("objects"):
            raise ConfigError(f"--attention-supervision needs the objects of every training image; item {it.id!r} "
                              "records none (only the shapes data has them: `vgpt prepare shapes`); leave it at 0")
    if store_meta is not None and not store_meta.get("data_config"):
        raise ConfigError(f"feature store {store_meta.get('fingerprint')}: no backbone data config, so the objects "
                          "cannot be placed on the token grid; --attention-supervision needs grid features "
                          "(`vgpt extract-features`)")


def shapes_targets(items: Sequence[Any], tokenizer: Any, cells_of: Callable[[dict[str, Any]], np.ndarray],
                   words: tuple[str, ...] = ("shape",)) -> Targets:
    """Targets of every caption of `items`, whose `extra["objects"]` lists their scene's objects.
    ConfigError naming the first item without them, or a tokenizer without character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("--attention-supervision needs a fast (Rust) tokenizer, to find each word's tokens; "
                          f"{type(tokenizer).__name__} is not one")
    cache: dict[str, np.ndarray] = {}

    def cells(obj: dict[str, Any]) -> np.ndarray:
        key = repr(sorted(obj.items()))
        if key not in cache:
            cache[key] = np.asarray(cells_of(obj), dtype=bool).reshape(-1)
        return cache[key]

    require_objects(items)
    targets: Targets = {}
    for it in items:
        for caption in it.captions:
            targets[(it.id, caption)] = caption_targets(caption, it.extra["objects"], tokenizer, cells, words)
    return targets


def grid_cells_for(meta: dict[str, Any], n_tokens: int) -> Callable[[dict[str, Any]], np.ndarray]:
    """obj -> (H, W) bool: the grid cells of a feature store (its backbone's eval resize and crop, from the
    store's data config; the tokens a square grid) that hold any pixel of a shapes object."""
    from timm.data import create_transform

    from vgpt_cli.attention import grid_shape, object_pixels, region_cells

    require_objects([], meta)
    transform = create_transform(**meta["data_config"], is_training=False, use_prefetcher=True)
    grid = grid_shape(n_tokens)
    return lambda obj: region_cells(object_pixels(transform, obj), grid)


def target_tensor(targets: Targets, keys: Sequence[tuple[str, str]], kept: Sequence[int], T: int,
                  N: int) -> Tensor:
    """(B, T, N) float: row b's supervised positions t (the query that predicts caption token t) hold their
    object's cells; `kept` is the number of caption tokens each row kept after cutting to max_length."""
    out = torch.zeros(len(keys), T, N)
    for b, key in enumerate(keys):
        for t, cells in targets.get(key, ()):
            if t < min(kept[b], T):
                out[b, t, :cells.shape[0]] = torch.from_numpy(cells.astype(np.float32))
    return out


def attention_loss_sum(attention: Sequence[Tensor], target: Tensor) -> Tensor:
    """Sum over the supervised positions (those with any target cell) of the mean over blocks of
    -log(attention mass on the target cells). attention: per block (B, T, N); target (B, T, >= N)."""
    supervised = target.sum(-1) > 0
    if not bool(supervised.any()):
        return attention[0].new_zeros(())
    per_block = [-((p * target[..., :p.shape[-1]].to(p)).sum(-1)[supervised].clamp_min(1e-6).log())
                 for p in attention]
    return torch.stack(per_block).mean(0).sum()
