"""Run checkpoints: `best/` and `last/`, written atomically, no pickle.

Each is a `Captioner.save_pretrained` folder plus `backbone.json` (the feature store's record of the
backbone, so `vgpt caption` can rebuild it without the workspace). `last/` also holds the trainer
state: trainer_state.safetensors (optimiser tensors, RNG states) and trainer_state.json (step, epoch,
best score, patience counter, optimiser hyper-parameters, scheduler and grad-scaler state).

A folder is written under a temporary name and swapped in with renames, so a run killed at any
moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vgpt_cli.errors import DataError, ModelLoadError
from vgpt_cli.workspace import atomic_write_json

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
BACKBONE_JSON = "backbone.json"


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder `final` by `tmp` with renames (a directory cannot be os.replace'd over a full one)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_dir(run_dir: Path, which: str) -> Path | None:
    """The `which` checkpoint folder, also when a kill fell between the two renames of a swap."""
    final = run_dir / which
    if final.is_dir():
        return final
    old = run_dir / f".{which}.old"
    return old if old.is_dir() else None


def save_checkpoint(model: Any, run_dir: Path, which: str, backbone: dict[str, Any] | None,
                    trainer_state: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{which}.tmp-", dir=run_dir))
    try:
        model.save_pretrained(tmp)
        if backbone is not None:
            atomic_write_json(tmp / BACKBONE_JSON, backbone)
        if trainer_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()},
                      str(tmp / STATE_TENSORS))
            atomic_write_json(tmp / STATE_JSON, trainer_state)
        _swap_in(tmp, run_dir / which)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # one line, not a traceback
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


def load_trainer_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    js, st = ckpt / STATE_JSON, ckpt / STATE_TENSORS
    if not js.is_file() or not st.is_file():
        raise ModelLoadError(f"{ckpt}: no trainer state ({STATE_JSON}, {STATE_TENSORS}); this folder cannot "
                             "be resumed, start a new run with another --name")
    try:
        return json.loads(js.read_text(encoding="utf-8")), load_file(str(st))
    except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear line
        raise ModelLoadError(f"{ckpt}: unreadable trainer state ({e}); start a new run with another --name") from e
