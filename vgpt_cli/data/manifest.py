"""The dataset manifest: what `prepare` writes and every later step reads.

One JSON file per dataset (workspace/data/<name>/manifest.json):

    {
      "format_version": 1,
      "dataset": "coco",                       # the name used in the workspace
      "format": "coco",                        # the source format
      "source": {"path": "...", "sha256": "..."},
      "image_root": "/abs/path",
      "sampling": {"fraction": 0.01, "count": null, "unit": "caption", "seed": 42, "pool_captions": ..., ...},
      "notes": ["test split cut to 500 images by --test-size", ...],
      "splits": {
        "train": [{"id": "391895", "images": ["/abs/a.jpg"], "captions": ["a man ..."], "extra": {}}],
        "val":   [...],
        "test":  [...]
      }
    }

An item is one captioned unit: usually one image; a multi-view study (IU X-ray) has several images,
whose features are concatenated along the token axis. Ids are strings, unique within the dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DataError
from vgpt_cli.files import atomic_write_json

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class Item:
    id: str
    images: list[str]
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    dataset: str
    format: str
    splits: dict[str, list[Item]]
    source: dict[str, Any] = field(default_factory=dict)
    image_root: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def items(self, split: str) -> list[Item]:
        if split not in self.splits:
            raise DataError(f"dataset {self.dataset!r} has no split {split!r} (it has: {', '.join(self.splits)})")
        return self.splits[split]

    def all_items(self) -> list[Item]:
        """Every item of every split, each id once (the images that need features)."""
        seen: dict[str, Item] = {}
        for items in self.splits.values():
            for item in items:
                seen.setdefault(item.id, item)
        return list(seen.values())

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {"items": len(items), "images": sum(len(i.images) for i in items),
                    "captions": sum(len(i.captions) for i in items)}
            for split, items in self.splits.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "format": self.format,
            "source": self.source,
            "image_root": self.image_root,
            "sampling": self.sampling,
            "notes": self.notes,
            "counts": self.counts(),
            "splits": {s: [asdict(i) for i in items] for s, items in self.splits.items()},
        }

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Manifest:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no dataset manifest; run `vgpt prepare ...` first")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            splits = {s: [Item(**i) for i in items] for s, items in raw["splits"].items()}
            return cls(
                dataset=raw["dataset"], format=raw["format"], splits=splits, source=raw.get("source", {}),
                image_root=raw.get("image_root"), sampling=raw.get("sampling", {}), notes=raw.get("notes", []),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a valid vgpt manifest ({e}); rerun `vgpt prepare`") from e
