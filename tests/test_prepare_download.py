"""`vgpt prepare coco --download` against a local HTTP server (127.0.0.1) serving small stand-in archives."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import write_coco
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.download import extract_zip, fetch
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.errors import DataError

runner = CliRunner()


class Server:
    """Serves `files` with Range support; `cut[name] = n` sends only n bytes once, then closes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if name in server.cut:
                    body = body[: server.cut.pop(name)]
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


def zip_of(folder: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted((folder / prefix).rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


@pytest.fixture()
def coco_archives(tmp_path, server, monkeypatch):
    """caption_datasets.zip, train2014.zip and val2014.zip in their public layouts, served locally."""
    src = tmp_path / "src"
    write_coco(src)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(src / "dataset_coco.json", "dataset_coco.json")
        zf.writestr("dataset_flickr8k.json", '{"images": [], "dataset": "flickr8k"}')
    server.files = {"caption_datasets.zip": buf.getvalue(), "train2014.zip": zip_of(src, "train2014"),
                    "val2014.zip": zip_of(src, "val2014")}
    for name, env in (("caption_datasets.zip", "VGPT_URL_CAPTION_DATASETS"), ("train2014.zip", "VGPT_URL_TRAIN2014"),
                      ("val2014.zip", "VGPT_URL_VAL2014")):
        monkeypatch.setenv(env, f"{server.url}/{name}")
    return server


def test_download_then_prepare_and_skip_when_done(coco_archives, tmp_path):
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["-w", str(ws), "prepare", "coco", "--download", "--fraction", "0.1"])
    assert result.exit_code == 0, result.output
    root = ws / "sources" / "coco"
    assert (root / "dataset_coco.json").is_file() and len(list((root / "train2014").iterdir())) == 30
    m = Manifest.load(ws / "data" / "coco" / "manifest.json")
    assert m.counts()["train"]["captions"] == 25 and len(m.splits["test"]) == 6
    record = json.loads((root / "downloads.json").read_text())
    for name, data in coco_archives.files.items():
        assert record[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert record[name]["bytes"] == len(data) and record[name]["extracted"]
        assert not (root / name).exists()  # archive removed after extraction
    n = len(coco_archives.requests)
    result = runner.invoke(app, ["-w", str(ws), "prepare", "coco", "--download"])
    assert result.exit_code == 0, result.output
    assert len(coco_archives.requests) == n  # nothing fetched again


def test_interrupted_download_resumes_with_a_range_request(coco_archives, tmp_path):
    data = coco_archives.files["train2014.zip"]
    coco_archives.cut["train2014.zip"] = len(data) // 3
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["-w", str(ws), "prepare", "coco", "--download"])
    assert result.exit_code == 2, result.output
    assert "interrupted" in result.output or "rerun the same command to resume" in result.output
    part = ws / "sources" / "coco" / "train2014.zip.part"
    assert part.stat().st_size == len(data) // 3
    assert not (ws / "data").exists()
    result = runner.invoke(app, ["-w", str(ws), "prepare", "coco", "--download"])
    assert result.exit_code == 0, result.output
    assert ("train2014.zip", f"bytes={len(data) // 3}-") in coco_archives.requests
    record = json.loads((ws / "sources" / "coco" / "downloads.json").read_text())
    assert record["train2014.zip"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_fetch_checks_the_sha256_and_the_length(server, tmp_path):
    server.files["f.bin"] = b"0123456789" * 100
    with pytest.raises(DataError, match="does not match the expected"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()
    info = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(server.files["f.bin"]).hexdigest())
    assert info["bytes"] == 1000 and (tmp_path / "f.bin").read_bytes() == server.files["f.bin"]
    with pytest.raises(DataError, match="HTTP 404"):
        fetch(f"{server.url}/nope.zip", tmp_path / "nope.zip")


def test_unreachable_address_says_where_to_put_the_file(tmp_path):
    with pytest.raises(DataError, match="cannot download .* put it at"):
        fetch("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", timeout=2)


def test_zip_members_escaping_the_root_are_refused(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DataError, match="escapes"):
        extract_zip(path, tmp_path / "root")
    assert not (tmp_path / "escape.txt").exists()
