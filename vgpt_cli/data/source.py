"""The pre-manifest structure every format reader returns, and the checks they all share.

A reader turns its files into a `Source`: one `Record` per captioned unit, with image paths relative
to the image root (as the annotation file names them), raw captions and the split the file assigns.
`vgpt_cli.data.build` then validates, samples and writes the manifest, the same way for every format.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        "re-download or fix the file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); is this the right file?") from e


def safe_join(root: Path, rel: str, file: Path, where: str) -> str:
    """`root/rel` as an absolute path string; refuses paths that leave the image root.

    String-only (normpath, no symlink resolution): it runs once per image on 100k+ images.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{file}: {where}: image path {rel!r} is not a non-empty string; fix the annotation file")
    root_s = os.path.normpath(str(root))
    full = os.path.normpath(os.path.join(root_s, rel))
    if full != root_s and not full.startswith(root_s.rstrip(os.sep) + os.sep):
        raise DataError(f"{file}: {where}: image path {rel!r} escapes the image root {root_s}; "
                        "image paths must stay inside the image root")
    return full
