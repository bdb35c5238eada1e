"""Kill campaign: `vgpt train` on a tiny model, SIGKILLed at random moments and resumed each time.

    python benchmarks/kill_campaign.py              # 20 kills (about 3-5 minutes on a 2-core CPU)
    python benchmarks/kill_campaign.py --kills 5    # a quicker look
    python benchmarks/kill_campaign.py --smoke      # seconds: 1 kill, 4 steps (three `vgpt train` starts)

A tiny random GPT-2 (real GPT-2 BPE tokenizer from tests/assets) trains on random features of a toy
dataset, checkpointing every step (so many kills land inside a save) and validating every 5 steps (with
patience high enough that every run trains all its steps: a tiny random model's CIDEr-D stays 0).
The same run is first trained without interruption (which also times a start and a step). Then the
campaign starts it, kills it with SIGKILL at a random moment (during the start, or 1 to 3 checkpoints
later, inside a step or its save), resumes it with `vgpt train --resume --name kc` (killed again at random), and so on until it
ends. It checks:
- every resume continues: its "resuming ... at step k" is the step of the checkpoint left on disk;
- after every kill, the run folder holds a loadable checkpoint where one was written (best/ or
  .best.old/, last/ or .last.old/), and no temporary folder survives to the end;
- metrics.jsonl has each step once;
- the final weights equal the uninterrupted run's bit for bit (CPU, one thread).
Writes benchmarks/results/kill_campaign.json (--smoke: kill_campaign_smoke.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import goal, parse_with_smoke, print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2_BPE = ROOT / "tests" / "assets" / "gpt2-bpe"
D_IN = 16
WORDS = "a man cat dog red blue ball on the table with two riding wave grass park street".split()


def build(root: Path) -> tuple[Path, Path]:
    """A toy workspace (24 train + 4 val items, random features) and a tiny random GPT-2 folder."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from vgpt_cli.data.manifest import Item, Manifest
    from vgpt_cli.features.store import StoreWriter
    from vgpt_cli.workspace import Workspace

    ws = Workspace(root / "ws")
    rng = np.random.default_rng(0)

    def caption() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9))))

    train = [Item(f"t{i}", [f"/img/t{i}.jpg"], [caption(), caption()]) for i in range(24)]
    val = [Item(f"v{i}", [f"/img/v{i}.jpg"], [caption(), caption()]) for i in range(4)]
    Manifest(dataset="toy", format="test", splits={"train": train, "val": val, "test": []}).save(
        ws.manifest_path("toy"))
    with StoreWriter(ws.features_root / "fp0", {"dim": D_IN, "fingerprint": "fp0", "backbone": "toy"}) as w:
        w.append([(it.id, it.images, rng.standard_normal((int(rng.integers(3, 7)), D_IN)).astype(np.float16))
                  for it in train + val])
    ws.set_current(dataset="toy", features="fp0")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    tok = GPT2TokenizerFast(vocab=str(GPT2_BPE / "vocab.json"), merges=str(GPT2_BPE / "merges.txt"))
    lm_dir = root / "tiny-gpt2"
    lm.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    return ws.root, lm_dir


def train_args(ws: Path, lm_dir: Path, name: str, steps: int) -> list[str]:
    options = ws.parent / "train.yaml"  # options that have no flag: log every step
    options.write_text("log_every: 1\n")
    return [sys.executable, "-m", "vgpt_cli", "-w", str(ws), "train", "--config", str(options),
            "--lm", str(lm_dir), "--encoder-layers", "1",
            "--batch-size", "4", "--max-steps", str(steps), "--save-every", "1", "--val-every", "5",
            "--val-size", "4", "--patience", "1000", "--lr", "1e-3", "--device", "cpu", "--name", name, "--keep-last"]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def loadable(run: Path, which: str) -> bool | None:
    """None: no such checkpoint yet; else whether it loads (weights, and trainer state for last)."""
    from vgpt_cli.model import Captioner
    from vgpt_cli.model_folders import checkpoint_dir
    from vgpt_cli.train.checkpoint import load_trainer_state

    folder = checkpoint_dir(run, which)
    if folder is None:
        return None
    try:
        Captioner.from_pretrained(folder)
        if which == "last":
            load_trainer_state(folder)
    except Exception:  # noqa: BLE001 - any failure is what this campaign looks for
        return False
    return True


