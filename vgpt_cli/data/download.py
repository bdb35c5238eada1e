"""Resumable, checksummed downloads (urllib + HTTP Range) and safe zip extraction.

The addresses are settings: each can be overridden by an environment variable (tests point them at a
local server; a mirror can be used the same way). What was fetched is recorded with its sha256 in
<root>/downloads.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgpt_cli.data.source import safe_join
from vgpt_cli.errors import DataError
from vgpt_cli.workspace import atomic_write_json

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    name: str  # file name under the root
    url: str  # the public address
    env: str  # environment variable that overrides the address
    sha256: str | None = None  # known checksum; None: verified against the server's Content-Length
    members: tuple[str, ...] | None = None  # zip members to extract (None: all)

    def address(self) -> str:
        return os.environ.get(self.env) or self.url


# The published addresses. No sha256 is published for them; we record the one we compute.
KARPATHY_SPLITS = Remote("caption_datasets.zip",
                         "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                         "VGPT_URL_CAPTION_DATASETS")
COCO_TRAIN2014 = Remote("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip", "VGPT_URL_TRAIN2014")
COCO_VAL2014 = Remote("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip", "VGPT_URL_VAL2014")

# A progress factory: progress(unit) -> a rich Progress (context manager) or None.
ProgressFactory = Callable[[str], Any]


@contextlib.contextmanager
def _bar(progress: ProgressFactory | None, description: str, total: int | None,
         done: int) -> Iterator[Callable[[int], None]]:
    if progress is None:
        yield lambda n: None
        return
    with progress("bytes") as bar:
        task = bar.add_task(description, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


def _total_from(resp: http.client.HTTPResponse, offset: int) -> int | None:
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m and m.group(3) != "*":
            return int(m.group(3))
        length = resp.headers.get("Content-Length")
        return offset + int(length) if length else None
    length = resp.headers.get("Content-Length")
    return int(length) if length else None


def fetch(url: str, dest: Path, sha256: str | None = None, progress: ProgressFactory | None = None,
          timeout: float = 60.0) -> dict[str, Any]:
    """Download `url` to `dest`, resuming a partial `dest.part` with a Range request.

    Verifies the size against Content-Length and, when known, the sha256. Returns {url, bytes, sha256}.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    digest = hashlib.sha256()
    if offset:  # hash what we already have, so the final checksum covers the whole file
        with open(part, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (addresses are settings)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the part is complete
            resp = None
        else:
            raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the address (or its environment "
                            f"variable) or fetch the file by hand to {dest}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: cannot download ({reason}); without internet, fetch it elsewhere and put "
                        f"it at {dest}, then rerun") from e
    total = offset
    if resp is not None:
        with resp:
            if resp.status == 200 and offset:  # the server ignored Range: start again
                offset, digest = 0, hashlib.sha256()
            total_expected = _total_from(resp, offset)
            mode = "ab" if offset else "wb"
            done = offset
            try:
                with open(part, mode) as f, _bar(progress, dest.name, total_expected, offset) as advance:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        digest.update(block)
                        done += len(block)
                        advance(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise DataError(f"{url}: download interrupted after {done:,} bytes ({e.__class__.__name__}); "
                                f"rerun the same command to resume from {part}") from e
            total = done
            if total_expected is not None and done != total_expected:
                raise DataError(f"{url}: got {done:,} of {total_expected:,} bytes; rerun the same command to "
                                f"resume from {part}")
    got = digest.hexdigest()
    if sha256 and got != sha256:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: sha256 {got} does not match the expected {sha256}; the partial file was "
                        "deleted, rerun to fetch it again (or check the address)")
    os.replace(part, dest)
    return {"url": url, "bytes": total, "sha256": got}


def extract_zip(path: Path, root: Path, members: tuple[str, ...] | None = None,
                progress: ProgressFactory | None = None) -> list[str]:
    """Extract (some) members of a zip under root, refusing member paths that leave root."""
    path, root = Path(path), Path(root)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a valid zip file ({e}); delete it and rerun to fetch it again") from e
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if members is not None:
            infos = [i for i in infos if i.filename in members]
            absent = set(members) - {i.filename for i in infos}
            if absent:
                raise DataError(f"{path}: has no {', '.join(sorted(absent))}; is this the right archive?")
        names = []
        with _bar(progress, f"extracting {path.name}", sum(i.file_size for i in infos), 0) as advance:
            for info in infos:
                target = Path(safe_join(root, info.filename, path, f"member {info.filename!r}"))
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                os.replace(tmp, target)
                names.append(info.filename)
                advance(info.file_size)
    return names


def fetch_and_extract(remote: Remote, root: Path, progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Fetch one archive into root, extract it, delete the archive; skipped when already done."""
    root = Path(root)
    record_path = root / "downloads.json"
    records = json.loads(record_path.read_text()) if record_path.exists() else {}
    if records.get(remote.name, {}).get("extracted"):
        return records[remote.name]
    archive = root / remote.name
    if archive.exists():  # fetched before, extraction did not finish
        info = records.get(remote.name) or {"url": remote.address(), "bytes": archive.stat().st_size,
                                            "sha256": None}
    else:
        info = fetch(remote.address(), archive, remote.sha256, progress)
    info["members"] = len(extract_zip(archive, root, remote.members, progress))
    info["extracted"] = True
    records[remote.name] = info
    atomic_write_json(record_path, records)
    archive.unlink()  # the images are extracted; the 13 GB zip is not needed again
    return info


def download_coco(root: Path, progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Karpathy's split file and the COCO 2014 train/val images into root (see vgpt_cli.data.coco)."""
    return {r.name: fetch_and_extract(r, root, progress) for r in (KARPATHY_SPLITS, COCO_TRAIN2014, COCO_VAL2014)}
