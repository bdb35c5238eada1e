"""Beam-search speed against what a user would pick instead, in one run.

Rows (captions/s, all decoding the same images' memory with the same beams and lengths):
- ours, K = 1 and K = 3: our cached SRAU beam search (`vgpt_cli.decode.search.beam_search`), the
  visual encoder included in the time;
- hf-xattn: transformers' GPT2LMHeadModel with `add_cross_attention=True` (the decoder that
  VisionEncoderDecoderModel runs) in `generate(num_beams=...)`, cross-attending to one level's N
  memory tokens (`encoder_hidden_states`, given ready: its encoder is not timed);
- hf-xattn KxN: the same peer reading all K = 3 levels' tokens (K x N, the memory ours K = 3 reads);
- lm-only generate: the same GPT-2 without cross-attention (no image at all), for scale;
- no-cache reference (K = 3): `reference_beam_search`, the full forward pass every step, timed once
  (it is also the equality check: ours must produce the same tokens before its speed means anything).
All models share one random GPT-2 (width, depth, heads, vocabulary); every search forces the same
number of tokens (EOS only at the last step: min length = max length - 1) and scores by summed
log-probabilities (no length penalty). The timed rows are measured interleaved (ours K=1, ours K=3,
peer, lm-only, then again) `--repeats` times and the median of each is kept, so that the ratios come
from the same moments of a shared machine. On the CPU the rates are computed from the process's CPU
time (one thread: the search's own work; the wall times are recorded too), on CUDA from wall time.
Each method's warm-up search also counts the floating-point operations of its matrix products
(torch.utils.flop_counter), so that a ratio of times can be read against the ratio of arithmetic.

Precision rows (CPU; batch 1 and 8 by default, --precision-batches): ours K = 1 with its weights
narrowed as `vgpt caption --precision` narrows them (vgpt_cli.model.precision: fp16 weights, int8
dynamic quantization, bf16 where the CPU has bf16 units) against ours at fp32, and the peer with the
same dynamic quantization of its Linear layers; interleaved and timed as above.

    python benchmarks/decode.py                   # CPU, 1 thread, GPT-2-small shape, batch 4: ~2 min idle
    python benchmarks/decode.py --preset gpu      # batch 32, on cuda (and cpu) when there is one
    python benchmarks/decode.py --batch 8 --layers 12 --devices cpu
    python benchmarks/decode.py --profile         # torch.profiler's top operations instead of timing
    python benchmarks/decode.py --smoke           # seconds: a 1-layer 64-wide LM, batch 2, 4 tokens, checks it runs

Goals (per device): ours K=1 >= 1.5x hf-xattn, ours K=3 >= 1.2x hf-xattn, ours K=3 >= 1.0x the peer
reading the same K x N memory, ours K=3 >= 3x the no-cache reference; on the CPU: int8 >= 2x fp32 at
batch 1 and 8, ours int8 >= 1.2x the peer int8, bf16 >= 1.5x fp32 (only on a CPU with bf16 units).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import goal, print_table, write_results  # noqa: E402
from vgpt_cli.decode.reference import reference_beam_search  # noqa: E402
from vgpt_cli.decode.search import DecodeOptions, beam_search  # noqa: E402
from vgpt_cli.model import Captioner, CaptionerConfig  # noqa: E402

BPE = Path(__file__).resolve().parent.parent / "tests" / "assets" / "gpt2-bpe"
PRESETS = {
    # CPU: the GPT-2-small shape at a batch that keeps the whole script under 5 minutes on 2 cores, on one
    # thread: on a shared 2-core machine a second OpenMP thread waits on a busy core at every operation
    # (tens of ms per small op), which measures the machine's other jobs, not the decoders
    "cpu": dict(batch=4, layers=12, repeats=3, threads=1),
    "gpu": dict(batch=32, layers=12, repeats=5, threads=None),
    # --smoke: every method once on a tiny LM (its numbers go to decode_smoke.json)
    "smoke": dict(batch=2, layers=1, width=64, repeats=1, threads=1, beams=2, max_length=4, n_visual=4, d_in=16,
                  precision_batches="1,2"),
}
BASE = dict(width=768, beams=5, max_length=20, n_visual=49, d_in=1280, precision_batches="1,8")


def build(device: str, layers: int, d_in: int, n_visual: int, width: int = 768):
    """Our K=1 and K=3 captioners and the transformers peer, all on one random GPT-2-small-shaped LM
    (`width` wide, a head per 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(BPE / "vocab.json"), merges=str(BPE / "merges.txt"))
    assert len(tok) > 50000
    shape = dict(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=len(tok), n_positions=64)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    ours = {}
    for k in (1, 3):
        cfg = CaptionerConfig(lm="gpt2-small-random", d_in=d_in, encoder_layers=k)
        ours[k] = Captioner.from_config(cfg, lm=lm, tokenizer=tok).to(device).eval()
    peer = GPT2LMHeadModel(GPT2Config(**shape, add_cross_attention=True)).eval()
    missing, unexpected = peer.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and all("crossattention" in k or "ln_cross_attn" in k for k in missing)
    return ours, peer.to(device), tok


