"""Conceptual Captions, as img2dataset leaves it, or as the release TSV plus a local images folder.

img2dataset's "files" output format:

    <folder>/00000/000000000.jpg  000000000.txt (the caption)  000000000.json ({"url", "caption", ...})
    <folder>/00001/000010000.jpg  ...

The release TSV (headerless `caption<TAB>url`, one line per sample) with an images folder named the way
img2dataset names them: row i (0-based) is the image whose file stem is f"{i:09d}" (its default keys at
10,000 samples per shard), anywhere under the folder. Rows whose image was never downloaded count as
missing images (--skip-missing drops them). Splits: seeded --val-fraction / --test-fraction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vgpt_cli.data.formats import TEST_FRACTION, VAL_FRACTION, DatasetFormat, Opt, Request, register
from vgpt_cli.data.sampling import split_assignment
from vgpt_cli.data.source import Record, Source, read_text, require_file, sha256_file, utf8_text
from vgpt_cli.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _image_files(folder: Path) -> dict[str, str]:
    """stem -> path relative to folder, for every image file under folder."""
    found: dict[str, str] = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                found[stem] = os.path.relpath(os.path.join(dirpath, name), folder)
    return found


def read_cc_files(folder: Path, val_fraction: float, test_fraction: float, seed: int) -> Source:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; pass img2dataset's output folder (with 00000/ shards)")
    images = _image_files(folder)
    if not images:
        raise DataError(f"{folder}: no images (.jpg, .png, .webp) under it; is this img2dataset's output "
                        "folder (--output_format files)?")
    records: list[Record] = []
    for key in sorted(images):
        rel = images[key]
        txt = (folder / rel).with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{folder}: sample {key}: {txt.name} (its caption) is missing beside {rel}; "
                            "run img2dataset with --caption_col")
        extra = {}
        meta = txt.with_suffix(".json")
        if meta.is_file():
            try:
                url = json.loads(read_text(meta)).get("url")
            except (json.JSONDecodeError, AttributeError) as e:
                raise DataError(f"{meta}: not a valid img2dataset metadata file ({e}); delete it or re-run "
                                "img2dataset") from e
            if url:
                extra["url"] = url
        records.append(Record(key, [rel], [read_text(txt)], "train", extra, f"sample {key}"))
    splits = split_assignment(len(records), val_fraction, test_fraction, seed)
    for r, s in zip(records, splits):
        r.split = s
    notes = [f"splits: seeded (seed {seed}) val fraction {val_fraction}, test fraction {test_fraction}"]
    return Source("cc", folder, folder.resolve(), records, notes=notes)


def read_cc_tsv(tsv: Path, images: Path, val_fraction: float, test_fraction: float, seed: int) -> Source:
    tsv = require_file(Path(tsv), "Conceptual Captions TSV", "pass --tsv FILE (caption<TAB>url lines)")
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: images folder not found; download the images (e.g. with img2dataset) "
                        "and pass --images DIR")
    found = _image_files(images)
    records: list[Record] = []
    with open(tsv, encoding="utf-8") as f, utf8_text(tsv):
        for i, line in enumerate(f):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{tsv}: line {i + 1}: expected 'caption<TAB>url', got {len(parts)} field(s)")
            key = f"{i:09d}"
            rel = found.get(key, f"{key}.jpg")  # absent files are reported as missing images
            records.append(Record(key, [rel], [parts[0]], "train", {"url": parts[1]}, f"line {i + 1}"))
    splits = split_assignment(len(records), val_fraction, test_fraction, seed)
    for r, s in zip(records, splits):
        r.split = s
    notes = [f"splits: seeded (seed {seed}) val fraction {val_fraction}, test fraction {test_fraction}",
             f"row i's image is the file named {{i:09d}} under {images} (img2dataset's default keys)"]
    return Source("cc", tsv, images.resolve(), records, sha256=sha256_file(tsv), notes=notes)


def _read(request: Request, folder: Path | None, tsv: Path | None, images: Path | None, val_fraction: float,
          test_fraction: float) -> Source:
    if (folder is None) == (tsv is None):
        raise ConfigError("pass either an img2dataset FOLDER or --tsv FILE --images DIR (one of them)")
    seed = request.sampling.seed
    if tsv is not None:
        if images is None:
            raise ConfigError(f"--tsv {tsv}: also pass --images DIR, the folder of the downloaded images")
        return read_cc_tsv(tsv, images, val_fraction, test_fraction, seed)
    return read_cc_files(folder, val_fraction, test_fraction, seed)


register(DatasetFormat(
    name="cc",
    help="Conceptual Captions: img2dataset's files output, or the release TSV plus an images folder.",
    examples=("vgpt prepare cc cc3m_files/ --fraction 0.01",
              "vgpt prepare cc --tsv Validation_GCC-1.1.0-Validation.tsv --images cc_val/ --skip-missing"),
    read=_read,
    options=(
        Opt("folder", Path, "img2dataset output folder (files format: 00000/000000000.jpg/.txt/.json).",
            positional=True),
        Opt("tsv", Path, "The release TSV (caption<TAB>url); needs --images."),
        Opt("images", Path, "With --tsv: the folder holding the downloaded images, named 000000000.jpg, ..."),
        VAL_FRACTION,
        TEST_FRACTION,
    ),
))
