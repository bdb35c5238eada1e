"""benchmarks/realphoto_study.py: the convergence verdicts it reports for each run (benchmarks/common.converged
and trend), on hand-made validation curves whose answer is known; the runs a results file records, reused only
with the settings they were trained with; and its COCO mode, on Karpathy files written in the public layout with
real JPEGs: shares of the pool become nested subsets, a recorded run joins the table, a missing folder is one
line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from helpers import write_coco

from benchmarks.common import converged
from benchmarks.realphoto_study import (
    BEYOND_SEARCH,
    RECIPES,
    load_recorded,
    parse,
    recorded_run,
    run_config,
    trend,
)

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "realphoto_study.py"


def curve(steps: list[int], ciders: list[float]) -> list[dict]:
    return [{"step": s, "cider": c} for s, c in zip(steps, ciders, strict=True)]


STEPS = [47, 94, 141, 188, 235, 282, 300]  # a 300-step run validated at each epoch's end: 4 in the last third


def test_flat_within_tolerance_is_converged():
    c = curve(STEPS, [0.10, 0.16, 0.20, 0.215, 0.222, 0.212, 0.216])  # last third within 2.4% of its mean
    assert converged(c, 300, floor=0.01) is True
    assert trend(c, 300) == "flat"


def test_absolute_floor_decides_on_small_scores():
    # 6% around a mean of 0.176: flat on the shapes' floor of 0.05 CIDEr, not on real photos' 0.01
    c = curve(STEPS, [0.11, 0.11, 0.12, 0.174, 0.165, 0.183, 0.180])
    assert converged(c, 300) is True
    assert converged(c, 300, floor=0.01) is False
    assert trend(c, 300) == "rising"


def test_falling_curve_is_past_its_best():
    c = curve(STEPS, [0.0, 0.066, 0.128, 0.134, 0.133, 0.122, 0.108])
    assert converged(c, 300, floor=0.01) is False
    assert trend(c, 300) == "falling"


@pytest.mark.parametrize("steps", [[100, 200, 300], [150, 300]])
def test_too_few_validations_in_the_last_third_is_unknown(steps):
    c = curve(steps, [0.2] * len(steps))
    assert converged(c, 300) is None
    assert trend(c, 300) is None


def write_recorded(path: Path, runs: list[dict], dataset: str = "flickr8k", dev_photos: int = 113) -> None:
    settings = {"dataset": dataset, "dev_photos": dev_photos, "recipes": RECIPES}
    path.write_text(json.dumps({"raw": {"settings": settings, "runs": runs, "tuning": [], "other_runs": []}}))


def recorded(model: str, recipe: str, dataset: str, seed: int, steps: int, photos: int, features: str,
             **scores) -> dict:
    """A run's row as the study records it: its whole training config (JSON) and features."""
    cfg = run_config(recipe, RECIPES[model][recipe], dataset, seed, steps, Namespace(device="auto"), {})
    return {"name": cfg.name, "model": model, "recipe": recipe, "seed": seed, "steps": steps, "train_photos": photos,
            "config": json.loads(json.dumps(asdict(cfg))), "features": features, **scores}


def test_every_model_searches_as_many_recipes_and_one_beyond_the_search_runs_only_when_named():
    assert len({len(r) for r in RECIPES.values()}) == 1  # the same tuning budget for each model
    extra = next(iter(BEYOND_SEARCH["visualgpt"]))
    assert extra not in RECIPES["visualgpt"]  # --tune never trains or keeps it
    assert parse(["--recipes", f"visualgpt={extra}"]).recipes == {"visualgpt": extra}
    with pytest.raises(SystemExit):
        parse(["--recipes", f"no-gates={extra}"])  # another model's recipe is refused
    cfg = run_config(extra, BEYOND_SEARCH["visualgpt"][extra], "flickr8k-150", 1, 300, Namespace(device="auto"), {})
    assert (cfg.gate_init_bias, cfg.tau, cfg.freeze_lm_steps, cfg.name) == (2.0, 0.1, 100, f"flickr8k-150-{extra}-s1")


def test_recorded_runs_are_reused_only_with_their_settings(tmp_path: Path):
    row = recorded("no-gates", "no-gates-lm-lr3e-4", "flickr8k", 1, 600, 753, "fp", CIDEr=0.41)
    write_recorded(tmp_path / "r.json", [row, {"model": "no-gates"}])  # a row without a name is skipped
    runs = load_recorded(tmp_path / "r.json", "flickr8k", 113)
    cfg = run_config("no-gates-lm-lr3e-4", RECIPES["no-gates"]["no-gates-lm-lr3e-4"], "flickr8k", 1, 600,
                     Namespace(device="auto"), {})
    reused = recorded_run(runs, cfg, "fp", 753)  # the recipe's lm_lr of 3e-4 back from JSON
    assert reused is not None and reused["CIDEr"] == 0.41 and reused["recorded"] is True
    assert recorded_run(runs, cfg, "other-features", 753) is None
    assert recorded_run(runs, cfg, "fp", 150) is None  # other training photos
    for change in ({"max_steps": 300}, {"lr": 2e-3}, {"rerank": 0}, {"device": "cuda"}):  # rerank: no rescoring
        assert recorded_run(runs, replace(cfg, **change), "fp", 753) is None, change
    assert recorded_run(runs, replace(cfg, seed=2, name="flickr8k-no-gates-lm-lr3e-4-s2"), "fp", 753) is None
    write_recorded(tmp_path / "old.json", [{k: v for k, v in row.items() if k != "config"}])
    assert recorded_run(load_recorded(tmp_path / "old.json", "flickr8k", 113), cfg, "fp", 753) is None
    assert load_recorded(tmp_path / "r.json", "flickr8k", 50) == {}  # other dev photos
    assert load_recorded(tmp_path / "r.json", "coco", 113) == {}
    assert load_recorded(tmp_path / "none.json", "flickr8k", 113) == {}


