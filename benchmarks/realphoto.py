"""Real photographs: vgpt's captioner on Flickr8k, beside answers that need no training.

Prepares Flickr8k from a copy of the release (the official train split for training, dev for model selection
and scoring), extracts features with the backbone `vgpt extract-features` picks with no flags, trains with
`vgpt train`'s defaults (or a named variant) for each seed, and scores dev with pycocoevalcap. On the same
features and references it puts beside them:
  retrieval   the caption of the training photo nearest in mean-pooled feature (cosine); of that photo's
              captions, the one the others agree with most (CIDEr-D against the other four)
  constant    one caption for every photo: of a seeded sample of training captions, the one that scores best
              on the training photos (chosen without dev)
and, per run: the fraction of distinct captions, the mean visual gate of the last training steps (SRAU), the
training minutes, the validation curve, and a few dev captions beside a reference.

    python benchmarks/realphoto.py                   # vgpt train's defaults (plain cross-attention) and SRAU with
                                                     # the demo's gates, seeds 1 and 2, vgpt train's 600 steps
                                                     # each: about 3.5 hours on a 2-core CPU without bf16 units
                                                     # (52 minutes a run measured), minutes on a GPU
    python benchmarks/realphoto.py --smoke           # seconds: 12 + 4 photos (or fewer, as --root has),
                                                     # a tiny random LM, 2 steps, checks it runs
    python benchmarks/realphoto.py --variants default --seeds 3
    python benchmarks/realphoto.py --root /data/flickr8k --device cuda

Finished runs are kept in the workspace (--workspace) and reused when their settings and features are the
same, so the study can be run in pieces. Writes benchmarks/results/realphoto.json (--smoke:
realphoto_smoke.json; its workspace a temporary folder unless --workspace is given).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    goal,
    gradient_path,
    print_table,
    scores_without_java,
    scratch_dir,
    tiny_lm,
    validation_curve,
    write_results,
)
from vgpt_cli.files import atomic_write_text  # noqa: E402
from vgpt_cli.model.artifact import trained_features  # noqa: E402
from vgpt_cli.train.config import DEFAULT_XE_STEPS  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "flickr8k"
# What each variant changes of `vgpt train`'s defaults (docs/results.md, "Real photographs").
VARIANTS: dict[str, dict] = {
    "default": {},
    "no-gates": {"gating": "none"},
    # the SRAU recipe tuned on the shapes scenes (the demo's): gates from sigmoid(5), tau 0.2
    "srau-shapes": {"gating": "srau", "gate_init_bias": 5.0, "tau": 0.2},
    # the gate start and the threshold (docs/results.md, "Real photographs", the recipe ladder)
    "srau-tau0": {"gating": "srau", "gate_init_bias": 5.0, "tau": 0.0},
    "srau-bias2-tau0.1": {"gating": "srau", "gate_init_bias": 2.0, "tau": 0.1},
    "srau-bias1": {"gating": "srau", "gate_init_bias": 1.0, "tau": 0.2},
    "srau-authors-init": {"gating": "srau", "gate_init_bias": None, "tau": 0.2},
}
PRESETS = {
    "default": dict(variants="default,srau-shapes", seeds="1,2", steps=DEFAULT_XE_STEPS, train_images=None, val_images=None,
                    results="realphoto"),
    # the same path on a few photos with a tiny random GPT-2 (lm=, unless --set gives one); photo counts are
    # cut to what --root holds, so a folder of a few generated photos will do (tests/test_benchmark_smokes.py)
    "smoke": dict(variants="default", seeds="1", steps=2, train_images=12, val_images=4,
                  results="realphoto_smoke", encoder_warm_start=1),
}
SHOWN = 8  # dev photos whose captions the results show beside a reference
CONSTANT_CANDIDATES = 150
CONSTANT_PHOTOS = 200


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="a Flickr8k release folder (token file, split "
                   "lists, Flicker8k_Dataset/)")
    p.add_argument("--workspace", type=Path, help="default /tmp/vgpt-realphoto (--smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="seconds: 12 + 4 photos, a tiny random LM, 2 steps")
    p.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, help=f"cross-entropy steps (default: vgpt train's, {DEFAULT_XE_STEPS})")
    p.add_argument("--device", default="auto")
    p.add_argument("--results", help="results file stem")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a `vgpt train` option for every run (TrainConfig name, e.g. encoder_warm_start=0); repeatable")
    p.add_argument("--share-warm-start", type=int, default=0, metavar="EPOCHS",
                   help="train the encoder warm start once per seed and reuse it in every variant (runs then "
                        "have encoder_warm_start 0 and record this); for ladders of recipes")
    p.add_argument("--tag", default="", help="appended to the run names (runs with other --set options)")
    p.add_argument("--finished-only", action="store_true", help="summarise the runs already finished, train none")
    a = p.parse_args(argv)
    preset = PRESETS["smoke" if a.smoke else "default"]
    for k, v in preset.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.encoder_warm_start = preset.get("encoder_warm_start")
    if a.workspace is None:  # the smoke's tiny-LM runs stay out of the study's workspace
        a.workspace = scratch_dir("vgpt-realphoto-smoke-") if a.smoke else Path("/tmp/vgpt-realphoto")
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants {','.join(unknown)}: unknown; use {', '.join(VARIANTS)}")
    return a


def prepare(ws, root: Path, train_images: int | None, val_images: int | None, dataset: str = "flickr8k",
            train_fraction: float | None = None) -> str:
    """The manifest: the official train split (all of it, a seeded subset of train_images photos or of
    train_fraction of them) and the dev split as val. dataset: flickr8k (the release folder) or coco
    (Karpathy's splits: the train+restval pool and its val)."""
    from vgpt_cli.data.build import SamplingOptions, build_manifest, write_manifest
    from vgpt_cli.data.coco import read_coco
    from vgpt_cli.data.flickr import read_flickr

    source = read_coco(root) if dataset == "coco" else read_flickr(dataset, root)
    # no more than the release holds (a smoke's small folder); the full release has 6,000 + 1,000
    have = {"train": sum(r.split in ("train", "restval") for r in source.records),
            "val": sum(r.split == "val" for r in source.records)}
    if train_fraction is not None:  # a share of the pool, as the paper gives COCO's (0.1%: 113 of 113,287)
        train_images = max(1, round(train_fraction * have["train"]))
    train_images = None if train_images is None else min(train_images, have["train"])
    val_images = None if val_images is None else min(val_images, have["val"])
    name = dataset if train_images is None else f"{dataset}-{train_images}"
    opts = SamplingOptions(count=train_images, unit="image", val_size=val_images, skip_missing=True)
    write_manifest(ws, build_manifest(source, name, opts))
    ws.set_current(dataset=name)
    return name


def pooled(store, ids: list[str]):
    """Unit-length mean-pooled features, as consensus reranking's caption bank keeps them."""
    import numpy as np

    from vgpt_cli.decode.consensus import unit_rows

    return unit_rows(np.stack([np.asarray(store.get(i), dtype=np.float32).mean(axis=0) for i in ids]))


def _cider(candidates: dict, references: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's CIDEr-D on lowercased, punctuation-free words (for choosing captions, not reporting)."""
    from pycocoevalcap.cider.cider import Cider

    from vgpt_cli.evaluate.metrics import ptb_tokenize

    keys = list(candidates)
    batch = {**{f"c\0{k}": [candidates[k]] for k in keys}, **{f"r\0{k}": list(references[k]) for k in keys}}
    tok = ptb_tokenize(batch, use_java=False)
    score, per = Cider().compute_score({k: tok[f"r\0{k}"] for k in keys}, {k: tok[f"c\0{k}"] for k in keys})
    return float(score), [float(s) for s in per]


def consensus_captions(items) -> dict[str, str]:
    """Each photo's caption that its other captions agree with most (CIDEr-D against them)."""
    cands, refs = {}, {}
    for it in items:
        for j, c in enumerate(it.captions):
            cands[(it.id, j)] = c
            refs[(it.id, j)] = [o for k, o in enumerate(it.captions) if k != j] or [c]
    _, per = _cider({f"{k[0]}#{k[1]}": v for k, v in cands.items()}, {f"{k[0]}#{k[1]}": v for k, v in refs.items()})
    best: dict[str, tuple[float, str]] = {}
    for (key, caption), s in zip(cands.items(), per):
        if key[0] not in best or s > best[key[0]][0]:
            best[key[0]] = (s, caption)
    return {k: v[1] for k, v in best.items()}


def retrieved_captions(store, train, dev, consensus: dict[str, str]) -> dict[str, str]:
    """{dev id: the consensus caption of the training photo nearest in mean-pooled feature (cosine)}."""
    sim = pooled(store, [it.id for it in dev]) @ pooled(store, [it.id for it in train]).T
    return {it.id: consensus[train[int(j)].id] for it, j in zip(dev, sim.argmax(axis=1))}


def baselines(store, train, dev) -> dict[str, dict[str, str]]:
    """{name: {dev id: caption}} for the two answers that need no training."""
    retrieval = retrieved_captions(store, train, dev, consensus_captions(train))
    rng = random.Random(0)
    distinct = sorted({c for it in train for c in it.captions})
    candidates = rng.sample(distinct, min(CONSTANT_CANDIDATES, len(distinct)))
    photos = rng.sample(train, min(CONSTANT_PHOTOS, len(train)))
    refs = {it.id: it.captions for it in photos}
    scored = [(_cider({k: c for k in refs}, refs)[0], c) for c in candidates]
    constant = max(scored)[1]
    return {"retrieval": retrieval, "constant": {it.id: constant for it in dev}}


def visual_gate(run_dir: Path) -> float | None:
    """The mean effective visual gate over the last fifth of the logged cross-entropy steps (None: no gates)."""
    from vgpt_cli.train.curves import METRICS_FILE, read_records

    gates = [r["visual_gate"] for r in read_records(run_dir / METRICS_FILE)
             if r.get("phase") == "xe" and r.get("visual_gate") is not None]
    return round(statistics.fmean(gates[-max(1, len(gates) // 5):]), 4) if gates else None


# TrainConfig options that change only how the finished model decodes (its generation_config.json and the
# caption bank), not its training: a finished run is reused and scored again when they change.
DECODE_ONLY = ("rerank",)


def same_settings(run_dir: Path, cfg) -> bool:
    """The run folder's config.json is cfg (up to what DECODE_ONLY names and what the run resolved itself)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return not settings_diff(saved, cfg)


def settings_diff(saved: dict, cfg, ignore: tuple[str, ...] = DECODE_ONLY) -> list[str]:
    """The settings in which a run's saved config.json differs from cfg, but for those ignore names and what
    the run resolved itself."""
    saved, wanted = dict(saved), json.loads(json.dumps(asdict(cfg)))
    if wanted["lm"] is None:  # the run records the LM it resolved
        saved.pop("lm", None), wanted.pop("lm")
    if wanted["max_steps"] is not None:  # --epochs has no effect then (its default has changed)
        saved.pop("epochs", None), wanted.pop("epochs")
    for key in ignore:  # by default DECODE_ONLY: settings of the saved decoding, applied again by rescore
        saved.pop(key, None), wanted.pop(key, None)
    return sorted(k for k in saved.keys() | wanted.keys() if saved.get(k, ...) != wanted.get(k, ...))


def finished(run_dir: Path, cfg, fingerprint: str) -> dict | None:
    """The row of a finished run made with exactly these settings and features, else None."""
    try:
        row = json.loads((run_dir / "realphoto_row.json").read_text())
    except (OSError, ValueError):
        return None
    return row if same_settings(run_dir, cfg) and trained_features(run_dir / "best") == fingerprint else None


def rescore(ws, cfg, run_dir: Path, dev, row: dict) -> dict:
    """A finished run's best/ brought to cfg's decoding (the caption bank and generation_config.json that
    `vgpt train` now writes with it), then dev scored again; the row keeps its training records and the
    scores it had before (`before`)."""
    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.decode.consensus import CaptionBank
    from vgpt_cli.features import open_workspace_store
    from vgpt_cli.model import Captioner

    best = run_dir / "best"
    model = Captioner.from_pretrained(best)
    model.generation = {**model.generation, "rerank": cfg.rerank}
    train_items = Manifest.load(ws.manifest_path(cfg.dataset)).items("train")
    model.caption_bank = CaptionBank.from_store(open_workspace_store(ws), train_items) if cfg.rerank else None
    model.save_pretrained(best)
    before = {k: row[k] for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "distinct") if k in row}
    row = {**row, **score_best(ws, cfg, run_dir, dev), "rerank": cfg.rerank,
           "before": {**before, "rerank": row.get("rerank", 0)}}
    atomic_write_text(run_dir / "realphoto_row.json", json.dumps(row) + "\n")
    return row


def score_best(ws, cfg, run_dir: Path, dev) -> dict:
    """Dev decoded by the run's best/ with its own settings, scored: the row's score fields."""
    from vgpt_cli.evaluate.report import evaluate_split

    ev = evaluate_split(ws, "val", model_dir=run_dir / "best", device=cfg.device, spice=False, log=lambda s: None)
    preds = {json.loads(line)["image_id"]: json.loads(line)["caption"]
             for line in Path(ev.per_image_path).read_text().splitlines()}
    s = ev.scores
    return {"CIDEr": round(s["CIDEr"], 4), "BLEU-4": round(s["Bleu_4"], 4), "METEOR": round(s.get("METEOR", float("nan")), 4),
            "ROUGE-L": round(s["ROUGE_L"], 4), "distinct": round(len(set(preds.values())) / len(preds), 4),
            "best_dir_mb": round(sum(p.stat().st_size for p in (run_dir / "best").rglob("*") if p.is_file()) / 2**20, 1),
            "predictions": preds}


def shared_warm_start(ws, cfg, model, epochs: int, store) -> None:
    """The encoder warm start (vgpt_cli.train.warm_start) of this seed, trained once and reused by every
    variant with the same encoder: the ladder's runs then differ only in what follows it."""
    from safetensors.torch import load_file, save_file

    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.train.warm_start import warm_start_encoder

    path = ws.root / "warm_start" / f"{cfg.dataset}-K{cfg.encoder_layers}-e{epochs}-s{cfg.seed}.safetensors"
    if path.is_file():
        model.encoder.load_state_dict(load_file(str(path)))
        return
    items = Manifest.load(ws.manifest_path(cfg.dataset)).items("train")
    warm_start_encoder(model, items, store, epochs, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}, str(tmp))
    tmp.replace(path)


def train_and_score(ws, cfg, dev, fingerprint: str, share_warm_start: int = 0) -> dict:
    """One run: train with `cfg`, decode dev with the model's own settings, score; the row is kept in the run.
    A run stopped after a checkpoint is resumed (its train_minutes are then those of the last piece).
    share_warm_start: N > 0 loads the encoder warm start of N epochs shared by the seed's runs (cfg has none)."""
    import shutil

    import torch

    from vgpt_cli.features import open_workspace_store
    from vgpt_cli.train import train
    from vgpt_cli.train.data import caption_examples, collate
    from vgpt_cli.train.loop import build_model

    run_dir = ws.run_dir(cfg.name)
    row = finished(run_dir, cfg, fingerprint)
    if row is not None:
        if row.get("rerank", 0) != cfg.rerank:
            row = rescore(ws, cfg, run_dir, dev, row)
        return dict(row, reused=True)
    t0 = time.perf_counter()
    store = open_workspace_store(ws)
    # a run stopped after a checkpoint with these settings goes on from it (train() loads last/; the gradient
    # probes, a diagnosis of fresh runs, are not taken then); any other unfinished run starts again
    resume = (run_dir / "last").is_dir() and same_settings(run_dir, cfg)
    probes: list[dict] = []
    if resume:
        result = train(cfg, ws, resume=True, quiet=True, store=store)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        torch.manual_seed(cfg.seed)  # as train() does before it builds the model
        model = build_model(cfg, int(store.dim))
        if share_warm_start:
            shared_warm_start(ws, cfg, model, share_warm_start, store)
        probe_batch = collate(store, model, caption_examples(dev)[:PROBE_CAPTIONS * 5:5], cfg.max_length)
        result = train(cfg, ws, quiet=True, model=model, store=store, callbacks=[probe_callback(model, probe_batch, probes)])
    train_s = time.perf_counter() - t0 - sum(p.get("seconds", 0) for p in probes)
    row = {"steps": result.steps, "best_step": result.best_step, "train_minutes": round(train_s / 60, 2),
           "resumed": resume,
           **score_best(ws, cfg, run_dir, dev), "rerank": cfg.rerank,
           "visual_gate": visual_gate(run_dir), "validation_curve": validation_curve(run_dir),
           "gradient_path": probes}
    atomic_write_text(run_dir / "realphoto_row.json", json.dumps(row) + "\n")
    return row


PROBE_STEPS = (1, 25, 50, 100, 150, 200, 300, 400, 600, 800)
PROBE_CAPTIONS = 32


def probe_callback(model, batch, out: list):
    """A TrainCallback that measures gradient_path at PROBE_STEPS of cross-entropy (after the step's update)."""
    from vgpt_cli.train.callbacks import TrainCallback

    class Probe(TrainCallback):
        def on_step(self, record):
            if record["phase"] == "xe" and record["step"] in PROBE_STEPS:
                t = time.perf_counter()
                rec = gradient_path(model, batch)
                out.append({"step": record["step"], **rec, "seconds": round(time.perf_counter() - t, 2)})

    return Probe()


# Decoding of a trained model, scored on dev (docs/results.md, "Real photographs", decoding): the model's own
# settings (beam 5, 20 tokens) against other search settings, on the same model and features.
DECODINGS: dict[str, dict] = {
    "model's own": {},
    "the beam's best (no rerank)": {"rerank": 0},
    "greedy": {"beam_size": 1},
    "beam 3": {"beam_size": 3},
    "no repeated 3-gram": {"no_repeat_ngram_size": 3},
    "length penalty 1": {"length_penalty": 1.0},
}


def decoding_study(ws, run_dir: Path, dev, refs: dict) -> list[dict]:
    """Dev decoded with each of DECODINGS by the run's best/ model; kept in the run folder and reused."""
    from dataclasses import replace

    import torch

    from vgpt_cli.decode import decode_arrays
    from vgpt_cli.evaluate.metrics import compute_metrics_many
    from vgpt_cli.features import open_workspace_store
    from vgpt_cli.model_folders import decode_options, load_model

    cache = run_dir / "realphoto_decoding.json"
    try:
        rows = json.loads(cache.read_text())
        if [r["decoding"] for r in rows] == list(DECODINGS):
            return rows
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model = load_model(run_dir / "best", "cpu")
    store = open_workspace_store(ws)
    arrays = [store.get(it.id) for it in dev]
    preds, info = {}, {}
    for name, change in DECODINGS.items():
        opts = replace(decode_options(model), **change)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hyps = decode_arrays(model, arrays, opts)
        preds[name] = {it.id: h.text for it, h in zip(dev, hyps)}
        info[name] = {"seconds": round(time.perf_counter() - t0, 1),
                      "cut": round(sum(not h.ended for h in hyps) / len(hyps), 4),
                      "words": round(statistics.fmean(len(h.text.split()) for h in hyps), 2)}
    reports = compute_metrics_many(preds, refs, spice=False, log=lambda s: None)
    rows = [{"decoding": name, "CIDEr": round(reports[name].scores["CIDEr"], 4),
             "BLEU-4": round(reports[name].scores["Bleu_4"], 4),
             "distinct": round(len(set(preds[name].values())) / len(dev), 4), **info[name]} for name in DECODINGS]
    atomic_write_text(cache, json.dumps(rows) + "\n")
    return rows


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None, "n": len(values)}


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if not (a.root / "Flickr8k.token.txt").is_file():
        sys.exit(f"{a.root}: no Flickr8k.token.txt there; pass --root DIR, a copy of the Flickr8k release "
                 "(Flickr8k.token.txt, Flickr_8k.*Images.txt, Flicker8k_Dataset/)")
    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.evaluate.metrics import compute_metrics_many
    from vgpt_cli.features import load_default_backbone, open_workspace_store
    from vgpt_cli.features.extract import extract_items
    from vgpt_cli.train import TrainConfig
    from vgpt_cli.workspace import Workspace

    t_all = time.perf_counter()
    ws = Workspace(a.workspace.resolve())
    if a.smoke:
        scores_without_java()
        if not any(kv.startswith("lm=") for kv in a.set):
            a.set.append(f"lm={tiny_lm(ws.root / 'tiny-lm')}")
    dataset = prepare(ws, a.root.resolve(), a.train_images, a.val_images)
    manifest = Manifest.load(ws.manifest_path(dataset))
    train_items, dev = manifest.items("train"), manifest.items("val")
    backbone, note = load_default_backbone(a.device if a.device != "auto" else "cpu")
    if note:
        print(f"note: {note}")
    summary = extract_items(manifest.all_items(), backbone, ws.features_root / backbone.fingerprint, progress=False)
    ws.set_current(features=summary.fingerprint)
    store = open_workspace_store(ws)
    refs = {it.id: list(it.captions) for it in dev}

    runs = []
    for variant in a.variants.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            overrides = dict(VARIANTS[variant], seed=seed, dataset=dataset, device=a.device,
                             name=f"{dataset}-{variant}-s{seed}" + (f"-{a.tag}" if a.tag else ""))
            if a.steps:
                overrides["max_steps"] = a.steps
            if a.encoder_warm_start is not None:
                overrides["encoder_warm_start"] = a.encoder_warm_start
            if a.share_warm_start:
                overrides["encoder_warm_start"] = 0
            cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **dict(kv.split("=", 1) for kv in a.set),
                                         **overrides}, source="--set").validate()
            if a.finished_only and finished(ws.run_dir(cfg.name), cfg, summary.fingerprint) is None:
                print(f"not yet run: {cfg.name}")
                continue
            row = train_and_score(ws, cfg, dev, summary.fingerprint, a.share_warm_start)
            row = {"variant": variant, "seed": seed, "name": cfg.name, "shared_warm_start": a.share_warm_start, **row}
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("predictions", "validation_curve")}),
                  flush=True)

    t_base = time.perf_counter()
    base_preds = baselines(store, train_items, dev)
    reports = compute_metrics_many(base_preds, refs, spice=False, log=lambda s: None)
    base_rows = {name: {"CIDEr": round(r.scores["CIDEr"], 4), "BLEU-4": round(r.scores["Bleu_4"], 4),
                        "METEOR": round(r.scores.get("METEOR", float("nan")), 4),
                        "distinct": round(len(set(base_preds[name].values())) / len(dev), 4)}
                 for name, r in reports.items()}
    base_rows["constant"]["caption"] = next(iter(base_preds["constant"].values()))
    base_seconds = time.perf_counter() - t_base

    table = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        table.append({"variant": variant, "seeds": len(rs),
                      **{m: spread([r[m] for r in rs])["mean"] for m in ("CIDEr", "BLEU-4", "METEOR", "distinct")},
                      "CIDEr_sd": spread([r["CIDEr"] for r in rs])["sd"],
                      "train_minutes": spread([r["train_minutes"] for r in rs])["mean"]})
    for name, b in base_rows.items():
        table.append({"variant": name, "seeds": 0, "CIDEr": b["CIDEr"], "BLEU-4": b["BLEU-4"], "METEOR": b["METEOR"],
                      "distinct": b["distinct"], "CIDEr_sd": None, "train_minutes": 0.0})
    print_table(table, title=f"Flickr8k dev ({len(dev)} photos, {len(train_items)} training photos)")

    # SRAU (any srau-* variant) over plain cross-attention (no-gates, or the default, which is plain), per seed
    plain = [v for v in ("no-gates", "default") if any(r["variant"] == v for r in runs)]
    paired = [{"seed": r["seed"], "srau": r["variant"], "plain": plain[0], "srau_cider": r["CIDEr"],
               "plain_cider": o["CIDEr"], "ratio": round(r["CIDEr"] / o["CIDEr"], 4) if o["CIDEr"] > 0 else None}
              for r in runs if r["variant"].startswith("srau") and plain
              for o in runs if o["variant"] == plain[0] and o["seed"] == r["seed"]]
    if paired:
        print_table(paired, title="paired per seed: SRAU over plain cross-attention (CIDEr)")
    first = next((r for r in runs if r["variant"] == "default"), runs[0] if runs else None)
    shown = [{"image": it.id, "caption": first["predictions"].get(it.id) if first else None,
              "retrieval": base_preds["retrieval"][it.id], "reference": it.captions[0]} for it in dev[:SHOWN]]
    for s in shown:
        print(f"{s['image']}: {s['caption']!r}  | retrieval {s['retrieval']!r}  | reference {s['reference']!r}")

    # the search settings, on the first default run's model (the model's own first)
    decodings = decoding_study(ws, ws.run_dir(first["name"]), dev, refs) if first else []
    if decodings:
        print_table(decodings, title=f"decoding dev with {first['name']}/best")

    goals = {}
    # the default model (plain cross-attention): its own runs, else the no-gates variant's (the same model)
    default_runs = [r for r in runs if plain and r["variant"] == plain[0]]
    if default_runs:
        cider = spread([r["CIDEr"] for r in default_runs])["mean"]
        goals["default_cider"] = goal(cider, 0.45)
        goals["default_cider_over_retrieval"] = goal(cider / max(base_rows["retrieval"]["CIDEr"], 1e-9), 2.0)
        goals["default_bleu4"] = goal(spread([r["BLEU-4"] for r in default_runs])["mean"], 0.20)
        goals["default_distinct_fraction"] = goal(spread([r["distinct"] for r in default_runs])["mean"], 0.80)
        goals["default_train_minutes"] = goal(max(r["train_minutes"] for r in default_runs), 45.0,
                                              higher_is_better=False)
    shapes = [p for p in paired if p["srau"] == "srau-shapes" and p["ratio"] is not None]
    if shapes:  # VisualGPT's claim: SRAU at least as good as plain cross-attention (here: it is not)
        goals["srau_over_plain_paired_min"] = goal(min(p["ratio"] for p in shapes), 1.0)
    raw = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                        "backbone": backbone.name, "backbone_note": note, "fingerprint": summary.fingerprint,
                        "dataset": dataset, "train_photos": len(train_items), "dev_photos": len(dev),
                        "train_defaults": TrainConfig().to_dict(), "variants": {v: VARIANTS[v] for v in a.variants.split(",")}},
           "runs": runs, "baselines": base_rows, "baseline_predictions": base_preds, "table": table, "paired": paired,
           "shown": shown, "decodings": decodings, "baseline_seconds": round(base_seconds, 1), "seconds": round(time.perf_counter() - t_all, 1)}
    write_results(__file__, raw, goals, name=a.results)


if __name__ == "__main__":
    main()
