"""The run layer (issue 12): resume, the run folder, checkpoints, decoding settings saved with a model,
device choice. Tiny random GPT-2 captioners with the real GPT-2 BPE tokenizer (see test_train.py).

Each defect test is named for the defect it pins down and fails on the code before its fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_workspace, max_diff, quick, tiny_captioner, tiny_lm_folder
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.model import Captioner
from vgpt_cli.train import train
from vgpt_cli.train.checkpoint import checkpoint_dir, load_trainer_state, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)
runner = CliRunner()


class Killed(Exception):
    """Raised from on_step: the run stops as if killed right after that step's checkpoint (if any)."""


def kill_at(phase: str, step: int):
    def hook(record):
        if record["phase"] == phase and record["step"] == step:
            raise Killed
    return hook


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line(text: str) -> str:
    return " ".join(text.split())


# --- 1. a resume never undoes a stop -------------------------------------------------------------------
def test_resume_after_early_stopping_does_not_train_on(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)
    # lr too small to change a caption: every validation ties, early stopping after 2 without a better one
    cfg = quick(lr=1e-12, max_steps=10, val_every=1, patience=2, val_size=2, name="es")
    first = train(cfg, ws, model=tiny_captioner(), quiet=True, keep_last=True)
    assert (first.stopped, first.steps) == ("early_stopping", 3)
    resumed = train(cfg, ws, resume=True, quiet=True, keep_last=True)
    assert (resumed.stopped, resumed.steps, resumed.history) == ("early_stopping", 3, [])
    assert max(r["step"] for r in metrics(first.run_dir) if "loss" in r) == 3


@pytest.mark.slow
def test_kill_during_scst_before_its_first_checkpoint_resumes_scst_not_cross_entropy(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)
    # 4 captions in a batch of 8: each step is an epoch, validated; SCST: 2 steps an epoch, validated at its end
    cfg = quick(lr=1e-12, max_steps=10, patience=2, val_size=2, scst=True, scst_epochs=1,
                scst_batch_size=2, scst_samples=2, name="sc")
    with pytest.raises(Killed):  # SCST step 1 of 2 writes no checkpoint (validation is at the epoch's end)
        train(cfg, ws, model=tiny_captioner(), on_step=kill_at("scst", 1), quiet=True)
    assert json.loads((ws.run_dir("sc") / "last" / "trainer_state.json").read_text())["phase"] == "xe"
    resumed = train(cfg, ws, resume=True, quiet=True)
    assert [(r["phase"], r["step"]) for r in resumed.history] == [("scst", 1), ("scst", 2)]
    assert (resumed.steps, resumed.scst_steps, resumed.stopped) == (3, 2, "early_stopping")


@pytest.mark.slow
def test_scst_resume_repeats_the_uninterrupted_run(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1)
    cfg = dict(lr=1e-2, max_steps=2, scst=True, scst_epochs=2, scst_batch_size=2, scst_samples=3, save_every=2,
               scst_lr=1e-3)
    full = train(quick(name="full", **cfg), ws, model=tiny_captioner(dropout=0.1), quiet=True, keep_last=True)
    with pytest.raises(Killed):
        train(quick(name="cut", **cfg), ws, model=tiny_captioner(dropout=0.1), on_step=kill_at("scst", 3),
              quiet=True)
    resumed = train(quick(name="cut", **cfg), ws, resume=True, quiet=True, keep_last=True)
    assert [(r["phase"], r["step"]) for r in resumed.history] == [("scst", 3), ("scst", 4)]
    before = {r["step"]: (r["loss"], r["reward"]) for r in full.history if r["phase"] == "scst"}
    for r in resumed.history:
        assert abs(r["loss"] - before[r["step"]][0]) <= 1e-6 and abs(r["reward"] - before[r["step"]][1]) <= 1e-9
    a = load_file(str(ws.run_dir("full") / "last" / "model.safetensors"))
    b = load_file(str(ws.run_dir("cut") / "last" / "model.safetensors"))
    assert max_diff(a, b) <= 1e-6


