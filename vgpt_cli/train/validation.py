"""Validation and early stopping: when to validate, the score (beam search on rank 0, CIDEr-D), and
the best-score / patience bookkeeping that selects `best/` and ends cross-entropy early."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from vgpt_cli.distributed import DistContext
from vgpt_cli.train.data import pad_features
from vgpt_cli.train.objectives import autocast_context


def beam_captions(model: Any, features: torch.Tensor, lengths: torch.Tensor, beam: int, max_length: int) -> list[str]:
    from vgpt_cli.decode import DecodeOptions, decode

    return [h.text for h in decode(model, features, lengths, DecodeOptions(beam_size=beam, max_length=max_length))]


def validation_due(step: int, total: int, *, val_every: int | None, epoch_done: bool, gates_soft_until: int) -> bool:
    """--val-every N: every N steps and at the last; otherwise at each epoch's end and the last step
    (a few-shot epoch is a handful of steps, and each validation also writes a checkpoint). Never while
    the gates are soft: the model would be validated (and kept) as it is not used."""
    return step > gates_soft_until and (step == total or (step % val_every == 0 if val_every else epoch_done))


class Validator:
    """CIDEr-D of beam-searched captions for the validation items, computed on rank 0 and shared."""

    def __init__(self, items: Sequence[Any], store: Any, dist: DistContext, *, beam: int, max_length: int,
                 precision: str):
        self.items, self.store, self.dist = list(items), store, dist
        self.beam, self.max_length, self.precision = beam, max_length, precision
        self._scorer = None
        self.details: dict[str, Any] = {}  # rank 0: seconds and the first examples of the last validation

    @property
    def scorer(self) -> Any:
        # CIDEr-D as `vgpt evaluate` computes it: document frequencies of the scored references.
        if self._scorer is None:
            from vgpt_cli.evaluate.metrics import CiderD

            self._scorer = CiderD([it.captions for it in self.items])
        return self._scorer

    def __call__(self, core: Any) -> float:
        score = torch.zeros((), dtype=torch.float64)
        device = self.dist.device
        if self.dist.is_main:
            core.eval()
            preds: list[str] = []
            t0 = time.perf_counter()
            with torch.no_grad(), autocast_context(device, self.precision):
                for start in range(0, len(self.items), 50):
                    chunk = self.items[start:start + 50]
                    feats, lengths = pad_features([self.store.get(it.id) for it in chunk])
                    preds += beam_captions(core, feats.to(device), lengths.to(device), self.beam, self.max_length)
            mean, _ = self.scorer.score(preds, [it.captions for it in self.items])
            score = torch.tensor(mean, dtype=torch.float64)
            self.details = {"seconds": time.perf_counter() - t0, "examples": [
                {"id": it.id, "caption": p} for it, p in zip(self.items[:3], preds[:3])]}
        return float(self.dist.broadcast_from_main(score).item())


def record_score(state: dict[str, Any], score: float, step: int) -> bool:
    """Count a validation in the trainer state (best score, its step and phase, validations without
    improvement). True when it is a new best."""
    state["validations"] += 1
    improved = state["best_score"] is None or score > state["best_score"]
    if improved:
        state["best_score"], state["best_step"], state["bad_validations"] = score, step, 0
        state["best_phase"] = state["phase"]
    else:
        state["bad_validations"] += 1
    return improved


def should_stop(state: dict[str, Any], patience: int) -> bool:
    """Early stopping: `patience` validations without a better score end cross-entropy (never SCST)."""
    return state["phase"] == "xe" and state["bad_validations"] >= patience
