"""Karpathy's split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "cocoid": 391895, "imgid": 0, "split": "train|restval|val|test",
      "sentences": [{"raw": "A man ...", "tokens": [...], "imgid": 0, "sentid": 0}, ...]}, ...]}

Flickr files have no "filepath" and no "cocoid": the image id is the file name without extension.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from vgpt_cli.data.source import RECORD_SPLITS, Record, Source, gc_paused, load_json, sha256_file
from vgpt_cli.errors import DataError

_SHAPE = 'the Karpathy format ({"images": [{"filename", "split", "sentences": [{"raw"}]}]})'


def read_karpathy(path: Path, image_root: Path, fmt: str, hash_source: bool = True) -> Source:
    path = Path(path)
    raw = load_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DataError(f"{path}: top level must be an object with an \"images\" list, as in {_SHAPE}; "
                        "is this the right file?")
    with gc_paused():
        records = _records(path, raw["images"])
    return Source(fmt, path, Path(image_root), records, sha256=sha256_file(path) if hash_source else None)


def _records(path: Path, images: list) -> list[Record]:
    records: list[Record] = []
    for i, im in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            raise DataError(f"{path}: {where}: must be an object, as in {_SHAPE}")
        if "cocoid" in im:
            where += f" (cocoid {im['cocoid']})"
        for key in ("filename", "split", "sentences"):
            if key not in im:
                raise DataError(f"{path}: {where}: missing field {key!r}; expected {_SHAPE}")
        filename, split, sentences = im["filename"], im["split"], im["sentences"]
        if not isinstance(filename, str) or not filename:
            raise DataError(f"{path}: {where}: \"filename\" must be a non-empty string")
        if split not in RECORD_SPLITS:
            raise DataError(f"{path}: {where}: split {split!r} is not one of {', '.join(RECORD_SPLITS)}")
        if not isinstance(sentences, list):
            raise DataError(f"{path}: {where}: \"sentences\" must be a list of {{\"raw\": ...}} objects")
        captions = []
        for j, s in enumerate(sentences):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise DataError(f"{path}: {where}.sentences[{j}]: missing string field 'raw'; expected {_SHAPE}")
            captions.append(s["raw"])
        filepath = im.get("filepath") or ""
        rel = f"{filepath}/{filename}" if filepath else filename
        image_id = str(im["cocoid"]) if "cocoid" in im else PurePosixPath(filename).stem
        extra = {k: im[k] for k in ("objects", "background") if k in im}  # the shapes scene record
        records.append(Record(image_id, [rel], captions, split, extra, where))
    return records
