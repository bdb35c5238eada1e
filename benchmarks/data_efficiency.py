"""The paper's main experiment on the built-in shapes data: caption quality vs training-set size.

Fractions of one fixed pool of scenes x four models x seeds, all scored on one fixed test set:
  visualgpt   pretrained SmolLM2-135M + SRAU, tau 0.2 (the paper's model)
  random-lm   the same network with the LM's weights randomly initialised (--lm-init random)
  soft-gates  the same with tau 0 (dense, soft gating)
  no-gates    plain residual cross-attention without gates (the usual "LM + cross-attention")
Every run trains the same number of optimiser steps (the same compute) and is scored as it is at
its last step, with the demo's settings: lite0 features with stage 2 appended, K = 1, gates starting
at sigmoid(5) (see docs/research/grounding.md for why), bf16 autocast where the CPU has AMX. Scores: CIDEr-D,
and on the scenes' recorded objects object F1 (partial credit) and grounded (all or nothing).

Presets (--preset; any setting may still be given on its own):
    python benchmarks/data_efficiency.py --smoke              # seconds: the smoke preset (the default), checks
                                                              # it runs: 100 scenes, a tiny random LM, 3 steps
    python benchmarks/data_efficiency.py --preset study --workspace /tmp/vgpt-study
        issue 11's study at convergence: 0.1% and 1% x visualgpt, no-gates, soft-gates (random-lm at 0.1%)
        x 3 seeds; the demo's encoder warm start, 120 / 200 steps, validation every 20 steps on 20 scenes
        (each run's curve, and whether it is flat over its last third), per-seed paired differences
        visualgpt minus no-gates. About 3 hours on a 2-core CPU; minutes on a GPU (add --device cuda).
    python benchmarks/data_efficiency.py --preset first-study   # 4 fractions x 4 models x 2 seeds, 50 steps (~100 min)
    python benchmarks/data_efficiency.py --preset realphoto [OPTIONS]
        the same question on real photos (Flickr8k: SRAU, plain cross-attention and a random LM at 150 and
        753 training photos, a recipe search for each): benchmarks/realphoto_study.py, which takes the options
        (--tune, --seeds, --finished-only, --smoke, ...; see its --help)
Larger, on a GPU (more steps, all of the test split), for example:
    python benchmarks/data_efficiency.py --preset study --device cuda --steps 1000 --test-size 2000
Finished runs are kept in the workspace: rerunning the same command skips them (resumable), and a
command that adds fractions or models reuses the runs it shares with an earlier one.
The smoke preset trains in a temporary workspace unless --workspace is given.
Writes benchmarks/results/<results>.json (smoke: data_efficiency_smoke, study: data_efficiency,
first-study: data_efficiency_50steps); the study also writes docs/results-data-efficiency.md (the table
and the paired differences) and docs/data_efficiency.png (the plot, when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    converged,
    print_table,
    scores_without_java,
    scratch_dir,
    tiny_lm,
    validation_curve,
    write_results,
)
from vgpt_cli.files import atomic_write_text  # noqa: E402
from vgpt_cli.model.artifact import trained_features  # noqa: E402

MODELS = {
    "visualgpt": {"gating": "srau", "tau": 0.2, "lm_init": "pretrained"},
    "random-lm": {"gating": "srau", "tau": 0.2, "lm_init": "random"},
    "soft-gates": {"gating": "srau", "tau": 0.0, "lm_init": "pretrained"},
    "no-gates": {"gating": "none", "tau": 0.2, "lm_init": "pretrained"},
}
BEAM = 3  # test decoding, as the demo's
DOCS = Path(__file__).resolve().parents[1] / "docs"


REALPHOTO = "realphoto"  # a preset of its own script: benchmarks/realphoto_study.py
PRESETS: dict[str, dict] = {
    # checks that everything runs (seconds; a tiny random LM in a temporary workspace): the default, so it
    # never overwrites a study
    "smoke": dict(pool=100, fractions="0.1", seeds="1", steps="3", test_size=10, val_size=4, lm="tiny",
                  results="data_efficiency_smoke"),
    # issue 11's study at convergence: the demo's encoder warm start, validation curves, 3 seeds
    "study": dict(fractions="0.001,0.01", seeds="1,2,3", steps="0.001:120,0.01:200", val_every=20, val_size=20,
                  encoder_warm_start=10, models="visualgpt,no-gates,soft-gates,random-lm@0.001",
                  results="data_efficiency"),
    # the first study: 50 steps per run at four fractions, no warm start (docs/results.md keeps its table)
    "first-study": dict(fractions="0.001,0.005,0.01,0.05", seeds="1,2", steps="50", val_size=10,
                        encoder_warm_start=0, results="data_efficiency_50steps"),
}
BASE = dict(pool=20000, lm=None, models=",".join(MODELS), batch_size=16, test_size=150, val_size=10, encoder_warm_start=0,
            val_every=None)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", choices=PRESETS,
                   help="the settings below, each of which may still be given (default: smoke); "
                   f"'{REALPHOTO}' hands the other options to benchmarks/realphoto_study.py")
    p.add_argument("--smoke", action="store_true", help="--preset smoke (seconds: checks that it runs)")
    p.add_argument("--workspace", type=Path,
                   help="default /tmp/vgpt-data-efficiency (preset smoke: a temporary folder)")
    p.add_argument("--lm", help="the language model: the demo's SmolLM2-135M (default), a local folder, or 'tiny' "
                   "(a tiny random GPT-2, the smoke's)")
    p.add_argument("--pool", type=int, help="scenes generated (80%% form the training pool; default 20000)")
    p.add_argument("--fractions", help="comma-separated fractions of the training pool")
    p.add_argument("--seeds", help="comma-separated")
    p.add_argument("--models", help="comma-separated; NAME@F1+F2 runs that model at those fractions only "
                   "(e.g. random-lm@0.001); default: all four at every fraction")
    p.add_argument("--steps", help="optimiser steps per run, or per fraction as F:STEPS,... (e.g. 0.001:120,0.01:200)")
    p.add_argument("--batch-size", type=int, help="captions per step (default 16)")
    p.add_argument("--test-size", type=int, help="test scenes (default 150)")
    p.add_argument("--val-size", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoder-warm-start", type=int,
                   help="epochs of encoder warm start before SRAU (the demo: 10; 0: none)")
    p.add_argument("--val-every", type=int,
                   help="validate every N steps: each run's validation curve and whether it has converged "
                        "(default: only at the last step)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new run after this many minutes; the table holds the runs done")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: tabulate the runs already finished in the workspace (a study in progress)")
    p.add_argument("--results", help="results file stem (benchmarks/results/STEM.json); "
                   "docs/results-data-efficiency.md and the plot are written for 'data_efficiency' only")
    a = p.parse_args()
    if a.smoke:
        a.preset = "smoke"
    for key, value in {**BASE, **PRESETS[a.preset]}.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.preset == "smoke":
        scores_without_java()
    if a.workspace is None:  # the smoke's runs would otherwise replace a study's of the same fraction and seed
        a.workspace = scratch_dir("vgpt-data-efficiency-smoke-") if a.preset == "smoke" \
            else Path("/tmp/vgpt-data-efficiency")
    return a


def steps_by_fraction(spec: str, fractions: list[float]) -> dict[float, int]:
    """--steps: one number for every fraction, or F:STEPS pairs naming every fraction."""
    if ":" not in spec:
        return {f: int(spec) for f in fractions}
    given = {float(f): int(n) for f, n in (part.split(":") for part in spec.split(","))}
    missing = [f for f in fractions if f not in given]
    if missing:
        raise SystemExit(f"--steps {spec}: no steps for fraction(s) {missing}; give F:STEPS for each of {fractions}")
    return {f: given[f] for f in fractions}


def models_by_fraction(spec: str, fractions: list[float]) -> dict[str, list[float]]:
    """--models: NAME (every fraction) or NAME@F1+F2 (those fractions only), comma-separated."""
    out = {}
    for part in spec.split(","):
        name, _, only = part.partition("@")
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
        out[name] = [float(f) for f in only.split("+")] if only else list(fractions)
    return out


def prepare(ws, pool: int, fraction: float, seed: int, test_size: int, val_size: int) -> str:
    """The manifest of one (fraction, seed): the same pool, val and test for every fraction."""
    from vgpt_cli.data.build import SamplingOptions, build_manifest, write_manifest
    from vgpt_cli.data.karpathy import read_karpathy
    from vgpt_cli.data.shapes import write_shapes

    root = ws.root / "sources" / f"shapes-{pool}"
    path = root / "dataset_shapes.json"
    if not path.exists():
        write_shapes(root, pool, 0)  # one fixed pool (generator seed 0) for every run
    source = read_karpathy(path, root.resolve(), "shapes")
    name = f"shapes-f{fraction}-s{seed}"
    opts = SamplingOptions(fraction=fraction, seed=seed, test_size=test_size, val_size=val_size)
    write_manifest(ws, build_manifest(source, name, opts))
    return name


def main() -> None:
    a = parse()
    from vgpt_cli.data.manifest import Manifest
    from vgpt_cli.demo import BACKBONE, DemoSettings
    from vgpt_cli.evaluate.report import evaluate_split
    from vgpt_cli.features import load_backbone
    from vgpt_cli.features.extract import extract_items
    from vgpt_cli.model.precision import cpu_has_fast_bf16
    from vgpt_cli.train import TrainConfig, train
    from vgpt_cli.train.config import PRESETS
    from vgpt_cli.workspace import Workspace

    ws = Workspace(a.workspace.resolve())
    demo = PRESETS["demo"]  # the demo's recipe, with this study's own schedule and validation
    lm = str(tiny_lm(ws.root / "tiny-lm")) if a.lm == "tiny" else a.lm or demo["lm"]
    precision = "bf16" if (a.device.startswith("cuda") or cpu_has_fast_bf16()) else "fp32"
    fractions = [float(f) for f in a.fractions.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    steps = steps_by_fraction(a.steps, fractions)
    runs_at = models_by_fraction(a.models, fractions)
    models = list(runs_at)
    backbone = load_backbone(BACKBONE, device=a.device, add_stages=DemoSettings().add_stages)
    rows, t_all = [], time.perf_counter()
    stopped = ""
    skipped: list[str] = []  # --finished-only: runs not trained yet
    # fraction outermost, then seed: a run cut short by --max-minutes leaves whole fractions behind it
    for fraction in fractions:
        for seed in seeds:
            dataset = prepare(ws, a.pool, fraction, seed, a.test_size, a.val_size)
            manifest = Manifest.load(ws.manifest_path(dataset))
            summary = extract_items(manifest.all_items(), backbone, ws.features_root / backbone.fingerprint,
                                    num_workers=1, progress=False)
            ws.set_current(features=summary.fingerprint)
            n_train = len(manifest.items("train"))
            n_caps = sum(len(i.captions) for i in manifest.items("train"))
            for model in (m for m in models if fraction in runs_at[m]):
                if a.max_minutes is not None and time.perf_counter() - t_all > 60 * a.max_minutes:
                    stopped = f"stopped by --max-minutes {a.max_minutes} before {dataset}-{model}"
                    break
                t0 = time.perf_counter()
                cfg = TrainConfig(
                    lm=lm, dataset=dataset, encoder_layers=demo["encoder_layers"], gate_init_bias=demo["gate_init_bias"],
                    lr=demo["lr"], lm_lr=demo["lm_lr"], warmup=min(demo["warmup"], steps[fraction] // 5), schedule="cosine",
                    batch_size=a.batch_size, max_steps=steps[fraction], val_size=a.val_size, val_beam=1,
                    val_every=a.val_every or steps[fraction],
                    max_length=demo["max_length"], precision=precision, seed=seed, device=a.device,
                    name=f"{dataset}-{model}", patience=10**6, encoder_warm_start=a.encoder_warm_start,
                    **MODELS[model])
                run_dir = ws.run_dir(cfg.name)
                reused = _finished(run_dir, cfg, backbone.fingerprint)  # by an earlier, interrupted invocation
                if a.finished_only and not reused:
                    skipped.append(cfg.name)
                    continue
                if reused:
                    last_loss = json.loads((run_dir / "result.json").read_text()).get("last_loss")
                else:
                    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run starts again
                    last_loss = train(cfg, ws, quiet=True).last_loss
                    shutil.rmtree(run_dir / "last", ignore_errors=True)  # train() drops it already; older runs kept it
                ws.set_current(dataset=dataset)
                scores = _rescore(run_dir, manifest, demo["max_length"]) if reused else None
                if scores is None:
                    scores = evaluate_split(ws, "test", model_dir=run_dir / "best", beam_size=BEAM,
                                            max_length=demo["max_length"], device=a.device, spice=False,
                                            log=lambda s: None).scores
                row = {"fraction": fraction, "seed": seed, "model": model, "steps": steps[fraction],
                       "train_images": n_train,
                       "train_captions": n_caps, "CIDEr": round(scores.get("CIDEr", float("nan")), 4),
                       "grounded": round(scores.get("grounded", float("nan")), 4),
                       "object_f1": round(scores.get("object_f1", float("nan")), 4),
                       "shape_f1": round(scores.get("shape_f1", float("nan")), 4),
                       "BLEU-4": round(scores.get("Bleu_4", float("nan")), 4),
                       "last_loss": round(last_loss or float("nan"), 4),
                       "seconds": round(time.perf_counter() - t0, 1),
                       "validation_curve": validation_curve(run_dir)}
                row["converged"] = converged(row["validation_curve"], steps[fraction])
                done = run_dir / "study_row.json"  # a reused run keeps the time it took to train and score
                if done.exists():
                    row["seconds"] = json.loads(done.read_text()).get("seconds", row["seconds"])
                else:
                    atomic_write_text(done, json.dumps(row) + "\n")
                rows.append(row)
                print(json.dumps(row), flush=True)
            if stopped:
                break
        if stopped:
            print(stopped)
            break
    if skipped:
        stopped = f"not yet run: {', '.join(skipped)}"
        print(stopped)
    seconds = time.perf_counter() - t_all
    fractions = [f for f in fractions if any(r["fraction"] == f for r in rows)]
    table = summarise(rows, fractions, models)
    print_table(table, title=f"data efficiency on shapes (steps per run {a.steps}, test {a.test_size} scenes)")
    paired = paired_differences(rows)
    if paired:
        print_table(paired, title="paired per seed: visualgpt minus no-gates")
    raw = {"settings": {**vars(a), "workspace": str(a.workspace), "precision": precision,
                        "demo_recipe": dict(demo)}, "runs": rows, "table": table, "paired": paired,
           "seconds": round(seconds, 1), "run_seconds": round(sum(r["seconds"] for r in rows), 1), "stopped": stopped}
    best = {m: max((r["CIDEr"] for r in table if r["model"] == m), default=0.0) for m in models}
    goals = {}
    # whenever both were asked for and a run finished (a random LM that scores 0 makes the ratio huge: the
    # goal is met, visualgpt is better; both at 0: not met)
    if "visualgpt" in best and "random-lm" in best and fractions:
        from benchmarks.common import goal
        goals["visualgpt_over_random_lm_cider_at_smallest_fraction"] = goal(
            _at(table, "visualgpt", fractions[0]) / max(_at(table, "random-lm", fractions[0]), 1e-9), 1.0)
    write_results(__file__, raw, goals, name=a.results)
    if a.results == "data_efficiency":
        write_docs(table, paired, rows, fractions, models, a, sum(r["seconds"] for r in rows), stopped)


def _finished(run_dir: Path, cfg, fingerprint: str) -> bool:
    """A finished run made with exactly these settings and features (else it is trained again)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / "result.json").exists() and trained_features(run_dir / "best") == fingerprint and \
        saved == json.loads(json.dumps(asdict(cfg)))


