"""`vgpt caption` end to end on a folder of 100 images: images/s, and where the time goes.

Images (one folder, 100 files): scikit-image's sample photographs cut and scaled to 640 x 480 JPEGs
(quality 90, COCO-sized), repeated, plus rendered shapes scenes (vgpt_cli.data.shapes) saved as JPEGs.
Model: NOT a trained captioner. Random weights, sized so that this runs in a few minutes on a 2-core
laptop: a 2-layer, 256-wide GPT-2 with the real 50,257-token BPE (so the LM head, log-softmax and
top-k of beam search are full-vocabulary sized), K = 3 encoder levels, over the real offline
EfficientNet-Lite0 backbone (7 x 7 x 1280 tokens, 224 px). Its captions are nonsense; what each part
costs is what this measures. A GPT-2-small decoder costs more in beam search: see decode.py.

Measured in one run, on the same images and model:
  cli          `python -m vgpt_cli caption FOLDER --model DIR --json` as a new process: wall time
               including interpreter start, imports and model loading (what a user waits for)
  in_process   ImageCaptioner.caption(paths) with everything loaded (the steady-state rate)
  parts        the same work split and timed one part after the other:
               decode_resize  open_rgb (JPEG decode, EXIF, RGB) + the backbone's eval transform
               backbone       Backbone.forward_tokens (normalise + forward_features)
               encoder        Captioner.encode (visual encoder + every layer's cross-attention k/v)
               beam_search    decode() minus its encode: the steps of the beam search

On the CPU, images/s and the shares come from CPU time at one torch thread (`--threads`; the CLI process
gets the same through OMP_NUM_THREADS): on a shared machine the wall time of each part is stretched by
whatever else runs at that moment. Wall times are recorded too.

    python benchmarks/caption.py                 # beam 5, 20 tokens, batch 16, CPU
    python benchmarks/caption.py --layers 12 --width 768 --device cuda
    python benchmarks/caption.py --smoke         # seconds: 4 images, a 1-layer 64-wide GPT-2, beam 2, 4 tokens

Goals: none are set for captioning speed yet; the parts must account for the in-process time
(their sum within 15%), so that the breakdown is a breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import goal, parse_with_smoke, print_table, write_results  # noqa: E402

BPE = ROOT / "tests" / "assets" / "gpt2-bpe"


def make_images(folder: Path, n: int, n_scenes: int) -> list[Path]:
    """n image files: n - n_scenes photographs (640 x 480 JPEG crops, repeated) and n_scenes shapes scenes."""
    import skimage.data

    from vgpt_cli.data.shapes import make_scene, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(skimage.data, k)()).convert("RGB")
              for k in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n - n_scenes):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        p = folder / f"photo_{i:03d}.jpg"
        im.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    for i in range(n_scenes):
        p = folder / f"scene_{i:03d}.jpg"
        render_scene(make_scene(0, i)).save(p, quality=90)
        paths.append(p)
    return paths


def make_model(folder: Path, args) -> None:
    """A random-weight captioner folder with its preprocessor.json (what training writes)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from vgpt_cli.features import load_backbone
    from vgpt_cli.model import Captioner, CaptionerConfig

    bb = load_backbone("tf_efficientnet_lite0")  # the offline package's real weights
    tok = GPT2TokenizerFast(vocab=str(BPE / "vocab.json"), merges=str(BPE / "merges.txt"))
    assert len(tok) > 50000
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                                    vocab_size=len(tok), n_positions=64))
    cfg = CaptionerConfig(lm="gpt2-random", lm_init="random", d_in=bb.dim, encoder_layers=args.k)
    Captioner.from_config(cfg, lm=lm, tokenizer=tok).save_pretrained(folder)
    (folder / "preprocessor.json").write_text(json.dumps(bb.meta, indent=2) + "\n")


