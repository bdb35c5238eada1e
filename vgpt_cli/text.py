"""The one caption normaliser, used by prepare, train and evaluate alike."""

from __future__ import annotations

import re

_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str, lowercase: bool = True) -> str:
    """Strip, collapse runs of white space to one space and (by default) lower-case.

    Lower-casing matches the standard COCO evaluation, which lower-cases before scoring.
    """
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text
