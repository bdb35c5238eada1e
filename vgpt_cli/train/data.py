"""Training examples, their deterministic order, and batches of padded features.

One example per (item, caption) pair of the train split. The order of epoch e is a permutation drawn
from a torch.Generator seeded with (seed, e), so a run resumed at step k recomputes the same order and
skips exactly the batches already consumed. Features stay in the memory-mapped store; a batch copies
only its own rows, so RAM does not grow with the data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Example:
    item_id: str
    caption: str


def caption_examples(items: Sequence[Any]) -> list[Example]:
    """One example per caption of each manifest item, in manifest order."""
    return [Example(item.id, caption) for item in items for caption in item.captions]


def epoch_order(n: int, seed: int, epoch: int, groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The shuffled example indices of one epoch: a pure function of (n, seed, epoch).

    With `groups` (the example indices of each image), the images are shuffled and each image's
    captions follow one another in a shuffled order, so a batch holds few images, each encoded once.
    """
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    if groups is None:
        return torch.randperm(n, generator=g).tolist()
    order: list[int] = []
    for gi in torch.randperm(len(groups), generator=g).tolist():
        members = groups[gi]
        order += [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
    return order


def image_groups(examples: Sequence[Example]) -> list[list[int]]:
    """The example indices of each image, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.item_id, []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class StepPlan:
    """How many examples one optimiser step takes (all processes, all micro-batches together)."""

    n_examples: int
    global_batch: int  # batch_size x grad_accum x world_size, cut to n_examples for tiny data sets
    world_size: int
    grad_accum: int

    @property
    def steps_per_epoch(self) -> int:
        # The remainder of each epoch is dropped (the next epoch reshuffles), except that a data set
        # smaller than one global batch is used whole, once per step.
        return max(1, self.n_examples // self.global_batch)

    def micro_batches(self, order: list[int], step_in_epoch: int, rank: int) -> list[list[int]]:
        """The example indices of this process's micro-batches for one optimiser step."""
        start = step_in_epoch * self.global_batch
        chosen = order[start:start + self.global_batch]
        mine = np.array_split(np.asarray(chosen, dtype=np.int64), self.world_size)[rank]
        return [part.tolist() for part in np.array_split(mine, self.grad_accum)]


def make_plan(n_examples: int, batch_size: int, grad_accum: int, world_size: int) -> StepPlan:
    return StepPlan(n_examples=n_examples, global_batch=min(batch_size * grad_accum * world_size, n_examples),
                    world_size=world_size, grad_accum=grad_accum)


def pad_features(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (N_i, C) arrays into a float32 (B, max N, C) tensor, zero-padded, with the real lengths."""
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)
    width = arrays[0].shape[1]
    out = np.zeros((len(arrays), int(lengths.max()), width), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a  # one copy out of the memmap, converted fp16 -> fp32 in place
    return torch.from_numpy(out), lengths


@dataclass
class Batch:
    features: torch.Tensor  # (I, N, C) float32: each distinct image of the batch once
    lengths: torch.Tensor  # (I,)
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss
    image_index: torch.Tensor | None = None  # (B,) the image row of each caption (None: row b is image b)
    attention_target: torch.Tensor | None = None  # (B, T, N) cells each position should look at (supervision)

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss (the model's labels are already shifted: labels[:, t] is position t's target)."""
        return int((self.labels != -100).sum())

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        moved = [t.to(device, non_blocking=nb) for t in
                 (self.features, self.lengths, self.input_ids, self.attention_mask, self.labels)]
        index = None if self.image_index is None else self.image_index.to(device, non_blocking=nb)
        target = None if self.attention_target is None else self.attention_target.to(device, non_blocking=nb)
        return Batch(*moved, image_index=index, attention_target=target)


def collate(store: Any, model: Any, examples: Sequence[Example], max_length: int,
            attention_targets: dict | None = None) -> Batch:
    """Captions of one micro-batch; an image with several captions there is loaded and encoded once.
    attention_targets (train/attention_supervision.py): also the batch's (B, T, N) attention targets."""
    rows: dict[str, int] = {}
    index = [rows.setdefault(e.item_id, len(rows)) for e in examples]
    feats, lengths = pad_features([store.get(item_id) for item_id in rows])
    tok = model.tokenize([e.caption for e in examples], max_length=max_length)
    image_index = None if len(rows) == len(examples) else torch.tensor(index, dtype=torch.long)
    target = None
    if attention_targets is not None:
        from vgpt_cli.train.attention_supervision import target_tensor

        kept = (tok["attention_mask"].sum(1) - 1).tolist()  # the caption tokens after BOS that survived the cut
        target = target_tensor(attention_targets, [(e.item_id, e.caption) for e in examples], kept,
                               tok["input_ids"].shape[1], feats.shape[1])
    return Batch(feats, lengths, tok["input_ids"], tok["attention_mask"], tok["labels"], image_index, target)