def clock(device: str, fn, *args):
    """((wall seconds, CPU seconds of this process), fn(*args))."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t, time.process_time() - c), out


def parts(captioner, paths: list[Path], device: str) -> dict[str, list[float]]:
    """The in-process work of ImageCaptioner.caption, split into its parts and timed one by one:
    {part: [wall seconds, CPU seconds]}."""
    from vgpt_cli.decode import pad_features
    from vgpt_cli.decode.search import decode
    from vgpt_cli.features import open_rgb

    bb, model, bs = captioner.backbone, captioner.model, captioner.batch_size
    t = {k: [0.0, 0.0] for k in ("decode_resize", "backbone", "encoder", "beam_search")}

    def add(part, seconds, minus=(0.0, 0.0)):
        t[part] = [t[part][i] + seconds[i] - minus[i] for i in range(2)]
    for start in range(0, len(paths), bs):
        chunk = paths[start:start + bs]
        s, pixels = clock("cpu", lambda c: torch.stack([bb.preprocess(open_rgb(p)) for p in c]), chunk)
        add("decode_resize", s)
        s, tokens = clock(device, bb.forward_tokens, pixels)
        add("backbone", s)
        f, lengths = pad_features([x.half().numpy() for x in tokens], device)
        with torch.inference_mode():
            enc, _ = clock(device, model.encode, f, lengths)
            add("encoder", enc)
            s, _ = clock(device, decode, model, f, lengths, captioner.options)
            add("beam_search", s, enc)  # decode() encodes again first: that part is the encoder's
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--scenes", type=int, default=30, help="how many of them are rendered shapes scenes")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--k", type=int, default=3, help="encoder levels")
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads, here and in the CLI process (0: torch's own choice); 1 by default: "
                         "on a shared 2-core machine a second thread waits on the busy core at every operation")
    args = parse_with_smoke(ap, "4 images, a tiny model, into caption_smoke.json", images=4, scenes=1, layers=1,
                            width=64, k=1, beam_size=2, max_length=4, batch_size=2)
    if args.threads:
        torch.set_num_threads(args.threads)

    from vgpt_cli.api import load_captioner

    tmp = Path(tempfile.mkdtemp(prefix="vgpt-caption-bench-"))
    try:
        paths = make_images(tmp / "images", args.images, args.scenes)
        model_dir = tmp / "model"
        make_model(model_dir, args)
        opts = ["--beam-size", str(args.beam_size), "--max-length", str(args.max_length),
                "--batch-size", str(args.batch_size), "--device", args.device]

        # 1. the command, as a user runs it (a fresh process: start-up and loading included)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        t, child = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "vgpt_cli", "-w", str(tmp / "ws"), "caption",
                               str(tmp / "images"), "--model", str(model_dir), "--json", *opts],
                              capture_output=True, text=True, env=env, cwd=tmp)
        cli_s = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = after.ru_utime + after.ru_stime - child.ru_utime - child.ru_stime
        if proc.returncode != 0:
            sys.exit(f"vgpt caption failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        captions = json.loads(proc.stdout)
        assert len(captions) == args.images and all(c.get("caption") is not None for c in captions)

        # 2. in process: load once, warm up, then the steady-state rate and its parts
        t = time.perf_counter()
        captioner = load_captioner(model_dir, device=args.device, beam_size=args.beam_size,
                                   max_length=args.max_length, batch_size=args.batch_size)
        load_s = time.perf_counter() - t
        captioner.caption(paths[:args.batch_size])  # warm-up
        (in_s, in_cpu), results = clock(args.device, captioner.caption, paths)
        assert [r.caption for r in results] == [c["caption"] for c in captions], "CLI and API captions differ"
        split = parts(captioner, paths, args.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.images
    wall = {k: v[0] for k, v in split.items()}
    cpu = {k: v[1] for k, v in split.items()}
    # on the CPU the shares and the check read CPU time: a shared machine's other jobs stretch the wall
    # time of each part by a different factor (the parts run at different moments)
    on_cpu = not args.device.startswith("cuda")
    basis, in_basis = (cpu, in_cpu) if on_cpu else (wall, in_s)
    total_parts = sum(basis.values())
    rows = [{"what": "vgpt caption (new process)", "wall_s": cli_s, "cpu_s": cli_cpu,
             "images_per_s": n / (cli_cpu if on_cpu else cli_s), "share": None},
            {"what": "in process (loaded)", "wall_s": in_s, "cpu_s": in_cpu, "images_per_s": n / in_basis,
             "share": 1.0}]
    rows += [{"what": f"  {k}", "wall_s": wall[k], "cpu_s": cpu[k], "images_per_s": n / basis[k],
              "share": basis[k] / total_parts} for k in split]
    rows.append({"what": "start-up + loading (cli - in process)", "wall_s": cli_s - in_s, "cpu_s": cli_cpu - in_cpu,
                 "images_per_s": None, "share": None})
    print_table(rows, title=f"{n} images ({n - args.scenes} photos 640x480, {args.scenes} shapes scenes), "
                            f"random {args.layers}-layer {args.width}-wide GPT-2 (vocab 50257), K={args.k}, "
                            f"beam {args.beam_size}, {args.max_length} tokens, batch {args.batch_size}, "
                            f"lite0 backbone, {args.device}, {torch.get_num_threads()} threads; images/s and "
                            f"shares from {'CPU' if on_cpu else 'wall'} time")
    raw = {"images": n, "scenes": args.scenes, "layers": args.layers, "width": args.width, "k": args.k,
           "beam_size": args.beam_size, "max_length": args.max_length, "batch_size": args.batch_size,
           "device": args.device, "threads": torch.get_num_threads(),
           "weights": "random captioner, real EfficientNet-Lite0 backbone", "rates_from": "cpu" if on_cpu else "wall",
           "cli_seconds": cli_s, "cli_cpu_seconds": cli_cpu, "cli_images_per_s": n / (cli_cpu if on_cpu else cli_s),
           "in_process_seconds": in_s, "in_process_cpu_seconds": in_cpu, "in_process_images_per_s": n / in_basis,
           "load_seconds_in_process": load_s, "parts_seconds": wall, "parts_cpu_seconds": cpu,
           "parts_share": {k: v / total_parts for k, v in basis.items()},
           "load_average_1min_after": os.getloadavg()[0]}
    goals = {"parts_account_for_in_process_time": goal(abs(total_parts / in_basis - 1), 0.15,
                                                       higher_is_better=False)}
    write_results(__file__, raw, goals, name="caption_smoke" if args.smoke else None)


if __name__ == "__main__":
    main()
