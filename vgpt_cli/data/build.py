"""Source -> validated, sampled Manifest -> workspace. Shared by every format."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vgpt_cli.data.manifest import Item, Manifest
from vgpt_cli.data.sampling import select, subset
from vgpt_cli.data.source import RECORD_SPLITS, Record, Source, absent_files, gc_paused, safe_join
from vgpt_cli.errors import ConfigError, DataError
from vgpt_cli.files import check_name
from vgpt_cli.text import normalize_caption
from vgpt_cli.workspace import Workspace

_FIRST = 5  # how many offending items an error names


@dataclass
class SamplingOptions:
    fraction: float | None = None
    count: int | None = None
    unit: str = "caption"
    seed: int = 42
    val_size: int | None = None
    test_size: int | None = None
    skip_missing: bool = False

    def check(self) -> None:
        """Every check that needs no data: run before anything is read or written."""
        from vgpt_cli.data.sampling import UNITS, check_fraction

        check_fraction(self.fraction, self.count)
        if self.unit not in UNITS:
            raise ConfigError(f"--unit {self.unit!r}: must be one of {', '.join(UNITS)}")
        for split, size in (("val", self.val_size), ("test", self.test_size)):
            if size is not None and size < 1:
                raise ConfigError(f"--{split}-size {size}: must be at least 1")


def _first(items: list[str]) -> str:
    more = f", ... ({len(items) - _FIRST} more)" if len(items) > _FIRST else ""
    return ", ".join(items[:_FIRST]) + more


def _resolved(source: Source, opts: SamplingOptions, notes: list[str]) -> list[tuple[Record, list[str], list[str]]]:
    """Check ids, captions and image paths; returns (record, absolute image paths, non-empty raw captions)."""
    dupes = [i for i, c in Counter(r.id for r in source.records).items() if c > 1]
    if dupes:
        raise DataError(f"{source.path}: {len(dupes)} duplicate image id(s): {_first(dupes)}; "
                        "each image may appear once (merge their captions)")
    resolved: list[tuple[Record, list[str]]] = []
    for r in source.records:
        if r.split not in RECORD_SPLITS:
            raise DataError(f"{source.path}: {r.where or r.id}: split {r.split!r} is not one of "
                            f"{', '.join(RECORD_SPLITS)}; fix the annotation file")
        if not r.images:
            raise DataError(f"{source.path}: {r.where or r.id}: no image path; fix the annotation file")
        resolved.append((r, [safe_join(source.image_root, p, source.path, r.where or r.id) for p in r.images]))
    gone = absent_files([p for _, paths in resolved for p in paths])
    out: list[tuple[Record, list[str], list[str]]] = []
    empty_captions = 0
    no_caption_records: list[str] = []
    missing: list[str] = []
    missing_records = 0
    for r, paths in resolved:
        # Only white space normalises to "": test that here and normalise only what goes into the
        # manifest (normalising all 616k COCO captions up front costs 2 s).
        kept = [c for c in r.captions if c.strip()]
        empty_captions += len(r.captions) - len(kept)
        if not kept:
            no_caption_records.append(r.id)
            continue
        absent = [p for p in paths if p in gone] if gone else []
        if absent:
            missing.extend(absent)
            missing_records += 1
            if opts.skip_missing:
                continue
        out.append((r, paths, kept))
    if missing and not opts.skip_missing:
        raise DataError(f"{source.image_root}: {len(missing)} image file(s) named in {source.path} are absent "
                        f"(first: {_first(missing)}); fetch them, point --images at the right folder, "
                        "or pass --skip-missing to drop those items")
    if missing:
        notes.append(f"--skip-missing: dropped {missing_records} item(s) whose {len(missing)} image file(s) are absent")
    if empty_captions:
        notes.append(f"dropped {empty_captions} empty caption(s)")
    if no_caption_records:
        notes.append(f"dropped {len(no_caption_records)} item(s) left with no caption: {_first(no_caption_records)}")
    return out


def build_manifest(source: Source, name: str, opts: SamplingOptions) -> Manifest:
    check_name(name, "--name")
    opts.check()
    with gc_paused():
        return _build(source, name, opts)


def _build(source: Source, name: str, opts: SamplingOptions) -> Manifest:
    notes = list(source.notes)
    rows = _resolved(source, opts, notes)
    pool = [row for row in rows if row[0].split in ("train", "restval")]
    if not pool:
        raise DataError(f"{source.path}: no training items (split train or restval) after checks; "
                        "check the split fields of the annotation file")
    sel = select([len(row[2]) for row in pool], opts.fraction, opts.count, opts.unit, opts.seed)
    train: list[Item] = []
    for idx, caps in sel.chosen:
        r, paths, captions = pool[idx]
        extra = dict(r.extra)
        if len(caps) != len(captions):
            extra["caption_index"] = caps  # which of the image's captions were sampled
        train.append(Item(r.id, paths, [normalize_caption(captions[c]) for c in caps], extra))

    def items_of(split: str, size: int | None) -> tuple[list[Item], int]:
        rows_s = [row for row in rows if row[0].split == split]
        if size is not None:
            rows_s = [rows_s[i] for i in subset(len(rows_s), size, opts.seed, split)]
        items = [Item(r.id, paths, [normalize_caption(c) for c in caps], dict(r.extra)) for r, paths, caps in rows_s]
        return items, len(rows_s)

    n_val_full = sum(1 for row in rows if row[0].split == "val")
    n_test_full = sum(1 for row in rows if row[0].split == "test")
    val, _ = items_of("val", opts.val_size)
    test, _ = items_of("test", opts.test_size)
    if opts.val_size is not None:
        notes.append(f"val split: a seeded subset of {len(val)} of its {n_val_full} images (--val-size)")
    if opts.test_size is not None:
        notes.append(f"TEST SPLIT CUT to {len(test)} of its {n_test_full} images by --test-size; "
                     "scores are not comparable with the full test split")
    if not val:
        notes.append("no val split: model selection will have nothing to score")
    if not test:
        notes.append("no test split")

    sampling: dict[str, Any] = {
        **asdict(opts),
        "pool_images": sel.pool_images,
        "pool_captions": sel.pool_captions,
        "selected_images": len(train),
        "selected_captions": sum(len(i.captions) for i in train),
        "val_full_images": n_val_full,
        "test_full_images": n_test_full,
        "test_cut": opts.test_size is not None and len(test) < n_test_full,
        "ids": {"train": [i.id for i in train], "val": [i.id for i in val], "test": [i.id for i in test]},
    }
    src: dict[str, Any] = {"path": str(source.path), "sha256": source.sha256, **source.extra}
    return Manifest(dataset=name, format=source.format, splits={"train": train, "val": val, "test": test},
                    source=src, image_root=str(source.image_root), sampling=sampling, notes=notes)


def write_manifest(ws: Workspace, manifest: Manifest) -> Path:
    """Atomic write, then make it the workspace's current dataset."""
    path = ws.manifest_path(manifest.dataset)
    with gc_paused():
        manifest.save(path)
    ws.set_current(dataset=manifest.dataset)
    return path


