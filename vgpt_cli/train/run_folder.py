"""A run folder's bookkeeping around the training loop: one writer at a time, which run `--resume`
continues, the metrics log cut back to the checkpoint it resumes, files read with one-line errors,
and what is kept when a run ends.

    runs/.<name>.lock      held (flock) by the one `vgpt train` writing runs/<name>
    workspace.json         "training": the run started last and not yet ended (what --resume continues)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from vgpt_cli.errors import ConfigError
from vgpt_cli.files import read_json
from vgpt_cli.workspace import Workspace

METRICS = "metrics.jsonl"


# --- one writer per run ------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on runs/<name> for as long as a training process writes it. The lock file sits
    beside the folder (runs/.<name>.lock), so a refused start leaves no run folder behind."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self._file = None

    def acquire(self) -> RunLock:
        self._made_parent = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the run's life
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): no protection, as before
            pass
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise ConfigError(f"{self.run_dir}: another `vgpt train` is writing this run{holder and f' ({holder})'}; "
                              "wait for it to end or stop it, or pass another --name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
            if not self.run_dir.exists():  # refused before anything was written: leave the workspace as it was
                self.path.unlink(missing_ok=True)
                if self._made_parent:
                    try:
                        self.path.parent.rmdir()
                    except OSError:  # something else was written there meanwhile
                        pass


# --- which run --resume continues --------------------------------------------------------------------
def mark_started(ws: Workspace, name: str) -> None:
    """Record that `name` is being trained: until it ends, `vgpt train --resume` continues it."""
    ws.set_current(training=name)


def mark_ended(ws: Workspace, name: str) -> None:
    """The run ended normally: it becomes the current run, and no run is left to resume."""
    if ws.state().get("training") == name:
        ws.set_current(run=name, training=None)
    else:
        ws.set_current(run=name)


def resumable_run(ws: Workspace) -> str:
    """The run `--resume` continues without --name: the one interrupted (started, never ended), else
    the workspace's current run."""
    return ws.state().get("training") or ws.current("run", "training run", "vgpt train")


# --- files read on resume ----------------------------------------------------------------------------
def read_run_config(run_dir: Path) -> dict[str, Any]:
    """runs/<name>/config.json as a dict; missing or corrupt: one line naming the file."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; nothing to resume (check --name)")
    return read_json(path, "restore it, or start a new run with another --name", error=ConfigError, expect=dict,
                     what="an object of training options")


# --- the metrics log ----------------------------------------------------------------------------------
def metrics_size(run_dir: Path) -> int:
    """Bytes of metrics.jsonl now; a checkpoint records it so that a resume can cut the log back."""
    path = Path(run_dir) / METRICS
    return path.stat().st_size if path.is_file() else 0


def truncate_metrics(run_dir: Path, size: int | None) -> None:
    """Drop what was logged after the checkpoint being resumed (those steps are trained again and
    logged again: each step appears once)."""
    path = Path(run_dir) / METRICS
    if size is None or not path.is_file() or path.stat().st_size <= size:
        return
    with open(path, "r+b") as f:
        f.truncate(int(size))
        f.flush()
        os.fsync(f.fileno())


# --- when a run ends ----------------------------------------------------------------------------------
def remove_last(run_dir: Path) -> None:
    """Drop last/ (the resumable state: weights plus optimiser moments, 3x the model) and any leftover
    of an interrupted save of it. best/ and the logs stay."""
    for path in [Path(run_dir) / "last", Path(run_dir) / ".last.old", *Path(run_dir).glob(".last.tmp-*")]:
        if path.is_dir():
            shutil.rmtree(path)


def folder_size(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as `du --si`)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"