# --- 2. the metrics log matches the checkpoint it resumes -----------------------------------------------
def test_resume_truncates_metrics_to_the_checkpoint_step(tmp_path):
    ws = make_workspace(tmp_path, n_train=6, caps_per_item=2)
    cfg = quick(batch_size=4, max_steps=7, save_every=2, name="m")
    with pytest.raises(Killed):  # steps 1-5 logged, last/ at step 4
        train(cfg, ws, model=tiny_captioner(), on_step=kill_at("xe", 5), quiet=True)
    train(cfg, ws, resume=True, quiet=True)
    steps = [r["step"] for r in metrics(ws.run_dir("m")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # step 5 once, from the resumed run
    assert [r["step"] for r in metrics(ws.run_dir("m")) if r.get("event") == "resume"] == [4]


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
    state = {"step": 1, "optimizer": {"param_groups": [], "scalars": {}}}
    save_checkpoint(model, run, "last", {"backbone": "toy"}, state, {})
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
    save_checkpoint(model, run, "last", {"backbone": "toy"}, dict(state, step=2), {})
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
    save_checkpoint(tiny_captioner(), run, "last", {"backbone": "toy"}, {"step": 1}, {"x": torch.zeros(2)})
    names = {Path(p).name for p in synced}
    for f in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.safetensors",
              "trainer_state.json", "backbone.json"):
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


# --- 4. decoding settings saved with the model -------------------------------------------------------------
@pytest.mark.slow
def test_training_saves_its_decoding_settings_and_evaluate_uses_them(tmp_path):
    from vgpt_cli.evaluate.report import evaluate_split

    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)
    result = train(quick(max_steps=1, val_beam=2, max_length=7, name="g"), ws, model=tiny_captioner(), quiet=True)
    saved = json.loads((result.run_dir / "best" / "generation_config.json").read_text())
    assert saved == {"beam_size": 2, "max_length": 7, "min_length": 0, "length_penalty": 0.0, "no_repeat_ngram_size": 0}
    assert "generation" not in json.loads((result.run_dir / "best" / "config.json").read_text())
    assert Captioner.from_pretrained(result.run_dir / "best").generation == saved
    ev = evaluate_split(ws, "val", device="cpu", spice=False, log=lambda s: None)
    assert (ev.decode["beam_size"], ev.decode["max_length"]) == (2, 7)
    ev = evaluate_split(ws, "val", beam_size=1, device="cpu", spice=False, log=lambda s: None)
    assert (ev.decode["beam_size"], ev.decode["max_length"]) == (1, 7)  # a flag overrides one setting


def test_every_decoding_setting_round_trips_through_generation_config_json(tmp_path):
    from dataclasses import asdict, fields

    from vgpt_cli.decode import DecodeOptions
    from vgpt_cli.runtime import decode_options

    defaults = DecodeOptions()
    # every field away from its default, so that a field dropped on the way fails
    chosen = DecodeOptions(beam_size=3, max_length=11, min_length=2, length_penalty=0.7, no_repeat_ngram_size=3)
    assert all(getattr(chosen, f.name) != getattr(defaults, f.name) for f in fields(DecodeOptions))
    model = tiny_captioner()
    model.generation = asdict(chosen)
    d = model.save_pretrained(tmp_path / "m")
    assert json.loads((d / "generation_config.json").read_text()) == asdict(chosen)
    assert decode_options(Captioner.from_pretrained(d)) == chosen
    (d / "generation_config.json").write_text('{"beam_size": 3, "temperature": 0.5}')
    from vgpt_cli.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"generation_config.json: not valid decoding settings .*temperature"):
        Captioner.from_pretrained(d)


def test_a_bad_generation_block_is_one_line_naming_config_json(tmp_path):
    from vgpt_cli.errors import ModelLoadError

    d = tiny_captioner().save_pretrained(tmp_path / "m")
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(meta, generation={"beam_size": "five"})))
    with pytest.raises(ModelLoadError, match=r"config.json: not a valid vgpt captioner config .*beam_size"):
        Captioner.from_pretrained(d)


