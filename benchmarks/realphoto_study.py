"""VisualGPT's claim on real photographs: does SRAU beat plain cross-attention and a random-init LM when
training photos are few?

On Flickr8k (benchmarks/realphoto.py's data, features and runs), nested seeded subsets of the train split
(150 photos and all 753 of the shared copy), three models, every run scored on the 113 dev photos:
  visualgpt   the pretrained LM joined through SRAU (VisualGPT)
  no-gates    the same LM joined through plain cross-attention (`vgpt train`'s default)
  random-lm   visualgpt's network with the LM's weights random (the paper's ablation)
Each model has the same number of candidate recipes (RECIPES; the first is its default). With --tune, every
candidate is trained at the smallest size on the first seed, and each model keeps its best on dev for all
its runs: the same tuning budget for each. The recipes used are recorded in the results. Recipes tried after
the search (BEYOND_SEARCH) run only when --recipes names them and are never kept; their runs are reported
with the recipes not kept.
A size's run trains --steps for it (150 photos: 300 steps; all: 600, `vgpt train`'s default), the LM frozen
for the first third where the recipe freezes it, validation on dev at each epoch's end. Recorded per run:
dev CIDEr, BLEU-4, distinct captions, the validation curve, whether it converged (validation CIDEr within
5% of their mean over the last third, at least 3 validations there; else rising or falling), minutes; and the
paired per-seed differences visualgpt minus no-gates and visualgpt minus random-lm, with their mean and spread.
Beside them, on the same photos, what needs no training: the caption of the nearest training photo
(realphoto.py's retrieval).

    python benchmarks/realphoto_study.py                # the defaults: 2 sizes x 3 models x seeds 1, 2; about
                                                        # 10 hours of CPU here (20-40 minutes a run at 150
                                                        # photos, 50-80 at 753), so run it in pieces: finished
                                                        # runs are reused and a stopped run resumes from its
                                                        # last validation
    python benchmarks/realphoto_study.py --tune         # first the recipe search (2 per model, 150 photos, seed 1)
    python benchmarks/realphoto_study.py --sizes 150 --models no-gates,visualgpt --seeds 1
    python benchmarks/realphoto_study.py --finished-only    # the table of what has finished, trains nothing
    python benchmarks/realphoto_study.py --models no-gates --seeds 2 --results pieces_ng2 \
        --recorded benchmarks/results/realphoto_study.json     # one run of the study, in a file of its own
    python benchmarks/realphoto_study.py --smoke         # 1-2 minutes: 6 and 12 photos, two models, a tiny
                                                        # random LM, 2 steps a run (checks that it runs)
    python benchmarks/realphoto_study.py --device cuda --tune --seeds 1,2,3 --steps 150:1000,all:2000   # on a GPU

With COCO (Karpathy's splits, as `vgpt prepare coco` reads them), at the paper's 0.1%, 0.5% and 1% of the
113,287-image pool, scored on 1,000 of Karpathy's val images, in a workspace of its own:
    python benchmarks/realphoto_study.py --dataset coco --root /data/coco --workspace /data/vgpt-coco-study \
        --device cuda --tune --seeds 1,2,3 --val-images 1000 --steps 0.1%:1000,0.5%:2000,1%:3000

The workspace is realphoto.py's (/tmp/vgpt-realphoto), so its finished default runs count as no-gates on all
photos. Writes benchmarks/results/realphoto_study.json and, with matplotlib, docs/realphoto_study.png
(with --dataset coco: realphoto_study_coco.json and .png).

The results file is also the record of the finished runs: each run's row keeps its whole training config and
the features it trained on, and a run found there with exactly the config and features it would have now (and
the same training and dev photos) is reused, not trained again, when the workspace no longer has it (another
machine, a cleared /tmp); it is marked "recorded" in the results. Recorded runs a command does not report (other
models, sizes or seeds) are kept in the file it writes (recorded_unused). --no-recorded reuses none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    flat,
    goal,
    last_third,
    print_table,
    results_dir,
    scores_without_java,
    tiny_lm,
    write_results,
)
from benchmarks.realphoto import (  # noqa: E402
    DEFAULT_ROOT,
    VARIANTS,
    baselines,
    finished,
    prepare,
    settings_diff,
    spread,
    train_and_score,
)

MODELS = ("visualgpt", "no-gates", "random-lm")
SRAU = VARIANTS["srau-shapes"]  # the SRAU recipe of the equal-steps ladder (docs/results.md, "Real photographs")
# Per model its candidate recipes, the same number each (the first: the model's default): name -> TrainConfig
# changes. A recipe's name is its run's name (with the dataset and seed), so runs are shared across commands.
RECIPES: dict[str, dict[str, dict]] = {
    "visualgpt": {"srau-shapes": SRAU,
                  "srau-tau0": VARIANTS["srau-tau0"]},
    "no-gates": {"default": {},
                 "no-gates-lm-lr3e-4": {"gating": "none", "lm_lr": 3e-4}},
    "random-lm": {"random-lm": {**SRAU, "lm_init": "random"},
                  # a random LM has nothing to keep while frozen: train it from the start, at the new parts' rate
                  "random-lm-unfrozen": {**SRAU, "lm_init": "random", "freeze_lm_steps": 0, "lm_lr": None}},
}
# Recipes tried after the search, outside its equal budget: run only when named (--recipes), never kept by
# --tune; their finished runs are reported with the recipes not kept. SRAU's gate start, between the ladder's
# sigmoid(5) and the sigmoid(1) that broke the frozen LM.
BEYOND_SEARCH: dict[str, dict[str, dict]] = {"visualgpt": {"srau-bias2-tau0.1": VARIANTS["srau-bias2-tau0.1"]}}
ALL = "all"
DOCS = Path(__file__).resolve().parents[1] / "docs"  # the figure: docs/<results stem>.png
# converged: validation CIDEr within 5% of its mean over the last third; on real photos CIDEr is 0.1-0.5, so the
# absolute floor is 0.01, not the shapes scale's 0.05 (benchmarks/common.flat)
FLAT_FLOOR = 0.01
# Per dataset, the default sizes and steps: Flickr8k's shared copy (150 photos, all 753); COCO at the paper's
# shares of the 113,287-image pool (113, 566 and 1,133 images)
DEFAULTS = {"flickr8k": {"sizes": f"150,{ALL}", "steps": f"150:300,{ALL}:600"},
            "coco": {"sizes": "0.1%,0.5%,1%", "steps": "0.1%:300,0.5%:600,1%:1000"}}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="flickr8k", choices=list(DEFAULTS),
                   help="flickr8k (the release folder) or coco (Karpathy's splits: dataset_coco.json, train2014/, "
                   "val2014/)")
    p.add_argument("--root", type=Path, default=None, help=f"the dataset's folder (flickr8k: default {DEFAULT_ROOT})")
    p.add_argument("--val-images", type=int, default=None, help="score on this many of the dev photos (a seeded "
                   "subset, the same for every run; default all: Flickr8k's 1,000 or COCO's 5,000)")
    p.add_argument("--workspace", type=Path, default=Path("/tmp/vgpt-realphoto"), help="realphoto.py's workspace")
    p.add_argument("--sizes", default=None, help="training photos per subset, comma-separated: a count, a share of "
                   "the pool ('0.1%%') or 'all' (the whole train split); nested: a smaller subset is the start of a "
                   "larger one. Default flickr8k 150,all; coco 0.1%%,0.5%%,1%%")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    p.add_argument("--steps", default=None, help="cross-entropy steps per size, SIZE:STEPS,... (default flickr8k "
                   "150:300,all:600; coco 0.1%%:300,0.5%%:600,1%%:1000)")
    p.add_argument("--recipes", default="", help="MODEL=RECIPE,... instead of each model's first (or --tune's)")
    p.add_argument("--tune", action="store_true", help="train every recipe at the smallest size on the first seed "
                   "and use each model's best on dev")
    p.add_argument("--device", default="auto")
    p.add_argument("--finished-only", action="store_true", help="summarise the finished runs, train none")
    p.add_argument("--results", default=None, help="results file stem, also the figure's (default "
                   "realphoto_study; with --dataset coco, realphoto_study_coco)")
    p.add_argument("--recorded", type=Path, default=None, help="a results file whose runs are reused where the "
                   "workspace lacks them (default: the one this command writes, benchmarks/results/<results>.json)")
    p.add_argument("--no-recorded", action="store_true", help="reuse no recorded run: train what the workspace "
                   "lacks")
    p.add_argument("--figure", type=Path, default=None, help="where the figure goes (default docs/<results stem>.png)")
    p.add_argument("--smoke", action="store_true", help="seconds, checks that it runs: 6 and 12 photos, 2 steps")
    a = p.parse_args(argv)
    a.sizes = a.sizes or DEFAULTS[a.dataset]["sizes"]
    a.results = a.results or ("realphoto_study" if a.dataset == "flickr8k" else f"realphoto_study_{a.dataset}")
    a.steps = a.steps or DEFAULTS[a.dataset]["steps"]
    a.recorded = None if a.no_recorded else (a.recorded or results_dir() / f"{a.results}.json")
    a.root = a.root or (DEFAULT_ROOT if a.dataset == "flickr8k" else None)
    if a.root is None:
        p.error(f"--dataset {a.dataset} needs --root DIR, the folder with dataset_coco.json, train2014/ and val2014/")
    if a.smoke:
        a.sizes, a.seeds, a.steps, a.results, a.tune = f"6,{ALL}", "1", f"6:2,{ALL}:2", "realphoto_study_smoke", True
        a.models = "visualgpt,no-gates"  # random-lm is visualgpt's network with another LM init: 6 runs, not 9
    a.models = a.models.split(",")
    unknown = [m for m in a.models if m not in RECIPES]
    if unknown:
        p.error(f"--models {','.join(unknown)}: unknown; use {', '.join(MODELS)}")
    a.steps = dict(kv.split(":") for kv in a.steps.split(","))
    a.sizes = a.sizes.split(",")
    bad = [s for s in a.sizes if not (s == ALL or s.isdigit() or (s.endswith("%") and _is_number(s[:-1])))]
    if bad:
        p.error(f"--sizes {','.join(bad)}: not a size; give a photo count (150), a share of the pool (0.1%) or {ALL}")
    missing = [s for s in a.sizes if s not in a.steps]
    if missing:
        p.error(f"--steps has no steps for size {','.join(missing)}; give SIZE:STEPS for each of --sizes")
    a.recipes = dict(kv.split("=", 1) for kv in a.recipes.split(",") if kv)
    bad = [f"{m}={r}" for m, r in a.recipes.items() if r not in recipes_of(m)]
    if bad:
        p.error(f"--recipes {','.join(bad)}: unknown; " +
                "; ".join(f"{m}: {', '.join(recipes_of(m))}" for m in a.models))
    return a


def recipes_of(model: str) -> dict[str, dict]:
    """The model's searched recipes, then those tried beyond the search."""
    return {**RECIPES.get(model, {}), **BEYOND_SEARCH.get(model, {})}


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def size_order(size: str) -> float:
    """Sorts --sizes from smallest to largest: counts by count, shares by share, 'all' last."""
    return float("inf") if size == ALL else float(size.rstrip("%"))


