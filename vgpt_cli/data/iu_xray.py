"""IU X-ray in R2Gen's annotation.json: one item per study, several views, one report.

    {"train": [{"id": "CXR2384_IM-0942", "report": "The heart size ...",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"}],
     "val": [...], "test": [...]}

Image paths are relative to the images/ folder beside annotation.json. Each record's own "split" field
decides its split: a real copy of this file keeps its test list under the key "    " (four spaces)
while every record in it still says "split": "test".
"""

from __future__ import annotations

from pathlib import Path

from vgpt_cli.data.formats import DatasetFormat, Opt, Request, register
from vgpt_cli.data.source import Record, Source, load_json, require_file, sha256_file
from vgpt_cli.errors import DataError

SPLITS = {"train": "train", "val": "val", "test": "test"}
_SHAPE = '{"train": [{"id", "report", "image_path": [...], "split"}], "val": [...], "test": [...]}'


def read_iu_xray(annotations: Path, images: Path | None = None) -> Source:
    annotations = require_file(Path(annotations), "R2Gen annotation file",
                               "pass --annotations path/to/annotation.json (from R2Gen's iu_xray release)")
    image_root = Path(images) if images else annotations.parent / "images"
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found; put R2Gen's iu_xray images/ folder beside "
                        f"{annotations.name} or pass --images DIR")
    raw = load_json(annotations)
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DataError(f"{annotations}: top level must be an object of record lists, as in {_SHAPE}")
    records: list[Record] = []
    notes: list[str] = []
    for key, entries in raw.items():
        moved = 0
        for i, rec in enumerate(entries):
            where = f"[{key!r}][{i}]"
            if not isinstance(rec, dict):
                raise DataError(f"{annotations}: {where}: must be an object, as in {_SHAPE}")
            for field in ("id", "report", "image_path"):
                if field not in rec:
                    raise DataError(f"{annotations}: {where}: missing field {field!r}; expected {_SHAPE}")
            where = f"{where} (id {rec['id']})"
            paths = rec["image_path"]
            if not isinstance(paths, list) or not paths:
                raise DataError(f"{annotations}: {where}: \"image_path\" must be a non-empty list of paths")
            if not isinstance(rec["report"], str):
                raise DataError(f"{annotations}: {where}: \"report\" must be text")
            split_field = rec.get("split", key.strip())
            split = SPLITS.get(str(split_field).strip())
            if split is None:
                raise DataError(f"{annotations}: {where}: split {split_field!r} is not train, val or test")
            if split != key:
                moved += 1
            records.append(Record(str(rec["id"]), list(paths), [rec["report"]], split, {"views": len(paths)},
                                  where))
        if moved:
            notes.append(f"{moved} record(s) under the key {key!r} were placed by their own \"split\" field")
    return Source("iu-xray", annotations, image_root.resolve(), records, sha256=sha256_file(annotations),
                  notes=notes)


def _read(request: Request, annotations: Path, images: Path | None) -> Source:
    return read_iu_xray(annotations, images)


register(DatasetFormat(
    name="iu-xray",
    help="IU X-ray radiology reports (R2Gen split): one item per study, its views, one report.",
    examples=("vgpt prepare iu-xray --annotations iu_xray/annotation.json --fraction 0.1",),
    read=_read,
    options=(
        Opt("annotations", Path, "R2Gen's iu_xray annotation.json.", required=True),
        Opt("images", Path, "R2Gen's images/ folder (default: beside annotation.json)."),
    ),
))
