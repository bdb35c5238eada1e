"""Model folders as commands find them: `--model DIR` or the current run's best checkpoint (a checkpoint
folder is `<run>/<which>`, or `<run>/.<which>.old` when a kill fell inside a save), where outputs about a
model go, loading it on a device, and the decoding settings saved with it (generation_config.json, then
the built-in defaults; an explicit option overrides either)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgpt_cli.device import resolve_device
from vgpt_cli.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from vgpt_cli.workspace import Workspace


def checkpoint_dir(run_dir: Path, which: str) -> Path | None:
    """The `which` checkpoint folder of a run, also when a kill fell inside a save: the checkpoint
    swap (vgpt_cli/train/checkpoint.py) always leaves `<which>/` or `.<which>.old/` complete."""
    final = Path(run_dir) / which
    if final.is_dir():
        return final
    old = Path(run_dir) / f".{which}.old"
    return old if old.is_dir() else None


def resolve_model_dir(ws: Workspace, model_dir: str | os.PathLike | None) -> Path:
    """--model DIR (which must exist), or the best checkpoint of the workspace's current run."""
    if model_dir is not None:
        path = Path(model_dir).expanduser().resolve()
        if not path.is_dir() and path.name in ("best", "last"):  # a kill inside a save: its .old copy
            path = checkpoint_dir(path.parent, path.name) or path
        if not path.is_dir():
            raise ConfigError(f"--model {model_dir}: no such folder; give a folder written by `vgpt train` "
                              "(runs/<name>/best)")
        return path
    run = ws.current("run", "trained model", "vgpt train")
    best = checkpoint_dir(ws.run_dir(run), "best")
    if best is None:
        raise ModelLoadError(f"{ws.run_dir(run) / 'best'}: the current run {run!r} has no best checkpoint yet; "
                             "let `vgpt train` finish a validation, or pass --model DIR")
    return best


def output_dir(ws: Workspace, model_dir: Path) -> Path:
    """Where outputs about a model go, always inside the workspace: the run folder of a checkpoint in
    this workspace's runs/, else runs/external/<name> (a model elsewhere is only read, never written)."""
    model_dir = Path(model_dir).resolve()
    runs = ws.runs_root.resolve()
    is_checkpoint = model_dir.name in ("best", "last", ".best.old", ".last.old")
    if is_checkpoint and model_dir.parent.parent == runs:
        return model_dir.parent
    label = model_dir.parent.name if is_checkpoint else model_dir.name
    import hashlib

    tag = hashlib.sha256(str(model_dir).encode("utf-8")).hexdigest()[:8]  # two r1/best elsewhere stay apart
    return runs / "external" / f"{label or 'model'}-{tag}"


def load_model(model_dir: Path, device: str | torch.device | None = None) -> Any:
    """Captioner.from_pretrained on the device (resolve_device's choice), in eval mode."""
    from vgpt_cli.model import Captioner

    return Captioner.from_pretrained(model_dir).to(resolve_device(device)).eval()


# --- decoding settings -------------------------------------------------------------------------------
def decode_options(model: Any, **overrides: Any) -> Any:
    """DecodeOptions for `model`: each option given (not None) in `overrides`, else the model's saved
    generation block (what it was validated and selected with), else DecodeOptions' defaults."""
    from vgpt_cli.decode import DecodeOptions

    saved = dict(getattr(model, "generation", None) or {})
    saved.update({k: v for k, v in overrides.items() if v is not None})
    return DecodeOptions(**saved).validate()
