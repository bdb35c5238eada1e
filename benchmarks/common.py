"""Shared by the benchmark scripts: machine description, a table printer, the results file, the gradient-path probe.

Results go to benchmarks/results/<name>.json, or to the folder named by the environment variable
VGPT_BENCHMARK_RESULTS when it is set (the tests run every script's --smoke with it, so that a test never
touches the committed results):

    VGPT_BENCHMARK_RESULTS=/tmp/bench python benchmarks/decode.py --smoke   # writes /tmp/bench/decode_smoke.json

Every script has a --smoke preset (seconds, tiny models and data: it checks that the script runs end to end
and writes its results, its numbers mean nothing) that writes <script>_smoke.json, never the full run's file.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RESULTS_ENV = "VGPT_BENCHMARK_RESULTS"
GPT2_BPE = Path(__file__).resolve().parents[1] / "tests" / "assets" / "gpt2-bpe"


def parse_with_smoke(parser: Any, what: str, **preset: Any) -> Any:
    """parser's arguments plus --smoke, which sets `preset` over them: the seconds-long run of `what` that
    tests/test_benchmark_smokes.py runs for every benchmark."""
    parser.add_argument("--smoke", action="store_true", help=f"seconds, checks that it runs: {what}")
    args = parser.parse_args()
    if args.smoke:
        for key, value in preset.items():
            setattr(args, key, value)
    return args


def results_dir() -> Path:
    """The folder results are written to (and earlier results read from): $VGPT_BENCHMARK_RESULTS or
    benchmarks/results/."""
    folder = os.environ.get(RESULTS_ENV)
    return Path(folder) if folder else RESULTS


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the script exits: a --smoke's workspace, never the full run's."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def scores_without_java() -> None:
    """For --smoke: score as on a machine without Java (the pure-Python PTB tokenizer, METEOR skipped), the
    path CI takes where it has no Java. With Java every scoring starts two JVMs (the PTB tokenizer and
    METEOR), seconds each: most of a smoke's time. The full runs score with Java where there is one."""
    from vgpt_cli.evaluate import metrics

    metrics.java_missing_reason = lambda java="java": "turned off for a benchmark's --smoke"


def tiny_lm(folder: Path) -> Path:
    """A tiny random GPT-2 (2 layers, 32 wide) with the real GPT-2 BPE, saved as a local LM folder that
    `lm=FOLDER` loads like any other: what the --smoke presets train in place of SmolLM2-135M."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        tok = GPT2TokenizerFast(vocab=str(GPT2_BPE / "vocab.json"), merges=str(GPT2_BPE / "merges.txt"))
        assert len(tok) > 50000  # the empty-tokenizer trap of transformers 5
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **cpu_model(),
    }
    return info


def cpu_model() -> dict[str, Any]:
    """The CPU's name and its bf16 units: the same "2-core machine" has been an AMX Xeon on one day and an
    AMD EPYC without AVX-512 on another, 3x slower per training step of the demo (docs/results.md)."""
    from vgpt_cli.model.precision import BF16_CPU_FLAGS, cpu_flags, cpuinfo_field

    model, flags = cpuinfo_field("model name"), cpu_flags()
    if model is None and not flags:  # no /proc/cpuinfo to read
        return {}
    return {"cpu_model": model, "cpu_bf16": sorted(flags & BF16_CPU_FLAGS), "cpu_avx512": "avx512f" in flags}


def goal(value: float, target: float, higher_is_better: bool = True) -> dict[str, Any]:
    met = value >= target if higher_is_better else value <= target
    return {"value": round(float(value), 4), "target": target, "higher_is_better": higher_is_better, "met": bool(met)}


def print_table(rows: list[dict[str, Any]], title: str = "") -> None:
    if title:
        print(title)
    if not rows:
        return
    cols = list(rows[0])
    cells = [[f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(script: str, raw: dict[str, Any], goals: dict[str, dict[str, Any]], name: str | None = None) -> Path:
    """Write <results_dir()>/<script>.json (or <name>.json) with the raw numbers, the machine and the goals."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or Path(script).stem}.json"
    payload = {"script": Path(script).name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine(), "raw": raw, "goals": goals}
    # a temporary name, then a rename: a killed script never leaves half a file, and a study's results file
    # is also its record of finished runs (realphoto_study.py --recorded)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    for name, g in goals.items():
        print(f"goal {name}: {g['value']} (target {'>=' if g['higher_is_better'] else '<='} {g['target']}): "
              f"{'met' if g['met'] else 'NOT met'}")
    print(f"wrote {path}")
    return path


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 FLOP/s of a plain n x n matmul on this machine, now."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


