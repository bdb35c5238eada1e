"""The training loop's cost over the bare model step, and its achieved FLOP/s.

Both are measured in one run on one machine, on the same batches:
- loop: `vgpt_cli.train.train` on a workspace with a real on-disk feature store (memory-mapped
  float16), so data loading (store rows -> padded float32, tokenisation, host->device copies),
  the NaN check, logging and the per-step bookkeeping are all included;
- bare: forward + summed-token loss + backward + clipping + AdamW + zero_grad on batches that were
  collated and moved to the device beforehand.
Goal: loop seconds per step <= 1.10 x bare seconds per step.
FLOPs of one step are counted by torch.utils.flop_counter (matmuls and attention, forward and
backward) on a real step; the achieved FLOP/s is compared with a float32 matmul measured in the same
run (benchmarks.common.matmul_flops on the CPU; the same n x n matmul on the GPU).

    python benchmarks/train_step.py                 # CPU: a 4-layer, 256-wide GPT-2, batch 16
    python benchmarks/train_step.py --preset gpt2   # GPT-2-small shape, batch 50, N = 50 x 2048 (GPU)
    python benchmarks/train_step.py --smoke         # seconds: a tiny model, 3 steps, checks it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import goal, machine, matmul_flops, print_table, results_dir, write_results  # noqa: E402

PRESETS = {
    # layers, width, heads, d_in, visual tokens, batch
    "small": dict(layers=4, width=256, heads=4, d_in=1280, n_visual=49, batch=16),
    "gpt2": dict(layers=12, width=768, heads=12, d_in=2048, n_visual=50, batch=50),
    # --smoke: seconds, checks that both paths still run (its numbers go to train_step_smoke.json)
    "smoke": dict(layers=1, width=64, heads=2, d_in=64, n_visual=16, batch=8),
}
WORDS = ("a man woman dog cat red blue small large standing sitting on in of with the table street field "
         "holding riding two white black near next to wooden green person bus train plate food").split()


def make_workspace(root: Path, n_items: int, d_in: int, n_visual: int):
    from vgpt_cli.data.manifest import Item, Manifest
    from vgpt_cli.features.store import StoreWriter
    from vgpt_cli.workspace import Workspace

    rng = np.random.default_rng(0)
    ws = Workspace(root)

    def caption() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(8, 14))))

    items = [Item(f"{i}", [f"/img/{i}.jpg"], [caption() for _ in range(5)]) for i in range(n_items)]
    Manifest(dataset="bench", format="synthetic", splits={"train": items, "val": [], "test": []}).save(
        ws.manifest_path("bench"))
    with StoreWriter(ws.features_root / "bench", {"dim": d_in, "fingerprint": "bench", "backbone": "random"}) as w:
        for start in range(0, n_items, 256):
            w.append([(it.id, it.images, rng.standard_normal((n_visual - (i % 3 == 0) * 10, d_in), dtype=np.float32)
                       .astype(np.float16)) for i, it in enumerate(items[start:start + 256], start)])
    ws.set_current(dataset="bench", features="bench")
    return ws


def build_model(p: dict, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from vgpt_cli.model import Captioner, CaptionerConfig

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=p["layers"], n_embd=p["width"], n_head=p["heads"]))
    tok = GPT2TokenizerFast(vocab="tests/assets/gpt2-bpe/vocab.json", merges="tests/assets/gpt2-bpe/merges.txt")
    assert len(tok) > 50000
    cfg = CaptionerConfig(lm="gpt2", lm_init="random", d_in=p["d_in"], encoder_layers=3,
                          encoder_ffn=min(2048, 4 * p["width"]))
    return Captioner.from_config(cfg, lm=lm, tokenizer=tok).to(device)


def device_matmul_flops(device: torch.device, n: int = 4096, repeats: int = 20) -> float:
    if device.type == "cpu":
        return matmul_flops()
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model size (default: small on the CPU, gpt2 on a GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on the CPU, 100 on a GPU)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="alternating loop/bare runs; the best of each counts")
    ap.add_argument("--smoke", action="store_true", help="seconds: the smoke preset, 3 steps, 40 items, 1 repeat")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.steps, args.warmup, args.items, args.repeats = "smoke", 3, 1, 40, 1

    from vgpt_cli.device import resolve_device
    from vgpt_cli.train import TrainConfig, train
    from vgpt_cli.train.data import caption_examples, collate, epoch_order, make_plan
    from vgpt_cli.train.objectives import token_loss_sum
    from vgpt_cli.train.optim import make_optimizer

    device = resolve_device(args.device)
    preset = args.preset or ("gpt2" if device.type == "cuda" else "small")
    p = PRESETS[preset]
    steps = args.steps or (100 if device.type == "cuda" else 30)
    total = args.warmup + steps + 1

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp), args.items, p["d_in"], p["n_visual"])
        from vgpt_cli.data.manifest import Manifest
        from vgpt_cli.features.store import open_workspace_store

        store = open_workspace_store(ws)
        examples = caption_examples(Manifest.load(ws.manifest_path("bench")).items("train"))
        plan = make_plan(len(examples), p["batch"], 1, 1)
        first, last = args.warmup, args.warmup + steps

        def run_loop(name: str) -> tuple[float, int]:
            """Seconds per step of train() between warm-up and the last step (which writes the checkpoint)."""
            stamps: dict[int, float] = {}

            def on_step(record) -> None:
                sync()
                stamps[record["step"]] = time.perf_counter()

            cfg = TrainConfig(lm="gpt2", device=str(device), batch_size=p["batch"], max_steps=total, lr=1e-4,
                              name=name, log_every=10, encoder_warm_start=0)
            result = train(cfg, ws, model=build_model(p, device), on_step=on_step, quiet=True)
            tokens = sum(r["tokens"] for r in result.history[first:last])
            return (stamps[last] - stamps[first]) / steps, tokens

        def run_bare() -> tuple[float, object, list]:
            """Seconds per step of forward/backward/clip/AdamW on batches already collated on the device."""
            model = build_model(p, device).train()
            opt = make_optimizer(model, 1e-4, 1e-4, 0.01)
            batches = []
            for s in range(last):
                epoch, pos = divmod(s, plan.steps_per_epoch)
                (mb,) = plan.micro_batches(epoch_order(len(examples), 42, epoch), pos, 0)
                b = collate(store, model, [examples[i] for i in mb], 20)
                batches.append((b.n_targets, b.to(device)))

            def bare_step(n, b) -> None:
                out = model(b.features, b.lengths, b.input_ids, b.attention_mask, image_index=b.image_index)
                (token_loss_sum(out.logits, b.labels) / n).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            for n, b in batches[:first]:
                bare_step(n, b)
            sync()
            t0 = time.perf_counter()
            for n, b in batches[first:last]:
                bare_step(n, b)
            sync()
            return (time.perf_counter() - t0) / steps, model, batches

        # Alternate loop and bare runs (the machine may be shared); keep the best of each.
        loop_runs, bare_runs = [], []
        for r in range(args.repeats):
            loop_sec, tokens = run_loop(f"bench{r}")
            loop_runs.append(loop_sec)
            bare_sec, bare_model, batches = run_bare()
            bare_runs.append(bare_sec)
        loop_sec, bare_sec = min(loop_runs), min(bare_runs)
        loop_tok_s, bare_tok_s = tokens / (loop_sec * steps), tokens / (bare_sec * steps)

        # --- FLOPs of one step (forward + backward), counted on the timed batches
        from torch.utils.flop_counter import FlopCounterMode

        flops_per_step = 0.0
        for _, b in batches[first:last]:
            counter = FlopCounterMode(display=False)
            with counter:
                out = bare_model(b.features, b.lengths, b.input_ids, b.attention_mask, image_index=b.image_index)
                token_loss_sum(out.logits, b.labels).backward()
            flops_per_step += counter.get_total_flops()
            bare_model.zero_grad(set_to_none=True)
        flops_per_step /= steps
        peak = device_matmul_flops(device)

    label = "cuda" if device.type == "cuda" else "cpu"
    overhead = loop_sec / bare_sec
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "preset": preset,
           "batch": p["batch"], "steps": steps, "repeats": args.repeats, "loop_s_per_step": loop_sec, "bare_s_per_step": bare_sec,
           "loop_tok_s": loop_tok_s, "bare_tok_s": bare_tok_s, "loop_over_bare": overhead,
           "GFLOP_per_step": flops_per_step / 1e9, "loop_TFLOP_s": flops_per_step / loop_sec / 1e12,
           "matmul_TFLOP_s": peak / 1e12, "loop_flops_ratio": flops_per_step / loop_sec / peak,
           "bare_flops_ratio": flops_per_step / bare_sec / peak}
    print_table([row], title=f"training step, {label}, float32 (tokens = caption tokens with loss)")

    # Keep the other device's numbers from an earlier run (CPU here, GPU on a lent machine).
    stem = "train_step_smoke" if args.smoke else "train_step"
    path = results_dir() / f"{stem}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    raw = {k: v for k, v in old.get("raw", {}).items() if k != label}
    goals = {k: v for k, v in old.get("goals", {}).items() if not k.endswith(f"_{label}")}
    raw[label] = dict(row, shape=p, loop_runs_s=loop_runs, bare_runs_s=bare_runs, machine=machine(),
                      threads=torch.get_num_threads(), when=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    goals[f"loop_over_bare_{label}"] = goal(overhead, 1.10, higher_is_better=False)
    write_results(__file__, raw, goals, name=stem)


if __name__ == "__main__":
    main()
