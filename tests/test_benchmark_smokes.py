"""Every benchmark script runs end to end: `python benchmarks/NAME.py --smoke` (seconds, tiny models and data)
must exit 0 and write NAME_smoke.json with the machine, the raw numbers and its goals, so that a change that
breaks a benchmark fails CI and not the next person who runs it. The results go to a temporary folder
(VGPT_BENCHMARK_RESULTS), never to the committed benchmarks/results/.

The scripts are found by listing benchmarks/: a new benchmark without --smoke fails here."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
NOT_SCRIPTS = {"__init__.py", "common.py"}
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.name not in NOT_SCRIPTS)
# A smoke that hangs (a server that never answers, a kill that never lands) fails instead of stalling CI.
TIMEOUT_S = 600
SMOKES_AT_ONCE = 2  # CI's machine has two cores
# started first, so that the last smokes to finish are short ones (several Python processes each)
LONGEST = ["kill_campaign", "serve", "data_efficiency", "caption", "grounding", "grounding_ceiling"]
WORDS = "a dog cat man woman girl runs sits on the grass beach street red blue ball with two near water".split()


def flickr8k_folder(root: Path) -> Path:
    """A tiny copy of the Flickr8k release layout (vgpt_cli/data/flickr.py): generated JPEGs in
    Flicker8k_Dataset/, five captions each in Flickr8k.token.txt, and the three split lists."""
    from PIL import Image

    rng = random.Random(0)
    counts = {"train": 12, "dev": 4, "test": 2}  # what realphoto.py's smoke preset asks for (12 + 4)
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    lines = []
    for split, n in counts.items():
        files = [f"{split}_{i:03d}.jpg" for i in range(n)]
        (root / f"Flickr_8k.{split}Images.txt").write_text("".join(f + "\n" for f in files))
        for f in files:
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (96, 72), colour).save(root / "Flicker8k_Dataset" / f, quality=90)
            lines += [f"{f}#{j}\t{' '.join(rng.choices(WORDS, k=rng.randint(5, 9)))}" for j in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return root


def extra_args(script: str, tmp_path: Path) -> list[str]:
    """A workspace in tmp_path for every script that takes one; a generated Flickr8k folder for those that
    read the release (--root), which a clone does not have."""
    source = (BENCHMARKS / f"{script}.py").read_text()
    args = []
    if 'add_argument("--workspace"' in source:
        args += ["--workspace", str(tmp_path / "workspace")]
    if 'add_argument("--root"' in source:
        args += ["--root", str(flickr8k_folder(tmp_path / "flickr8k"))]
    return args


def run_smoke(script: str, tmp_path: Path) -> tuple[list[str], subprocess.CompletedProcess, float, Path]:
    """`python benchmarks/SCRIPT.py --smoke` from the repository root, its results sent to tmp_path/results:
    (the command, the finished process, its seconds, the results folder)."""
    results = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VGPT_BENCHMARK_RESULTS": str(results),
           # tiny models gain nothing from a second thread, and the smokes run two at a time
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, f"benchmarks/{script}.py", "--smoke", *extra_args(script, tmp_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return cmd, proc, time.perf_counter() - t0, results


@pytest.fixture(scope="module")
def smokes(request, tmp_path_factory):
    """The selected scripts' smokes, queued at once and run SMOKES_AT_ONCE at a time: {script: Future of
    run_smoke's answer}. The whole file runs on one xdist worker (pyproject's --dist loadfile), and a smoke is
    mostly one core's work (starting Python, importing torch): one after the other they take twice as long."""
    def script_of(item) -> str | None:
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("script") if callspec is not None and item.module is request.module else None

    collected = request.node.listchain()[0].items  # the whole run's tests, of which some are smokes
    selected = sorted({s for s in map(script_of, collected) if s},
                      key=lambda s: (LONGEST.index(s) if s in LONGEST else len(LONGEST), s))
    pool = ThreadPoolExecutor(SMOKES_AT_ONCE)
    try:
        yield {s: pool.submit(run_smoke, s, tmp_path_factory.mktemp(f"{s}-smoke")) for s in selected}
    finally:
        pool.shutdown(cancel_futures=True)  # after -x: the smokes not yet started are not run


def test_every_benchmark_is_found():
    assert {"train_step", "grounding", "realphoto", "data_efficiency", "decode"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script, smokes):
    cmd, proc, seconds, results = smokes[script].result()
    print(f"{script} --smoke: {seconds:.1f} s")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    written = sorted(p.name for p in results.glob("*.json")) if results.is_dir() else []
    assert written == [f"{script}_smoke.json"], f"a smoke writes {script}_smoke.json only, not {written}"
    payload = json.loads((results / written[0]).read_text())
    assert payload["script"] == f"{script}.py"
    assert isinstance(payload["machine"], dict) and payload["machine"]
    assert isinstance(payload["raw"], dict) and payload["raw"]
    goals = payload["goals"]
    assert isinstance(goals, dict) and goals, "the smoke computes the full run's goals"
    for name, g in goals.items():
        assert set(g) == {"value", "target", "higher_is_better", "met"}, name
        assert isinstance(g["value"], (int, float)) and not isinstance(g["value"], bool), name
        assert isinstance(g["target"], (int, float)) and not isinstance(g["target"], bool), name
        assert isinstance(g["higher_is_better"], bool) and isinstance(g["met"], bool), name