def _rescore(run_dir: Path, manifest, max_length: int) -> dict | None:
    """The test scores of a finished run from its saved captions (no decoding), or None when it has
    none decoded with these settings."""
    from vgpt_cli.evaluate.report import score_items

    ev = run_dir / "eval" / "test"
    try:
        decode = json.loads((ev / "metrics.json").read_text())["decode"]
        preds = {r["image_id"]: r["caption"] for r in map(json.loads, (ev / "per_image.jsonl").read_text().splitlines())}
    except (OSError, ValueError, KeyError):
        return None
    items = manifest.items("test")
    if decode.get("beam_size") != BEAM or decode.get("max_length") != max_length or set(preds) != {i.id for i in items}:
        return None
    return score_items(preds, items, manifest.format, spice=False, log=lambda s: None)[1]


def paired_differences(rows: list[dict], a: str = "visualgpt", b: str = "no-gates") -> list[dict]:
    """For every (fraction, seed) with both models: a minus b in CIDEr and object F1 (same data, same seed)."""
    out = []
    for r in rows:
        if r["model"] != a:
            continue
        other = next((x for x in rows if x["model"] == b and (x["fraction"], x["seed"]) == (r["fraction"], r["seed"])),
                     None)
        if other is not None:
            out.append({"fraction": r["fraction"], "seed": r["seed"],
                        "CIDEr_diff": round(r["CIDEr"] - other["CIDEr"], 4),
                        "object_f1_diff": round(r["object_f1"] - other["object_f1"], 4)})
    return out