def run_config(recipe: str, changes: dict, dataset: str, seed: int, steps: int, a, extra: dict):
    from vgpt_cli.train import TrainConfig

    overrides = {**changes, "seed": seed, "dataset": dataset, "device": a.device, "max_steps": steps,
                 "name": f"{dataset}-{recipe}-s{seed}", **extra}
    # the LM frozen for the first third where the recipe freezes it (the default's 200 of 600)
    if changes.get("freeze_lm_steps", 1):
        overrides["freeze_lm_steps"] = steps // 3
    return TrainConfig.from_dict({**TrainConfig().to_dict(), **overrides}, source="the study").validate()


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.dataset == "flickr8k" and not (a.root / "Flickr8k.token.txt").is_file():
        sys.exit(f"{a.root}: no Flickr8k.token.txt there; pass --root DIR, a copy of the Flickr8k release")
    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.errors import VgptError
    from vgpt_cli.features import load_default_backbone
    from vgpt_cli.features.extract import extract_items
    from vgpt_cli.workspace import Workspace

    t_all = time.perf_counter()
    ws = Workspace(a.workspace.resolve())
    extra = {}
    if a.smoke:
        scores_without_java()
        extra = {"lm": str(tiny_lm(ws.root / "tiny-lm")), "encoder_warm_start": 1}
    # the datasets, largest first: its manifest holds every photo, whose features the smaller ones share
    def prepared(size: str) -> str:
        share = float(size[:-1]) / 100 if size.endswith("%") else None
        count = None if size == ALL or share is not None else int(size)
        try:
            return prepare(ws, a.root.resolve(), count, a.val_images, a.dataset, train_fraction=share)
        except VgptError as e:  # no such folder, no annotation file: one line, no traceback
            sys.exit(str(e))

    datasets = {size: prepared(size) for size in sorted(a.sizes, key=size_order, reverse=True)}
    full = Manifest.load(ws.manifest_path(next(iter(datasets.values()))))
    backbone, note = load_default_backbone(a.device if a.device != "auto" else "cpu")
    summary = extract_items(full.all_items(), backbone, ws.features_root / backbone.fingerprint, progress=False)
    ws.set_current(features=summary.fingerprint)
    dev = full.items("val")
    seeds = [int(s) for s in a.seeds.split(",")]
    sizes = sorted(a.sizes, key=size_order)
    train_items = {s: Manifest.load(ws.manifest_path(datasets[s])).items("train") for s in sizes}
    photos = {s: len(items) for s, items in train_items.items()}
    recorded = load_recorded(a.recorded, a.dataset, len(dev)) if a.recorded else {}
    if recorded:
        print(f"{a.recorded}: {len(recorded)} recorded runs, reused where the workspace lacks them")

    def run(model: str, recipe: str, size: str, seed: int, only_finished: bool = False) -> dict | None:
        cfg = run_config(recipe, recipes_of(model)[recipe], datasets[size], seed, int(a.steps[size]), a, extra)
        run_dir = ws.run_dir(cfg.name)
        row = finished(run_dir, cfg, summary.fingerprint)
        if row is None:
            row = recorded_run(recorded, cfg, summary.fingerprint, photos[size])
        if row is None and (a.finished_only or only_finished):
            if not only_finished:
                print(f"not yet run: {cfg.name}")
            return None
        if row is None:
            row = train_and_score(ws, cfg, dev, summary.fingerprint)
        config = row["config"] if row.get("recorded") else json.loads((run_dir / "config.json").read_text())
        curve = row["validation_curve"]
        shape = trend(curve, row["steps"])
        out = {"model": model, "recipe": recipe, "size": size, "train_photos": photos[size], "seed": seed,
               "name": cfg.name, "steps": row["steps"],
               "converged": None if shape is None else shape == "flat", "trend": shape,
               **{k: row.get(k) for k in ("CIDEr", "BLEU-4", "METEOR", "distinct", "visual_gate", "train_minutes",
                                          "resumed", "reused", "best_step")},
               "recorded": bool(row.get("recorded")), "validation_curve": curve,
               # what recorded_run checks before reusing the row where the workspace lacks the run
               "config": config, "features": summary.fingerprint}
        print(json.dumps({k: v for k, v in out.items() if k not in ("validation_curve", "config")}), flush=True)
        return out

    # the recipe search: every candidate at the smallest size, first seed; each model keeps its best on dev
    tuning = []
    chosen = {m: a.recipes.get(m, next(iter(RECIPES[m]))) for m in a.models}
    if a.tune:
        for m in a.models:
            rows = [r for r in (run(m, recipe, sizes[0], seeds[0]) for recipe in RECIPES[m]) if r]
            tuning += rows
            if len(rows) == len(RECIPES[m]) and m not in a.recipes:
                chosen[m] = max(rows, key=lambda r: r["CIDEr"])["recipe"]
    runs = [r for m in a.models for size in sizes for seed in seeds if (r := run(m, chosen[m], size, seed))]
    # the finished runs of the recipes not chosen, beyond the search (an earlier choice's, or the search's
    # losers run on more seeds): kept in the results, out of the table
    done = {r["name"] for r in runs + tuning}
    other_runs = [r for m in a.models for recipe in recipes_of(m) if recipe != chosen[m] for size in sizes
                  for seed in seeds if (r := run(m, recipe, size, seed, only_finished=True)) and r["name"] not in done]

    reported = {r["name"] for r in runs + tuning + other_runs}
    table = summarize(runs, a.models, sizes, photos)
    # the same for the recipes not kept (beside the table, and dotted in the figure)
    other_table = summarize(other_runs + [r for r in tuning if r["recipe"] != chosen[r["model"]]], a.models,
                            sizes, photos)
    # what needs no training, on the same photos: the nearest training photo's caption (realphoto.py)
    from vgpt_cli.evaluate.metrics import compute_metrics_many
    from vgpt_cli.features import open_workspace_store

    store, refs = open_workspace_store(ws), {it.id: list(it.captions) for it in dev}
    retrieval = {s: baselines(store, train_items[s], dev)["retrieval"] for s in sizes}
    scored = compute_metrics_many(retrieval, refs, spice=False, log=lambda m: None)
    for s in sizes:
        table.append({**dict.fromkeys(COLUMNS), "model": "retrieval", "train_photos": photos[s], "seeds": 0,
                      "CIDEr": round(scored[s].scores["CIDEr"], 4), "BLEU-4": round(scored[s].scores["Bleu_4"], 4),
                      "distinct": round(len(set(retrieval[s].values())) / len(dev), 4)})
    print_table(table, title=f"{a.dataset} dev ({len(dev)} photos): CIDEr by model and training photos")
    paired = [{"pair": f"visualgpt - {other}", "train_photos": photos[r["size"]], "seed": r["seed"],
               "CIDEr_diff": round(r["CIDEr"] - o["CIDEr"], 4)}
              for other in ("no-gates", "random-lm") for r in runs if r["model"] == "visualgpt"
              for o in runs if o["model"] == other and (o["size"], o["seed"]) == (r["size"], r["seed"])]
    if paired:
        print_table(paired, title="paired per seed (same photos, same seed)")
    # per pair and size: the differences' mean, spread and how many seeds favour visualgpt
    by_pair: dict[tuple[str, int], list[float]] = {}
    for d in paired:
        by_pair.setdefault((d["pair"], d["train_photos"]), []).append(d["CIDEr_diff"])
    paired_summary = []
    for (pair, n), diffs in by_pair.items():
        c = spread(diffs)
        paired_summary.append({"pair": pair, "train_photos": n, "seeds": len(diffs), "mean": c["mean"],
                               "sd": c["sd"], "positive": sum(x > 0 for x in diffs)})
    if paired_summary:
        print_table(paired_summary, title="paired CIDEr differences: mean, sd over seeds, seeds where positive")
    worst: dict[str, float] = {}  # the paper's claim: SRAU ahead on every paired seed and size
    for d in paired:
        worst[d["pair"]] = min(d["CIDEr_diff"], worst.get(d["pair"], d["CIDEr_diff"]))
    goals = {pair.replace(" - ", "_minus_").replace("-", "_") + "_min": goal(v, 0.0) for pair, v in worst.items()}
    if not a.smoke and table:
        figure(table, other_table, a.models, sizes, photos, a.dataset, len(dev),
               a.figure or DOCS / f"{a.results}.png")
    raw = {"settings": {"dataset": a.dataset, "sizes": sizes, "train_photos": photos, "models": a.models, "seeds": seeds,
                        "steps": a.steps, "recipes": RECIPES, "beyond_search": BEYOND_SEARCH, "chosen": chosen, "tuned": a.tune,
                        "backbone": backbone.name, "backbone_note": note, "features": summary.fingerprint,
                        "dev_photos": len(dev)},
           "runs": runs, "tuning": tuning, "table": table, "other_table": other_table, "paired": paired,
           "paired_summary": paired_summary,
           # every run's own minutes (of a resumed run, its last piece), whichever command trained it
           "other_runs": other_runs,
           # the recorded runs this command did not report (other models, sizes, seeds): the file stays their record
           "recorded_unused": [r for name, r in recorded.items() if name not in reported],
           "train_minutes_total": round(sum(r["train_minutes"] or 0
                                            for r in {r["name"]: r for r in runs + tuning + other_runs}.values()), 1),
           "seconds": round(time.perf_counter() - t_all, 1)}
    write_results(__file__, raw, goals, name=a.results)


