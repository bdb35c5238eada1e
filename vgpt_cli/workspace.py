"""Where each step reads and writes inside a workspace folder.

    <root>/workspace.json                 what is current: dataset, feature store, run
    <root>/data/<dataset>/manifest.json   splits, image paths, captions, sampling record
    <root>/features/<fingerprint>/        the feature store of one backbone + preprocessing
    <root>/runs/<run>/                    config, checkpoints (best/, last/), metrics log, predictions
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DiskFullError, VgptError

WORKSPACE_ENV = "VGPT_WORKSPACE"


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


def check_name(name: str, option: str) -> str:
    """A dataset or run name is one plain folder name inside the workspace: no path separators,
    not absolute, not hidden, not '..' (the rule `train --name` applies)."""
    if (not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name or "\0" in name
            or name.startswith(".")):
        raise VgptError(f"{option} {name!r}: use a plain folder name such as coco-1pct (no '/', not "
                        "starting with '.'); it names a folder inside the workspace")
    return name


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_option(cls, path: Path | None) -> Workspace:
        if path is None:
            path = Path(os.environ.get(WORKSPACE_ENV) or ".")
        return cls(Path(path).expanduser().resolve())

    # --- layout -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / "workspace.json"

    def dataset_dir(self, name: str) -> Path:
        check_name(name, "--name")
        return self.root / "data" / name

    def manifest_path(self, name: str) -> Path:
        return self.dataset_dir(name) / "manifest.json"

    @property
    def features_root(self) -> Path:
        return self.root / "features"

    @property
    def runs_root(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_root / name

    # --- what is current ----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VgptError(f"{self.state_path}: not valid JSON ({e}); delete it and rerun the last step") from None
        if not isinstance(state, dict):
            raise VgptError(f"{self.state_path}: expected an object such as {{\"dataset\": \"coco\"}}, found "
                            f"{type(state).__name__}; delete it and rerun the last step")
        return state

    def set_current(self, **items: Any) -> None:
        """Record what the last step produced (e.g. dataset='coco', features='<fp>', run='r1')."""
        state = self.state()
        state.update(items)
        atomic_write_json(self.state_path, state)

    def current(self, key: str, what: str, how: str) -> str:
        """The current `key`, or an error that says which step makes it."""
        value = self.state().get(key)
        if not value:
            raise VgptError(f"{self.root}: no {what} in this workspace yet; run `{how}` first")
        return value
