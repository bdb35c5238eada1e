"""Consensus reranking on real photos: which captions to choose among, and which training photos to ask.

`vgpt train` saves a caption bank with the model, and decoding keeps, of the beam's five captions, the one
the captions of the 20 training photos nearest in mean-pooled feature agree with most (CIDEr-D against
them; vgpt_cli/decode/consensus.py). This scores, on the finished default runs of benchmarks/realphoto.py,
that choice beside other ways to make it:

  candidates   the beam's 5 captions (the default), 10 beams, the 5 beams plus 10 sampled captions
               (temperature 0.8, top-p 0.95; two seeded draws, and the product's `--rerank-samples 10`),
               sampled captions alone
  neighbours   by the backbone's pooled features (the bank's, the default) or by the trained visual
               encoder's pooled output; 10, 20 or 40 of them
  weighting    every neighbour alike (the default) or by exp(cosine / 0.05); plus, or not, each
               candidate's agreement with the beam's other captions

    python benchmarks/consensus.py          # realphoto.py's default runs, seeds 1 and 2: about 25 minutes on
                                            # a 2-core CPU (the sampled captions are most of it)
    python benchmarks/consensus.py --smoke  # seconds: a tiny random captioner on made-up features

Each run's candidates are kept in its folder (consensus_candidates.json) and reused. Writes
benchmarks/results/consensus.json. Goal: the default reranking at least 1.1x the beam's best (mean CIDEr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    goal,
    parse_with_smoke,
    print_table,
    scores_without_java,
    scratch_dir,
    tiny_lm,
    write_results,
)

RUNS = "flickr8k-default-s1,flickr8k-default-s2"
BATCH = 8
SAMPLES = 10
TOP_P = 0.95
# candidate sets: (beam size, 0, 0), (0, temperature, generator seed: one for the batch), or "product": the
# samples `--rerank-samples 10` adds (vgpt_cli.decode.search.sampled_candidates: a generator per image)
CANDIDATES = {"beam5": (5, 0, 0), "beam10": (10, 0, 0), "t0.8-draw1": (0, 0.8, 0), "t0.8-draw2": (0, 0.8, 1),
              "t0.5-draw1": (0, 0.5, 0), "product": None}
# name: candidate sets (merged in order, repeats dropped), neighbour features, neighbours, choice options
VARIANTS = {
    "the beam's best (--rerank 0)": (["beam5"], None, 0, {}),
    "rerank 20 (the default)": (["beam5"], "backbone", 20, {}),
    "neighbours weighted by exp(cosine / 0.05)": (["beam5"], "backbone", 20, {"temperature": 0.05}),
    "encoder neighbours, k = 10": (["beam5"], "encoder", 10, {}),
    "encoder neighbours, k = 20": (["beam5"], "encoder", 20, {}),
    "encoder neighbours, k = 40": (["beam5"], "encoder", 40, {}),
    "plus 0.5 x agreement with the other beams": (["beam5"], "backbone", 20, {"self_weight": 0.5}),
    "10 beams, rerank 20": (["beam10"], "backbone", 20, {}),
    "5 beams + 10 samples (T 0.8), draw 1": (["beam5", "t0.8-draw1"], "backbone", 20, {}),
    "5 beams + 10 samples (T 0.8), draw 2": (["beam5", "t0.8-draw2"], "backbone", 20, {}),
    "--rerank-samples 10 (5 beams + 10 samples, seeded per image)": (["beam5", "product"], "backbone", 20, {}),
    "10 samples alone (T 0.8)": (["t0.8-draw1"], "backbone", 20, {}),
    "10 samples alone (T 0.5)": (["t0.5-draw1"], "backbone", 20, {}),
}


def candidates(model, arrays: list[np.ndarray], names: list[str]) -> dict[str, list[list[str]]]:
    """{set name: per image its candidate captions}; beams best first, samples in the order drawn."""
    from dataclasses import replace

    from vgpt_cli.decode.search import beam_search, pad_features, sample, sampled_candidates
    from vgpt_cli.model_folders import decode_options

    out: dict = {"seconds": {}}
    for name in names:
        t0 = time.perf_counter()
        beam, temperature, seed = CANDIDATES[name] or (0, 0, 0)
        generator = torch.Generator().manual_seed(seed)
        texts: list[list[str]] = []
        for i in range(0, len(arrays), BATCH):
            features, lengths = pad_features(arrays[i:i + BATCH])
            with torch.inference_mode():
                if CANDIDATES[name] is None:
                    opts = replace(decode_options(model), rerank=20, rerank_samples=SAMPLES)
                    texts += [[h.text for h in hyps] for hyps in sampled_candidates(model, features, lengths, opts)]
                elif beam:
                    opts = decode_options(model, beam_size=beam, rerank=0)  # the model's own length
                    texts += [[h.text for h in hyps] for hyps in beam_search(model, features, lengths, opts,
                                                                             num_return=beam)]
                else:
                    s = sample(model, features, lengths, SAMPLES, max_length=decode_options(model).max_length,
                               temperature=temperature, top_p=TOP_P, generator=generator)
                    texts += [s.texts[b * SAMPLES:(b + 1) * SAMPLES] for b in range(len(features))]
        out[name] = texts
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
    return out


def encoder_pooled(model, arrays: list[np.ndarray]) -> np.ndarray:
    """The trained visual encoder's last level, pooled as the caption bank pools the backbone's features."""
    from vgpt_cli.decode.consensus import pooled_features
    from vgpt_cli.decode.search import pad_features
    from vgpt_cli.model.encoder import padding_mask

    rows = []
    for i in range(0, len(arrays), 32):
        features, lengths = pad_features(arrays[i:i + 32])
        with torch.inference_mode():
            e = model.encoder(features, padding_mask(lengths, features.shape[1]))[:, -1]  # (B, N, D)
        rows.append(pooled_features(e, lengths))
    return np.concatenate(rows)


def choose(bank, agreement, texts: list[str], near: list[int], sims: np.ndarray, temperature: float | None = None,
           self_weight: float = 0.0) -> str:
    """The candidate with the highest CIDEr-D against the neighbours' captions (the product's choice), or
    against each neighbour's captions weighted by its similarity."""
    if temperature is None:
        score = np.array(bank.consensus(texts, near))
    else:
        per = np.array([bank.consensus(texts, [j]) for j in near])  # (k, candidates)
        w = np.exp((sims - sims.max()) / temperature)
        score = (w[:, None] * per).sum(0) / w.sum()
    if self_weight:
        score += self_weight * np.array([agreement.score_one(t, [o for o in texts if o != t] or [t]) for t in texts])
    return texts[int(np.argmax(score))]  # ties: the earlier candidate (the better beam)