def load_recorded(path: Path, dataset: str, dev_photos: int) -> dict[str, dict]:
    """The runs a results file holds (runs, tuning, other_runs, recorded_unused) by name, where it was written
    for this dataset and these dev photos; else, or without the file, none."""
    try:
        raw = json.loads(path.read_text())["raw"]
        s = raw["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if (s.get("dataset"), s.get("dev_photos")) != (dataset, dev_photos):
        print(f"{path}: recorded on other data ({s.get('dataset')}, {s.get('dev_photos')} dev photos): none of its "
              f"runs reused")
        return {}
    rows = [r for key in ("runs", "tuning", "other_runs", "recorded_unused") for r in raw.get(key) or []]
    return {r["name"]: r for r in rows if isinstance(r, dict) and "name" in r}


def recorded_run(recorded: dict[str, dict], cfg, features: str, photos: int) -> dict | None:
    """The recorded run of cfg's name (load_recorded), if it was trained with exactly cfg (its decoding too),
    on these features and this many training photos: marked "recorded". One that differs is named, with how,
    and not reused."""
    row = recorded.get(cfg.name)
    if row is None:
        return None
    if not isinstance(row.get("config"), dict):
        differs = ["config (not recorded)"]
    else:  # rerank too: a recorded run cannot be scored again with another decoding
        differs = settings_diff(row["config"], cfg, ignore=())
    differs += [k for k, v in (("features", features), ("train_photos", photos)) if row.get(k) != v]
    if differs:
        print(f"recorded run {cfg.name} differs in {', '.join(differs)}: not reused")
        return None
    return {**row, "recorded": True}


# the table's columns (summarize's rows; a row without training, the retrieval baseline, leaves the rest None)
COLUMNS = ("model", "recipe", "train_photos", "seeds", "CIDEr", "CIDEr_sd", "BLEU-4", "distinct", "visual_gate",
           "converged", "rising", "unknown")


def summarize(runs: list[dict], models: list[str], sizes: list[str], photos: dict) -> list[dict]:
    """One row per model, recipe and size: the mean over seeds (and CIDEr's sd) of the runs."""
    table = []
    for m in models:
        for recipe in dict.fromkeys(r["recipe"] for r in runs if r["model"] == m):
            for size in sizes:
                rs = [r for r in runs if (r["model"], r["recipe"], r["size"]) == (m, recipe, size)]
                if not rs:
                    continue
                c = spread([r["CIDEr"] for r in rs])
                table.append({"model": m, "recipe": recipe, "train_photos": photos[size], "seeds": len(rs),
                              "CIDEr": c["mean"], "CIDEr_sd": c["sd"],
                              "BLEU-4": spread([r["BLEU-4"] for r in rs])["mean"],
                              "distinct": spread([r["distinct"] for r in rs])["mean"],
                              # how much of each layer's output the image makes (SRAU's gates; None without)
                              "visual_gate": (spread([r["visual_gate"] for r in rs])["mean"]
                                              if all(r["visual_gate"] is not None for r in rs) else None),
                              # runs flat over their last third; rising: not flat and ending above where
                              # the last third began; unknown: fewer than 3 validations there
                              "converged": sum(r["converged"] is True for r in rs),
                              "rising": sum(r["trend"] == "rising" for r in rs),
                              "unknown": sum(r["converged"] is None for r in rs)})
    return table


def trend(curve: list[dict], steps: int) -> str | None:
    """The last third of a validation curve: flat (converged), rising (ends above where the third began:
    more steps may help) or falling (past its best). None with fewer than 3 validations there."""
    last = last_third(curve, steps)
    is_flat = flat(last, floor=FLAT_FLOOR)
    if is_flat is None:
        return None
    return "flat" if is_flat else "rising" if last[-1] > last[0] else "falling"


def figure(table: list[dict], other_table: list[dict], models: list[str], sizes: list[str], photos: dict,
           dataset: str, dev: int, path: Path) -> None:
    """CIDEr against training photos, one line per model with its spread over seeds; the recipes not kept
    dotted, in their model's colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in [*models, "retrieval"]:
        rs = [r for r in table if r["model"] == m]
        if not rs:
            continue
        line = ax.errorbar([r["train_photos"] for r in rs], [r["CIDEr"] for r in rs],
                           yerr=[r["CIDEr_sd"] or 0 for r in rs], marker="o", capsize=3,
                           linestyle="--" if m == "retrieval" else "-",
                           label="nearest photo's caption" if m == "retrieval" else f"{m} ({rs[0]['recipe']})")
        for recipe in dict.fromkeys(r["recipe"] for r in other_table if r["model"] == m):
            rows = [r for r in other_table if (r["model"], r["recipe"]) == (m, recipe)]
            ax.errorbar([r["train_photos"] for r in rows], [r["CIDEr"] for r in rows],
                        yerr=[r["CIDEr_sd"] or 0 for r in rows], marker="o", fillstyle="none", capsize=3,
                        linestyle=":", color=line.lines[0].get_color(), label=f"{m} ({recipe}, not kept)")
    ax.set_xscale("log")
    ax.set_xticks([photos[s] for s in sizes], [str(photos[s]) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(f"training photos ({'COCO' if dataset == 'coco' else 'Flickr8k'} train split, 5 captions each)")
    ax.set_ylabel(f"dev CIDEr-D ({dev} photos)")
    ax.set_title("Real photos: mean ± sd over seeds (no bar: one seed so far)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
