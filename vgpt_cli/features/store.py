"""The feature store: one folder per backbone fingerprint, append-only, crash-safe, memory-mapped.

    <store>/meta.json            what made these features (written first, atomically)
    <store>/data-r<rank>.f16     raw float16 rows of width `dim`, appended batch by batch
    <store>/index-r<rank>.jsonl  one JSON line per item: {"id", "images", "files", "row", "n", "t"}
                                 or {"id", "images", "skipped": reason, "t"}; "files" holds one
                                 [size, mtime_ns, sha256] per image, what the features were made from
    <store>/skipped.json         the report of skipped items of the last extraction
    <store>/lock-r<rank>         held (flock) by the one writer of that rank

Crash safety: a batch's rows are written and fsynced before its index lines, and the index lines
are fsynced before the next batch, so an index line never points at rows that are not on disk.
Readers ignore a torn last line and rows no line points at; a writer reopening its rank's files
cuts both off before appending, so a rerun keeps nothing half-written. Under torchrun every rank
writes its own pair of files; readers merge all of them (for one id, the newest line wins).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vgpt_cli.errors import DataError
from vgpt_cli.files import atomic_write_json, read_json
from vgpt_cli.workspace import Workspace

META = "meta.json"
REPORT = "skipped.json"
EXTRACT_HINT = "run `vgpt extract-features`"


def data_name(rank: int) -> str:
    return f"data-r{rank}.f16"


def index_name(rank: int) -> str:
    return f"index-r{rank}.jsonl"


def file_record(path: str | Path) -> list:
    """[size, mtime_ns, sha256 of the bytes]: what a stored entry was made from, to tell later
    whether the file on disk is still that one."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return [st.st_size, st.st_mtime_ns, h.hexdigest()]