def study(model, train_arrays: list[np.ndarray], dev_arrays: list[np.ndarray], cands: dict) -> dict[str, list[str]]:
    """{variant: per dev image the chosen caption}."""
    from vgpt_cli.decode.consensus import pooled_features
    from vgpt_cli.decode.search import pad_features
    from vgpt_cli.evaluate.cider_d import CiderD

    bank = model.caption_bank
    features, lengths = pad_features(dev_arrays)
    query = {"backbone": (pooled_features(features, lengths), bank.features),
             "encoder": (encoder_pooled(model, dev_arrays), encoder_pooled(model, train_arrays))}
    sims = {name: q @ keys.T for name, (q, keys) in query.items()}
    agreement = CiderD(bank.captions)
    out = {}
    for name, (sets, by, k, options) in VARIANTS.items():
        chosen = []
        for i in range(len(dev_arrays)):
            texts = list(dict.fromkeys(t for s in sets for t in cands[s][i]))
            if not k:
                chosen.append(texts[0])
                continue
            near = [int(j) for j in np.argsort(-sims[by][i], kind="stable")[:k]]
            chosen.append(choose(bank, agreement, texts, near, sims[by][i][near], **options))
        out[name] = chosen
    return out


def load_run(run_dir: Path):
    """The run's best/ model (with its caption bank), and its training and dev features from its workspace."""
    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.features.store import FeatureStore
    from vgpt_cli.model.artifact import trained_features
    from vgpt_cli.model_folders import load_model
    from vgpt_cli.workspace import Workspace

    ws = Workspace(run_dir.parent.parent)
    model = load_model(run_dir / "best", "cpu")
    if model.caption_bank is None:
        sys.exit(f"{run_dir / 'best'}: no caption bank; run benchmarks/realphoto.py, which writes it")
    dataset = json.loads((run_dir / "config.json").read_text())["dataset"]
    manifest = Manifest.load(ws.manifest_path(dataset))
    store = FeatureStore.open(ws.features_root / trained_features(run_dir / "best"))
    train, dev = manifest.items("train"), manifest.items("val")
    return (model, [np.asarray(store.get(it.id), dtype=np.float32) for it in train],
            [np.asarray(store.get(it.id), dtype=np.float32) for it in dev], {it.id: list(it.captions) for it in dev})


