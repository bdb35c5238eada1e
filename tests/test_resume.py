"""Resume (issue 12): a resumed run continues exactly where the interrupted one stopped, never undoes a
stop, finds the right run, and refuses changes it could not honour. Tiny random GPT-2 captioners with the
real GPT-2 BPE tokenizer (see test_train.py).

Each defect test is named for the defect it pins down and fails on the code before its fix.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import Killed, kill_at, metrics, one_line
from safetensors.torch import load_file
from test_train import make_workspace, max_diff, quick, tiny_captioner, tiny_lm_folder
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)
runner = CliRunner()


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
    # 300 steps: far more than can run between seeing last/ and the signal, even on an idle machine
    args = ["train", "--lm", str(lm_dir), "--encoder-layers", "1", "--batch-size", "2", "--max-steps", "300",
            "--save-every", "1", "--device", "cpu", "--name", "cc"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    # a test runner's worker may ignore SIGINT, and an ignored signal stays ignored in its children: the
    # training process gets the default disposition back, as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "vgpt_cli", "-w", str(ws.root), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600  # a busy machine can take minutes to import torch and start
    while not (ws.run_dir("cc") / "last").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # a SIGINT during the imports can be swallowed by a library's bare `except`: only interrupt training
    assert (ws.run_dir("cc") / "last").is_dir() and proc.poll() is None, "no checkpoint to interrupt in time"
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # the signal fell where a library swallowed it: a user presses again
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    match = re.search(r"Resume with:\s*\n\s*vgpt (.+)", stderr)
    assert match, stderr
    printed = match.group(1).split()
    assert printed == ["-w", str(ws.root), "train", "--resume", "--name", "cc"]
    state = json.loads((ws.run_dir("cc") / "last" / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 300
    r = runner.invoke(app, printed)  # exactly as printed
    assert r.exit_code == 0, r.output
    assert f"resuming {ws.run_dir('cc')} at step {state['step']}" in one_line(r.stderr)
    assert json.loads((ws.run_dir("cc") / "result.json").read_text())["steps"] == 300


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
