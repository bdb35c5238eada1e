"""Beam-search speed: captions/s of our cached beam search, the no-cache reference beam search, and
transformers' `generate(num_beams=...)` on the equivalent language-only model, in one run.

The captioner is a GPT-2-small-shaped random LM (12 layers, 768 wide, 12 heads, vocabulary 50,257)
joined by SRAU to a 3-layer visual encoder over 49 tokens of 1280 (EfficientNet-Lite0's 7x7 grid);
generate() runs the same random GPT-2 without the image. All three decode exactly `max_length` tokens
(EOS is allowed only at the last step), with summed log-probabilities (no length penalty).

    python benchmarks/decode.py                       # beam 5, batch 32, on cuda if there is one
    python benchmarks/decode.py --device cpu --batch 8

Goals: ours >= 3x the no-cache reference, and >= 1x generate().
"""

from __future__ import annotations

import argparse
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


def build(device: str, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(BPE / "vocab.json"), merges=str(BPE / "merges.txt"))
    assert len(tok) > 50000
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=len(tok), n_positions=64))
    model = Captioner.from_config(CaptionerConfig(lm="gpt2-small-random", d_in=1280), lm=lm, tokenizer=tok)
    return model.to(device).eval(), tok


def timed(fn, device: str, repeats: int) -> float:
    """Best of `repeats` wall-clock seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def run(dev: str, args) -> dict:
    model, tok = build(dev, args.layers)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(args.batch, 49, 1280, generator=gen).to(dev)
    lengths = torch.full((args.batch,), 49, dtype=torch.long, device=dev)
    opts = DecodeOptions(beam_size=args.beams, max_length=args.max_length, min_length=args.max_length - 1)
    bos = torch.full((args.batch, 1), model.bos_token_id, dtype=torch.long, device=dev)

    def ours():
        return beam_search(model, feats, lengths, opts)

    def reference():
        return reference_beam_search(model, feats, lengths, opts)

    def generate():
        with torch.no_grad():
            return model.lm.generate(bos, attention_mask=torch.ones_like(bos), num_beams=args.beams,
                                     max_new_tokens=args.max_length, min_new_tokens=args.max_length - 1,
                                     do_sample=False, length_penalty=0.0, early_stopping=False,
                                     pad_token_id=model.eos_token_id, eos_token_id=model.eos_token_id)

    # the cache is exact: the two searches must agree before their speeds mean anything
    a, b = ours(), reference()
    agree = sum(x[0].token_ids == y[0].token_ids for x, y in zip(a, b)) / len(a)
    seconds = {name: timed(fn, dev, args.repeats if name != "reference" else 1)
               for name, fn in (("ours", ours), ("generate", generate), ("reference", reference))}
    rate = {k: args.batch / v for k, v in seconds.items()}
    rows = [{"method": k, "seconds": v, "captions_per_s": rate[k]} for k, v in seconds.items()]
    print_table(rows, title=f"beam {args.beams}, batch {args.batch}, {args.max_length} tokens, {args.layers}-layer "
                            f"GPT-2-small-shaped LM, device {dev}")
    return {"seconds": seconds, "captions_per_s": rate, "ours_equals_reference": agree,
            "ours_vs_reference": rate["ours"] / rate["reference"], "ours_vs_generate": rate["ours"] / rate["generate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu",
                    help="comma-separated: each device gets its own table and goals")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    raw = {"batch": args.batch, "beams": args.beams, "max_length": args.max_length, "layers": args.layers,
           "cpu_threads": torch.get_num_threads(), "results": {}}
    goals = {}
    for dev in args.devices.split(","):
        r = raw["results"][dev] = run(dev, args)
        goals[f"{dev}_speedup_vs_no_cache_reference"] = goal(r["ours_vs_reference"], 3.0)
        goals[f"{dev}_speedup_vs_transformers_generate"] = goal(r["ours_vs_generate"], 1.0)
    write_results(__file__, raw, goals)


if __name__ == "__main__":
    main()
