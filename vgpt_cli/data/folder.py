"""A folder of images plus a captions file (CSV with a header row, or JSON Lines).

    image,caption[,split]                 {"image": "dogs/1.jpg", "caption": "a dog", "split": "train"}
    dogs/1.jpg,a dog running on grass     {"image": "dogs/1.jpg", "captions": ["a dog", "a brown dog"]}
    dogs/1.jpg,a brown dog

Several rows may name one image (its captions are merged). Image paths are relative to the folder.
Splits come from the split column when every row has one, else from a seeded
--val-fraction / --test-fraction of the images.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vgpt_cli.data.formats import TEST_FRACTION, VAL_FRACTION, DatasetFormat, Opt, Request, register
from vgpt_cli.data.sampling import split_assignment
from vgpt_cli.data.source import Record, Source, not_utf8, require_file, sha256_file
from vgpt_cli.errors import DataError

_EXTRA = "\0extra"  # DictReader's key for fields past the header
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs, with where = 'line N'."""
    try:
        return _parse(path)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e}); captions longer than "
                        f"{csv.field_size_limit() // 1024} KiB are not captions, check the quoting") from None


def _parse(path: Path) -> list[tuple[str, dict]]:
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg}); "
                                    "expected one {\"image\": ..., \"caption\": ...} object per line") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {lineno}: expected an object with \"image\" and \"caption\"")
                rows.append((f"line {lineno}", row))
        return rows
    # utf-8-sig: spreadsheets start CSV files with a byte-order mark, which is not part of "image".
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, restkey=_EXTRA)
        header = reader.fieldnames or []
        if "image" not in header or not ({"caption", "captions"} & set(header)):
            raise DataError(f"{path}: header {header} must have columns 'image' and 'caption' "
                            "(and optionally 'split')")
        rows = []
        for row in reader:
            if _EXTRA in row:  # an unquoted comma: a caption cut short, or columns with no name
                raise DataError(f"{path}: line {reader.line_num}: {len(header) + len(row[_EXTRA])} fields but the "
                                f"header has {len(header)}; put a caption that contains commas in double "
                                "quotes (\"a dog, running\")")
            rows.append((f"line {reader.line_num}", row))
        return rows


def read_folder(folder: Path, captions_file: Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 42) -> Source:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; pass the folder that holds the images")
    captions_file = require_file(Path(captions_file), "captions file",
                                 "pass --captions FILE (CSV or JSONL with image and caption columns)")
    order: list[str] = []
    caps: dict[str, list[str]] = {}
    split_of: dict[str, str | None] = {}
    where_of: dict[str, str] = {}
    duplicates = 0
    for where, row in _rows(captions_file):
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{captions_file}: {where}: missing 'image'")
        image = image.strip()
        text = row.get("captions", row.get("caption"))
        texts = text if isinstance(text, list) else [text]
        if any(not isinstance(t, str) for t in texts):
            raise DataError(f"{captions_file}: {where}: 'caption' must be text (or a list of texts in 'captions')")
        raw_split = (row.get("split") or "").strip().lower() or None
        split = SPLIT_NAMES.get(raw_split) if raw_split else None
        if raw_split and split is None:
            raise DataError(f"{captions_file}: {where}: split {raw_split!r} is not one of train, val, test")
        if image not in caps:
            order.append(image)
            caps[image], split_of[image], where_of[image] = [], split, where
        elif split_of[image] != split:
            raise DataError(f"{captions_file}: {where}: image {image} has split {split!r} here but "
                            f"{split_of[image]!r} at {where_of[image]}")
        for t in texts:
            if t in caps[image]:
                duplicates += 1  # the same row twice would count the caption twice
            else:
                caps[image].append(t)
    if not order:
        raise DataError(f"{captions_file}: no rows; expected image and caption columns")
    notes = []
    if duplicates:
        notes.append(f"dropped {duplicates} duplicate caption(s): the same image and caption more than once")
    given = [split_of[im] for im in order]
    if all(given):
        splits = given
        notes.append("splits from the captions file's split column")
    else:
        if any(given):
            notes.append("the split column is incomplete, so it was ignored")
        splits = split_assignment(len(order), val_fraction, test_fraction, seed)
        notes.append(f"splits: seeded (seed {seed}) val fraction {val_fraction}, test fraction {test_fraction}")
    records = [Record(im, [im], caps[im], sp, {}, f"{where_of[im]} (image {im})") for im, sp in zip(order, splits)]
    return Source("folder", captions_file, folder.resolve(), records, sha256=sha256_file(captions_file),
                  notes=notes)


def _read(request: Request, images: Path, captions: Path, val_fraction: float, test_fraction: float) -> Source:
    return read_folder(images, captions, val_fraction, test_fraction, request.sampling.seed)


register(DatasetFormat(
    name="folder",
    help="A folder of images plus a captions file (several captions per image allowed).",
    examples=("vgpt prepare folder photos/ --captions photos/captions.csv --name pets",
              "vgpt prepare folder photos/ --captions caps.jsonl --val-fraction 0.05 --test-fraction 0.05"),
    read=_read,
    options=(
        Opt("images", Path, "The folder of images; captions-file paths are relative to it.", required=True,
            positional=True),
        Opt("captions", Path, "CSV (header: image,caption[,split]) or JSONL ({\"image\", \"caption\"}) file.",
            required=True),
        VAL_FRACTION,
        TEST_FRACTION,
    ),
))
