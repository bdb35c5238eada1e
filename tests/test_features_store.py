"""The feature store's crash safety and lookups, and image decoding (bad files, odd modes).
No backbone here: these run in about a second."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vgpt_cli.errors import DataError
from vgpt_cli.features import BadImage, FeatureStore, StoreWriter, open_rgb, open_workspace_store
from vgpt_cli.features.store import data_name, index_name
from vgpt_cli.workspace import Workspace

DIM = 8


def _meta(fp="toy-000000000000", dim=DIM):
    return {"fingerprint": fp, "dim": dim, "backbone": "toy", "pretrained": False}


def _rows(seed, n):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float16)


def test_store_round_trip_views_lengths_and_batch(tmp_path):
    a, b = _rows(0, 3), _rows(1, 5)
    with StoreWriter(tmp_path, _meta()) as w:
        w.append([("a", ["/x/a.jpg"], a)], [("bad", ["/x/bad.jpg"], "empty file (0 bytes)")])
        w.append([("b", ["/x/b1.jpg", "/x/b2.jpg"], b)])
    s = FeatureStore.open(tmp_path)
    assert s.dim == DIM and sorted(s.keys()) == ["a", "b"] and len(s) == 2
    assert "a" in s and "bad" not in s and "zzz" not in s
    np.testing.assert_array_equal(s.get("a"), a)
    np.testing.assert_array_equal(s.get("b"), b)
    assert s.get("b").dtype == np.float16 and isinstance(s.get("b").base, np.memmap | np.ndarray)
    assert isinstance(s._data[0], np.memmap)  # read from disk on demand, not loaded into RAM
    assert s.length("b") == 5 and s.images("b") == ("/x/b1.jpg", "/x/b2.jpg")
    assert s.skipped() == {"bad": "empty file (0 bytes)"}
    feats, lengths = s.batch(["b", "a"])
    assert feats.shape == (2, 5, DIM) and lengths.tolist() == [5, 3]
    np.testing.assert_array_equal(feats[1, :3], a)
    assert not feats[1, 3:].any()


def test_require_names_missing_and_skipped_items_and_the_fix(tmp_path):
    with StoreWriter(tmp_path, _meta()) as w:
        w.append([("a", ["/x/a.jpg"], _rows(0, 2))], [("bad", ["/x/bad.jpg"], "not an image file PIL can read")])
    s = FeatureStore.open(tmp_path)
    s.require(["a"])
    with pytest.raises(DataError) as e:
        s.require(["a", "bad"])
    msg = str(e.value)
    assert "'bad'" in msg and "/x/bad.jpg" in msg and "not an image" in msg and "vgpt extract-features" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"'nope' \(not extracted\).*vgpt extract-features"):
        s.get("nope")


def test_a_killed_writer_leaves_a_readable_store_and_a_rerun_drops_the_half_written_tail(tmp_path):
    a, b = _rows(0, 3), _rows(1, 4)
    with StoreWriter(tmp_path, _meta()) as w:
        w.append([("a", ["a.jpg"], a)])
    # What a kill -9 can leave: rows written with no index line, then a torn index line.
    with open(tmp_path / data_name(0), "ab") as f:
        f.write(_rows(9, 2).tobytes() + b"\x01\x02\x03")
    with open(tmp_path / index_name(0), "ab") as f:
        f.write(b'{"id": "ghost", "images": [], "row": 3, "n": 2')
    s = FeatureStore.open(tmp_path)
    assert s.keys() == ["a"]
    np.testing.assert_array_equal(s.get("a"), a)
    with StoreWriter(tmp_path, _meta()) as w:  # the rerun cuts the tail, then appends
        assert (tmp_path / data_name(0)).stat().st_size == 3 * DIM * 2
        w.append([("b", ["b.jpg"], b)])
    s = FeatureStore.open(tmp_path)
    assert sorted(s.keys()) == ["a", "b"]
    np.testing.assert_array_equal(s.get("b"), b)
    lines = (tmp_path / index_name(0)).read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b"]


def test_ranks_write_their_own_files_and_the_newest_entry_wins(tmp_path):
    with StoreWriter(tmp_path, _meta(), rank=0) as w0, StoreWriter(tmp_path, _meta(), rank=1) as w1:
        w0.append([("a", ["a.jpg"], _rows(0, 2))], [("c", ["c.jpg"], "truncated")])
        w1.append([("b", ["b.jpg"], _rows(1, 3))])
        w1.append([("c", ["c.jpg"], _rows(2, 1))])  # later, the fixed image succeeded on rank 1
    s = FeatureStore.open(tmp_path)
    assert sorted(s.keys()) == ["a", "b", "c"] and s.skipped() == {}
    np.testing.assert_array_equal(s.get("c"), _rows(2, 1))


def test_one_writer_per_rank_and_no_mixing_of_fingerprints(tmp_path):
    with StoreWriter(tmp_path, _meta()):
        with pytest.raises(DataError, match="another extraction is writing"):
            StoreWriter(tmp_path, _meta())
    with pytest.raises(DataError, match="holds toy-000000000000 features"):
        StoreWriter(tmp_path, _meta(fp="other-111111111111"))


def test_open_errors_are_one_line_with_the_fix(tmp_path):
    with pytest.raises(DataError, match="not a feature store.*vgpt extract-features"):
        FeatureStore.open(tmp_path / "nothing")
    ws = Workspace(tmp_path)
    with pytest.raises(Exception, match="vgpt extract-features"):
        open_workspace_store(ws)
    with StoreWriter(ws.features_root / "toy-000000000000", _meta()) as w:
        w.append([("a", ["a.jpg"], _rows(0, 1))])
    ws.set_current(features="toy-000000000000")
    assert open_workspace_store(ws).keys() == ["a"]


# --- images -------------------------------------------------------------------------------------
def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height: what a decompression bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_bad_images_raise_badimage_with_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _png_claiming(tmp_path / "bomb.png", 60_000, 60_000)  # 3.6 G pixels claimed, 1 KB on disk
    _png_claiming(tmp_path / "big.png", 12_000, 12_000)  # 144 M: over our limit, under PIL's own refusal
    cases = {"empty.jpg": "0 bytes", "text.jpg": "not an image", "truncated.jpg": "cannot decode",
             "bomb.png": "decompression bomb", "big.png": "pixels is over the limit", "missing.jpg": "not found"}
    for name, reason in cases.items():
        with pytest.raises(BadImage) as e:
            open_rgb(tmp_path / name)
        assert reason in e.value.reason, (name, e.value.reason)
    with pytest.raises(BadImage, match="over the limit of 100,000"):
        open_rgb(tmp_path / "full.jpg", max_pixels=100_000)  # chelsea is 451 x 300
    assert open_rgb(tmp_path / "full.jpg").size == (451, 300)


def test_every_image_mode_becomes_rgb_with_the_right_pixels(tmp_path):
    rgb = skimage.data.astronaut()[:64, :96]  # (64, 96, 3)
    grey = skimage.data.camera()[:64, :96]
    # L
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    out = np.asarray(open_rgb(tmp_path / "l.png"))
    assert out.shape == (64, 96, 3) and (out == grey[..., None]).all()
    # RGBA and LA: transparent pixels become white, opaque ones keep their colour
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :48] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert (out[:, :48] == 255).all() and (out[:, 48:] == rgb[:, 48:]).all()
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    out = np.asarray(open_rgb(tmp_path / "la.png"))
    assert (out[:, :48] == 255).all() and (out[:, 48:, 0] == grey[:, 48:]).all()
    # P with a transparent palette entry
    p = Image.fromarray(rgb).quantize(16)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    idx = np.asarray(Image.open(tmp_path / "p.png"))
    out = np.asarray(open_rgb(tmp_path / "p.png"))
    assert (out[idx == 0] == 255).all()
    pal = np.asarray(p.getpalette(), np.uint8).reshape(-1, 3)
    assert (out[idx != 0] == pal[idx[idx != 0]]).all()
    # CMYK (JPEG, as print workflows write it)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = np.asarray(open_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert out.shape == (64, 96, 3) and np.abs(out - rgb).mean() < 12
    # I;16: a 12-bit X-ray-like range is stretched to 0..255, not clipped to white
    g16 = (grey.astype(np.uint16) * 16 + 7)
    Image.fromarray(g16).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = np.asarray(open_rgb(tmp_path / "i16.png")).astype(float)
    expect = (g16 - g16.min()) / (g16.max() - g16.min()) * 255
    assert np.abs(out[..., 0] - expect).max() <= 0.5 + 1e-9


def test_exif_orientation_is_applied(tmp_path):
    rgb = skimage.data.astronaut()[:60, :100]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = open_rgb(tmp_path / "rot.jpg")
    assert out.size == (60, 100)  # width and height swapped
    ref = np.rot90(rgb, k=-1)  # 90 degrees clockwise
    assert np.abs(np.asarray(out).astype(int) - ref).mean() < 6
