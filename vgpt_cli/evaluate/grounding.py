"""Where a caption's words look: for scenes that record their objects (the shapes data), how often a word
that names an object has its cross-attention peak on that object, against a random cell's chance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def grid_preprocess(feature_meta: dict[str, Any]) -> Callable | None:
    """The eval resize + crop of the backbone a feature store (or a model's preprocessor.json) describes, as
    timm builds it from the record's data config: what the token grid covers. None for region features."""
    config = feature_meta.get("data_config")
    if feature_meta.get("kind") == "regions" or not config:
        return None
    from timm.data import create_transform

    return create_transform(**config, is_training=False, use_prefetcher=True)  # PIL -> (3, h, w) uint8


def object_region(preprocess: Callable, obj: dict[str, Any]):
    """A shapes object's pixels as the backbone sees them (its own resize and crop): (h, w) bool."""
    from vgpt_cli.attention import object_pixels

    return object_pixels(preprocess, obj)


def shapes_attention(model: Any, preprocess: Callable, store: Any, items: Sequence[Any],
                     captions: dict[str, str]) -> dict[str, Any]:
    """attention_peak_in_object over the shape words of `captions` (by item id) that name an object of
    their scene: each word's map (the mean of its tokens', teacher-forced on the caption as tokenized),
    against the object's pixels taken through the backbone's own resize and crop (`preprocess`)."""
    import torch

    from vgpt_cli.attention import attention_peak_in_object, word_attention
    from vgpt_cli.data.shapes import naming_words
    from vgpt_cli.evaluate.attention_figure import word_groups

    tok = model.tokenizer
    samples = []
    for it in items:
        caption = captions.get(it.id) or ""
        named = naming_words(caption, it.extra.get("objects", []))
        if not named:
            continue
        ids = tok(caption, add_special_tokens=False)["input_ids"]
        groups = word_groups([tok.decode([t]).strip() for t in ids], caption)
        if [w for w, _ in groups] != caption.split():
            continue  # tokens that do not spell the words: no word to take a map for
        maps = word_attention(model, torch.from_numpy(store.get(it.id).astype("float32")), ids)
        for k, obj in named:
            samples.append((maps[groups[k][1]].mean(dim=0), object_region(preprocess, obj)))
    return attention_peak_in_object(samples)
