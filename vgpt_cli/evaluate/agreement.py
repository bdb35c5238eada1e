"""How far narrower weights move the captions: the same images decoded at fp32 and at a narrower
precision (vgpt_cli.model.precision), compared caption by caption and by score."""

from __future__ import annotations

from typing import Any

SHOWN_SCORES = ("CIDEr", "Bleu_4", "METEOR", "object_f1")


def precision_agreement(precision: str, captions: dict[str, str], captions_fp32: dict[str, str],
                        scores: dict[str, float], scores_fp32: dict[str, float],
                        per_item: dict[str, dict[str, float]],
                        per_item_fp32: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The share of images whose caption is identical, the scores with both, the relative CIDEr change,
    and the worst case: of the captions that differ, the one whose CIDEr fell most (None when none differ)."""
    ids = list(captions_fp32)
    if set(ids) != set(captions):
        raise ValueError("the two caption sets must cover the same images")
    differ = [i for i in ids if captions[i] != captions_fp32[i]]
    worst = None
    if differ:
        i = min(differ, key=lambda k: per_item[k].get("CIDEr", 0.0) - per_item_fp32[k].get("CIDEr", 0.0))
        worst = {"image_id": i, precision: captions[i], "fp32": captions_fp32[i],
                 "CIDEr": per_item[i].get("CIDEr"), "CIDEr_fp32": per_item_fp32[i].get("CIDEr")}
    cider, cider32 = scores.get("CIDEr"), scores_fp32.get("CIDEr")
    return {
        "precision": precision, "images": len(ids), "identical": (len(ids) - len(differ)) / max(len(ids), 1),
        "scores": {precision: {k: scores[k] for k in SHOWN_SCORES if k in scores},
                   "fp32": {k: scores_fp32[k] for k in SHOWN_SCORES if k in scores_fp32}},
        "cider_change": None if not cider32 or cider is None else (cider - cider32) / cider32,
        "worst": worst,
    }
