"""`vgpt prepare coco --fraction 0.01` on a synthetic Karpathy file of real COCO size.

123,287 images (82,783 train, 30,504 restval, 5,000 val, 5,000 test) and 616,767 captions, with
sentence tokens as in the real file. The images "exist" as empty files (the prepare step only checks
existence); creating them is setup, outside the timed run. The timed run is the real CLI in a fresh
process (Python start-up and imports included); peak memory is that process's max RSS.

    .venv/bin/python benchmarks/prepare.py
    .venv/bin/python benchmarks/prepare.py --smoke    # seconds: the same at 1/500 of the size, checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import goal, print_table, write_results  # noqa: E402

SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
CAPTIONS = 616_767
WORDS = ("a man woman dog cat riding sitting on top of the with near large small red white table street "
         "plate food bus train people standing next to in front field grass water").split()


def write_synthetic(root: Path, scale: float = 1.0) -> tuple[Path, dict[str, int], int]:
    """The Karpathy file (and empty image files) of `scale` x COCO's size: (its path, images per split, captions)."""
    rng = random.Random(0)
    splits = {split: max(2, round(n * scale)) for split, n in SPLITS.items()}
    n_images = sum(splits.values())
    # this many images get a 6th caption, as some real ones do
    extra = round((CAPTIONS - 5 * sum(SPLITS.values())) * n_images / sum(SPLITS.values()))
    images, imgid, sentid = [], 0, 0
    for folder in ("train2014", "val2014"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        folder = "train2014" if split == "train" else "val2014"
        for _ in range(n):
            cocoid = 9 + imgid * 3
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            (root / folder / filename).touch()
            sents = []
            for _ in range(6 if imgid < extra else 5):
                tokens = rng.choices(WORDS, k=rng.randint(8, 13))
                sents.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".", "imgid": imgid,
                              "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": filename,
                           "imgid": imgid, "split": split, "sentences": sents, "cocoid": cocoid})
            imgid += 1
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    assert sentid == 5 * n_images + extra
    return path, splits, sentid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds, checks that it runs: 1/500 of COCO's size, "
                   "into prepare_smoke.json")
    a = p.parse_args()
    scale = 1 / 500 if a.smoke else 1.0
    with tempfile.TemporaryDirectory(prefix="vgpt-bench-prepare-") as tmp:
        root, ws = Path(tmp) / "coco", Path(tmp) / "ws"
        t = time.perf_counter()
        ann, splits, captions = write_synthetic(root, scale)
        setup_s = time.perf_counter() - t
        print(f"setup: wrote {ann} ({ann.stat().st_size / 1e6:.0f} MB) and {sum(splits.values()):,} empty image files "
              f"in {setup_s:.1f} s", file=sys.stderr)
        cmd = [sys.executable, "-m", "vgpt_cli", "-w", str(ws), "prepare", "coco", "--root", str(root),
               "--fraction", "0.01", "--json"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        wall = time.perf_counter() - t
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            sys.exit(f"prepare failed ({proc.returncode}): {proc.stderr}")
        info = json.loads(proc.stdout)
        t = time.perf_counter()
        import_proc = subprocess.run([sys.executable, "-c", "import vgpt_cli.cli"], capture_output=True)
        import_s = time.perf_counter() - t
        assert import_proc.returncode == 0
    assert before <= peak_kib
    peak_gb = peak_kib * 1024 / 1e9
    counts = info["counts"]
    rows = [{"split": s, "images": c["items"], "captions": c["captions"]} for s, c in counts.items()]
    print_table(rows, "manifest of `vgpt prepare coco --fraction 0.01` (synthetic COCO-size Karpathy file)")
    print_table([{"wall_s": wall, "cli_import_s": import_s, "peak_rss_gb": peak_gb}], "\ncost")
    raw = {"images": sum(splits.values()), "captions": captions, "fraction": 0.01, "wall_s": round(wall, 3),
           "cli_import_s": round(import_s, 3), "peak_rss_gb": round(peak_gb, 3), "setup_s": round(setup_s, 1),
           "counts": counts, "pool_captions": info["sampling"]["pool_captions"],
           "images_exist_as": "empty files created before the timed run"}
    assert counts["train"]["captions"] == round(0.01 * info["sampling"]["pool_captions"])
    write_results(__file__, raw, {"wall_seconds": goal(wall, 20.0, higher_is_better=False),
                                  "peak_memory_gb": goal(peak_gb, 2.0, higher_is_better=False)},
                  name="prepare_smoke" if a.smoke else None)


if __name__ == "__main__":
    main()