# --- measurements inside a captioner during training (realphoto, grounding) -----------------------
def gradient_path(model, batch) -> dict:
    """One teacher-forced pass + backward on `batch` (eval mode: no dropout), SRAU or plain cross-attention
    alike. Per block: the share of visual channels open (1 - g > tau, with the tau in force; 1 without
    gates), the image's share of the block's output (norm of its visual part over the linguistic part:
    (1 - g) 1[..] C against g 1[..] A with SRAU, mean_k C_k against A without), and the gradient norms that
    reach the cross-attention and the visual encoder (parameters that train at this step)."""
    import math

    import torch

    import vgpt_cli.model.captioner as cap

    real = batch.attention_mask.bool()
    blocks: list[dict] = []

    def norms(ling, vis) -> dict:
        sel = real  # (B, T): real caption positions
        ln, vn = float(ling[sel].norm(dim=-1).mean()), float(vis[sel].norm(dim=-1).mean())
        return {"visual_over_linguistic": vn / max(ln, 1e-9)}

    def srau(a, c, gates, t, want_gates=True):
        with torch.no_grad():
            g = gates(a, c)
            open_ = ((1 - g) > t)
            sel = real[:, None, :].expand(g.shape[:3])
            ling = (torch.where(g > t, g, 0.0) * a.unsqueeze(1)).sum(1)
            vis = (torch.where(open_, 1 - g, 0.0) * c).sum(1)
            blocks.append({"open": float(open_[sel].float().mean()), **norms(ling, vis)})
        return srau_orig(a, c, gates, t, want_gates)

    def residual(a, c):
        with torch.no_grad():
            blocks.append({"open": 1.0, **norms(a, c.mean(dim=1))})
        return residual_orig(a, c)

    srau_orig, residual_orig = cap.srau_combine, cap.residual_combine
    was, fused = model.training, model.fused_inference
    cap.srau_combine, cap.residual_combine = srau, residual
    model.eval()
    model.fused_inference = False
    try:
        model.zero_grad(set_to_none=True)
        out = model(batch.features, batch.lengths, batch.input_ids, batch.attention_mask, labels=batch.labels,
                    image_index=batch.image_index)
        out.loss.backward()
    finally:
        cap.srau_combine, cap.residual_combine = srau_orig, residual_orig
        model.train(was)
        model.fused_inference = fused

    def norm(params) -> float:
        sq = [q.grad.detach().float().pow(2).sum() for q in params if q.grad is not None]
        return float(torch.stack(sq).sum().sqrt()) if sq else 0.0

    xattn = [norm(x.parameters()) for x in model.xattn]
    rec = {"loss": round(float(out.loss.detach()), 4),
           "open_visual_channels": [round(b["open"], 3) for b in blocks],
           "image_share": [round(b["visual_over_linguistic"], 4) for b in blocks],
           "xattn_grad": [float(f"{v:.3g}") for v in xattn],
           "xattn_grad_total": float(f"{math.sqrt(sum(v * v for v in xattn)):.3g}"),
           "encoder_grad": float(f"{norm(model.encoder.parameters()):.3g}")}
    model.zero_grad(set_to_none=True)
    return rec


def validation_curve(run_dir: Path) -> list[dict]:
    """[{step, cider}] of the run's validations (metrics.jsonl)."""
    from vgpt_cli.train.curves import METRICS_FILE, read_records

    return [{"step": r["step"], "cider": round(r["cider"], 4)} for r in read_records(run_dir / METRICS_FILE)
            if r.get("event") == "validation"]


def last_third(curve: list[dict], steps: int) -> list[float]:
    """The validation CIDEr scores of a run's last third of steps."""
    return [c["cider"] for c in curve if c["step"] >= steps * 2 / 3]


def flat(scores: list[float], tolerance: float = 0.05, floor: float = 0.05) -> bool | None:
    """Every score within `tolerance` of their mean (relative), or within `floor` (absolute) where the
    mean is near 0. None with fewer than 3 scores. The floor is in CIDEr's units: 0.05 suits the shapes
    scenes (CIDEr 1-4), not real photos (0.1-0.5)."""
    if len(scores) < 3:
        return None
    mean = sum(scores) / len(scores)
    return max(abs(v - mean) for v in scores) <= max(tolerance * abs(mean), floor)


def converged(curve: list[dict], steps: int, tolerance: float = 0.05, floor: float = 0.05) -> bool | None:
    """Validation CIDEr flat over the last third of the run (`flat`)."""
    return flat(last_third(curve, steps), tolerance, floor)
