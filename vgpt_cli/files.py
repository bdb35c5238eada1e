"""The one way vgpt writes and reads its own files: atomic writes (a temporary file beside the target,
fsynced, renamed over it), JSON reading whose failures are one line naming the file, and the rule for a
name that becomes a folder inside the workspace."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DiskFullError, VgptError


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None) -> Path:
    """The one way a file is written: `write(tmp)` fills a temporary file beside `path`, which is fsynced
    and renamed over `path`; a failure (a kill, a full disk) leaves the previous version intact. size: the
    bytes it needs, for the disk-full message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # the old file is intact: say so, no traceback
            needed = f" ({size:,} bytes needed)" if size is not None else ""
            raise DiskFullError(f"{path}: disk full while writing it{needed}; the previous version is unchanged, "
                                "free space and rerun") from None
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temporary file beside `path`, fsync, then rename over it."""
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_name(name: str, option: str, error: type[Exception] = VgptError) -> str:
    """The one rule for a dataset or run name: one plain folder name inside the workspace (no path
    separators, not absolute, not hidden, not '..')."""
    if (not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name or "\0" in name
            or name.startswith(".")):
        raise error(f"{option} {name!r}: use a plain folder name such as coco-1pct or r1 (no '/', not "
                    "starting with '.'); it names a folder inside the workspace")
    return name


def read_json(path: str | os.PathLike, fix: str, *, error: type[Exception] = VgptError, expect: type | None = None,
              what: str = "") -> Any:
    """The one JSON reader: a file that is not UTF-8 JSON, or not of type `expect` (`what` names what was
    expected), is one line that names it and says `fix`. A missing file is the caller's to word
    (FileNotFoundError passes through)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None
    if expect is not None and not isinstance(value, expect):
        wanted = what or ("an object" if expect is dict else f"a {expect.__name__}")
        raise error(f"{path}: expected {wanted}, found {type(value).__name__}; {fix}")
    return value
