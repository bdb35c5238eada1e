"""The one caption normaliser, used by prepare, train and evaluate alike."""

from __future__ import annotations

import re
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str, lowercase: bool = True) -> str:
    """Strip, collapse runs of white space to one space and (by default) lower-case.

    Lower-casing matches the standard COCO evaluation, which lower-cases before scoring.
    """
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text


def caption_tensors(tokenizer: Any, captions: list[str], max_length: int, bos: int, eos: int,
                    pad: int) -> dict[str, Any]:
    """Captions -> input_ids (BOS w1..wn), labels (w1..wn EOS; -100 on padding), attention_mask.

    labels are already shifted: labels[:, t] is the target of position t. At most `max_length` tokens per
    row; words are cut so that EOS always stays. Rows are right-padded with the pad id.
    """
    import torch

    from vgpt_cli.errors import ConfigError, DataError

    if max_length < 2:
        raise ConfigError(f"max_length={max_length}: needs room for a word and EOS (>= 2)")
    if not captions:
        raise DataError("tokenize() got no captions: pass a non-empty list of strings")
    rows = [[bos, *tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1], eos] for text in captions]
    B, T = len(rows), max(len(r) - 1 for r in rows)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r) - 1
        input_ids[b, :n] = torch.tensor(r[:-1])
        labels[b, :n] = torch.tensor(r[1:])
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