# --- 10. which run --resume continues, and the printed command ---------------------------------------------
def test_resume_without_name_continues_the_interrupted_run_not_the_last_finished_one(tmp_path):
    ws = make_workspace(tmp_path, n_train=6, caps_per_item=2)
    finished = train(quick(batch_size=4, max_steps=2, name="done"), ws, model=tiny_captioner(), quiet=True,
                     keep_last=True)
    done_result = (finished.run_dir / "result.json").read_text()
    with pytest.raises(Killed):
        train(quick(batch_size=4, max_steps=4, save_every=1, name="cut"), ws, model=tiny_captioner(),
              on_step=kill_at("xe", 2), quiet=True)
    r = runner.invoke(app, ["-w", str(ws.root), "train", "--resume", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["run_dir"], out["steps"]) == (str(ws.run_dir("cut")), 4)
    assert (finished.run_dir / "result.json").read_text() == done_result  # the finished run is untouched
    assert ws.state()["run"] == "cut" and ws.state()["training"] is None


@pytest.mark.slow
def test_the_printed_resume_command_after_ctrl_c_works_as_printed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    lm_dir = tiny_lm_folder(tmp_path / "tiny-gpt2")
    ws = make_workspace(tmp_path / "ws", n_train=4, caps_per_item=2)
    args = ["train", "--lm", str(lm_dir), "--encoder-layers", "1", "--batch-size", "2", "--max-steps", "60",
            "--save-every", "1", "--device", "cpu", "--name", "cc"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vgpt_cli", "-w", str(ws.root), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a busy machine can take minutes to import torch and start
    while not (ws.run_dir("cc") / "last").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # a SIGINT during the imports can be swallowed by a library's bare `except`: only interrupt training
    assert (ws.run_dir("cc") / "last").is_dir() and proc.poll() is None, "no checkpoint to interrupt in time"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    match = re.search(r"Resume with:\s*\n\s*vgpt (.+)", stderr)
    assert match, stderr
    printed = match.group(1).split()
    assert printed == ["-w", str(ws.root), "train", "--resume", "--name", "cc"]
    state = json.loads((ws.run_dir("cc") / "last" / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 60
    r = runner.invoke(app, printed)  # exactly as printed
    assert r.exit_code == 0, r.output
    assert f"resuming {ws.run_dir('cc')} at step {state['step']}" in one_line(r.stderr)
    assert json.loads((ws.run_dir("cc") / "result.json").read_text())["steps"] == 60


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


# --- 14. corrupt files on resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["config.json", "last/trainer_state.json"])
def test_corrupt_run_files_on_resume_give_one_line_naming_the_file(tmp_path, damaged):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1)
    train(quick(max_steps=1, name="r"), ws, model=tiny_captioner(), quiet=True, keep_last=True)
    (ws.run_dir("r") / damaged).write_text('{"step": 3, "optim')  # cut off mid-write
    r = runner.invoke(app, ["-w", str(ws.root), "train", "--resume", "--name", "r", "--max-steps", "2"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert f"{ws.run_dir('r') / damaged}: not valid JSON" in one_line(r.output)


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


# --- 16. device choice ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda, mps, local_rank, expected", [
    (True, True, None, "cuda:0"),
    (True, False, "1", "cuda:1"),
    (False, True, None, "mps"),
    (False, False, None, "cpu"),
])
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, local_rank, expected):
    from vgpt_cli.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert str(resolve_device("auto")) == expected
    assert str(resolve_device(None)) == expected


def test_device_names_that_are_not_here_fail_with_the_fix(monkeypatch):
    from vgpt_cli.errors import ConfigError
    from vgpt_cli.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, message in (("cuda", "no CUDA GPU is visible"), ("mps", "MPS is not available"),
                          ("tpu", "use auto, cpu")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(name)


# --- 6. no library call changes global state ---------------------------------------------------------------------
def test_load_backbone_leaves_the_global_torch_rng_alone():
    from vgpt_cli.features import load_backbone

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_backbone("test_efficientnet", pretrained=False, image_size=64)
    assert torch.equal(torch.rand(3), expected)
    # and its seeded random init is still reproducible
    a = load_backbone("test_efficientnet", pretrained=False, image_size=64)
    b = load_backbone("test_efficientnet", pretrained=False, image_size=64)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_opening_an_image_leaves_pils_truncated_images_setting_alone(tmp_path):
    from PIL import Image, ImageFile

    from vgpt_cli.features.images import open_rgb

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # a caller's own choice
        open_rgb(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


# --- 8. results the loop must give -------------------------------------------------------------------------------
def test_lr_schedules_and_warmup_give_the_expected_rates(tmp_path):
    import math

    from vgpt_cli.train.optim import lr_factor

    # warm-up 2 then linear decay to 0 over 6 steps; the rate each step used, as logged
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=2)
    result = train(quick(batch_size=2, max_steps=6, warmup=2, schedule="linear", lr=1e-3, name="s"), ws,
                   model=tiny_captioner(), quiet=True)
    got = [r["lr"] / 1e-3 for r in result.history]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25], abs=1e-12)
    cosine = lr_factor("cosine", 2, 6)
    assert [cosine(s) for s in range(6)] == pytest.approx(
        [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], abs=1e-12)
    assert [lr_factor("constant", 3, 6)(s) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert [lr_factor("linear", 0, 4)(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_parameter_groups_lm_rate_and_no_decay_on_norms_and_biases():
    from vgpt_cli.train.optim import make_optimizer

    model = tiny_captioner()
    opt = make_optimizer(model, lr=1e-3, lm_lr=1e-5, weight_decay=0.01)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # every trainable parameter, once
    for name, p in names.items():
        g = group_of[id(p)]
        assert g["lr"] == (1e-5 if name.startswith("lm.") else 1e-3), name
        is_norm_or_bias = re.search(r"[._]bias$", name) or re.search(r"\.(ln_\w+|norm\d*)\.weight$", name)
        assert g["weight_decay"] == (0.0 if is_norm_or_bias else 0.01), name
    assert any(n.startswith("lm.") and ".ln_" in n for n in names)  # the rule was exercised on LM norms


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_gradient_clipping_caps_the_global_norm_the_optimiser_sees(tmp_path, clip):
    from test_train import first_step_gradients

    ws = make_workspace(tmp_path, n_train=4, caps_per_item=2)
    raw = first_step_gradients(ws, tiny_captioner(), batch_size=8)
    raw_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()])))
    assert raw_norm > 0.05  # so that clipping at 0.05 has work to do
    seen: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(quick(batch_size=8, max_steps=1, clip_grad=clip, name=f"c{clip}"), ws, model=tiny_captioner(),
              quiet=True)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert seen[0] == pytest.approx(clip if clip else raw_norm, rel=1e-4)


