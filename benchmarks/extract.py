"""Extraction speed: JPEG files on disk -> store, against the same backbone's forward alone.

    python benchmarks/extract.py                                  # lite0, offline weights, CPU
    python benchmarks/extract.py --device cuda --backbone vit_base_patch16_clip_224 --no-pretrained
    python benchmarks/extract.py --device cuda --gpu-decode       # JPEGs decoded + resized on the GPU
    python benchmarks/extract.py --smoke      # seconds: 8 images, timm's tiny random test_efficientnet

Measured in one run, on the same machine:
  forward_only   forward_tokens on preprocessed tensors already in (host) memory: the ceiling
  end_to_end     extract_items: read + decode + resize in DataLoader workers, forward, fp16 store writes
  store_read     random-order batches from the memory-mapped store (store.batch), what training does
Goals: end_to_end / forward_only >= 0.85; store_read >= 20 x end_to_end.
With --gpu-decode, end_to_end decodes the JPEGs on the device (extract-features --gpu-decode), and the
pixels and features of the first 64 images are compared with the CPU (PIL) path's: pixel_diff in the
results (mean and max |difference| in 0..255 levels, and the features' relative difference).
Random weights (--no-pretrained) cost exactly the same compute as pretrained ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import goal, print_table, write_results  # noqa: E402
from vgpt_cli.data.manifest import Item  # noqa: E402
from vgpt_cli.features import FeatureStore, extract_items, load_backbone  # noqa: E402
from vgpt_cli.features.images import open_rgb  # noqa: E402


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (640, 480), distinct: int = 512) -> list[Path]:
    """n COCO-sized JPEG files (640 x 480, quality 90) cut and scaled from real photographs;
    beyond `distinct` of them, byte copies (decoding costs the same; making them does not)."""
    import skimage.data

    photos = [Image.fromarray(getattr(skimage.data, k)()).convert("RGB")
              for k in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        if i >= distinct:
            p = root / f"{i:05d}.jpg"
            shutil.copyfile(paths[i % distinct], p)
            paths.append(p)
            continue
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        p = root / f"{i:05d}.jpg"
        im.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    return paths


def compare_decoders(bb, paths: list[Path]) -> dict[str, float]:
    """The device path's pixels and features against the CPU (PIL) path's, on the same files."""
    from vgpt_cli.features.extract import decode_on_device, jpeg_bytes_or_pixels

    cpu = torch.stack([bb.preprocess(open_rgb(p)) for p in paths])
    entries = [jpeg_bytes_or_pixels(p, bb.transform, 10**9) for p in paths]
    dev = torch.stack(decode_on_device(entries, [str(p) for p in paths], bb.transform, bb.device, 10**9)).cpu()
    d = (dev.int() - cpu.int()).abs().float()
    fc, fd = bb.forward_tokens(cpu).float(), bb.forward_tokens(dev).float()
    rel = ((fd - fc).flatten(1).norm(dim=1) / fc.flatten(1).norm(dim=1))
    return {"pixel_mean_abs": float(d.mean()), "pixel_max_abs": float(d.max()),
            "pixels_differing": float((d > 0).float().mean()), "feature_rel_diff_mean": float(rel.mean()),
            "feature_rel_diff_max": float(rel.max()), "images": len(paths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--no-pretrained", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=None, help="default: 256 on CPU, 16384 on CUDA")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    ap.add_argument("--num-workers", type=int, default=None, help="default: CPUs - 1")
    ap.add_argument("--read-batch", type=int, default=64)
    ap.add_argument("--read-seconds", type=float, default=2.0, help="store reads last at least this long")
    ap.add_argument("--gpu-decode", action="store_true", help="end to end decodes JPEGs on the device (CUDA)")
    ap.add_argument("--smoke", action="store_true", help="seconds, checks that it runs: 8 images, a tiny random "
                    "backbone, into extract_smoke.json")
    args = ap.parse_args()
    if args.smoke:
        args.backbone, args.no_pretrained, args.images, args.batch_size = "test_efficientnet", True, 8, 4
        args.num_workers, args.read_seconds = 1, 0.1
    cuda = args.device.startswith("cuda")
    n = args.images or (16384 if cuda else 256)
    bs = args.batch_size or (128 if cuda else 32)
    workers = args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)

    bb = load_backbone(args.backbone, pretrained=not args.no_pretrained, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        paths = make_jpegs(root / "img", n)

        # forward only: the same forward_tokens + fp16 copy to the host as extraction, on ready tensors
        pixels = torch.stack([bb.preprocess(open_rgb(p)) for p in paths[: min(n, 8 * bs)]])
        if cuda:
            pixels = pixels.pin_memory()
        batches = [pixels[i:i + bs] for i in range(0, len(pixels), bs)]
        bb.forward_tokens(batches[0]).half().numpy()  # warm-up (cudnn autotune, allocator)
        done, t = 0, time.perf_counter()
        while done < n:
            for x in batches:
                bb.forward_tokens(x).half().numpy()
                done += len(x)
                if done >= n:
                    break
        if cuda:
            torch.cuda.synchronize()
        forward_rate = done / (time.perf_counter() - t)

        # end to end: files on disk -> store
        items = [Item(p.stem, [str(p)], []) for p in paths]
        dd = {"device_decode": args.gpu_decode}
        extract_items(items[:bs], bb, root / "warm", batch_size=bs, num_workers=0, progress=False, **dd)  # warm-up
        t = time.perf_counter()
        summary = extract_items(items, bb, root / "store", batch_size=bs, num_workers=workers, progress=False, **dd)
        e2e_rate = len(items) / (time.perf_counter() - t)
        assert summary.extracted == len(items), summary

        # store reads: random-order padded batches, as a training loader asks for them
        store = FeatureStore.open(root / "store")
        keys = store.keys()
        order = np.random.default_rng(0).permutation(len(keys))
        reads, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.read_seconds or reads < 2 * len(keys):
            for i in range(0, len(order), args.read_batch):
                feats, _ = store.batch([keys[j] for j in order[i:i + args.read_batch]])
                torch.from_numpy(feats)
                reads += feats.shape[0]
        read_rate = reads / (time.perf_counter() - t)

        pixel_diff = compare_decoders(bb, paths[:64]) if args.gpu_decode else None

    raw = {"gpu_decode": args.gpu_decode, "pixel_diff": pixel_diff, "backbone": args.backbone, "pretrained": bool(bb.meta["pretrained"]), "device": args.device,
           "images": n, "image_size": "640x480 JPEG q90", "batch_size": bs, "num_workers": workers,
           "tokens": bb.meta["tokens_per_image"], "dim": bb.dim, "forward_only_img_s": round(forward_rate, 1),
           "end_to_end_img_s": round(e2e_rate, 1), "store_read_img_s": round(read_rate, 1),
           "read_batch": args.read_batch}
    print_table([{"what": "forward only (tensors in memory)", "img/s": forward_rate},
                 {"what": "end to end (JPEG files -> store)", "img/s": e2e_rate},
                 {"what": "store reads (random batches)", "img/s": read_rate}],
                title=f"{args.backbone} on {args.device}, {n} images, batch {bs}, {workers} workers")
    write_results(__file__, raw, {
        "end_to_end_vs_forward": goal(e2e_rate / forward_rate, 0.85),
        "store_read_vs_extraction": goal(read_rate / e2e_rate, 20.0),
    }, name="extract_smoke" if args.smoke else None)


if __name__ == "__main__":
    main()
