"""The pre-manifest structure every format reader returns, and the checks they all share.

A reader turns its files into a `Source`: one `Record` per captioned unit, with image paths relative
to the image root (as the annotation file names them), raw captions and the split the file assigns.
`vgpt_cli.data.build` then validates, samples and writes the manifest, the same way for every format.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DataError

# The split names a record may carry. Karpathy's "restval" joins the training pool.
RECORD_SPLITS = ("train", "restval", "val", "test")


@dataclass
class Record:
    id: str
    images: list[str]  # paths as the annotation file gives them, relative to Source.image_root
    captions: list[str]  # raw text; normalised later
    split: str  # one of RECORD_SPLITS
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # how to name this record in an error, e.g. "images[12] (cocoid 391895)"


@dataclass
class Source:
    format: str
    path: Path  # the annotation file (or folder) read
    image_root: Path
    records: list[Record]
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in manifest.source


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: Path, what: str, how: str) -> Path:
    """The file, or an error that says where we looked and how to get it."""
    path = Path(path)
    if not path.is_file():
        looked = "a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: {what} {looked}; {how}")
    return path


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of small objects.

    Parsing a COCO-size Karpathy file (616k captions) takes 12 s with it running and 4 s without:
    the collector keeps re-scanning containers that are all still alive.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    """The one line for a text file that is not UTF-8 (a Latin-1 export, a binary file)."""
    return DataError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}: {e.reason}); "
                     "save it as UTF-8 (or check that this is the right file)")


@contextlib.contextmanager
def utf8_text(path: Path) -> Iterator[None]:
    """Around code that reads `path` as text: a decoding error becomes `not_utf8`."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def read_text(path: Path) -> str:
    with utf8_text(path):
        return Path(path).read_text(encoding="utf-8")


def load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f, gc_paused():
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        "re-download or fix the file") from e
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def safe_join(root: Path, rel: str, file: Path, where: str) -> str:
    """`root/rel` as an absolute path string; refuses paths that leave the image root.

    String-only (normpath, no symlink resolution): it runs once per image on 100k+ images.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{file}: {where}: image path {rel!r} is not a non-empty string; fix the annotation file")
    root_s = os.path.normpath(str(root))
    if rel[0] != "/" and ".." not in rel and "./" not in rel and "//" not in rel and not rel.endswith("/."):
        return f"{root_s.rstrip(os.sep)}{os.sep}{rel}"  # nothing to normalise (the common case, 3x faster)
    full = os.path.normpath(os.path.join(root_s, rel))
    if full != root_s and not full.startswith(root_s.rstrip(os.sep) + os.sep):
        raise DataError(f"{file}: {where}: image path {rel!r} escapes the image root {root_s}; "
                        "image paths must stay inside the image root")
    return full


def absent_files(paths: list[str]) -> set[str]:
    """The paths that are not existing files.

    Folders named by many paths (COCO's train2014/ has 82,783 images) are listed once instead of
    stat-ing every file: 10x faster on 100k images.
    """
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p), []).append(p)
    absent: set[str] = set()
    for folder, group in by_dir.items():
        if len(group) < 64:
            absent.update(p for p in group if not os.path.isfile(p))
            continue
        try:
            with os.scandir(folder) as it:
                files = {e.name for e in it if e.is_file()}
        except OSError:
            files = set()
        absent.update(p for p in group if os.path.basename(p) not in files)
    return absent
