"""Opening image files for a backbone: EXIF orientation, every mode to RGB, bad files named.

A bad image (missing, zero bytes, truncated, not an image, a decompression bomb) raises BadImage
with a short reason; extraction skips the item, lists it in the report and counts it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own warning threshold (about 89 M pixels, 9,459 x 9,459): far above any photograph a
# captioner needs, far below what a decompression bomb expands to. Above 2x this PIL itself refuses.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImage(Exception):
    """An image file that cannot be used; `reason` is one short line."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparent pixels become white (not black), and 16-bit / 32-bit
    greyscale is stretched from its own min..max (X-ray PNGs often use only 10-12 of 16 bits)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if im.mode == "1":
        im = im.convert("L")
    try:
        return im.convert("RGB")
    except ValueError:  # e.g. LAB has no direct conversion in some PIL builds
        return im.convert("RGBA").convert("RGB")


def open_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check, fully decode, apply EXIF orientation and convert to RGB; BadImage otherwise."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise BadImage(path, "file not found") from None
    return _decode_rgb(path, path, size, max_pixels)


def open_rgb_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """open_rgb for an image held in memory (an upload): nothing is written to disk; `name` labels errors."""
    return _decode_rgb(io.BytesIO(data), name, len(data), max_pixels)


def _decode_rgb(source: Path | BinaryIO, label: str | Path, size: int, max_pixels: int) -> Image.Image:
    if size == 0:
        raise BadImage(label, "empty file (0 bytes)")
    # A truncated file is an error, not a grey half-image: PIL's default (ImageFile.LOAD_TRUNCATED_IMAGES
    # False). That is PIL's global, so it is the caller's to change, never ours.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(source) as im:
                w, h = im.size  # from the header: checked before anything is decoded
                if w * h > max_pixels:
                    raise BadImage(label, f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                          "(a decompression bomb?)")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(label, "not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise BadImage(label, f"decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(label, f"cannot decode ({e})") from None