def _at(table: list[dict], model: str, fraction: float) -> float:
    return next((r["CIDEr"] for r in table if r["model"] == model and r["fraction"] == fraction), 0.0)


def summarise(rows: list[dict], fractions: list[float], models: list[str]) -> list[dict]:
    """Mean and spread over seeds, one row per (model, fraction)."""
    import statistics

    out = []
    for model in models:
        for fraction in fractions:
            rs = [r for r in rows if r["model"] == model and r["fraction"] == fraction]
            if not rs:
                continue
            c = [r["CIDEr"] for r in rs]
            g = [r["grounded"] for r in rs]
            o = [r.get("object_f1", float("nan")) for r in rs]
            out.append({"model": model, "fraction": fraction, "train_captions": rs[0]["train_captions"],
                        "CIDEr": round(statistics.mean(c), 4), "CIDEr_sd": round(statistics.pstdev(c), 4),
                        "grounded": round(statistics.mean(g), 4), "object_f1": round(statistics.mean(o), 4),
                        "object_f1_sd": round(statistics.pstdev(o), 4),
                        "shape_f1": round(statistics.mean(r.get("shape_f1", float("nan")) for r in rs), 4),
                        "seeds": len(rs)})
    return out


def write_docs(table: list[dict], paired: list[dict], rows: list[dict], fractions: list[float], models: list[str],
               a: argparse.Namespace, seconds: float, stopped: str) -> None:
    lines = ["| model | " + " | ".join(f"{f:g} ({next(r['train_captions'] for r in table if r['fraction'] == f)} captions)"
                                      for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for m in models:
        cells = []
        for f in fractions:
            r = next((r for r in table if r["model"] == m and r["fraction"] == f), None)
            cells.append(f"{r['CIDEr']:.3f} ± {r['CIDEr_sd']:.3f} / {r['object_f1']:.3f} ± {r['object_f1_sd']:.3f} / "
                         f"{r['grounded']:.2f}" + (f" ({r['seeds']} of {len(a.seeds.split(','))} seeds)"
                                                   if r["seeds"] < len(a.seeds.split(",")) else "") if r else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if paired:
        lines += ["", "Paired per seed, visualgpt minus no-gates (same data, same seed):", "",
                  "| fraction | seed | CIDEr | object F1 |", "|---:|---:|---:|---:|"]
        lines += [f"| {d['fraction']:g} | {d['seed']} | {d['CIDEr_diff']:+.3f} | {d['object_f1_diff']:+.3f} |"
                  for d in paired]
    checked = [r["converged"] for r in rows if r.get("converged") is not None]
    text = (f"# Data efficiency on shapes (generated by benchmarks/data_efficiency.py --preset {a.preset})\n\n"
            f"CIDEr mean ± sd over seeds {a.seeds} / object F1 mean ± sd / grounded; steps per run {a.steps} "
            f"({a.batch_size} captions each); encoder warm start {a.encoder_warm_start} epochs; validation every "
            f"{a.val_every or 'last'} steps on {a.val_size} scenes; test: {a.test_size} scenes, beam {BEAM}; "
            f"{seconds / 60:.0f} minutes on {a.device} (the runs' own time, summed)."
            + (f" Validation CIDEr flat (within 5%) over the last third: {sum(checked)} of {len(checked)} runs."
               if checked else "")
            + f"{' ' + stopped + '.' if stopped else ''}\n\n" + "\n".join(lines) + "\n")
    (DOCS / "results-data-efficiency.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "CIDEr", "test CIDEr-D"), (axes[1], "object_f1", "test object F1 (colour + shape)")):
        for m in models:
            rs = [r for r in table if r["model"] == m]
            ax.errorbar([r["fraction"] * 100 for r in rs], [r[key] for r in rs],
                        yerr=[r[f"{key}_sd"] for r in rs], marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("training data (% of the pool)")
        ax.set_ylabel(label)
    axes[0].set_title(f"shapes: steps per run {a.steps}, mean ± sd of {len(a.seeds.split(','))} seeds", fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(DOCS / "data_efficiency.png", dpi=120)


def realphoto_argv(argv: list[str]) -> list[str] | None:
    """realphoto_study.py's arguments (argv without the preset) where argv asks for --preset realphoto;
    else None."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and argv[i + 1:i + 2] == [REALPHOTO]:
            return argv[:i] + argv[i + 2:]
        if arg == f"--preset={REALPHOTO}":
            return argv[:i] + argv[i + 1:]
    return None


if __name__ == "__main__":
    study_argv = realphoto_argv(sys.argv[1:])
    if study_argv is None:
        main()
    else:
        from benchmarks.realphoto_study import main as realphoto_study

        realphoto_study(study_argv)
