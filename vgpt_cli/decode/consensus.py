"""Consensus reranking (Devlin et al. 2015, "Language Models for Image Captioning: The Quirks and What
Works"): of the captions a beam search finishes with, keep the one that the captions of the k training
images nearest in feature agree with most, by CIDEr-D against them.

The caption bank is what this needs from training, saved in the model folder: each training image's
mean-pooled feature (unit length, float16) and its captions. It is small for the data vgpt is for (753
Flickr8k photos: 1.9 MB of features); above MAX_BANK_IMAGES a seeded sample of that many is kept.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vgpt_cli.errors import ModelLoadError

BANK_FEATURES = "caption_bank.safetensors"
BANK_CAPTIONS = "caption_bank.json"
MAX_BANK_IMAGES = 10_000


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pooled_features(features: Any, lengths: Any) -> np.ndarray:
    """(B, N, C) padded features and (B,) real token counts -> (B, C) unit-length means over the real tokens."""
    f = features.float().cpu().numpy() if hasattr(features, "cpu") else np.asarray(features, dtype=np.float32)
    n = [int(v) for v in (lengths.cpu().tolist() if hasattr(lengths, "cpu") else lengths)]
    return unit_rows(np.stack([f[b, : n[b]].mean(axis=0) for b in range(len(n))]))


class CaptionBank:
    """The training images' pooled features and captions, and the consensus choice among candidates."""

    def __init__(self, features: np.ndarray, captions: Sequence[Sequence[str]]):
        if len(features) != len(captions) or not len(captions):
            raise ModelLoadError(f"caption bank: {len(features)} feature rows for {len(captions)} images")
        self.features = unit_rows(features)
        self.captions = [list(c) for c in captions]
        self._scorer = None

    @classmethod
    def from_store(cls, store: Any, items: Sequence[Any], seed: int = 0) -> CaptionBank:
        """The bank of `items` (captioned training items) from their cached features."""
        items = [it for it in items if it.captions]
        if len(items) > MAX_BANK_IMAGES:
            items = random.Random(seed).sample(items, MAX_BANK_IMAGES)
        pooled = np.stack([np.asarray(store.get(it.id), dtype=np.float32).mean(axis=0) for it in items])
        return cls(pooled, [it.captions for it in items])

    def neighbours(self, pooled: np.ndarray, k: int) -> list[list[int]]:
        """Per row of (B, C) unit-length features, the k nearest bank images (cosine), nearest first."""
        sim = unit_rows(pooled) @ self.features.T
        k = min(k, sim.shape[1])
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        return [list(row[np.argsort(-sim[b, row])]) for b, row in enumerate(top)]

    def consensus(self, candidates: Sequence[str], neighbours: Sequence[int]) -> list[float]:
        """CIDEr-D of each candidate against every caption of the neighbour images (the bank's n-gram
        document frequencies)."""
        if self._scorer is None:
            from vgpt_cli.evaluate.cider_d import CiderD

            self._scorer = CiderD(self.captions)
        bank = [c for j in neighbours for c in self.captions[j]]
        return [self._scorer.score_one(c, bank) for c in candidates]

    def rerank(self, hypotheses: Sequence[Sequence[Any]], pooled: np.ndarray, k: int) -> list[list[Any]]:
        """Each image's hypotheses with the consensus choice first (the others after it in beam order)."""
        out = []
        for hyps, near in zip(hypotheses, self.neighbours(pooled, k)):
            scores = self.consensus([h.text for h in hyps], near)
            best = int(np.argmax(scores))  # ties: the earlier, better-scored beam
            out.append([hyps[best], *(h for i, h in enumerate(hyps) if i != best)])
        return out

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        from vgpt_cli.files import atomic_write, atomic_write_json

        atomic_write(directory / BANK_FEATURES, lambda tmp: save_file(
            {"features": self.features.astype(np.float16)}, str(tmp), metadata={"format": "np"}))
        atomic_write_json(directory / BANK_CAPTIONS, {"format": 1, "captions": self.captions})

    @classmethod
    def load(cls, directory: Path) -> CaptionBank | None:
        """The folder's bank, or None when it has none; a damaged one is one line naming the file."""
        feats, caps = directory / BANK_FEATURES, directory / BANK_CAPTIONS
        if not feats.is_file() and not caps.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from vgpt_cli.files import read_json

        fix = "copy the model folder again, or decode with --rerank 0"
        record = read_json(caps, fix, error=ModelLoadError, expect=dict) if caps.is_file() else None
        if record is None or not isinstance(record.get("captions"), list) or not feats.is_file():
            raise ModelLoadError(f"{directory}: an incomplete caption bank ({BANK_FEATURES} and {BANK_CAPTIONS} "
                                 f"go together); {fix}")
        try:
            features = load_file(str(feats))["features"]
        except (SafetensorError, OSError, KeyError) as e:
            raise ModelLoadError(f"{feats}: unreadable caption bank ({e}); {fix}") from None
        return cls(features, record["captions"])

