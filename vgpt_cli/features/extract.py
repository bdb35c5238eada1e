"""Extraction: manifest items -> backbone token grids -> the store. Also the HDF5 region import.

Decoding and resizing (decoding.py) run in DataLoader workers while the backbone runs on the batch before.
Under torchrun each rank takes every world_size-th item still missing and writes its own files.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgpt_cli.data.manifest import Item
from vgpt_cli.errors import ConfigError, DataError
from vgpt_cli.features.backbone import Backbone, fingerprint_of
from vgpt_cli.features.decoding import _collate, _device_batches, _ItemFiles, _ItemImages
from vgpt_cli.features.decoding import decode_on_device as decode_on_device
from vgpt_cli.features.decoding import jpeg_bytes_or_pixels as jpeg_bytes_or_pixels
from vgpt_cli.features.images import DEFAULT_MAX_PIXELS
from vgpt_cli.features.store import META, REPORT, FeatureStore, StoreWriter
from vgpt_cli.files import atomic_write_json

MAX_REGIONS = 50  # the authors' bottom-up features keep at most 50 boxes per image


@dataclass
class ExtractSummary:
    store: str
    fingerprint: str
    items: int  # items the dataset needs
    already: int  # found in the store, not recomputed
    extracted: int  # written by this run
    changed: int = 0  # of those, items in the store whose image files changed since (re-extracted)
    skipped: dict[str, str] = field(default_factory=dict)  # id -> reason, for this dataset's items
    images: int = 0  # images decoded by this run
    seconds: float = 0.0
    report: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped_count": len(self.skipped), "images_per_s": round(self.images_per_s, 2)}


# --- torch.distributed: only when launched by torchrun -----------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    created: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def total(self, n: int) -> int:
        """Sum of n over the ranks (images decoded, for the summary)."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64,
                         device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.created:
            torch.distributed.destroy_process_group()


def _dist(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    created = False
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device: one GPU per rank
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), created)


class _BackgroundWriter:
    """Store writes (and their fsyncs) in a thread, so the backbone never waits for the disk.
    Batches are written in order; a full queue slows the producer instead of growing RAM."""

    def __init__(self, writer: StoreWriter, depth: int = 4):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.append(*job)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def put(self, feats: list, bad: list) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((feats, bad))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _progress(total: int, enabled: bool):  # noqa: ANN202 - rich types
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True, soft_wrap=True)  # progress on stderr, as the commands print theirs
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
                    console=err, disable=not enabled, transient=False)


def extract_items(items: Sequence[Item], backbone: Backbone, store_dir: str | Path, batch_size: int = 32,
                  num_workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
                  warn: Callable[[str], None] | None = None, device_decode: bool = False) -> ExtractSummary:
    """Extract every item not yet in the store at `store_dir` (one folder per backbone fingerprint).

    Items with a bad image are recorded as skipped (with the reason) and listed in skipped.json.
    Killed at any point, a rerun continues from the last fsynced batch.
    device_decode: JPEGs are decoded and resized on the backbone's CUDA device (workers only read
    the files); for when the CPU decoding, not the backbone, is the bottleneck. Needs a CUDA backbone.
    """
    if device_decode and backbone.device.type != "cuda":
        raise ConfigError(f"--gpu-decode decodes JPEGs on the GPU, but the backbone runs on {backbone.device}; "
                          "use it with --device cuda, or drop --gpu-decode (the CPU decodes in workers)")
    return _extract(items, backbone, store_dir, batch_size, num_workers, max_pixels, progress, warn,
                    device_decode)