def saved_step(run: Path, quiet: bool = False) -> int | None:
    """The step of the `last` checkpoint on disk. quiet: while a run writes it (a swap may be under way),
    None instead of an error."""
    from vgpt_cli.model_folders import checkpoint_dir

    try:
        folder = checkpoint_dir(run, "last")
        return None if folder is None else int(json.loads((folder / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        if quiet:
            return None
        raise


def wait_until(proc: subprocess.Popen, done, seconds: float) -> None:
    """Until done() or the process ends or `seconds` pass (polled every 10 ms)."""
    end = time.perf_counter() + seconds
    while proc.poll() is None and time.perf_counter() < end and not done():
        time.sleep(0.01)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = parse_with_smoke(p, "1 kill, 4 steps, into kill_campaign_smoke.json", kills=1, steps=4)
    rnd = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="vgpt-kill-"))
    t_all = time.perf_counter()
    try:
        ws, lm_dir = build(tmp)
        t0, wall0 = time.perf_counter(), time.time()
        ref = subprocess.run(train_args(ws, lm_dir, "ref", a.steps), env=env(), capture_output=True, text=True)
        if ref.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{ref.stderr[-3000:]}")
        ref_seconds = time.perf_counter() - t0
        # How long a start (imports) and a step (with its save) take: the kills are timed from these.
        times = [r["time"] for r in map(json.loads, (ws / "runs" / "ref" / "metrics.jsonl").read_text().splitlines())
                 if "loss" in r]
        step_s = (times[-1] - times[0]) / max(1, len(times) - 1)
        startup_s = max(0.0, times[0] - wall0 - step_s)
        run = ws / "runs" / "kc"
        rows, problems = [], []
        attempt, finished = 0, False
        while not finished:
            before = saved_step(run)
            cmd = train_args(ws, lm_dir, "kc", a.steps) + (["--resume"] if before is not None else [])
            killing = attempt < a.kills
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if killing:
                # One kill in five during the start (imports, resume: cutting metrics.jsonl back); the others
                # once 1 to 3 more checkpoints are on disk, plus a random part of a step (each step ends with
                # a save, so many land inside one). Counting checkpoints, not seconds, keeps 20 kills before
                # the end however long a start takes on a busy machine. A run that ends first is the last attempt.
                if rnd.random() < 0.2:  # at the latest when its first checkpoint appears (a start may be quick)
                    wait_until(proc, lambda b=before or 0: (saved_step(run, quiet=True) or 0) > b,
                               rnd.uniform(0.3, 1.0) * startup_s)
                else:
                    target = (before or 0) + rnd.randint(1, 3)
                    wait_until(proc, lambda t=target: (saved_step(run, quiet=True) or 0) >= t, 600)
                    wait_until(proc, lambda: False, rnd.uniform(0.0, 1.0) * step_s)
                if proc.poll() is None:
                    proc.kill()
            _, stderr = proc.communicate()
            seconds = time.perf_counter() - t0
            killed = proc.returncode == -9
            if not killed and proc.returncode != 0:
                problems.append(f"attempt {attempt}: exit {proc.returncode}: {stderr[-500:]}")
                break
            m = re.search(r"resuming \S+ at step (\d+)", stderr)
            resumed_at = int(m.group(1)) if m else None
            if before is not None and m is None and not killed:
                problems.append(f"attempt {attempt}: a resume that did not say where it continued")
            if resumed_at is not None and resumed_at != before:
                problems.append(f"attempt {attempt}: resumed at {resumed_at}, the checkpoint on disk was {before}")
            best_ok, last_ok = loadable(run, "best"), loadable(run, "last")
            if best_ok is False or last_ok is False:
                problems.append(f"attempt {attempt}: a checkpoint does not load (best {best_ok}, last {last_ok})")
            rows.append({"attempt": attempt, "killed": killed, "seconds": round(seconds, 2),
                         "checkpoint_before": before, "resumed_at": resumed_at, "checkpoint_after": saved_step(run),
                         "best_loads": best_ok, "last_loads": last_ok,
                         "temporaries": len(list(run.glob(".*.tmp-*"))) if run.is_dir() else 0,
                         "old_folders": len(list(run.glob(".*.old"))) if run.is_dir() else 0})
            finished = not killed
            attempt += 1
        left = sorted(p.name for p in run.glob(".*.tmp-*")) + sorted(p.name for p in run.glob(".*.old"))
        if left:
            problems.append(f"left in the finished run folder: {left}")
        steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        each_once = steps == list(range(1, a.steps + 1))
        if not each_once:
            problems.append(f"metrics.jsonl steps are not 1..{a.steps} once each: {steps}")
        from safetensors.torch import load_file

        w_ref = load_file(str(ws / "runs" / "ref" / "last" / "model.safetensors"))
        w_kc = load_file(str(run / "last" / "model.safetensors"))
        identical = w_ref.keys() == w_kc.keys() and all(bool((w_ref[k] == w_kc[k]).all()) for k in w_ref)
        if not identical:
            problems.append("the final weights differ from the uninterrupted run's")
        kills = sum(r["killed"] for r in rows)
        # a kill inside a save leaves its temporary folder (until the next start) or a .old folder; a kill
        # during a start that had not yet removed the previous kill's folder counts too (an upper bound)
        in_saves = sum(bool(r["killed"] and (r["temporaries"] or r["old_folders"])) for r in rows)
        print_table(rows, f"kill campaign: {kills} kills ({in_saves} inside a save), {a.steps} steps, "
                          "checkpoint every step")
        for pr in problems:
            print("PROBLEM:", pr)
        raw = {"kills": kills, "kills_inside_saves": in_saves, "steps": a.steps, "reference_seconds": round(ref_seconds, 2),
               "startup_seconds": round(startup_s, 2), "step_seconds": round(step_s, 3), "attempts": rows,
               "metrics_each_step_once": each_once, "final_weights_bit_identical": identical,
               "problems": problems, "seconds": round(time.perf_counter() - t_all, 1)}
        goals = {
            "kills": goal(kills, 20),
            "kills_inside_saves": goal(in_saves, 1),
            "problems": goal(len(problems), 0, higher_is_better=False),
            "final_weights_bit_identical": goal(float(identical), 1.0),
        }
        write_results(__file__, raw, goals, name="kill_campaign_smoke" if a.smoke else None)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
