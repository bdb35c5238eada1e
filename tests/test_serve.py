"""`vgpt serve`: every endpoint and every bad upload through FastAPI's TestClient, disconnects and
batching through a real uvicorn server, and the page in a real headless Chromium.

The model is tiny_photo_model: a tiny captioner trained on four real photographs, so that its
answers are known ("a cat sitting on a wooden floor" for chelsea.jpg) and compared with the Python
API's answers for the same files (an independent path: the file is opened from disk there).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import CHELSEA, PHOTO_CAPTIONS, tiny_photo_model
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vgpt_cli.api import load_captioner  # noqa: E402
from vgpt_cli.cli import app as cli_app  # noqa: E402
from vgpt_cli.serve.app import ServeSettings, create_app  # noqa: E402
from vgpt_cli.serve.batcher import Batcher  # noqa: E402
from vgpt_cli.workspace import Workspace  # noqa: E402

skimage = pytest.importorskip("skimage")
ASTRONAUT = Path(skimage.__file__).parent / "data" / "astronaut.png"
DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_photo_model(tmp_path_factory.mktemp("serve") / "best")


@pytest.fixture(scope="module")
def captioner(model_dir):
    return load_captioner(model_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(captioner):
    """What the Python API says about the two photographs, opened from disk."""
    return {r.source: r for r in captioner.caption([str(CHELSEA), str(ASTRONAUT)], gates=True, beams=True)}


@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner, ServeSettings(max_files=3, max_upload_bytes=2_000_000))) as c:
        yield c


def jpeg(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png" if path.suffix == ".png" else "image/jpeg")


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, and a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_good(client) -> dict:
    """The next good request is answered, with the known caption."""
    r = client.post("/v1/captions", files=[("images", jpeg(CHELSEA))])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["caption"] == PHOTO_CAPTIONS["chelsea"]
    return r.json()


# --- the endpoints ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_photo_gets_caption_beams_and_gates_equal_to_the_python_api(client, reference):
    r = client.post("/v1/captions", files=[("images", jpeg(CHELSEA))])
    assert r.status_code == 200, r.text
    (got,) = r.json()["results"]
    ref = reference[str(CHELSEA)]
    assert got["filename"] == "chelsea.jpg"
    assert got["caption"] == ref.caption == PHOTO_CAPTIONS["chelsea"]
    assert got["score"] == pytest.approx(ref.score, abs=1e-3)
    assert [b["caption"] for b in got["beams"]] == [b["caption"] for b in ref.beams]
    scores = [b["score"] for b in got["beams"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and scores[0] == got["score"]
    assert [t["token"] for t in got["tokens"]] == [t["token"] for t in ref.tokens] == \
        "a cat sitting on a wooden floor <eos>".split()
    assert got["cut"] is False  # it ended within the token limit
    for t, rt in zip(got["tokens"], ref.tokens):
        assert t["visual"] == pytest.approx(rt["visual"], abs=1e-3)
        assert 0 <= t["visual"] <= 1 and 0 <= t["linguistic"] <= 1
        assert "attention" not in t
    assert "grid" not in got


def test_attention_maps_one_per_token_over_the_image_grid(client, captioner):
    r = client.post("/v1/captions?attention=true", files=[("images", jpeg(CHELSEA))])
    assert r.status_code == 200, r.text
    (got,) = r.json()["results"]
    assert got["grid"] == [7, 7]  # 224 px through a stride-32 backbone
    maps = torch.tensor([t["attention"] for t in got["tokens"]])
    assert maps.shape == (len(got["tokens"]), 7, 7)
    # softmax weights averaged over heads, levels and layers: a distribution over the 49 tokens
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(len(maps)), atol=1e-3, rtol=0)
    assert (maps > 0).all()
    assert not torch.allclose(maps[1], maps[2], atol=1e-4)  # "cat" and "sitting" look differently
    # the same maps as the Python API computes from the file on disk
    ref = captioner.caption([str(CHELSEA)], attention=True)[0].attention
    torch.testing.assert_close(maps, ref.float(), atol=2e-5, rtol=0)


def test_several_images_in_one_request_keep_their_order(client, reference):
    r = client.post("/v1/captions", files=[("images", jpeg(ASTRONAUT)), ("images", jpeg(CHELSEA))])
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["astronaut.png", "chelsea.jpg"]
    assert [x["caption"] for x in res] == [reference[str(ASTRONAUT)].caption, reference[str(CHELSEA)].caption]
    assert res[0]["caption"] == PHOTO_CAPTIONS["astronaut"]


def test_a_batch_gets_the_same_pixels_features_and_captions_as_one_image_at_a_time(captioner, monkeypatch):
    """What the server's model thread does with a batch (backbone forwards over a few of its images at a
    time, or all at once, then one search) answers each image as captioning it alone does; the pixels made from the upload's bytes in
    the request's thread are those `caption()` makes from the file on disk."""
    import numpy as np
    import skimage.data

    from vgpt_cli.features import open_rgb
    from vgpt_cli.features.backbone import CPU_FORWARD_IMAGES
    from vgpt_cli.serve.app import decode_uploads
    from vgpt_cli.serve.uploads import Upload

    def png(a) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    names = list(PHOTO_CAPTIONS)
    uploads = [Upload("chelsea.jpg", "image/jpeg", CHELSEA.read_bytes())] + [
        Upload(f"{k}.png", "image/png", png(getattr(skimage.data, k)())) for k in names[1:]]
    bb = captioner.backbone
    pixels = decode_uploads(uploads, 10**8, bb.pixels)
    assert torch.equal(pixels[0], bb.pixels(open_rgb(CHELSEA)))

    forwards: list[int] = []
    real_forward = bb.forward_tokens
    monkeypatch.setattr(bb, "forward_tokens", lambda x: forwards.append(len(x)) or real_forward(x))
    batched = bb.features_for_pixels(pixels, batch_size=len(pixels))
    assert forwards == [CPU_FORWARD_IMAGES] * (len(pixels) // CPU_FORWARD_IMAGES)  # a few images per forward
    whole = real_forward(torch.stack(pixels))  # all four in one forward
    alone = [bb.features_for_pixels([p], batch_size=1)[0] for p in pixels]
    for a, w, b in zip(batched, whole, alone):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(w.float().numpy(), b.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not np.allclose(alone[0].astype(np.float32), alone[1].astype(np.float32), atol=1e-2)  # they differ

    forwards.clear()
    together = captioner.caption_pixels(pixels, gates=True, beams=True)
    assert sum(forwards) == len(pixels)
    one_by_one = [captioner.caption_pixels([p], gates=True, beams=True)[0] for p in pixels]
    assert [r.caption for r in together] == [r.caption for r in one_by_one]
    assert together[0].caption == PHOTO_CAPTIONS["chelsea"]
    for t, o in zip(together, one_by_one):
        assert [b["caption"] for b in t.beams] == [b["caption"] for b in o.beams]
        assert [x["token"] for x in t.tokens] == [x["token"] for x in o.tokens]
        assert t.score == pytest.approx(o.score, abs=1e-3)
        assert [x["visual"] for x in t.tokens] == pytest.approx([x["visual"] for x in o.tokens], abs=2e-3)
    # what the server runs: the backbone in pieces while a batch forms (prepare), then one search
    pieces = bb.features_for_pixels(pixels[:1]) + bb.features_for_pixels(pixels[1:])
    served = captioner.caption_features(pieces, gates=True, beams=True)
    for t, o in zip(served, one_by_one):
        assert t.caption == o.caption and [b["caption"] for b in t.beams] == [b["caption"] for b in o.beams]
        assert [x["token"] for x in t.tokens] == [x["token"] for x in o.tokens]
        assert t.score == pytest.approx(o.score, abs=1e-3)


def test_model_health_page_and_openapi(client, captioner, model_dir):
    m = client.get("/v1/model").json()
    assert m["model_dir"] == str(model_dir.resolve())
    assert m["config"]["d_in"] == captioner.model.config.d_in and m["config"]["gating"] == "srau"
    assert m["backbone"]["name"] == "test_efficientnet" and m["backbone"]["input_size"] == [3, 224, 224]
    assert m["decoding"]["beam_size"] == captioner.options.beam_size == 5
    assert m["limits"]["max_files"] == 3 and m["batching"]["max_batch"] == 16
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["queued"] == 0
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # self-contained: no script, style or image from anywhere else (works offline)
    assert "<script src" not in page.text and "http://" not in page.text and "https://" not in page.text
    spec = client.get("/openapi.json").json()
    assert "/v1/captions" in spec["paths"] and "/v1/model" in spec["paths"] and "/health" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


# --- bad input: each a 4xx naming the problem, and the next good request answered -----------------------
BAD_UPLOADS = {
    "not an image": ([("images", ("notes.jpg", b"these are not pixels\n" * 20, "image/jpeg"))], 422,
                     "notes.jpg: not an image"),
    "truncated": ([("images", ("cut.jpg", CHELSEA.read_bytes()[:4000], "image/jpeg"))], 422, "cut.jpg: cannot decode"),
    "zero bytes": ([("images", ("empty.png", b"", "image/png"))], 422, "empty.png: empty file (0 bytes)"),
    "decompression bomb": ([("images", ("bomb.png", png_header_only(40_000, 40_000), "image/png"))], 422,
                           "decompression bomb"),
    "wrong part type": ([("images", ("notes.txt", b"hello", "text/plain"))], 415, "text/plain is not an image"),
    "too many files": ([("images", jpeg(CHELSEA))] * 4, 413, "more than 3 files"),
    "missing field": ([("photo", jpeg(CHELSEA))], 400, "unexpected form field 'photo'"),
    "text, not a file": ({"images": (None, b"chelsea.jpg")}, 400, "holds text, not a file"),
    "bad image among good": ([("images", jpeg(CHELSEA)), ("images", ("b.jpg", b"xx", "image/jpeg"))], 422,
                             "b.jpg (file 2 of 2): not an image"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_4xx_naming_the_problem_and_the_server_goes_on(client, case):
    files, status, message = BAD_UPLOADS[case]
    r = client.post("/v1/captions", files=files)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["detail"]
    assert_good(client)


def test_wrong_request_content_types_and_empty_multipart(client):
    r = client.post("/v1/captions", content=b'{"image": "chelsea.jpg"}', headers={"content-type": "application/json"})
    assert r.status_code == 415 and "send multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/captions", content=CHELSEA.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 415 and "content type image/jpeg" in r.json()["detail"]
    r = client.post("/v1/captions")
    assert r.status_code == 415 and "content type none" in r.json()["detail"]
    r = client.post("/v1/captions", content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "no 'images' field" in r.json()["detail"]
    cut = (b'--b\r\nContent-Disposition: form-data; name="images"; filename="x.jpg"\r\n\r\n'
           + CHELSEA.read_bytes()[:3000])
    r = client.post("/v1/captions", content=cut, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "the body ends inside x.jpg" in r.json()["detail"]
    r = client.post("/v1/captions", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "without a boundary" in r.json()["detail"]
    assert_good(client)


def test_body_over_the_size_limit_is_413_declared_or_streamed(client):
    big = [("images", ("big.jpg", b"\xff" * 2_100_000, "image/jpeg"))]
    r = client.post("/v1/captions", files=big)
    assert r.status_code == 413 and "over the limit of 2 MB" in r.json()["detail"] and "--max-upload-mb" in \
        r.json()["detail"]
    # chunked (no Content-Length): counted while it streams in
    body = b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.jpg\"\r\n\r\n" + b"\0" * 2_100_000

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = client.post("/v1/captions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert_good(client)


def test_no_upload_touches_the_disk_and_no_request_path_is_opened(client, monkeypatch):
    import builtins
    import os

    writes = []
    real_os_open, real_open = os.open, builtins.open
    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def os_open(path, flag, *a, **k):
        if flag & flags:  # tempfile.TemporaryFile / SpooledTemporaryFile's rollover come through here
            writes.append(str(path))
        return real_os_open(path, flag, *a, **k)

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    # a 1.9 MB image: over the 1 MB at which Starlette's own form parser spools a part to a temporary file
    big = io.BytesIO()
    Image.open(CHELSEA).resize((900, 700)).save(big, "BMP")
    assert len(big.getvalue()) > 1_048_576
    r = client.post("/v1/captions", files=[("images", ("big.bmp", big.getvalue(), "image/bmp"))])
    assert r.status_code == 200, r.text
    r = client.post("/v1/captions", files=[("images", ("cut.bmp", big.getvalue()[:1_500_000], "image/bmp"))])
    assert r.status_code == 422
    # a filename that is the path of a real photo, over bytes that are not an image: never opened
    r = client.post("/v1/captions", files=[("images", (str(CHELSEA), b"not an image", "image/jpeg"))])
    assert r.status_code == 422 and "not an image" in r.json()["detail"]
    monkeypatch.undo()
    assert writes == []


def test_a_model_error_is_500_with_a_message_and_the_server_stays_up(client, captioner, monkeypatch):
    real = captioner.backbone.forward_tokens
    calls = []

    def broken(x):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(captioner.backbone, "forward_tokens", broken)
    r = client.post("/v1/captions", files=[("images", jpeg(CHELSEA))])
    assert r.status_code == 500
    assert "the model failed on this batch (RuntimeError: CUDA out of memory (simulated))" in r.json()["detail"]
    assert_good(client)
    assert client.get("/health").json()["failed_batches"] >= 1


# --- API key -------------------------------------------------------------------------------------------
def test_api_key_guards_every_endpoint_but_health_in_constant_time(captioner, monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with TestClient(create_app(captioner, ServeSettings(api_key="s3cret-key"))) as c:
        assert c.get("/health").status_code == 200
        for method, path in (("get", "/v1/model"), ("get", "/"), ("get", "/openapi.json"), ("get", "/docs"),
                             ("post", "/v1/captions")):
            r = getattr(c, method)(path)
            assert r.status_code == 401 and "Authorization: Bearer KEY" in r.json()["detail"], path
            assert r.headers["www-authenticate"] == "Bearer"
            r = getattr(c, method)(path, headers={"Authorization": "Bearer s3cret-kez"})
            assert r.status_code == 401 and "wrong API key" in r.json()["detail"], path
            r = getattr(c, method)(path, headers={"Authorization": "Basic s3cret-key"})
            assert r.status_code == 401, path
        good = {"Authorization": "Bearer s3cret-key"}
        assert c.get("/v1/model", headers=good).status_code == 200
        assert c.get("/", headers=good).status_code == 200
        r = c.post("/v1/captions", headers=good, files=[("images", jpeg(CHELSEA))])
        assert r.status_code == 200 and r.json()["results"][0]["caption"] == PHOTO_CAPTIONS["chelsea"]
    assert compared  # the key was checked with hmac.compare_digest


def test_cli_serves_the_workspace_best_model_on_localhost_with_the_env_key(model_dir, tmp_path, monkeypatch):
    import uvicorn

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(model_dir, ws.run_dir("r1") / "best")
    ws.set_current(run="r1")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **k: started.update(app=app, host=host, port=port))
    r = CliRunner().invoke(cli_app, ["-w", str(ws.root), "serve", "--device", "cpu", "--max-batch", "4"],
                           env={"VGPT_API_KEY": "k1"})
    assert r.exit_code == 0, r.output
    assert started["host"] == "127.0.0.1" and started["port"] == 8000
    with TestClient(started["app"]) as c:
        assert c.get("/v1/model").status_code == 401
        m = c.get("/v1/model", headers={"Authorization": "Bearer k1"}).json()
        assert m["model_dir"] == str((ws.run_dir("r1") / "best").resolve()) and m["batching"]["max_batch"] == 4
    # no run yet: one line naming the fix, exit 2
    r = CliRunner().invoke(cli_app, ["-w", str(tmp_path / "empty"), "serve"])
    assert r.exit_code == 2 and "vgpt train" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli_app, ["-w", str(ws.root), "serve", "--api-key", " "])
    assert r.exit_code == 2 and "--api-key" in r.output


def test_missing_serve_extra_is_one_line_with_the_install_command_intact(monkeypatch):
    # The error line went through rich markup unescaped: "vgpt[serve]" printed as "vgpt" (fixed in
    # commands/common.py: messages are escaped); this fails on the old friendly_errors.
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    r = CliRunner().invoke(cli_app, ["serve", "--model", "nowhere"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "pip install 'vgpt[serve]'" in r.output and "uvicorn is missing" in r.output


# --- batching and disconnects --------------------------------------------------------------------------
def test_requests_that_arrive_while_the_model_works_are_batched_together(captioner, reference, monkeypatch):
    entered, gate = threading.Event(), threading.Event()
    real = captioner.caption_features

    def held(*a, **k):
        entered.set()
        gate.wait(60)  # the first batch holds the model while three more requests arrive
        return real(*a, **k)

    monkeypatch.setattr(captioner, "caption_features", held)
    app = create_app(captioner, ServeSettings(max_batch=8, max_wait_ms=0))
    photos = [CHELSEA, ASTRONAUT, CHELSEA, ASTRONAUT]
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        post = lambda p: c.post("/v1/captions", files=[("images", jpeg(p))])  # noqa: E731
        first = pool.submit(post, photos[0])
        assert entered.wait(60), "the first request never reached the model"
        rest = [pool.submit(post, p) for p in photos[1:]]
        wait_until(lambda: app.state.batcher.queued == 3, "three requests to queue behind the first")
        gate.set()
        answers = [first.result()] + [f.result() for f in rest]
        assert all(a.status_code == 200 for a in answers)
        assert [a.json()["results"][0]["caption"] for a in answers] == [reference[str(p)].caption for p in photos]
        h = c.get("/health").json()
        assert h["images"] == 4 and h["batches"] == 2 and h["largest_batch"] == 3


@contextlib.asynccontextmanager
async def running(batcher: Batcher):
    """The batcher started, and stopped on the way out (also when the scenario fails)."""
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


def test_batcher_waits_only_for_images_announced_as_coming():
    seen: list[list[int]] = []

    async def scenario():
        b = Batcher(lambda items, options: seen.append(list(items)) or list(items), max_batch=4, max_wait_ms=60_000)
        async with running(b):
            # nothing announced: a lone job runs at once, not after the 60 s wait
            assert await asyncio.wait_for(b.submit([1], {})[0], 30) == 1
            # one more announced: the batch waits for it (and no longer than it must)
            b.announce(1)
            (f2,) = b.submit([2], {})
            await asyncio.sleep(0.2)
            assert not f2.done()
            b.retract(1)
            (f3,) = b.submit([3], {})
            assert await asyncio.wait_for(asyncio.gather(f2, f3), 30) == [2, 3]

    asyncio.run(scenario())
    assert seen == [[1], [2, 3]]


def test_a_batch_smaller_than_the_last_waits_for_the_clients_just_answered():
    # Under load the clients of a batch send their next images as soon as they are answered, but not
    # before the next batch forms: a batch that would start smaller than the last one waits for them
    # (at most max_wait) instead of running the one image already queued alone (16 clients were
    # served in batches of 15, 1, 15, 1, ...).
    seen: list[list[int]] = []

    async def scenario():
        b = Batcher(lambda items, options: seen.append(list(items)) or list(items), max_batch=4, max_wait_ms=60_000)
        async with running(b):
            assert await asyncio.wait_for(asyncio.gather(*b.submit([1, 2, 3], {})), 30) == [1, 2, 3]
            (f4,) = b.submit([4], {})  # one of the three answered clients is back; nothing announced
            await asyncio.sleep(0.2)
            assert not f4.done()  # its batch waits for the other two
            later = b.submit([5, 6], {})
            assert await asyncio.wait_for(asyncio.gather(f4, *later), 30) == [4, 5, 6]
            b.max_wait = 0.05  # and never longer than max_wait: the others did not come back
            assert await asyncio.wait_for(b.submit([7], {})[0], 30) == 7

    asyncio.run(scenario())
    assert seen == [[1, 2, 3], [4, 5, 6], [7]]


def test_prepare_runs_while_the_batch_forms_and_latecomers_join_it():
    # The model thread would sit idle while a batch waits for its images: prepare (the backbone) runs on
    # the images already there, and images that arrive while it runs join the batch, even past
    # max_wait (the model is busy with this batch anyway); run_batch gets the prepared items in order.
    prepared: list[list[int]] = []
    seen: list[list[int]] = []
    started, gate = threading.Event(), threading.Event()

    def prepare(items):
        prepared.append(list(items))
        started.set()
        gate.wait(30)
        return [i * 10 for i in items]

    async def scenario():
        b = Batcher(lambda items, options: seen.append(list(items)) or list(items), max_batch=4, max_wait_ms=0, prepare=prepare)
        async with running(b):
            try:
                (f1,) = b.submit([1], {})
                while not started.is_set():  # prepare([1]) runs in the model thread
                    await asyncio.sleep(0.01)
                later = b.submit([2, 3], {})  # past max_wait (0), while prepare runs
                await asyncio.sleep(0.1)
                gate.set()
                assert await asyncio.wait_for(asyncio.gather(f1, *later), 30) == [10, 20, 30]
            finally:
                gate.set()

    asyncio.run(scenario())
    assert prepared == [[1], [2, 3]] and seen == [[10, 20, 30]]


def test_a_failing_prepare_fails_its_batch_only():
    def prepare(items):
        if 0 in items:
            raise RuntimeError("bad image")
        return items

    async def scenario():
        b = Batcher(lambda items, options: [i + 1 for i in items], max_batch=4, max_wait_ms=0, prepare=prepare)
        async with running(b):
            bad = b.submit([0, 5], {})
            with pytest.raises(RuntimeError, match="bad image"):
                await asyncio.wait_for(asyncio.gather(*bad), 30)
            assert await asyncio.wait_for(b.submit([7], {})[0], 30) == 8  # the worker goes on
            return b.stats

    stats = asyncio.run(scenario())
    assert stats.failed_batches == 1 and stats.batches == 1


def test_batcher_skips_withdrawn_jobs_and_caps_the_batch():
    seen: list[list[int]] = []
    gate = threading.Event()

    def run(items, options):
        gate.wait(30)
        seen.append(list(items))
        return [i * 10 for i in items]

    async def scenario():
        b = Batcher(run, max_batch=2, max_wait_ms=0)
        async with running(b):
            (first,) = b.submit([1], {})
            await asyncio.sleep(0.05)  # the worker takes job 1 and blocks in the model
            later = b.submit([2, 3, 4], {})
            b.withdraw(later[:1])  # job 2's client went away
            gate.set()
            assert await first == 10
            assert await asyncio.gather(*later[1:]) == [30, 40]
            return b.stats

    stats = asyncio.run(scenario())
    assert seen == [[1], [3, 4]]
    assert stats.withdrawn == 1 and stats.dropped == 1 and stats.images == 3 and stats.largest_batch == 2


class Server:
    """A real uvicorn server on a free local port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_until(predicate, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s  # a bound against hanging, not a speed requirement
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_client_that_disconnects_leaves_no_work_in_the_queue(captioner, monkeypatch):
    entered, gate = threading.Event(), threading.Event()
    real = captioner.caption_features

    def slow(*a, **k):
        entered.set()
        gate.wait(60)  # the first batch holds the model until the second client has gone
        return real(*a, **k)

    monkeypatch.setattr(captioner, "caption_features", slow)
    app = create_app(captioner, ServeSettings(max_wait_ms=0))
    with Server(app) as srv:
        health = lambda: httpx.get(f"{srv.url}/health").json()  # noqa: E731
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{srv.url}/v1/captions", files=[("images", jpeg(CHELSEA))], timeout=120)
            assert entered.wait(60), "the first request never reached the model"
            # the second client sends a whole request, then hangs up before its answer
            req = httpx.Request("POST", f"{srv.url}/v1/captions", files=[("images", jpeg(ASTRONAUT))])
            raw = (f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {req.headers['content-type']}\r\n"
                   f"Content-Length: {len(req.read())}\r\n\r\n").encode() + req.read()
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(raw)
                wait_until(lambda: health()["queued"] == 1, "the second request to be queued")
            wait_until(lambda: health()["withdrawn"] == 1, "the server to notice the hang-up")
            gate.set()
            assert first.result().status_code == 200
        wait_until(lambda: health()["dropped"] == 1, "the withdrawn job to be skipped")
        h = health()
        assert h["images"] == 1 and h["batches"] == 1 and h["queued"] == 0  # astronaut never reached the model
        r = httpx.post(f"{srv.url}/v1/captions", files=[("images", jpeg(ASTRONAUT))], timeout=120)
        assert r.status_code == 200 and r.json()["results"][0]["caption"] == PHOTO_CAPTIONS["astronaut"]


# --- the page in a real browser ------------------------------------------------------------------------
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_page_in_headless_chromium_captions_a_photo_and_draws_word_heatmaps(captioner, tmp_path):
    browser_path = find_chromium()
    if browser_path is None:
        pytest.skip("no Chromium found: apt-get install chromium (the browser test needs a real browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")
    with Server(create_app(captioner, ServeSettings())) as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 620})
            page.goto(srv.url + "/")
            page.set_input_files("#pick", str(CHELSEA))
            page.wait_for_selector(".result[data-state=done]", timeout=120_000)
            assert page.inner_text(".result .caption") == PHOTO_CAPTIONS["chelsea"]
            words = page.locator(".result .word")
            assert words.count() == len(PHOTO_CAPTIONS["chelsea"].split()) + 1  # and <eos>
            # the visual gate bars have the heights of the API's gates
            bars = page.eval_on_selector_all(".result .word .bar i", "els => els.map(e => e.style.height)")
            assert all(b.endswith("%") for b in bars) and len(set(bars)) > 1

            # the canvas's pixels after each click, and the mean absolute difference of two snapshots
            snap = ("name => { const c = document.querySelector('.result canvas'); "
                    "window[name] = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; }")
            diff = ("([a, b]) => { const x = window[a], y = window[b]; let s = 0; "
                    "for (let i = 0; i < x.length; i++) s += Math.abs(x[i] - y[i]); return s / x.length; }")
            page.evaluate(snap, "plain")
            for i, name in ((0, "a"), (1, "cat"), (0, "a_again")):
                words.nth(i).click()
                page.wait_for_selector(f".result canvas[data-shown='{i}']")
                page.evaluate(snap, name)
            overlay = page.evaluate(diff, ["plain", "a"])
            between = page.evaluate(diff, ["a", "cat"])
            again = page.evaluate(diff, ["a", "a_again"])
            print(f"mean |pixel difference|: overlay {overlay:.2f}, 'a' vs 'cat' {between:.2f}, 'a' twice {again:.2f}")
            assert overlay > 20, "clicking a word drew no heatmap"
            assert between > 2, "two words drew the same heatmap"
            assert again < between / 4  # the same word draws the same map again (up to the canvas's rounding)
            words.nth(1).click()
            # docs/serve.png is refreshed only when asked, so a test run leaves the checkout clean
            shot = DOCS / "serve.png" if os.environ.get("VGPT_UPDATE_DOCS") else tmp_path / "serve.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