def _extract(items: Sequence[Item], backbone: Backbone, store_dir: str | Path, batch_size: int, num_workers: int,
             max_pixels: int, progress: bool, warn: Callable[[str], None] | None,
             device_decode: bool) -> ExtractSummary:
    store_dir = Path(store_dir)
    dist = _dist(backbone.device)
    try:
        if dist.world == 1 and _all_current(items, backbone, store_dir):
            # nothing to write, so no writer's lock: runs that share a finished store start side by side
            return _summarise(items, store_dir, [], 0, 0.0, True, warn)
        if dist.rank == 0:
            writer = StoreWriter(store_dir, backbone.meta, rank=0)  # writes meta.json first
        dist.barrier()
        if dist.rank != 0:
            writer = StoreWriter(store_dir, backbone.meta, rank=dist.rank)
        dist.barrier()  # every writer has cut its half-written tail: the store is consistent now
        with writer:
            before = FeatureStore.open(store_dir)
            todo, changed = [], 0
            for item in items:
                if before.current(item.id, item.images):
                    continue
                if item.id in before:
                    changed += 1  # other image paths, or the files changed: the newest entry will win
                todo.append(item)
            dist.barrier()  # every rank has the same todo list before any rank writes
            if changed and dist.rank == 0 and warn:
                warn(f"{changed} items were in the store but their image files changed (other paths, or "
                     "other contents); extracting them again")
            mine = todo[dist.rank::dist.world]
            t0 = time.perf_counter()
            n_images = _run(mine, backbone, writer, batch_size, num_workers, max_pixels,
                            progress and dist.rank == 0, len(todo), dist.world, device_decode)
            seconds = time.perf_counter() - t0
        n_images = dist.total(n_images)  # also a barrier: every rank has finished writing
        summary = _summarise(items, store_dir, [it.id for it in todo], n_images, seconds,
                             dist.rank == 0, warn)
        summary.changed = changed
        return summary
    finally:
        dist.close()


def _all_current(items: Sequence[Item], backbone: Backbone, store_dir: Path) -> bool:
    """Whether the store at store_dir holds this backbone's features of every item's current images (read
    without the writer's lock: a reader trusts only the index lines whose rows are on disk)."""
    if not (store_dir / META).is_file():
        return False
    try:
        store = FeatureStore.open(store_dir)
    except DataError:
        return False  # the writer says what is wrong with it
    return store.fingerprint == backbone.fingerprint and all(store.current(it.id, it.images) for it in items)


def _run(items: Sequence[Item], backbone: Backbone, writer: StoreWriter, batch_size: int, num_workers: int,
         max_pixels: int, show: bool, total: int, world: int, device_decode: bool = False) -> int:
    if not items:
        return 0
    loader = torch.utils.data.DataLoader(
        (_ItemFiles if device_decode else _ItemImages)(items, backbone.transform, max_pixels),
        batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=list if device_decode else _collate,
        pin_memory=backbone.device.type == "cuda" and not device_decode,
        persistent_workers=False,  # default prefetch (2 batches a worker): shared memory stays modest
    )
    batches = _device_batches(loader, items, backbone, max_pixels) if device_decode else loader
    n_images = 0
    t0 = time.perf_counter()
    background = _BackgroundWriter(writer)
    try:
        with _progress(total, show) as bar:
            task = bar.add_task(f"extracting ({backbone.name})", total=total, rate="-")
            for pixels, good, bad in batches:
                feats = []
                if pixels is not None:
                    tokens = backbone.forward_tokens(pixels).numpy()  # (sum k, N, C) float16
                    start = 0
                    for i, k, records in good:  # a multi-view item: its k images' tokens, one after another
                        feats.append((items[i].id, items[i].images,
                                      tokens[start:start + k].reshape(-1, backbone.dim), records))
                        start += k
                    n_images += start
                background.put(feats, [(items[i].id, items[i].images, reason) for i, reason in bad])
                rate = n_images * world / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=(len(good) + len(bad)) * world, rate=f"{rate:.1f}")
    finally:
        background.close()  # waits for the last batches to reach the disk
    return n_images


def _summarise(items: Sequence[Item], store_dir: Path, todo: list[str], n_images: int, seconds: float,
               is_main: bool, warn: Callable[[str], None] | None) -> ExtractSummary:
    store = FeatureStore.open(store_dir)
    all_skipped = store.skipped()
    skipped = {it.id: all_skipped[it.id] for it in items if it.id in all_skipped}
    report = store_dir / REPORT
    if is_main:
        atomic_write_json(report, {"store": str(store_dir), "skipped": [
            {"id": k, "images": list(store.images(k)), "reason": v} for k, v in all_skipped.items()]})
        if warn:
            for k, v in list(skipped.items())[:5]:
                warn(f"skipped item {k!r}: {v}")
            if len(skipped) > 5:
                warn(f"... and {len(skipped) - 5} more skipped items, listed in {report}")
    return ExtractSummary(store=str(store_dir), fingerprint=store.fingerprint, items=len(items),
                          already=len(items) - len(todo), extracted=sum(1 for k in todo if k in store),
                          skipped=skipped, images=n_images, seconds=seconds, report=str(report))


