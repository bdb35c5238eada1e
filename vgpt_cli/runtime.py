"""What every consumer of a trained model shares: device choice, the distributed context, model-folder
lookup with checkpoint recovery, loading, and the decoding settings saved with a model.

Used by extraction and training (device, distributed context), `vgpt caption`, `vgpt evaluate`, the
Python API and anything that serves models later, so each rule exists once:
- `--device auto`: CUDA (the process's LOCAL_RANK GPU under torchrun), then Apple's MPS, then the CPU;
- a checkpoint folder is `<run>/<which>`, or `<run>/.<which>.old` when a kill fell inside a save;
- under `torchrun`, rank, world size and device come from one `DistContext` (setup_distributed);
- decoding uses the settings saved in the model's generation_config.json, then the built-in defaults;
  an explicit option overrides either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgpt_cli.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from vgpt_cli.workspace import Workspace



# --- device ------------------------------------------------------------------------------------------
def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(option: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` (or None): cuda:LOCAL_RANK if CUDA is there, else mps, else cpu. Otherwise check the
    named device exists here and say what to use instead when it does not."""
    import torch

    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    text = str(option or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {option}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {option}: no CUDA GPU is visible here; use --device cpu (or auto)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {option}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not mps_available():
            raise ConfigError(f"--device {option}: Apple's MPS is not available here; use --device cpu (or auto)")
        return device
    if device.type != "cpu":
        raise ConfigError(f"--device {option}: use auto, cpu, cuda, cuda:N or mps")
    return device


# --- model folders -----------------------------------------------------------------------------------
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


# --- the distributed context -------------------------------------------------------------------------
@dataclass
class DistContext:
    """This process's place in a `torchrun` job (one process: rank 0 of 1): rank, world size, its
    device, and the collective operations training needs. One process: every operation is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device; None: the CPU
    started_here: bool = False  # we called init_process_group, so close() tears it down

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a no-op in one process). Works on a copy on the process's device."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = value.detach().clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_from_main(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = value.detach().clone().to(self.device)
        dist.broadcast(t, src=0)
        return t

    def broadcast_str(self, value: str) -> str:
        if not self.enabled:
            return value
        import torch

        # bytes in a fixed-size tensor (broadcast_object_list would pickle)
        raw = value.encode("utf-8")[:255]
        t = torch.zeros(256, dtype=torch.uint8)
        t[0] = len(raw)
        t[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        t = self.broadcast_from_main(t).cpu()
        return bytes(t[1:1 + int(t[0])].tolist()).decode("utf-8")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_option: str | None = "auto") -> DistContext:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); with several processes, start the
    process group (NCCL on GPUs, gloo on CPUs) unless the caller already did."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option, local_rank)
    if world <= 1:
        return DistContext(device=device)
    import torch
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        started = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, started_here=started)
