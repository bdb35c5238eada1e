"""What the demo's image features know: a linear probe for colour and shape, stage by stage.

Renders shapes scenes, keeps those with one object, and fits a logistic regression on each stage's
map of tf_efficientnet_lite0 (the demo's backbone, real offline weights), mean- and max-pooled over
positions, to predict the object's colour (6 classes) and shape (5 classes); accuracy on held-out
scenes. "tokens" is what `vgpt demo` stores: the last layer with stage 2 appended (--add-stage 2).

    python benchmarks/feature_probe.py            # about a minute on 2 CPU cores
    python benchmarks/feature_probe.py --smoke    # seconds: 80 scenes in a temporary folder, checks it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import goal, print_table, scratch_dir, write_results  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=2000, help="scenes rendered (about 30%% have one object)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", type=Path, default=None, help="default /tmp/vgpt-feature-probe (--smoke: a "
                   "temporary folder)")
    p.add_argument("--smoke", action="store_true", help="seconds, checks that it runs: 80 scenes, into "
                   "feature_probe_smoke.json")
    a = p.parse_args()
    if a.smoke:
        a.scenes = 80
        a.workdir = a.workdir or scratch_dir("vgpt-feature-probe-smoke-")
    a.workdir = a.workdir or Path("/tmp/vgpt-feature-probe")
    return a


def pooled(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C): mean and max over positions."""
    return torch.cat([maps.mean((2, 3)), maps.amax((2, 3))], 1).double()


def probe_accuracy(x: torch.Tensor, labels: list[str], seed: int) -> float:
    """Held-out accuracy of an L2-regularised softmax regression on pooled features (B, D)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    train, test = order[:cut], order[cut:]
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6  # standardise with the training scenes only
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ w + b, y[train]) + 1e-2 * w.pow(2).sum() / len(train)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[test] @ w + b).argmax(1) == y[test]).double().mean())


def main() -> None:
    a = parse()
    from PIL import Image

    from vgpt_cli.data.shapes import write_shapes
    from vgpt_cli.demo import BACKBONE, DemoSettings
    from vgpt_cli.features import load_backbone

    t0 = time.perf_counter()
    path = write_shapes(a.workdir, a.scenes, a.seed)
    scenes = [e for e in json.loads(path.read_text())["images"] if len(e["objects"]) == 1]
    stages = DemoSettings().add_stages
    bb = load_backbone(BACKBONE, add_stages=stages)
    pixels = torch.stack([bb.preprocess(Image.open(a.workdir / e["filepath"] / e["filename"]).convert("RGB"))
                          for e in scenes])
    parts: dict[str, list[torch.Tensor]] = {}
    shapes_of: dict[str, tuple[int, ...]] = {}

    def keep(name: str, maps: torch.Tensor) -> None:
        parts.setdefault(name, []).append(pooled(maps))
        shapes_of[name] = tuple(maps.shape[1:])

    assert bb.meta["data_config"]["mean"] == [0.5, 0.5, 0.5] == bb.meta["data_config"]["std"]
    m, tokens_name = bb.model, f"tokens (last layer + stage {','.join(map(str, stages))})"
    with torch.inference_mode():
        for start in range(0, len(pixels), 64):  # batches: the early maps are large
            batch = pixels[start:start + 64]
            h = m.bn1(m.conv_stem(batch.float() / 127.5 - 1.0))  # lite0's mean = std = 0.5
            for i, block in enumerate(m.blocks):
                h = block(h)
                keep(f"blocks.{i}", h)
            keep("last layer (forward_features)", m.bn2(m.conv_head(h)))
            tokens = bb.forward_tokens(batch).float()  # exactly what the store holds
            side = int(round(tokens.shape[1] ** 0.5))
            keep(tokens_name, tokens.transpose(1, 2).reshape(len(batch), -1, side, side))
    feats = {name: (torch.cat(p), shapes_of[name]) for name, p in parts.items()}
    colours = [e["objects"][0]["colour"] for e in scenes]
    shapes = [e["objects"][0]["shape"] for e in scenes]
    rows = [{"features": name, "channels": shape[0], "grid": f"{shape[1]}x{shape[2]}",
             "colour_acc": round(probe_accuracy(f, colours, a.seed), 3),
             "shape_acc": round(probe_accuracy(f, shapes, a.seed), 3)} for name, (f, shape) in feats.items()]
    chance = {"colour": max(colours.count(c) for c in set(colours)) / len(colours),
              "shape": max(shapes.count(s) for s in set(shapes)) / len(shapes)}
    print_table(rows, title=f"linear probes on {len(scenes)} one-object scenes (70% fit, 30% held out); "
                            f"majority class: colour {chance['colour']:.2f}, shape {chance['shape']:.2f}")
    last, demo = rows[-2], rows[-1]
    goals = {"demo_tokens_colour_accuracy": goal(demo["colour_acc"], 0.9),
             "demo_tokens_shape_accuracy": goal(demo["shape_acc"], 0.9)}
    write_results(__file__, {"scenes": len(scenes), "rows": rows, "chance": chance,
                             "last_layer_colour_acc": last["colour_acc"],
                             "seconds": round(time.perf_counter() - t0, 1)}, goals,
                  name="feature_probe_smoke" if a.smoke else None)


if __name__ == "__main__":
    main()