def _read_index(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of an index file, and the byte length of that valid prefix."""
    entries: list[dict[str, Any]] = []
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn last line: written while the process died
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(entry, dict) or "id" not in entry:
                break
            entries.append(entry)
            good += len(line)
    return entries, good


@dataclass(frozen=True)
class _Entry:
    file: int  # index into FeatureStore._data, -1 for skipped
    row: int
    n: int
    t: int
    images: tuple[str, ...]
    skipped: str | None = None
    files: tuple[tuple, ...] | None = None  # one (size, mtime_ns, sha256) per image; None: not recorded


class FeatureRecord:
    """What a backbone and the store it fills both say about their features, read from their record `meta`."""

    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])


class FeatureStore(FeatureRecord):
    """Read-only view of a store. `get` returns a view into a memory map: no copy, no RAM growth."""

    def __init__(self, path: Path, meta: dict[str, Any], entries: dict[str, _Entry], data: list[np.ndarray]):
        self.path = path
        self.meta = meta
        self._entries = entries
        self._data = data

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise DataError(f"{path}: not a feature store (no {META}); {EXTRACT_HINT} first")
        meta = read_json(meta_path, f"delete the folder and {EXTRACT_HINT}", error=DataError, expect=dict)
        dim = int(meta["dim"])
        entries: dict[str, _Entry] = {}
        data: list[np.ndarray] = []
        for index_path in sorted(path.glob("index-r*.jsonl")):
            rank = index_path.stem.removeprefix("index-r")
            lines, _ = _read_index(index_path)  # read the index BEFORE mapping: its rows are on disk
            data_path = path / data_name(int(rank))
            rows = data_path.stat().st_size // (2 * dim) if data_path.exists() else 0
            file_no = len(data)
            data.append(np.memmap(data_path, dtype=np.float16, mode="r", shape=(rows, dim)) if rows
                        else np.zeros((0, dim), np.float16))
            for e in lines:
                t = int(e.get("t", 0))
                old = entries.get(e["id"])
                if old is not None and old.t > t:
                    continue
                images = tuple(e.get("images", ()))
                if "skipped" in e:
                    entries[e["id"]] = _Entry(-1, 0, 0, t, images, str(e["skipped"]))
                elif e["row"] + e["n"] <= rows:
                    files = e.get("files")
                    files = tuple(tuple(f) for f in files) if isinstance(files, list) else None
                    entries[e["id"]] = _Entry(file_no, int(e["row"]), int(e["n"]), t, images, None, files)
        return cls(path, meta, entries, data)

    # --- lookups ------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        e = self._entries.get(key)  # type: ignore[arg-type]
        return e is not None and e.skipped is None

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.skipped is None)

    def keys(self) -> list[str]:
        return [k for k, e in self._entries.items() if e.skipped is None]

    def _entry(self, key: str) -> _Entry:
        e = self._entries.get(key)
        if e is None or e.skipped is not None:
            self.require([key])
        assert e is not None
        return e

    def get(self, key: str) -> np.ndarray:
        """(N, C) float16, a read-only view into the memory-mapped shard."""
        e = self._entry(key)
        return self._data[e.file][e.row:e.row + e.n]

    def length(self, key: str) -> int:
        return self._entry(key).n

    def images(self, key: str) -> tuple[str, ...]:
        """The image paths the entry for `key` was made from (skipped entries included)."""
        e = self._entries.get(key)
        if e is None:
            self.require([key])
        assert e is not None
        return e.images

    def current(self, key: str, images: Sequence[str]) -> bool:
        """Whether the stored features of `key` were made from exactly these image files as they
        are on disk now. Same paths, then per file: same size and mtime (no read), or, when either
        changed, the same sha256 of the bytes. Entries without a file record (stores written before
        content checks) are not current."""
        e = self._entries.get(key)
        if e is None or e.skipped is not None or e.images != tuple(images) or e.files is None:
            return False
        if len(e.files) != len(e.images):
            return False
        for path, rec in zip(e.images, e.files):
            try:
                st = os.stat(path)
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) == (rec[0], rec[1]):
                continue
            if st.st_size != rec[0]:
                return False
            try:
                if file_record(path)[2] != rec[2]:
                    return False
            except OSError:
                return False
        return True

    def skipped(self) -> dict[str, str]:
        return {k: e.skipped for k, e in self._entries.items() if e.skipped is not None}

    def batch(self, keys: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, N_max, C) float16 zero-padded features and (B,) int64 lengths, for a training batch."""
        arrays = [self.get(k) for k in keys]
        lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
        n = max(int(lengths.max(initial=0)), pad_to or 0)
        out = np.zeros((len(keys), n, self.dim), dtype=np.float16)
        for i, a in enumerate(arrays):
            out[i, :a.shape[0]] = a
        return out, lengths

    def require(self, keys: Iterable[str]) -> None:
        """Raise DataError naming the first ids with no features (and why) and the fix."""
        keys = list(keys)
        missing = [k for k in keys if k not in self]
        if not missing:
            return
        skipped = self.skipped()
        shown = []
        for k in missing[:3]:
            if k in skipped:
                img = ", ".join(self._entries[k].images) or "?"
                shown.append(f"{k!r} (skipped: {img}: {skipped[k]})")
            else:
                shown.append(f"{k!r} (not extracted)")
        if any(k in skipped for k in missing):
            fix = (f"fix or remove those images (list: {self.path / REPORT}) and {EXTRACT_HINT}, "
                   "or drop the items from the dataset")
        else:
            fix = f"{EXTRACT_HINT} for the current dataset"
        raise DataError(f"{self.path}: {len(missing)} of {len(keys)} items have no features, e.g. "
                        f"{'; '.join(shown)}; {fix}")


def open_workspace_store(ws: Workspace) -> FeatureStore:
    """The workspace's current feature store, or an error that says to run extract-features."""
    fp = ws.current("features", "feature store", "vgpt extract-features")
    return FeatureStore.open(ws.features_root / fp)


class StoreWriter:
    """Appends one rank's entries. One writer per (store, rank), enforced with a file lock."""

    def __init__(self, path: str | Path, meta: dict[str, Any], rank: int = 0):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dim = int(meta["dim"])
        self.rank = rank
        meta_path = self.path / META
        if meta_path.is_file():
            old = read_json(meta_path, f"delete the folder and {EXTRACT_HINT}", error=DataError, expect=dict)
            if old.get("fingerprint") != meta["fingerprint"] or int(old.get("dim", -1)) != self.dim:
                raise DataError(f"{meta_path}: this store holds {old.get('fingerprint')} features, not "
                                f"{meta['fingerprint']}; delete the folder or choose another one")
        else:
            atomic_write_json(meta_path, {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

        self._lock = open(self.path / f"lock-r{rank}", "a+b")  # noqa: SIM115 - held for the writer's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataError(f"{self.path}: another extraction is writing to this store (rank {rank}); wait for "
                            "it to finish, or stop it and rerun") from None

        # Cut off what a killed run left half-written: a torn index line, rows no line points at.
        index_path, data_path = self.path / index_name(rank), self.path / data_name(rank)
        index_path.touch()
        lines, good = _read_index(index_path)
        rows = max((e["row"] + e["n"] for e in lines if "row" in e), default=0)
        data_path.touch()
        size = data_path.stat().st_size
        if size < rows * 2 * self.dim:
            raise DataError(f"{data_path}: shorter than its index says (file damaged); delete {self.path} "
                            f"and {EXTRACT_HINT} again")
        os.truncate(index_path, good)
        os.truncate(data_path, rows * 2 * self.dim)
        self._rows = rows
        self._data = open(data_path, "ab")  # noqa: SIM115
        self._index = open(index_path, "ab")  # noqa: SIM115

    def append(self, features: Sequence[tuple],
               skipped: Sequence[tuple[str, Sequence[str], str]] = ()) -> None:
        try:
            self._append(features, skipped)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            need = sum(np.asarray(f[2]).shape[0] * 2 * self.dim for f in features)
            # What reached the disk before is consistent: the next writer cuts rows no line points at.
            raise DataError(f"{self.path / data_name(self.rank)}: disk full while writing the features of "
                            f"{len(features)} items ({need:,} bytes for this batch alone); free space and rerun "
                            "the same command to continue") from None

    def _append(self, features: Sequence[tuple],
                skipped: Sequence[tuple[str, Sequence[str], str]] = ()) -> None:
        """Write a batch: rows first (fsynced), then their index lines (fsynced).

        `features`: (id, images, (N, dim) array) or (id, images, array, file records), the records
        as `file_record` makes them for each image, taken before the image was decoded."""
        lines = []
        now = time.time_ns()
        for key, images, arr, *rest in features:
            arr = np.ascontiguousarray(arr, dtype=np.float16)
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"features for {key!r} have shape {arr.shape}, the store wants (N, {self.dim})")
            self._data.write(arr.tobytes())
            line = {"id": key, "images": list(images), "row": self._rows, "n": int(arr.shape[0]), "t": now}
            if rest and rest[0] is not None:
                line["files"] = [list(f) for f in rest[0]]
            lines.append(line)
            self._rows += arr.shape[0]
        if features:
            self._data.flush()
            os.fdatasync(self._data.fileno())
        for key, images, reason in skipped:
            lines.append({"id": key, "images": list(images), "skipped": reason, "t": now})
        if lines:
            self._index.write(b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\n" for x in lines))
            self._index.flush()
            os.fdatasync(self._index.fileno())

    def close(self) -> None:
        for f in (self._data, self._index, self._lock):
            if not f.closed:
                f.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