def prepare_shapes(ws: Workspace, count: int, seed: int, opts: SamplingOptions, *, name: str = "shapes",
                   root: Path | None = None, on_progress: Callable[[int], None] | None = None,
                   caption_order: str = "random") -> tuple[Manifest, Path]:
    """Render `count` shapes scenes under root (default <workspace>/sources/<name>) and write their
    manifest: what `vgpt prepare shapes` and `vgpt demo` both do.

    Every option is checked before anything is written. The scenes are rendered into a staging
    folder inside root and the manifest is built from there; only when both are complete are the
    images and dataset file swapped in and the manifest written. A refused option or a failure
    leaves the previous images, dataset file and manifest as they were."""
    import shutil
    import tempfile

    from vgpt_cli.data.karpathy import read_karpathy
    from vgpt_cli.data.sampling import split_assignment
    from vgpt_cli.data.shapes import FILE_NAME, write_shapes

    check_name(name, "--name")
    opts.check()
    if count < 10:
        raise ConfigError(f"--count {count}: need at least 10 scenes for an 80/10/10 split")
    splits = split_assignment(count, 0.1, 0.1, seed)  # the split sizes, known before rendering
    for split, size in (("val", opts.val_size), ("test", opts.test_size)):
        have = splits.count(split)
        if size is not None and size > have:
            raise ConfigError(f"--{split}-size {size}: {count} scenes give {have} {split} images; pass "
                              f"{have} or less (or a larger --count)")
    root = (Path(root) if root else ws.root / "sources" / name).resolve()
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    done = False
    try:
        staged = write_shapes(stage, count, seed, on_progress=on_progress, caption_order=caption_order)
        source = read_karpathy(staged, stage, "shapes")
        source.extra = {"scenes": count, "generator_seed": seed, "caption_order": caption_order}
        manifest = build_manifest(source, name, opts)
        _move_paths(manifest, str(stage), str(root))
        manifest.source["path"] = str(root / FILE_NAME)
        # Swap in: the old images aside, the new ones in, the dataset file, then the manifest.
        old = root / f"{stage.name}-old"
        if (root / "images").exists():
            os.rename(root / "images", old)
        os.rename(stage / "images", root / "images")
        os.replace(staged, root / FILE_NAME)
        path = write_manifest(ws, manifest)
        shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not done:
            shutil.rmtree(root, ignore_errors=True)  # we made it; a refusal leaves no trace
    return manifest, path


def _move_paths(manifest: Manifest, old: str, new: str) -> None:
    """Rewrite the manifest's image paths from the staging folder to their final place."""
    def moved(p: str) -> str:
        return new + p[len(old):] if p.startswith(old + os.sep) else p

    for items in manifest.splits.values():
        for item in items:
            item.images = [moved(p) for p in item.images]
    manifest.image_root = new


def summary(manifest: Manifest, path: Path) -> dict[str, Any]:
    """What `vgpt prepare --json` prints."""
    s = manifest.sampling
    return {
        "dataset": manifest.dataset,
        "format": manifest.format,
        "manifest": str(path),
        "source": manifest.source,
        "image_root": manifest.image_root,
        "counts": manifest.counts(),
        "sampling": {k: v for k, v in s.items() if k != "ids"},
        "notes": manifest.notes,
    }
