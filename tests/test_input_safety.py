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
@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs-name", ".hidden", "a/b", ""])
def test_prepare_name_escaping_the_workspace_is_refused(tmp_path, name):
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
