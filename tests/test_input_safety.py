"""Issue 15: nothing silently wrong, nothing outside the workspace. One test per defect, named for
it; each failed before its fix. The hostile-input corpus (defect 7) is tests/test_hostile_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tree_digest
from typer.testing import CliRunner

from vgpt_cli.cli import app


def _vgpt(ws: Path, *args: str):
    return CliRunner().invoke(app, ["-w", str(ws), *args])


def _one_error_line(result, *names: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


# --- defect 2: prepare checks every option before it writes, and swaps in only when complete -----
@pytest.mark.parametrize("bad", [["--fraction", "1.5"], ["--val-size", "999"], ["--test-size", "0"],
                                 ["--name", "../escaped"]])
def test_prepare_refused_option_leaves_the_old_images_and_manifest(tmp_path, bad):
    ws = tmp_path / "ws"
    assert _vgpt(ws, "prepare", "shapes", "--count", "20", "--seed", "1").exit_code == 0
    before = tree_digest(tmp_path)
    r = _vgpt(ws, "prepare", "shapes", "--count", "40", "--seed", "5", *bad)
    _one_error_line(r, bad[0])
    assert tree_digest(tmp_path) == before  # the old images, dataset file and manifest, bit for bit


def test_prepare_a_failure_while_rendering_leaves_the_old_dataset(tmp_path, monkeypatch):
    from vgpt_cli.data import shapes

    ws = tmp_path / "ws"
    assert _vgpt(ws, "prepare", "shapes", "--count", "20", "--seed", "1").exit_code == 0
    before = tree_digest(tmp_path)
    real = shapes.render_scene
    calls = []

    def dies_half_way(scene):
        calls.append(1)
        if len(calls) == 15:
            raise OSError(28, "No space left on device")
        return real(scene)

    monkeypatch.setattr(shapes, "render_scene", dies_half_way)
    r = _vgpt(ws, "prepare", "shapes", "--count", "20", "--seed", "5")
    assert r.exit_code != 0
    assert tree_digest(tmp_path) == before  # nothing half-rendered swapped in, no staging left


# --- defect 4: dataset names stay inside the workspace ------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped", "ABS", ".hidden", "a/b", ""])
def test_prepare_name_escaping_the_workspace_is_refused(tmp_path, name):
    name = str(tmp_path / "abs-name") if name == "ABS" else name
    ws = tmp_path / "deep" / "ws"
    ws.mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "caps.csv").write_text("image,caption\na.png,a thing\n", encoding="utf-8")
    before = tree_digest(tmp_path)
    r = _vgpt(ws, "prepare", "folder", str(tmp_path / "images"), "--captions", str(tmp_path / "caps.csv"),
              "--name", name)
    _one_error_line(r, "--name")
    assert tree_digest(tmp_path) == before
    assert not json.dumps(before).count("manifest.json")


# --- defect 3: folder CSV never drops text silently ------------------------------------------------
def _folder(tmp_path: Path, csv_bytes: bytes, images=("a.png", "b.png", "c.png", "d.png", "e.png")):
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    from PIL import Image

    for i, n in enumerate(images):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / n)
    caps = tmp_path / "caps.csv"
    caps.write_bytes(csv_bytes)
    return d, caps


def test_folder_csv_unquoted_comma_in_a_caption_is_refused_with_the_line_and_fix(tmp_path):
    d, caps = _folder(tmp_path, b"image,caption\na.png,a cat\nb.png,a dog, running on grass\n")
    ws = tmp_path / "ws"
    line = _one_error_line(_vgpt(ws, "prepare", "folder", str(d), "--captions", str(caps)),
                           str(caps), "line 3", "quotes")
    assert "3 fields but the header has 2" in line
    assert not ws.exists()
    # quoted, the whole caption is kept
    caps.write_bytes(b'image,caption\na.png,a cat\nb.png,"a dog, running on grass"\nc.png,x\nd.png,y\ne.png,z\n')
    r = _vgpt(ws, "prepare", "folder", str(d), "--captions", str(caps), "--json", "--val-fraction", "0",
              "--test-fraction", "0")
    assert r.exit_code == 0, r.output
    m = json.loads((ws / "data" / "folder" / "manifest.json").read_text())
    assert ["a dog, running on grass"] in [it["captions"] for it in m["splits"]["train"]]


def test_folder_csv_duplicate_rows_are_kept_once_with_a_note(tmp_path):
    d, caps = _folder(tmp_path, b"image,caption\na.png,a cat\na.png,a cat\na.png,a red cat\nb.png,b\n"
                                b"c.png,c\nd.png,d\ne.png,e\n")
    ws = tmp_path / "ws"
    r = _vgpt(ws, "prepare", "folder", str(d), "--captions", str(caps), "--json", "--val-fraction", "0",
              "--test-fraction", "0")
    assert r.exit_code == 0, r.output
    m = json.loads((ws / "data" / "folder" / "manifest.json").read_text())
    a = next(it for it in m["splits"]["train"] if it["id"] == "a.png")
    assert a["captions"] == ["a cat", "a red cat"]
    assert any("1 duplicate caption" in n for n in json.loads(r.stdout)["notes"])


def test_folder_csv_with_a_utf8_bom_reads_like_without(tmp_path):
    body = "image,caption\na.png,a café\nb.png,b\nc.png,c\nd.png,d\ne.png,e\n".encode()
    d, caps = _folder(tmp_path, b"\xef\xbb\xbf" + body)
    ws = tmp_path / "ws"
    r = _vgpt(ws, "prepare", "folder", str(d), "--captions", str(caps), "--val-fraction", "0",
              "--test-fraction", "0")
    assert r.exit_code == 0, r.output
    m = json.loads((ws / "data" / "folder" / "manifest.json").read_text())
    assert {it["id"]: it["captions"] for it in m["splits"]["train"]}["a.png"] == ["a café"]


# --- defect 8: partial predictions need --allow-partial; captions are cut for scoring --------------
def _refs(tmp_path: Path, n: int = 4) -> Path:
    refs = {str(i): [f"a red circle number {i}", f"a circle {i} that is red"] for i in range(n)}
    p = tmp_path / "refs.json"
    p.write_text(json.dumps(refs), encoding="utf-8")
    return p


@pytest.mark.slow
def test_evaluate_partial_predictions_need_allow_partial_and_print_the_coverage(tmp_path):
    refs = _refs(tmp_path)
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"0": "a red circle", "1": "a blue square"}), encoding="utf-8")
    r = _vgpt(tmp_path, "evaluate", "-p", str(preds), "-r", str(refs), "--no-spice")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "preds.json: covers 2 of the 4 images" in r.stderr and "--allow-partial" in r.stderr
    assert "Bleu" not in r.stdout  # nothing was scored
    ok = _vgpt(tmp_path, "evaluate", "-p", str(preds), "-r", str(refs), "--no-spice", "--allow-partial", "--json")
    assert ok.exit_code == 0, ok.output
    got = json.loads(ok.stdout)["preds.json"]
    assert got["n_items"] == 2 and any("--allow-partial" in n for n in got["notes"])


def test_evaluate_caps_a_huge_caption_at_1000_words_with_a_note():
    from vgpt_cli.evaluate.metrics import MAX_SCORED_WORDS, compute_metrics

    assert MAX_SCORED_WORDS == 1000
    refs = {"a": ["a red circle on a white background"], "b": ["a blue square"]}
    huge = "a red circle " + "on a white background " * 25_000  # 100,000 words
    cut = " ".join(huge.split()[:1000])
    logs: list[str] = []
    got = compute_metrics({"a": huge, "b": "a blue square"}, refs, use_java=False, spice=False, log=logs.append)
    ref = compute_metrics({"a": cut, "b": "a blue square"}, refs, use_java=False, spice=False, log=lambda m: None)
    assert got.scores == ref.scores  # scored exactly as its first 1,000 words
    assert any("1 caption(s) longer than 1,000 words were cut" in w for w in got.warnings)
    assert any("cut to their first 1,000 words" in m for m in logs)


# --- defect 5: archive members are resolved and checked; a bad archive leaves nothing behind -----
def _zip(path: Path, members: list) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            if isinstance(m, zipfile.ZipInfo):
                zf.writestr(m, "link-target/../../outside")
            else:
                zf.writestr(m[0], m[1])
    return path


def _symlink_member(name: str):
    import stat
    import zipfile

    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("case", ["dot", "symlink-then-child", "file-then-child", "long-name", "dotdot",
                                  "absolute"])
def test_archive_extraction_bad_member_paths_are_refused_and_leave_nothing(tmp_path, case):
    from vgpt_cli.data.download import extract_zip
    from vgpt_cli.errors import DataError

    members = {
        "dot": [("ok.txt", "fine"), (".", "x")],
        "symlink-then-child": [("ok.txt", "fine"), _symlink_member("link"), ("link/x", "y")],
        "file-then-child": [("ok.txt", "fine"), ("x", "a file"), ("x/y", "under a file")],
        "long-name": [("ok.txt", "fine"), ("d/" + "n" * 300 + ".jpg", "x")],
        "dotdot": [("ok.txt", "fine"), ("a/../../up.txt", "x")],
        "absolute": [("ok.txt", "fine"), ("/tmp/vgpt-abs-member.txt", "x")],
    }[case]
    area = tmp_path / "area"
    area.mkdir()
    archive = _zip(tmp_path / "bad.zip", members)
    before = tree_digest(tmp_path)
    with pytest.raises(DataError, match="member") as e:
        extract_zip(archive, area / "root")
    assert "\n" not in str(e.value) and str(archive) in str(e.value)
    assert tree_digest(tmp_path) == before  # nothing inside, nothing beside (no root.tmp, no ok.txt)
    assert not Path("/tmp/vgpt-abs-member.txt").exists()


def test_archive_extraction_bad_crc_is_refused_and_leaves_nothing(tmp_path):
    from vgpt_cli.data.download import extract_zip
    from vgpt_cli.errors import DataError

    archive = _zip(tmp_path / "crc.zip", [("a.txt", "first file"), ("b.txt", "B" * 1000)])
    data = bytearray(archive.read_bytes())
    i = data.index(b"B" * 20)  # stored uncompressed: flip a byte of b.txt's content
    data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    before = tree_digest(tmp_path)
    with pytest.raises(DataError, match="damaged"):
        extract_zip(archive, tmp_path / "root")
    left = {k for k in tree_digest(tmp_path) if k not in before}
    assert left <= {"root"}, left  # no a.txt, no b.txt.tmp


def test_archive_extraction_full_disk_says_which_file_and_how_much(tmp_path, monkeypatch):
    import errno
    import shutil

    from vgpt_cli.data import download
    from vgpt_cli.errors import DataError

    archive = _zip(tmp_path / "big.zip", [("a.txt", "a" * 100), ("b.txt", "b" * 5000), ("c.txt", "c" * 700)])
    real = shutil.copyfileobj

    def full_on_b(src, dst, length=0):
        if dst.name.endswith("b.txt.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, length)

    monkeypatch.setattr(download.shutil, "copyfileobj", full_on_b)
    with pytest.raises(DataError, match="disk full") as e:
        download.extract_zip(archive, tmp_path / "root")
    assert "'b.txt'" in str(e.value) and "5,700 more bytes" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["a.txt"]  # kept; no .tmp left