@pytest.mark.slow
def test_bf16_training_on_cpu_lowers_the_loss(tmp_path):
    ws = make_workspace(tmp_path, n_train=8, caps_per_item=1)
    result = train(quick(lr=1e-2, max_steps=30, precision="bf16", name="bf16"), ws, model=tiny_captioner(),
                   quiet=True)
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_decoding_settings_default_to_the_models_then_the_decoders():
    from vgpt_cli.decode import DecodeOptions
    from vgpt_cli.runtime import decode_options

    model = tiny_captioner()
    assert decode_options(model) == DecodeOptions()
    model.generation = {"beam_size": 3, "max_length": 9}
    assert (decode_options(model).beam_size, decode_options(model).max_length) == (3, 9)
    assert decode_options(model, beam_size=1, max_length=None).beam_size == 1


def test_model_lookup_recovers_best_from_its_old_copy(tmp_path):
    from vgpt_cli.errors import ConfigError
    from vgpt_cli.runtime import resolve_model_dir
    from vgpt_cli.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = ws.run_dir("r1")
    tiny_captioner().save_pretrained(run / ".best.old")  # a kill between the two renames of a best/ save
    ws.set_current(run="r1")
    assert resolve_model_dir(ws, None) == run / ".best.old"
    assert resolve_model_dir(ws, run / "best") == (run / ".best.old").resolve()
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model_dir(ws, tmp_path / "nowhere")


# --- TrainConfig's model part is exactly what --resume may not change -------------------------------------
def test_resume_refuses_a_changed_dropout_or_gate_init(tmp_path):
    """The resumed model comes from last/, so a changed model option would be silently ignored. Before,
    only lm, lm_init, tau, encoder_layers, gating and max_length were refused: encoder_dropout,
    cross_attn_dropout and gate_init_bias were accepted and had no effect."""
    from vgpt_cli.errors import ConfigError
    from vgpt_cli.train.config import RESUME_LOCKED, ModelOptions, TrainConfig

    assert set(RESUME_LOCKED) == set(TrainConfig().part("model").__dataclass_fields__) == {
        "lm", "lm_init", "tau", "encoder_layers", "gating", "gate_init_bias", "max_length", "encoder_dropout",
        "cross_attn_dropout", "coverage"}
    # every CaptionerConfig setting training chooses comes from the model part
    assert isinstance(TrainConfig().part("model"), ModelOptions)
    ws = make_workspace(tmp_path)
    train(quick(max_steps=1, name="m"), ws, model=tiny_captioner(), quiet=True, keep_last=True)
    for change in ({"encoder_dropout": 0.3}, {"cross_attn_dropout": 0.0}, {"gate_init_bias": 2.0}, {"tau": 0.1},
                   {"coverage": 1.0}):
        with pytest.raises(ConfigError, match=f"--resume cannot change {next(iter(change))}"):
            train(quick(max_steps=2, name="m", **change), ws, resume=True, quiet=True)
    resumed = train(quick(max_steps=2, name="m", lr=5e-4), ws, resume=True, quiet=True)  # the rest may change
    assert resumed.steps == 2
