"""The run folder (issue 12): checkpoint saves and their swap, last/ kept only while a run can resume,
one writer per run, nothing written outside the workspace. Tiny random GPT-2 captioners with the real
GPT-2 BPE tokenizer (see test_train.py).

Each defect test is named for the defect it pins down and fails on the code before its fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import Killed, kill_at, metrics, one_line
from test_train import make_workspace, quick, tiny_captioner, tiny_lm_folder
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.model import Captioner
from vgpt_cli.train import train
from vgpt_cli.train.checkpoint import checkpoint_dir, load_trainer_state, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)
runner = CliRunner()


# --- 3 + 12. the checkpoint swap ---------------------------------------------------------------------------
def _complete(folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        Captioner.from_pretrained(folder)
        load_trainer_state(folder)
    except Exception:  # noqa: BLE001 - any failure means: not a loadable checkpoint
        return False
    return True


@pytest.mark.parametrize("start", ["last", ".last.old"])
def test_every_moment_of_a_checkpoint_save_leaves_one_complete_checkpoint(tmp_path, monkeypatch, start):
    """Check, before and after every rename and removal a save makes, that the folder a resume would use
    loads. start=".last.old": the previous save was killed between its two renames."""
    run = tmp_path / "run"
    model = tiny_captioner()
    model.preprocessor = {"backbone": "toy"}
    state = {"step": 1, "optimizer": {"param_groups": [], "scalars": {}}}
    save_checkpoint(model, run, "last", state, {})
    if start == ".last.old":
        (run / "last").rename(run / ".last.old")
    assert _complete(checkpoint_dir(run, "last"))

    seen: list[tuple[str, bool]] = []
    real_rename, real_rmtree = Path.rename, shutil.rmtree

    def check(what: str) -> None:
        seen.append((what, _complete(checkpoint_dir(run, "last"))))

    def rename(self, target):
        check(f"before rename {Path(self).name} -> {Path(target).name}")
        out = real_rename(self, target)
        check(f"after rename {Path(self).name} -> {Path(target).name}")
        return out

    def rmtree(path, *args, **kwargs):
        check(f"before rmtree {Path(path).name}")
        out = real_rmtree(path, *args, **kwargs)
        check(f"after rmtree {Path(path).name}")
        return out

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr("vgpt_cli.train.checkpoint.shutil.rmtree", rmtree)
    save_checkpoint(model, run, "last", dict(state, step=2), {})
    monkeypatch.undo()
    assert seen and all(ok for _, ok in seen), [w for w, ok in seen if not ok]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["last"]


def test_stale_temporary_checkpoint_folders_are_removed(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=1)
    run = ws.run_dir("t")
    for name in (".last.tmp-abc123", ".best.tmp-def456"):  # what kills during saves left behind
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"\0" * 1000)
    train(quick(max_steps=2, val_every=1, name="t"), ws, model=tiny_captioner(), quiet=True)
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def test_checkpoint_saves_fsync_their_files_and_folders(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced descriptors")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    model = tiny_captioner()
    model.preprocessor = {"backbone": "toy"}  # what training sets: the feature store's record
    save_checkpoint(model, run, "last", {"step": 1}, {"x": torch.zeros(2)})
    names = {Path(p).name for p in synced}
    for f in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.safetensors",
              "trainer_state.json", "preprocessor.json"):
        assert f in names, f
    assert str(run.resolve()) in synced  # the run folder, after the renames
    assert any(Path(p).name.startswith(".last.tmp-") for p in synced)  # the new folder, before them


@pytest.mark.slow
def test_resume_from_last_old_after_a_kill_between_the_renames(tmp_path):
    ws = make_workspace(tmp_path, n_train=6, caps_per_item=2)
    cfg = dict(batch_size=4, max_steps=7, save_every=2)
    full = train(quick(name="full", **cfg), ws, model=tiny_captioner(), quiet=True)
    with pytest.raises(Killed):
        train(quick(name="cut", **cfg), ws, model=tiny_captioner(), on_step=kill_at("xe", 5), quiet=True)
    run = ws.run_dir("cut")
    (run / "last").rename(run / ".last.old")  # the state a kill between the swap's two renames leaves
    resumed = train(quick(name="cut", **cfg), ws, resume=True, quiet=True, keep_last=True)
    before = {r["step"]: r["loss"] for r in full.history}
    assert [r["step"] for r in resumed.history] == [5, 6, 7]
    assert all(abs(r["loss"] - before[r["step"]]) <= 1e-6 for r in resumed.history)
    assert (run / "last").is_dir() and not (run / ".last.old").exists()


def test_a_lone_best_old_is_put_back_at_the_next_start(tmp_path):
    """A kill between the renames of the only `best` save left `.best.old/`; with no better score later,
    nothing saved `best/` again and the finished run kept `.best.old/` (found by checkpoint_dir, but not
    where a user looks). The next start puts both back."""
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)
    # lr too small to change a caption: the first validation is the only best
    train(quick(lr=1e-12, max_steps=2, val_every=1, name="b"), ws, model=tiny_captioner(), quiet=True, keep_last=True)
    run = ws.run_dir("b")
    for which in ("best", "last"):
        (run / which).rename(run / f".{which}.old")
    train(quick(lr=1e-12, max_steps=3, val_every=1, name="b"), ws, resume=True, quiet=True, keep_last=True)
    assert not list(run.glob(".*.old")) and (run / "best").is_dir() and (run / "last").is_dir()
    assert [r["improved"] for r in metrics(run) if r.get("event") == "validation"] == [True, False, False]


# --- 11. one writer per run ----------------------------------------------------------------------------------
def test_a_second_concurrent_train_of_the_same_run_is_refused(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1)
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(record):
        started.set()
        release.wait(60)

    def first():
        try:
            train(quick(max_steps=2, name="cc"), ws, model=tiny_captioner(), on_step=hold, quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert started.wait(60)
        r = runner.invoke(app, ["-w", str(ws.root), "train", "--device", "cpu", "--lm", "gpt2", "--name", "cc"])
    finally:
        release.set()
        t.join(60)
    assert not errors
    assert r.exit_code == 2, r.output
    assert "another `vgpt train` is writing this run" in one_line(r.output) and "Traceback" not in r.output
    assert json.loads((ws.run_dir("cc") / "result.json").read_text())["steps"] == 2  # the first run finished


# --- 13. nothing written outside the workspace -----------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_a_model_elsewhere_writes_inside_the_workspace_only(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, caps_per_item=1, n_val=2)
    result = train(quick(max_steps=1, name="r1"), ws, model=tiny_captioner(), quiet=True)
    elsewhere = tmp_path / "elsewhere" / "r1" / "best"
    shutil.copytree(result.run_dir / "best", elsewhere)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "elsewhere").rglob("*"))
    os.chmod(elsewhere.parent, 0o555)  # read-only: a write there would fail after the whole decode
    try:
        r = runner.invoke(app, ["-w", str(ws.root), "evaluate", "--split", "val", "--model", str(elsewhere),
                                "--device", "cpu", "--no-spice", "--json"])
    finally:
        os.chmod(elsewhere.parent, 0o755)
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "elsewhere").rglob("*")) == before
    out = Path(json.loads(r.stdout)["metrics"])
    assert out.is_file() and ws.runs_root.resolve() in out.resolve().parents


# --- 15. disk: last/ only while a run can be resumed -------------------------------------------------------------
def test_last_is_removed_when_a_run_ends_unless_keep_last_and_the_size_is_printed(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1)
    lm_dir = tiny_lm_folder(tmp_path / "tiny-gpt2")
    common = ["-w", str(ws.root), "train", "--lm", str(lm_dir), "--encoder-layers", "1", "--max-steps", "1",
              "--device", "cpu"]
    r = runner.invoke(app, [*common, "--name", "plain"])
    assert r.exit_code == 0, r.output
    run = ws.run_dir("plain")
    assert (run / "best").is_dir() and not (run / "last").exists()
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    printed = re.search(r"wrote \S+ \(([\d.]+) (KB|MB|GB)\)", one_line(r.stderr))
    assert printed, r.stderr
    scale = {"KB": 1e3, "MB": 1e6, "GB": 1e9}[printed.group(2)]
    assert abs(float(printed.group(1)) * scale - size) <= 0.05 * scale + 0.01 * size
    r = runner.invoke(app, [*common, "--name", "kept", "--keep-last"])
    assert r.exit_code == 0, r.output
    assert (ws.run_dir("kept") / "last" / "trainer_state.json").is_file()
    r = runner.invoke(app, ["-w", str(ws.root), "train", "--resume", "--name", "plain"])
    assert r.exit_code == 2 and "last/ was removed (--keep-last keeps it)" in one_line(r.output)
    r = runner.invoke(app, [*common, "--name", "plain"])  # a finished run is still refused as a new one
    assert r.exit_code == 2 and "a run with this name exists" in one_line(r.output)


def test_model_lookup_recovers_best_from_its_old_copy(tmp_path):
    from vgpt_cli.errors import ConfigError
    from vgpt_cli.model_folders import resolve_model_dir
    from vgpt_cli.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = ws.run_dir("r1")
    tiny_captioner().save_pretrained(run / ".best.old")  # a kill between the two renames of a best/ save
    ws.set_current(run="r1")
    assert resolve_model_dir(ws, None) == run / ".best.old"
    assert resolve_model_dir(ws, run / "best") == (run / ".best.old").resolve()
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model_dir(ws, tmp_path / "nowhere")
