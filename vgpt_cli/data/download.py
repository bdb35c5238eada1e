"""Resumable, checksummed downloads (urllib + HTTP Range) and safe zip extraction.

The addresses are settings: each can be overridden by an environment variable (tests point them at a
local server; a mirror can be used the same way). What was fetched is recorded with its sha256 in
<root>/downloads.json.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DataError
from vgpt_cli.files import atomic_write_json, read_json

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


NAME_MAX = 255  # bytes in one path component on common file systems
PATH_MAX = 4096


def _check_members(path: Path, root: Path, infos: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, Path]]:
    """Each member's target, resolved and checked, before anything is written: it must lie strictly
    inside root, be no link, not clash with another member (a file 'x' and a file 'x/y'), and have
    a name the file system can hold. A bad archive is refused whole."""
    base = root.resolve()

    def bad(info: zipfile.ZipInfo, why: str) -> DataError:
        return DataError(f"{path}: member {info.filename[:80]!r}{'...' if len(info.filename) > 80 else ''}: "
                         f"{why}; this archive cannot be extracted safely, delete it and fetch it again")

    out: list[tuple[zipfile.ZipInfo, Path]] = []
    files: set[Path] = set()
    dirs: set[Path] = set()
    for info in infos:
        name = info.filename
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise bad(info, "a symbolic link (vgpt extracts files only)")
        if "\0" in name or name.startswith("/") or re.match(r"[A-Za-z]:[\\/]", name):
            raise bad(info, "an absolute path")
        parts = [q for q in name.replace("\\", "/").split("/") if q not in ("", ".")]
        if not parts:
            raise bad(info, "names the extraction folder itself, not a file in it")
        if ".." in parts:
            raise bad(info, f"escapes the extraction folder {base}")
        if any(len(q.encode("utf-8", "surrogateescape")) > NAME_MAX for q in parts):
            raise bad(info, f"a name over {NAME_MAX} bytes, more than the file system holds")
        target = base.joinpath(*parts)
        if len(str(target).encode("utf-8", "surrogateescape")) + 8 > PATH_MAX:
            raise bad(info, f"a path over {PATH_MAX} bytes")
        try:  # a link already on disk must not lead outside either
            real = target.resolve()
        except (OSError, RuntimeError) as e:
            raise bad(info, f"cannot resolve its target ({e})") from None
        if real == base or base not in real.parents:
            raise bad(info, f"escapes the extraction folder {base}")
        parents = set(target.parents)
        if target in files or target in dirs:
            raise bad(info, "appears twice, or is both a file and a folder of the archive")
        if parents & files:
            raise bad(info, f"lies under {next(iter(parents & files)).relative_to(base)}, which the archive "
                            "also has as a file")
        files.add(target)
        dirs |= {d for d in parents if base in d.parents}
        out.append((info, target))
    return out


def extract_zip(path: Path, root: Path, members: tuple[str, ...] | None = None,
                progress: ProgressFactory | None = None) -> list[str]:
    """Extract (some) members of a zip under root. Every member path is resolved and checked first
    (`_check_members`); each file goes to a temporary name, renamed when complete. A damaged member
    (bad CRC) or a target that cannot be written refuses the archive and removes what this call
    wrote; a full disk keeps the finished files (a rerun resumes) and says how much space is needed."""
    path, root = Path(path), Path(root)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a valid zip file ({e}); delete it and rerun to fetch it again") from e
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if members is not None:
            infos = [i for i in infos if i.filename in members]
            absent = set(members) - {i.filename for i in infos}
            if absent:
                raise DataError(f"{path}: has no {', '.join(sorted(absent))}; is this the right archive?")
        checked = _check_members(path, root, infos)
        names: list[str] = []
        written: list[Path] = []
        made: list[Path] = []
        tmp: Path | None = None
        info, target = checked[0] if checked else (None, root)
        try:
            with _bar(progress, f"extracting {path.name}", sum(i.file_size for i in infos), 0) as advance:
                for info, target in checked:
                    for d in reversed([target.parent, *target.parent.parents]):
                        if not d.exists():
                            d.mkdir()
                            made.append(d)
                    tmp = target.with_name(target.name + ".tmp")
                    with zf.open(info) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    os.replace(tmp, target)
                    tmp = None
                    written.append(target)
                    names.append(info.filename)
                    advance(info.file_size)
        except OSError as e:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                need = sum(i.file_size for i, _ in checked[len(written):])
                raise DataError(f"{root}: disk full while extracting {info.filename!r} from {path}: "
                                f"{need:,} more bytes are needed ({len(checked) - len(written)} files left); free space "
                                "and rerun to continue") from None
            _remove(written, made)
            raise DataError(f"{path}: cannot write member {info.filename!r} to {target} ({e.strerror or e}); "
                            "nothing of this archive was kept") from None
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            _remove(written, made)
            raise DataError(f"{path}: member {info.filename!r} is damaged ({e}); nothing of this archive was "
                            "kept, delete it and fetch it again") from None
    return names


def _remove(files: list[Path], folders: list[Path]) -> None:
    for f in files:
        f.unlink(missing_ok=True)
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            d.rmdir()


def _read_records(record_path: Path) -> dict[str, Any]:
    """downloads.json: {archive name: {url, bytes, sha256, extracted}}; anything else is refused."""
    if not record_path.exists():
        return {}
    records = read_json(record_path, "delete it and rerun (finished downloads are checked again)", error=DataError)
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        raise DataError(f"{record_path}: expected an object {{archive: {{url, bytes, sha256, extracted}}}}; "
                        "delete it and rerun")
    return records


def fetch_and_extract(remote: Remote, root: Path, progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Fetch one archive into root, extract it, delete the archive; skipped when already done."""
    root = Path(root)
    record_path = root / "downloads.json"
    records = _read_records(record_path)
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
