"""COCO with Karpathy's splits: where the files conventionally live, and what to say when they do not.

    <root>/dataset_coco.json        from caption_datasets.zip
    <root>/train2014/*.jpg          from train2014.zip
    <root>/val2014/*.jpg            from val2014.zip

Training pool = train + restval (113,287 images); val and test are Karpathy's 5,000 each.
"""

from __future__ import annotations

from pathlib import Path

from vgpt_cli.data.formats import DatasetFormat, Opt, Request, register
from vgpt_cli.data.karpathy import read_karpathy
from vgpt_cli.data.source import Source, require_file
from vgpt_cli.errors import DataError

ANNOTATION_NAME = "dataset_coco.json"
IMAGE_FOLDERS = ("train2014", "val2014")


def default_root(workspace_root: Path) -> Path:
    return Path(workspace_root) / "sources" / "coco"


def read_coco(root: Path, annotations: Path | None = None, images: Path | None = None) -> Source:
    root = Path(root)
    ann = Path(annotations) if annotations else root / ANNOTATION_NAME
    image_root = Path(images) if images else root
    how = (f"run `vgpt prepare coco --download --root {root}` to fetch it (Karpathy's caption_datasets.zip), "
           "or pass --root DIR (the folder with dataset_coco.json, train2014/, val2014/) or --annotations FILE")
    require_file(ann, "Karpathy split file", how)
    if not image_root.is_dir() or not any((image_root / d).is_dir() for d in IMAGE_FOLDERS):
        raise DataError(f"{image_root}: no {' or '.join(f + '/' for f in IMAGE_FOLDERS)} image folder here; "
                        f"run `vgpt prepare coco --download --root {root}` to fetch the COCO 2014 images, "
                        "or pass --images DIR (the folder that holds train2014/ and val2014/)")
    return read_karpathy(ann, image_root.resolve(), "coco")


def _read(request: Request, root: Path | None, annotations: Path | None, images: Path | None,
          download: bool) -> Source:
    root = Path(root) if root else default_root(request.workspace.root)
    if download:
        from vgpt_cli.data.download import download_coco

        download_coco(root, progress=request.progress)
    return read_coco(root, annotations, images)


register(DatasetFormat(
    name="coco",
    help="COCO 2014 with Karpathy's splits (train+restval pool, 5,000 val, 5,000 test).",
    examples=("vgpt prepare coco --fraction 0.01",
              "vgpt prepare coco --root /data/coco --fraction 0.005 --val-size 1000 --seed 1"),
    read=_read,
    options=(
        Opt("root", Path, "Folder with dataset_coco.json, train2014/ and val2014/ "
            "(default: <workspace>/sources/coco)."),
        Opt("annotations", Path, "Karpathy's dataset_coco.json (default: <root>/dataset_coco.json)."),
        Opt("images", Path, "Folder holding train2014/ and val2014/ (default: <root>)."),
        Opt("download", bool, "Fetch caption_datasets.zip and the COCO 2014 image zips into --root first "
            "(resumable, checksummed).", False),
    ),
))
