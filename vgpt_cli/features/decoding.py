"""Decoding items' images for extraction: in DataLoader workers (pixels), or, with --gpu-decode, read
there and decoded on the backbone's device (nvJPEG on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vgpt_cli.data.manifest import Item
from vgpt_cli.features.backbone import Backbone
from vgpt_cli.features.images import BadImage, open_rgb
from vgpt_cli.features.store import file_record


class _ItemImages(torch.utils.data.Dataset):
    """One item -> (index, (k, 3, H, W) pixels or None, reason or None, file records or None).

    Each image's file record (size, mtime, sha256) is taken BEFORE it is decoded: if the file is
    replaced in between, the record no longer matches the disk and the next run extracts again."""

    def __init__(self, items: Sequence[Item], transform: Callable, max_pixels: int):
        self.items, self.transform, self.max_pixels = items, transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def load(self, path: str) -> torch.Tensor:
        return self.transform(open_rgb(path, self.max_pixels))

    def __getitem__(self, i: int) -> tuple[int, Any, str | None, list | None]:
        item = self.items[i]
        if not item.images:
            return i, None, "the item lists no image", None
        try:
            records = [file_record(p) for p in item.images]
        except OSError:
            records = None  # missing or unreadable: open_rgb names the reason below
        try:
            loaded = [self.load(p) for p in item.images]
        except BadImage as e:
            return i, None, f"{e.path}: {e.reason}", None
        return i, self.pack(loaded), None, records

    @staticmethod
    def pack(loaded: list[torch.Tensor]) -> Any:
        return torch.stack(loaded)


class _ItemFiles(_ItemImages):
    """For decoding on the device: one item -> (index, per image the JPEG file's bytes (1-D uint8) or,
    for anything else, the CPU path's pixels (3, H, W), reason or None, file records). Workers only
    read files."""

    def load(self, path: str) -> torch.Tensor:
        return jpeg_bytes_or_pixels(path, self.transform, self.max_pixels)

    @staticmethod
    def pack(loaded: list[torch.Tensor]) -> Any:
        return loaded


def jpeg_bytes_or_pixels(path: str | Path, transform: Callable, max_pixels: int) -> torch.Tensor:
    """A plain JPEG (RGB or greyscale, upright, within max_pixels; judged from its header) -> its bytes,
    to decode on the device; any other image -> decoded and transformed here, as without the option."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # the header only
            plain = (im.format == "JPEG" and im.mode in ("RGB", "L") and im.size[0] * im.size[1] <= max_pixels
                     and im.getexif().get(0x0112, 1) == 1)  # EXIF orientation 1: nothing to rotate
    except (OSError, SyntaxError, ValueError):
        plain = False  # open_rgb below says what is wrong
    if plain:
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    return transform(open_rgb(path, max_pixels))


def decode_on_device(entries: list[torch.Tensor], paths: list[str], transform: Callable, device: torch.device,
                     max_pixels: int) -> list[torch.Tensor | str]:
    """JPEG bytes (1-D) -> pixels (3, H, W) uint8 on `device`: torchvision.io.decode_jpeg on the device
    (nvJPEG on CUDA), then the backbone's own eval transform (torchvision Resize + CenterCrop, which
    run on tensors too). Entries that are pixels already are moved to the device. A file the device
    decoder refuses is decoded on the CPU instead; the reason is returned in its place if that fails too."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [k for k, e in enumerate(entries) if e.dim() == 1]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        try:  # one batched call for the whole batch
            decoded = dict(zip(jpeg, decode_jpeg([entries[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:  # a bad file spoils the batch: one by one
            for k in jpeg:
                try:
                    decoded[k] = decode_jpeg(entries[k], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    out: list[torch.Tensor | str] = []
    for k, e in enumerate(entries):
        if e.dim() != 1:
            out.append(e.to(device, non_blocking=True))
        elif k in decoded:
            out.append(transform(decoded[k]))
        else:
            try:
                out.append(transform(open_rgb(paths[k], max_pixels)).to(device))
            except BadImage as err:
                out.append(err.reason)
    return out


def _collate(batch: list) -> tuple[torch.Tensor | None, list[tuple[int, int, list | None]], list[tuple[int, str]]]:
    """In the worker: one stacked uint8 tensor per batch (one shared-memory block to pass, not one
    per image), the (item index, image count, file records) of each good item, and the (index,
    reason) of bad ones."""
    good = [(i, px, rec) for i, px, _, rec in batch if px is not None]
    bad = [(i, reason) for i, px, reason, _ in batch if px is None]
    pixels = torch.cat([px for _, px, _ in good]) if good else None
    return pixels, [(i, px.shape[0], rec) for i, px, rec in good], bad


def _device_batches(loader, items: Sequence[Item], backbone: Backbone, max_pixels: int):
    """Batches of _ItemFiles decoded on the device, in _collate's form (pixels, good, bad)."""
    for batch in loader:
        entries, paths, owner, bad, records = [], [], [], [], {}
        for i, files, reason, rec in batch:
            if files is None:
                bad.append((i, reason))
                continue
            records[i] = rec
            entries.extend(files)
            paths.extend(items[i].images)
            owner.extend([i] * len(files))
        pixels = decode_on_device(entries, paths, backbone.transform, backbone.device, max_pixels)
        failed = {}
        for i, px in zip(owner, pixels):
            if isinstance(px, str) and i not in failed:
                failed[i] = px
        bad.extend(failed.items())
        kept = [(i, px) for i, px in zip(owner, pixels) if i not in failed]
        good: list[tuple[int, int, list | None]] = []
        for i, _ in kept:
            if good and good[-1][0] == i:
                good[-1] = (i, good[-1][1] + 1, records[i])
            else:
                good.append((i, 1, records[i]))
        yield (torch.stack([px for _, px in kept]) if kept else None), good, bad
