"""Training curves: curves.png after every run, TensorBoard event files with `vgpt train --tensorboard`, and the
mean visual gate the loop logs for them. Tiny random GPT-2 captioners (tests/test_train.py's builders)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import poison_encoder_at
from PIL import Image
from test_train import make_workspace, quick, tiny_captioner, tiny_lm_folder
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.train import NonFiniteLossError, train
from vgpt_cli.train.curves import TensorBoardMirror, read_records, scalars, write_curves

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install -e '.[test]')").EventAccumulator


def set_gates(model, bias: float) -> None:
    for g in model.gates:  # every gate exactly sigmoid(bias), whatever the input
        torch.nn.init.zeros_(g.weight)
        torch.nn.init.constant_(g.bias, bias)


def tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def colour_pixels(png, rgb, tol=30) -> int:
    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB"), dtype=int)
    return int((np.abs(a - np.array(rgb)).sum(-1) < tol).sum())


def test_every_run_writes_curves_png_with_its_three_curves(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)
    result = train(quick(max_steps=4, val_every=2, val_size=2, name="c"), ws, model=tiny_captioner(), quiet=True)
    png = result.run_dir / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (700, 750)
        im.verify()
    # the loss, CIDEr-D and gate lines are drawn (each in its colour), not just empty axes
    assert colour_pixels(png, (0x1b, 0x9e, 0x77)) > 50
    assert colour_pixels(png, (0xd9, 0x5f, 0x02)) > 20
    assert colour_pixels(png, (0x75, 0x70, 0xb3)) > 50
    assert not list(result.run_dir.glob(".*.tmp"))
    # without metrics nothing is drawn
    assert write_curves(tmp_path / "nowhere") is None


def test_a_run_that_fails_still_writes_its_curves(tmp_path):
    ws = make_workspace(tmp_path)
    model = tiny_captioner()

    poison_after_2 = poison_encoder_at(model, 2)

    with pytest.raises(NonFiniteLossError):
        train(quick(max_steps=5, name="nan"), ws, model=model, on_step=poison_after_2, quiet=True)
    with Image.open(ws.run_dir("nan") / "curves.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("bias,tau,want", [(-1.0, 0.2, 1 - 1 / (1 + math.exp(1.0))),  # 1 - g = 0.731 > tau
                                           (5.0, 0.2, 0.0)])                          # 1 - g = 0.007: cut
def test_logged_visual_gate_is_the_gates_mean_over_real_tokens(tmp_path, bias, tau, want):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=2)  # captions of different lengths: padding
    model = tiny_captioner(tau=tau)
    set_gates(model, bias)
    result = train(quick(max_steps=2, lr=1e-12, name="g"), ws, model=model, quiet=True)
    records = [r for r in read_records(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(abs(r["visual_gate"] - want) < 1e-5 for r in records), records


@pytest.mark.slow
def test_cli_tensorboard_events_hold_the_logged_scalars(tmp_path):
    lm_dir = tiny_lm_folder(tmp_path / "tiny-gpt2")
    ws = make_workspace(tmp_path / "ws", n_train=4, caps_per_item=2, n_val=2)
    r = CliRunner().invoke(app, ["-w", str(ws.root), "train", "--lm", str(lm_dir), "--batch-size", "3",
                                 "--max-steps", "4", "--val-every", "2", "--val-size", "2", "--encoder-layers", "1",
                                 "--gating", "srau", "--device", "cpu", "--name", "tb", "--tensorboard", "--json"])
    assert r.exit_code == 0, r.output
    run = ws.run_dir("tb")
    assert "tensorboard/" in r.stderr and (run / "curves.png").is_file()
    records = read_records(run / "metrics.jsonl")
    got = tb_scalars(run / "tensorboard")
    # independently of vgpt_cli.train.curves: the step records and validations as metrics.jsonl has them
    steps = [rec for rec in records if "loss" in rec]
    vals = [rec for rec in records if rec.get("event") == "validation"]
    assert steps and len(vals) == 2
    assert got["train/loss"] == [(rec["step"], pytest.approx(rec["loss"], rel=1e-6)) for rec in steps]
    assert got["train/learning_rate"] == [(rec["step"], pytest.approx(rec["lr"], rel=1e-6)) for rec in steps]
    assert got["train/visual_gate"] == [(rec["step"], pytest.approx(rec["visual_gate"], rel=1e-6)) for rec in steps]
    assert got["eval/cider"] == [(v["step"], pytest.approx(v["cider"], rel=1e-6, abs=1e-7)) for v in vals]
    # without the flag: no event files
    r2 = CliRunner().invoke(app, ["-w", str(ws.root), "train", "--lm", str(lm_dir), "--batch-size", "3",
                                  "--max-steps", "1", "--device", "cpu", "--name", "plain"])
    assert r2.exit_code == 0, r2.output
    assert not (ws.run_dir("plain") / "tensorboard").exists() and (ws.run_dir("plain") / "curves.png").is_file()


def test_mirror_follows_metrics_jsonl_through_scst_and_a_resume(tmp_path):
    metrics = tmp_path / "metrics.jsonl"

    def write(lines, mode="a"):
        with open(metrics, mode, encoding="utf-8") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))

    xe = [{"phase": "xe", "step": s, "loss": 5.0 - s, "lr": 1e-3, "visual_gate": 0.1 * s} for s in (1, 2, 3)]
    mirror = TensorBoardMirror(tmp_path)
    assert mirror.sync() == 0 and not (tmp_path / "tensorboard").exists()  # nothing yet: no folder
    write(xe[:2])
    with open(metrics, "a") as f:
        f.write('{"phase": "xe", "st')  # a line being written: not read yet
    assert mirror.sync() == 6
    # a resume cuts metrics.jsonl back to its checkpoint (step 1) and logs from there again
    write(xe[:1], mode="w")
    write([{"event": "resume", "phase": "xe", "step": 1}, xe[1], xe[2],
           {"event": "validation", "phase": "xe", "step": 3, "cider": 0.5},
           {"phase": "scst", "step": 1, "loss": -0.2, "lr": 1e-5, "reward": 0.7}])
    mirror.sync()
    mirror.close()
    got = tb_scalars(tmp_path / "tensorboard")
    assert got["train/loss"] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, pytest.approx(-0.2))]  # each step once
    assert got["eval/cider"] == [(3, 0.5)] and got["train/reward"] == [(4, pytest.approx(0.7))]
    assert [s for s, _ in got["train/visual_gate"]] == [1, 2, 3]
    # the same scalars as scalars() reads from the whole file
    assert sorted((t, s) for t, s, _ in scalars(read_records(metrics))) == sorted(
        (t, s) for t, pts in got.items() for s, _ in pts)
