"""Few-shot sampling: one seeded permutation of the pool, then its first k entries.

Taking a prefix of one permutation makes subsets nested for free: with one seed the 0.1% subset
lies inside the 0.5% subset, which lies inside the 1% subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vgpt_cli.errors import ConfigError

UNITS = ("caption", "image")

# Salts keep the val/test subsets independent of the training permutation for one seed.
_SALT = {"train": 0, "val": 1, "test": 2, "split": 3}


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SALT[purpose]])


def check_fraction(fraction: float | None, count: int | None) -> None:
    if fraction is not None and count is not None:
        raise ConfigError("--fraction and --count both given; pass one of them")
    if fraction is not None and not (0.0 < fraction <= 1.0):  # NaN fails this too
        raise ConfigError(f"--fraction {fraction}: must be in (0, 1], e.g. --fraction 0.01 for 1% of the training pool")
    if count is not None and count < 1:
        raise ConfigError(f"--count {count}: must be at least 1")


def sample_size(pool: int, fraction: float | None, count: int | None, what: str) -> int:
    """How many entries of a pool of `pool` the options select (round half up)."""
    check_fraction(fraction, count)
    if count is not None:
        if count > pool:
            raise ConfigError(f"--count {count}: larger than the training pool of {pool} {what}s; "
                              f"pass --count {pool} or less (or --fraction)")
        return count
    if fraction is None:
        return pool
    k = int(math.floor(fraction * pool + 0.5))
    if k < 1:
        raise ConfigError(f"--fraction {fraction}: selects no {what} of the pool of {pool}; "
                          f"use at least --fraction {1 / pool:.2g}")
    return k


@dataclass
class Selection:
    """Which captions of which pool entries were chosen (pool order, caption order kept)."""

    chosen: list[tuple[int, list[int]]]  # (pool index, indices of its captions)
    pool_images: int
    pool_captions: int
    k: int  # entries taken: captions (unit caption) or images (unit image)


def select(caption_counts: list[int], fraction: float | None, count: int | None, unit: str, seed: int) -> Selection:
    """Sample the training pool. `caption_counts[i]` is how many captions pool entry i has."""
    if unit not in UNITS:
        raise ConfigError(f"--unit {unit!r}: must be one of {', '.join(UNITS)}")
    counts = np.asarray(caption_counts, dtype=np.int64)
    n_images, n_captions = len(counts), int(counts.sum())
    rng = rng_for(seed, "train")
    if unit == "image":
        k = sample_size(n_images, fraction, count, "image")
        picked = np.sort(rng.permutation(n_images)[:k])
        chosen = [(int(i), list(range(int(counts[i])))) for i in picked]
        return Selection(chosen, n_images, n_captions, k)
    k = sample_size(n_captions, fraction, count, "caption")
    flat = np.sort(rng.permutation(n_captions)[:k])
    # flat caption index -> (pool entry, caption within entry)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    owner = np.searchsorted(offsets, flat, side="right") - 1
    within = flat - offsets[owner]
    chosen: list[tuple[int, list[int]]] = []
    if k:
        breaks = np.flatnonzero(np.diff(owner)) + 1
        for own, caps in zip(np.split(owner, breaks), np.split(within, breaks)):
            chosen.append((int(own[0]), caps.tolist()))
    return Selection(chosen, n_images, n_captions, k)


def subset(n: int, size: int, seed: int, split: str) -> list[int]:
    """A seeded subset of `size` of n entries (sorted indices), nested across sizes for one seed."""
    if size < 1:
        raise ConfigError(f"--{split}-size {size}: must be at least 1")
    if size > n:
        raise ConfigError(f"--{split}-size {size}: the {split} split has only {n} images; pass {n} or less")
    return sorted(int(i) for i in rng_for(seed, split).permutation(n)[:size])


def split_assignment(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Seeded train/val/test labels for n entries (for formats without their own split)."""
    for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not (0.0 <= f < 1.0):
            raise ConfigError(f"{name} {f}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leave no training data; "
                          "keep their sum below 1")
    n_val = int(math.floor(val_fraction * n + 0.5))
    n_test = int(math.floor(test_fraction * n + 0.5))
    labels = ["train"] * n
    order = rng_for(seed, "split").permutation(n)
    for i in order[:n_val]:
        labels[int(i)] = "val"
    for i in order[n_val:n_val + n_test]:
        labels[int(i)] = "test"
    return labels