def study(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VGPT_BENCHMARK_RESULTS": str(tmp_path / "results")}
    return subprocess.run([sys.executable, str(STUDY), "--workspace", str(tmp_path / "ws"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_coco_shares_of_the_pool_are_nested_subsets(tmp_path: Path):
    from vgpt_cli.data.manifest import Manifest

    write_coco(tmp_path / "coco", {"train": 30, "restval": 20, "val": 8, "test": 2}, real_images=True)  # pool: 50
    done = study(tmp_path, "--dataset", "coco", "--root", str(tmp_path / "coco"), "--sizes", "10%,50%",
                 "--steps", "10%:2,50%:2", "--finished-only", "--figure", str(tmp_path / "study.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not yet run: coco-5-srau-shapes-s1" in done.stdout  # trains nothing; names runs by photo count
    raw = json.loads((tmp_path / "results" / "realphoto_study_coco.json").read_text())["raw"]
    assert raw["settings"]["dataset"] == "coco"
    assert raw["settings"]["train_photos"] == {"10%": 5, "50%": 25}  # restval joins the pool
    assert raw["settings"]["dev_photos"] == 8 and raw["runs"] == []
    assert [(r["model"], r["train_photos"]) for r in raw["table"]] == [("retrieval", 5), ("retrieval", 25)]
    manifests = {n: Manifest.load(tmp_path / "ws" / "data" / f"coco-{n}" / "manifest.json") for n in (5, 25)}
    small, large = ({it.id for it in manifests[n].items("train")} for n in (5, 25))
    assert len(small) == 5 and len(large) == 25 and small < large
    assert (tmp_path / "study.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)

    # a run recorded in the results file (trained elsewhere) joins the table where the workspace lacks it; one
    # recorded with other steps does not; the file keeps both
    path, features = tmp_path / "results" / "realphoto_study_coco.json", raw["settings"]["features"]
    scores = {"size": "10%", "CIDEr": 0.123, "BLEU-4": 0.04, "distinct": 0.5, "visual_gate": 0.01,
              "train_minutes": 1.0, "validation_curve": [{"step": 2, "cider": 0.123}]}
    write_recorded(path, [recorded("visualgpt", "srau-shapes", "coco-5", 1, 2, 5, features, **scores),
                          recorded("no-gates", "default", "coco-5", 1, 1, 5, features, **scores)], "coco", 8)
    args = ["--dataset", "coco", "--root", str(tmp_path / "coco"), "--sizes", "10%,50%", "--steps", "10%:2,50%:2",
            "--finished-only", "--figure", str(tmp_path / "study.png")]
    again = study(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "recorded run coco-5-default-s1 differs in max_steps: not reused" in again.stdout
    raw = json.loads(path.read_text())["raw"]
    assert [(r["name"], r["CIDEr"], r["recorded"]) for r in raw["runs"]] == [("coco-5-srau-shapes-s1", 0.123, True)]
    assert [(r["model"], r["train_photos"], r["CIDEr"]) for r in raw["table"]][0] == ("visualgpt", 5, 0.123)
    assert [r["name"] for r in raw["recorded_unused"]] == ["coco-5-default-s1"]
    ignored = study(tmp_path, *args, "--no-recorded", "--results", "ignored")
    assert ignored.returncode == 0, ignored.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "ignored.json").read_text())["raw"]["runs"] == []


def test_coco_without_its_files_is_one_line(tmp_path: Path):
    done = study(tmp_path, "--dataset", "coco", "--root", str(tmp_path / "nowhere"), "--finished-only")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "dataset_coco.json" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_data_efficiency_preset_realphoto_is_this_study():
    """`data_efficiency.py --preset realphoto ...` hands the other options to this script, unchanged."""
    from benchmarks.data_efficiency import realphoto_argv

    assert realphoto_argv(["--preset", "realphoto", "--tune", "--seeds", "1,2,3"]) == ["--tune", "--seeds", "1,2,3"]
    assert realphoto_argv(["--seeds", "3", "--preset=realphoto"]) == ["--seeds", "3"]
    assert realphoto_argv(["--preset", "study", "--seeds", "1"]) is None
    assert realphoto_argv(["--preset"]) is None
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/data_efficiency.py", "--preset", "realphoto", "--dataset",
                           "coco"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # this script's own check, not data_efficiency's unknown preset
    assert "--dataset coco needs --root DIR" in proc.stderr and "Traceback" not in proc.stderr