# --- the authors' bottom-up region features ------------------------------------------------------
def hdf5_meta(h5_path: Path) -> dict[str, Any]:
    """Region features are identified by the file's name and size (hashing many GB is too slow)."""
    st = h5_path.stat()
    record = {"format": 1, "architecture": "bottom-up-regions", "weights": f"hdf5:{h5_path.name}:{st.st_size}",
              "data_config": None, "max_regions": MAX_REGIONS, "dtype": "float16"}
    return {"backbone": "bottom-up-regions", "architecture": "bottom-up-regions", "kind": "regions",
            "weights": {"kind": "hdf5", "path": str(h5_path), "size": st.st_size}, "pretrained": True,
            "data_config": None, "source": str(h5_path), "fingerprint": fingerprint_of(record),
            "fingerprint_record": record, "dtype": "float16", "dim": 2048, "max_regions": MAX_REGIONS}


def _h5_keys_for(item: Item) -> list[str]:
    """The authors' keys are "<coco image id>_features"; try the item id, then the file's number."""
    cands = [f"{item.id}_features"]
    for p in item.images:
        stem = Path(p).stem
        digits = stem.rsplit("_", 1)[-1]
        cands += [f"{stem}_features"] + ([f"{int(digits)}_features"] if digits.isdigit() else [])
    return list(dict.fromkeys(cands))


def import_hdf5(items: Sequence[Item], h5_path: str | Path, store_root: str | Path, progress: bool = True,
                warn: Callable[[str], None] | None = None) -> ExtractSummary:
    """Copy the authors' region features for these items into a store, at most 50 regions each,
    dropping all-zero padding rows so that lengths are real."""
    import h5py

    h5_path = Path(h5_path).expanduser().resolve()
    if not h5_path.is_file():
        raise DataError(f"--from-hdf5 {h5_path}: no such file")
    meta = hdf5_meta(h5_path)
    store_dir = Path(store_root) / meta["fingerprint"]
    t0 = time.perf_counter()
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as e:
        raise DataError(f"--from-hdf5 {h5_path}: not an HDF5 file ({e})") from None
    with h5, StoreWriter(store_dir, meta) as writer:
        before = FeatureStore.open(store_dir)
        todo = [it for it in items if it.id not in before]
        with _progress(len(todo), progress) as bar:
            task = bar.add_task("importing regions", total=len(todo), rate="-")
            for start in range(0, len(todo), 256):
                feats, bad = [], []
                for item in todo[start:start + 256]:
                    key = next((k for k in _h5_keys_for(item) if k in h5), None)
                    if key is None:
                        bad.append((item.id, item.images, f"no '{item.id}_features' in {h5_path.name}"))
                        continue
                    arr = np.asarray(h5[key][:MAX_REGIONS], dtype=np.float32)
                    if arr.ndim != 2 or arr.shape[1] != 2048:
                        raise DataError(f"{h5_path}: {key} has shape {arr.shape}, expected (n, 2048) "
                                        "bottom-up features")
                    nonzero = np.flatnonzero(np.abs(arr).sum(axis=1) > 0)
                    arr = arr[: nonzero[-1] + 1] if nonzero.size else arr[:0]
                    if arr.shape[0] == 0:
                        bad.append((item.id, item.images, f"{key} in {h5_path.name} has no regions"))
                        continue
                    feats.append((item.id, item.images, arr))
                writer.append(feats, bad)
                bar.update(task, advance=len(todo[start:start + 256]),
                           rate=f"{(start + 256) / max(time.perf_counter() - t0, 1e-9):.0f}")
    return _summarise(items, store_dir, [it.id for it in todo], 0, time.perf_counter() - t0, True, warn)