def clock(fn, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def count_flops(fn) -> tuple[object, int]:
    """fn's result and the floating-point operations of its matrix products (mm, addmm, bmm, baddbmm;
    attention scores are not counted on the CPU, under 1% here)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def search_inputs(dev: str, args, B: int, seed: int, eos: int, bos: int):
    """B images of random features (all N tokens real), the search options forcing max_length tokens, and
    the same search for transformers' generate: (feats, lengths, opts, bos ids, generate kwargs)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, args.n_visual, args.d_in, generator=gen).to(dev)
    lengths = torch.full((B,), args.n_visual, dtype=torch.long, device=dev)
    n = args.max_length
    opts = DecodeOptions(beam_size=args.beams, max_length=n, min_length=n - 1)
    bos_ids = torch.full((B, 1), bos, dtype=torch.long, device=dev)
    common = dict(attention_mask=torch.ones_like(bos_ids), num_beams=args.beams, max_new_tokens=n,
                  min_new_tokens=n - 1, do_sample=False, length_penalty=0.0, early_stopping=False,
                  pad_token_id=eos, eos_token_id=eos)
    return feats, lengths, opts, bos_ids, common


def timed_interleaved(methods: dict, dev: str, repeats: int) -> tuple[dict[str, list], dict[str, list]]:
    """All methods in turn, `repeats` times (so that the load of a shared machine falls on every method
    alike): (wall seconds, CPU seconds) of each run, per method. The caller warms them up first."""
    wall = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            w, c = clock(fn, dev)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def medians(runs: dict[str, list]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in runs.items()}


def setup(dev: str, args):
    """The models, the images and one zero-argument callable per timed method."""
    ours, peer, tok = build(dev, args.layers, args.d_in, args.n_visual, args.width)
    B = args.batch
    feats, lengths, opts, bos, common = search_inputs(dev, args, B, 0, ours[1].eos_token_id,
                                                      peer.config.bos_token_id)
    # the peer's memory: the same number of tokens, already at the decoder's width (its encoder's output)
    with torch.no_grad():
        levels = ours[3].encoder(feats, lengths[:, None] > torch.arange(args.n_visual, device=dev))  # (B, 3, N, D)
        memory = ours[1].encoder(feats, lengths[:, None] > torch.arange(args.n_visual, device=dev))[:, -1]
    memory_kn = levels.reshape(B, -1, levels.shape[-1])  # the K x N tokens ours K=3 attends to

    def hf_xattn():
        with torch.no_grad():
            return peer.generate(bos, encoder_hidden_states=memory, **common)

    def hf_xattn_kn():
        with torch.no_grad():
            return peer.generate(bos, encoder_hidden_states=memory_kn, **common)

    def lm_only():
        with torch.no_grad():
            return ours[1].lm.generate(bos, **common)

    methods = {"ours K=1": lambda: beam_search(ours[1], feats, lengths, opts),
               "ours K=3": lambda: beam_search(ours[3], feats, lengths, opts),
               "hf-xattn": hf_xattn, "hf-xattn KxN": hf_xattn_kn, "lm-only generate": lm_only}
    return ours, feats, lengths, opts, methods


def profile(dev: str, args, rows: int = 20) -> None:
    """Where a search's time goes, per operation (self time), for ours K=3 and the peer."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, _, _, _, methods = setup(dev, args)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    for name in ("ours K=3", "ours K=1", "hf-xattn"):
        methods[name]()  # warm-up
        with torch_profile(activities=acts) as prof:
            methods[name]()
        sort = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
        print(f"== {name}, {dev}, {torch.get_num_threads()} threads: one beam search "
              f"(batch {args.batch}, beam {args.beams}, {args.max_length} tokens)")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def run(dev: str, args) -> dict:
    ours, feats, lengths, opts, methods = setup(dev, args)
    B, n = args.batch, args.max_length
    # warm-up, counting each search's arithmetic; every search emits exactly n tokens per caption
    flops = {}
    for name, fn in methods.items():
        out, flops[name] = count_flops(fn)
        got = {len(h[0].token_ids) for h in out} if name.startswith("ours") else {out.shape[1] - 1}
        assert got == {n}, f"{name} emitted {got} tokens, not {n}"
    # interleaved (ours K=1, ours K=3, peer, lm-only, then again ...); the median of the repetitions is kept
    wall, cpu = timed_interleaved(methods, dev, args.repeats)
    med_wall, med_cpu = medians(wall), medians(cpu)
    # the speed goals read CPU time: on one thread it is the search's own work, and a shared machine's
    # other jobs stretch the wall time of every method by a different, changing factor
    basis = med_wall if dev.startswith("cuda") else med_cpu
    rate = {k: B / v for k, v in basis.items()}
    # the no-cache reference, once, on the first --reference-batch images: its run is also the
    # equality check of the K = 3 cache (ours must emit the same tokens)
    rb = min(args.reference_batch, B)
    ours_k3 = beam_search(ours[3], feats[:rb], lengths[:rb], opts)
    holder = {}
    ref_w, ref_c = clock(lambda: holder.setdefault("ref", reference_beam_search(ours[3], feats[:rb], lengths[:rb],
                                                                                 opts)), dev)
    agree = sum(x[0].token_ids == y[0].token_ids for x, y in zip(ours_k3, holder["ref"])) / rb
    ref_name = f"no-cache reference K=3 ({rb} images)"
    rate["no-cache reference K=3"] = rb / (ref_w if dev.startswith("cuda") else ref_c)
    rows = [{"method": k, "wall_s": med_wall[k], "cpu_s": med_cpu[k], "captions_per_s": rate[k],
             "vs hf-xattn": rate[k] / rate["hf-xattn"], "GFLOP": flops[k] / 1e9,
             "hf-xattn GFLOP / this": flops["hf-xattn"] / flops[k]} for k in methods]
    rows.append({"method": ref_name, "wall_s": ref_w, "cpu_s": ref_c, "captions_per_s": rate["no-cache reference K=3"],
                 "vs hf-xattn": rate["no-cache reference K=3"] / rate["hf-xattn"], "GFLOP": None,
                 "hf-xattn GFLOP / this": None})
    print_table(rows, title=f"beam {args.beams}, batch {B}, {n} tokens, {args.layers}-layer GPT-2-small-shaped LM, "
                            f"{args.n_visual} memory tokens, device {dev}, {torch.get_num_threads()} threads, "
                            f"median of {args.repeats} interleaved repetitions; rates from "
                            f"{'wall' if basis is med_wall else 'CPU'} time")
    return {"wall_seconds": wall, "cpu_seconds": cpu, "median_wall_seconds": med_wall, "median_cpu_seconds": med_cpu,
            "rates_from": "wall" if basis is med_wall else "cpu", "captions_per_s": rate,
            "matmul_flops_per_search": flops,
            "reference_seconds": {"wall": ref_w, "cpu": ref_c, "images": rb},
            "ours_k3_equals_reference": agree, "ours_k1_vs_hf_xattn": rate["ours K=1"] / rate["hf-xattn"],
            "ours_k3_vs_hf_xattn": rate["ours K=3"] / rate["hf-xattn"],
            "ours_k3_vs_hf_xattn_kn": rate["ours K=3"] / rate["hf-xattn KxN"],
            "ours_k1_vs_hf_xattn_wall": med_wall["hf-xattn"] / med_wall["ours K=1"],
            "ours_k3_vs_hf_xattn_wall": med_wall["hf-xattn"] / med_wall["ours K=3"],
            "hf_xattn_flops_over_ours_k1": flops["hf-xattn"] / flops["ours K=1"],
            "hf_xattn_flops_over_ours_k3": flops["hf-xattn"] / flops["ours K=3"],
            "hf_xattn_flops_over_lm_only": flops["hf-xattn"] / flops["lm-only generate"],
            "ours_k3_vs_reference": rate["ours K=3"] / rate["no-cache reference K=3"],
            "ours_k3_vs_lm_only_generate": rate["ours K=3"] / rate["lm-only generate"]}


def peer_generate(model, bos, memory, kwargs: dict):
    with torch.no_grad():
        return model.generate(bos, encoder_hidden_states=memory, **kwargs)


def run_precisions(dev: str, args) -> dict:
    """Ours K=1 at fp32 / fp16 / int8 (and bf16 where the CPU has bf16 units) and the peer at fp32 / int8,
    at each batch of --precision-batches: captions/s from CPU time, and the ratios of the goals."""
    import copy

    from vgpt_cli.model.precision import conv1d_as_linear, cpu_has_fast_bf16, dynamic_quantize, narrow_model

    ours, peer, _ = build(dev, args.layers, args.d_in, args.n_visual, args.width)
    narrow = ["fp16", "int8"] + (["bf16"] if cpu_has_fast_bf16() else [])
    models = {"fp32": ours[1], **{p: narrow_model(copy.deepcopy(ours[1]), p) for p in narrow}}
    peer_int8 = copy.deepcopy(peer)
    conv1d_as_linear(peer_int8)
    dynamic_quantize(peer_int8)
    out: dict = {"precisions": list(models), "batches": {}}
    for B in [int(b) for b in str(args.precision_batches).split(",")]:
        feats, lengths, opts, bos, common = search_inputs(dev, args, B, 1, ours[1].eos_token_id,
                                                          peer.config.bos_token_id)
        with torch.no_grad():
            memory = ours[1].encoder(feats, lengths[:, None] > torch.arange(args.n_visual, device=dev))[:, -1]

        methods = {f"ours {p}": functools.partial(beam_search, m, feats, lengths, opts) for p, m in models.items()}
        methods.update({name: functools.partial(peer_generate, m, bos, memory, common)
                        for name, m in (("peer fp32", peer), ("peer int8", peer_int8))})
        for fn in methods.values():  # warm-up
            fn()
        wall, cpu = timed_interleaved(methods, dev, args.repeats)
        med_wall, med_cpu = medians(wall), medians(cpu)
        rate = {k: B / v for k, v in med_cpu.items()}
        rows = [{"batch": B, "method": k, "cpu_s": med_cpu[k], "wall_s": med_wall[k], "captions_per_s": rate[k],
                 "vs ours fp32": rate[k] / rate["ours fp32"]} for k in methods]
        print_table(rows, title=f"precisions: beam {args.beams}, batch {B}, {args.max_length} tokens, {args.layers}-layer LM, "
                                f"{torch.get_num_threads()} threads, median of {args.repeats}; rates from CPU time")
        ratios = {f"{p}_vs_fp32": rate[f"ours {p}"] / rate["ours fp32"] for p in narrow}
        ratios["ours_int8_vs_peer_int8"] = rate["ours int8"] / rate["peer int8"]
        ratios["peer_int8_vs_peer_fp32"] = rate["peer int8"] / rate["peer fp32"]
        out["batches"][str(B)] = {"median_wall_seconds": med_wall, "median_cpu_seconds": med_cpu,
                                  "captions_per_s": rate, **ratios}
    if "bf16" not in models:
        out["bf16"] = "not measured: this CPU has no bf16 units (AMX or AVX-512 BF16), where bf16 runs slower than fp32"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="default sizes: cpu (2-core laptop) or gpu (batch 32, cuda too when present)")
    ap.add_argument("--devices", default=None, help="comma-separated; default: cpu (preset cpu), "
                                                     "cuda when there is one (preset gpu)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (preset)")
    ap.add_argument("--beams", type=int, default=None, help="default 5")
    ap.add_argument("--max-length", type=int, default=None, help="default 20")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (preset: 12, GPT-2 small)")
    ap.add_argument("--width", type=int, default=None, help="decoder width (default 768, GPT-2 small)")
    ap.add_argument("--n-visual", type=int, default=None, help="memory tokens (default 49: EfficientNet-Lite0's 7x7 grid)")
    ap.add_argument("--d-in", type=int, default=None, help="visual feature width (default 1280)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method, interleaved (median kept)")
    ap.add_argument("--reference-batch", type=int, default=1,
                    help="images for the (slow) no-cache reference and the equality check")
    ap.add_argument("--precision-batches", default=None,
                    help="comma-separated batch sizes of the precision rows (default 1,8); '' skips them")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (preset cpu: 1; gpu: torch's own choice)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: torch.profiler's top operations of ours K=3 and hf-xattn (one search each)")
    ap.add_argument("--smoke", action="store_true", help="seconds: the smoke preset, checks that it runs "
                    "(into decode_smoke.json)")
    args = ap.parse_args()
    if args.smoke:
        args.preset = "smoke"
    preset = {**BASE, **PRESETS[args.preset]}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices is None:
        args.devices = "cuda" if args.preset == "gpu" and torch.cuda.is_available() else "cpu"
    raw = {"preset": args.preset, "batch": args.batch, "beams": args.beams, "max_length": args.max_length,
           "layers": args.layers, "width": args.width, "n_visual": args.n_visual, "d_in": args.d_in,
           "repeats": args.repeats, "reference_batch": args.reference_batch,
           "precision_batches": args.precision_batches,
           "cpu_threads": torch.get_num_threads(), "results": {}}
    goals = {}
    t0 = time.perf_counter()
    for dev in args.devices.split(","):
        if args.profile:
            profile(dev, args)
            continue
        r = raw["results"][dev] = run(dev, args)
        goals[f"{dev}_speedup_vs_hf_xattn_k1"] = goal(r["ours_k1_vs_hf_xattn"], 1.5)
        goals[f"{dev}_speedup_vs_hf_xattn_k3"] = goal(r["ours_k3_vs_hf_xattn"], 1.2)
        goals[f"{dev}_k3_vs_hf_xattn_same_kxn_memory"] = goal(r["ours_k3_vs_hf_xattn_kn"], 1.0)
        goals[f"{dev}_speedup_vs_no_cache_reference"] = goal(r["ours_k3_vs_reference"], 3.0)
        goals[f"{dev}_k3_equals_reference"] = goal(r["ours_k3_equals_reference"], 1.0)
        if dev == "cpu" and args.precision_batches:
            pr = raw["precisions"] = run_precisions(dev, args)
            for b, r in pr["batches"].items():
                goals[f"cpu_int8_vs_fp32_batch{b}"] = goal(r["int8_vs_fp32"], 2.0)
                goals[f"cpu_int8_vs_peer_int8_batch{b}"] = goal(r["ours_int8_vs_peer_int8"], 1.2)
                if "bf16_vs_fp32" in r:
                    goals[f"cpu_bf16_vs_fp32_batch{b}"] = goal(r["bf16_vs_fp32"], 1.5)
    if args.profile:
        return
    raw["total_seconds"] = time.perf_counter() - t0
    raw["total_cpu_seconds"] = time.process_time()  # the whole script's work (start-up included)
    raw["load_average_1min_after"] = os.getloadavg()[0]  # the machine is shared: how busy it was
    write_results(__file__, raw, goals, name="decode_smoke" if args.smoke else None)


if __name__ == "__main__":
    main()