def smoke_run(folder: Path):
    """A tiny random captioner with a caption bank over made-up features: the study's path in seconds."""
    from vgpt_cli.decode.consensus import CaptionBank, unit_rows
    from vgpt_cli.train import TrainConfig
    from vgpt_cli.train.loop import build_model

    rng = np.random.default_rng(0)
    words = "a dog man runs on the grass beach with ball red blue".split()
    caps = [[" ".join(rng.choice(words, 6)) for _ in range(5)] for _ in range(9)]
    arrays = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(9)]
    torch.manual_seed(0)
    model = build_model(TrainConfig(lm=str(tiny_lm(folder / "tiny-lm"))), 16).eval()
    model.generation = {"max_length": 6}
    model.caption_bank = CaptionBank(unit_rows(np.stack([a.mean(0) for a in arrays[:6]])), caps[:6])
    return model, arrays[:6], arrays[6:], {f"dev{i}": caps[6 + i] for i in range(3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=Path("/tmp/vgpt-realphoto"),
                   help="benchmarks/realphoto.py's workspace")
    p.add_argument("--runs", default=RUNS, help="comma-separated run names in the workspace")
    a = parse_with_smoke(p, "a tiny random captioner on made-up features", runs="smoke")
    from vgpt_cli.evaluate.metrics import compute_metrics_many
    from vgpt_cli.files import atomic_write_json

    t_all = time.perf_counter()
    if a.smoke:
        scores_without_java()
    rows, per_run = [], {}
    for name in a.runs.split(","):
        if a.smoke:
            model, train_arrays, dev_arrays, refs = smoke_run(scratch_dir("vgpt-consensus-smoke-"))
            cache = None
        else:
            run_dir = a.workspace / "runs" / name
            if not (run_dir / "best").is_dir():
                sys.exit(f"{run_dir}: no finished run there; run `python benchmarks/realphoto.py` first, or pass "
                         "--workspace and --runs")
            model, train_arrays, dev_arrays, refs = load_run(run_dir)
            cache = run_dir / "consensus_candidates.json"
        try:
            cands = json.loads(cache.read_text()) if cache else {}
        except (OSError, ValueError):
            cands = {}
        missing = [c for c in CANDIDATES if c not in cands]
        if missing:  # the seconds each set took to decode are kept beside them, from the run that made it
            new = candidates(model, dev_arrays, missing)
            cands.update({**new, "seconds": {**cands.get("seconds", {}), **new["seconds"]}})
            if cache:  # a quarter of an hour of decoding: never left half-written
                atomic_write_json(cache, cands)
        chosen = study(model, train_arrays, dev_arrays, cands)
        ids = list(refs)
        reports = compute_metrics_many({v: dict(zip(ids, c)) for v, c in chosen.items()}, refs, spice=False,
                                       log=lambda s: None)
        per_run[name] = {"decode_seconds": cands.get("seconds", {}),
                         "variants": {v: {"CIDEr": round(r.scores["CIDEr"], 4), "BLEU-4": round(r.scores["Bleu_4"], 4),
                                          "distinct": round(len(set(chosen[v])) / len(ids), 4)}
                                      for v, r in reports.items()}}
    for v in VARIANTS:
        ciders = [r["variants"][v]["CIDEr"] for r in per_run.values()]
        rows.append({"variant": v, **{n: r["variants"][v]["CIDEr"] for n, r in per_run.items()},
                     "mean": round(statistics.fmean(ciders), 4)})
    print_table(rows, title="dev CIDEr by run")
    default = next(r["mean"] for r in rows if r["variant"] == "rerank 20 (the default)")
    plain = next(r["mean"] for r in rows if r["variant"].startswith("the beam's best"))
    goals = {"rerank_over_beams_best": goal(default / max(plain, 1e-9), 1.1)}
    raw = {"runs": per_run, "table": rows, "variants": {v: {"candidates": s, "neighbours_by": b, "k": k, **o}
                                                        for v, (s, b, k, o) in VARIANTS.items()},
           "samples": SAMPLES, "top_p": TOP_P, "seconds": round(time.perf_counter() - t_all, 1)}
    write_results(__file__, raw, goals, name="consensus_smoke" if a.smoke else "consensus")


if __name__ == "__main__":
    main()
