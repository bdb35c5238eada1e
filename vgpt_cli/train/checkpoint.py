"""Run checkpoints: `best/` and `last/`, written atomically, no pickle.

Each is a `Captioner.save_pretrained` folder (vgpt_cli.model.artifact), whose preprocessor.json is the
feature store's record, so `vgpt caption` can rebuild the backbone without the workspace. `last/` also holds the trainer
state: trainer_state.safetensors (optimiser tensors, RNG states) and trainer_state.json (step, epoch,
best score, patience counter, optimiser hyper-parameters, scheduler and grad-scaler state).

A folder is written under a temporary name, fsynced, and swapped in with renames (`_swap_in`), so a
run killed at any moment, or a power loss, leaves the previous checkpoint or the new one complete as
`<which>/` or `.<which>.old/` (vgpt_cli.model_folders.checkpoint_dir finds it), never half of one; the
temporary folders of saves that a kill interrupted are removed by the next save.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vgpt_cli.errors import DataError, DiskFullError, ModelLoadError
from vgpt_cli.files import atomic_write_json, read_json
from vgpt_cli.model_folders import checkpoint_dir as checkpoint_dir  # the one recovery rule

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def fsync_tree(folder: Path) -> None:
    """fsync every file in `folder` (recursively), then each folder: the bytes and the names reach the
    disk before the folder is renamed into place (a rename alone survives a kill, not a power loss)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """fsync a folder's entry list (renames and removals in it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(run_dir: Path, which: str) -> list[Path]:
    """Remove `.<which>.tmp-*` folders that a kill during a save left behind (one writer per run:
    the run lock, vgpt_cli/train/run_folder.py, makes every such folder stale)."""
    stale = [p for p in Path(run_dir).glob(f".{which}.tmp-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def finish_interrupted_swap(run_dir: Path, which: str) -> bool:
    """A kill between the two renames of a save left `.<which>.old/` alone: put it back as `<which>/`
    (one writer per run, so nothing else is writing it). True when it did."""
    final, old = Path(run_dir) / which, Path(run_dir) / f".{which}.old"
    if final.exists() or not old.is_dir():
        return False
    old.rename(final)
    fsync_dir(Path(run_dir))
    return True


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder `final` by the complete folder `tmp` so that at every moment `final/` or
    `.final.old/` is a complete checkpoint (checkpoint_dir reads the first that exists):

    1. `final/` exists: drop a leftover `.old` (final is complete), rename final -> .old.
       `final/` missing: a kill fell between two renames of the previous save, and `.old` is the only
       checkpoint: keep it.
    2. rename tmp -> final;  3. remove .old.  The folder is fsynced after each rename.
    """
    run_dir = final.parent
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        fsync_dir(run_dir)
    tmp.rename(final)
    fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)
        fsync_dir(run_dir)


def save_checkpoint(model: Any, run_dir: Path, which: str, trainer_state: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir, which)
    tmp = Path(tempfile.mkdtemp(prefix=f".{which}.tmp-", dir=run_dir))
    try:
        model.save_pretrained(tmp)
        if trainer_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()},
                      str(tmp / STATE_TENSORS))
            atomic_write_json(tmp / STATE_JSON, trainer_state)
        fsync_tree(tmp)
        _swap_in(tmp, run_dir / which)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno == errno.ENOSPC):  # one line
            need = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *(tensors or {}).values()])
            raise DataError(f"{run_dir / which}: disk full while saving the {which} checkpoint (about {need:,} bytes "
                            f"needed, in {getattr(e, 'filename', None) or tmp}); the previous {which}/ is intact, "
                            "free space and rerun with --resume") from None
        raise
    return run_dir / which


# --- optimiser / RNG state <-> (JSON, tensors) ----------------------------------------------------
def optimizer_to_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def optimizer_from_parts(opt: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, scal in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scal)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda][:n])


def read_trainer_meta(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint; a missing or corrupt file is one line that names it."""
    js = Path(ckpt) / STATE_JSON
    if not js.is_file():
        raise ModelLoadError(f"{js}: missing; this checkpoint cannot be resumed, start a new run with "
                             "another --name")
    meta = read_json(js, "the checkpoint is damaged, start a new run with another --name (or restore the file "
                     "from a backup)", error=ModelLoadError)
    if not isinstance(meta, dict) or not isinstance(meta.get("optimizer"), dict) or "step" not in meta:
        raise ModelLoadError(f"{js}: not a trainer state (no step or optimizer); start a new run with another "
                             "--name")
    return meta


def load_trainer_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = read_trainer_meta(ckpt)
    st = Path(ckpt) / STATE_TENSORS
    if not st.is_file():
        raise ModelLoadError(f"{st}: missing; this checkpoint cannot be resumed, start a new run with "
                             "another --name")
    try:
        return meta, load_file(str(st))
    except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear line
        raise ModelLoadError(f"{st}: unreadable ({e}); start a new run with another --name") from None
