"""Where each step reads and writes inside a workspace folder.

    <root>/workspace.json                 what is current: dataset, feature store, run
    <root>/data/<dataset>/manifest.json   splits, image paths, captions, sampling record
    <root>/features/<fingerprint>/        the feature store of one backbone + preprocessing
    <root>/runs/<run>/                    config, checkpoints (best/, last/), metrics log, predictions
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgpt_cli.errors import VgptError
from vgpt_cli.files import atomic_write_json, check_name, read_json

WORKSPACE_ENV = "VGPT_WORKSPACE"


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
        state = read_json(self.state_path, "delete it and rerun the last step", expect=dict,
                          what='an object such as {"dataset": "coco"}')
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
