"""What the demo's visual tokens can carry: a multi-object binding probe and a small decoder from scratch.

The demo's captions name the right shapes but guess colours. Before blaming the captioner, this measures
the ceiling of its features on the same data (`vgpt demo`'s 1,000 shapes scenes, seed 42, 800 train /
100 test, lite0 + stage 2 = 49 tokens x 1,320):

1. Multi-object probes: which of the 30 (colour, shape) pairs a scene holds, from its token set.
   - pooled: mean over tokens -> linear (no binding possible beyond co-occurrence)
   - per-token: every token -> linear, max over tokens (a pair must be readable from one token)
   - attention: one learned query per pair attends over the tokens (binding by content)
2. A small captioner trained from scratch on the same tokens (word vocabulary, 2-layer transformer
   decoder, 256 wide, cross-attention over a 1-layer encoder), trained until validation loss stops
   improving, greedy-decoded on the test scenes and scored like the demo (object F1, grounded, shape F1).
   With and without 2-D position embeddings on the 7 x 7 grid.

    python benchmarks/grounding_ceiling.py               # about 5 minutes on a 2-core CPU
    python benchmarks/grounding_ceiling.py --smoke       # seconds: 50 scenes, one seed, a few steps, checks it runs
Writes benchmarks/results/grounding_ceiling.json (--smoke: grounding_ceiling_smoke.json, its workspace a
temporary folder).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import goal, print_table, results_dir, scratch_dir, write_results  # noqa: E402

DEMO_TAG = "49 tokens x 1320"

PAIRS = None  # filled from vgpt_cli.data.shapes


def demo_data(workspace: Path, seed: int = 42, scenes: int = 1000, image_size: int | None = None,
              caption_order: str = "random"):
    """The demo's manifest and feature store (built here when missing, as `vgpt demo` builds them)."""
    from vgpt_cli.data.build import SamplingOptions, prepare_shapes
    from vgpt_cli.demo import BACKBONE, DemoSettings
    from vgpt_cli.features import load_backbone
    from vgpt_cli.features.extract import extract_items
    from vgpt_cli.features.store import FeatureStore
    from vgpt_cli.workspace import Workspace

    ws = Workspace.from_option(workspace)
    manifest, _ = prepare_shapes(ws, scenes, seed, SamplingOptions(seed=seed), caption_order=caption_order)
    backbone = load_backbone(BACKBONE, device="cpu", add_stages=DemoSettings().add_stages, image_size=image_size)
    store_dir = ws.features_root / backbone.fingerprint
    extract_items(manifest.all_items(), backbone, store_dir, num_workers=1, progress=False, warn=print)
    return manifest, FeatureStore.open(store_dir)


def split_arrays(manifest, store, split: str):
    items = manifest.items(split)
    x = torch.from_numpy(np.stack([store.get(it.id).astype(np.float32) for it in items]))
    return items, x


def pair_targets(items) -> torch.Tensor:
    y = torch.zeros(len(items), len(PAIRS))
    for i, it in enumerate(items):
        for o in it.extra["objects"]:
            y[i, PAIRS.index((o["colour"], o["shape"]))] = 1
    return y


# --- 1. probes --------------------------------------------------------------------------------------
class Probe(nn.Module):
    def __init__(self, kind: str, d_in: int, n_out: int):
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.proj = nn.Linear(d_in, 128)
            self.queries = nn.Parameter(torch.randn(n_out, 128) * 0.1)
            self.out = nn.Parameter(torch.randn(n_out, 128) * 0.1)
            self.bias = nn.Parameter(torch.zeros(n_out))
        else:
            self.lin = nn.Linear(d_in, n_out)

    def forward(self, x):  # x (B, N, d_in), standardised per channel -> logits (B, P)
        if self.kind == "pooled":
            return self.lin(x.mean(1))
        if self.kind == "per-token":
            return self.lin(x).max(1).values
        h = torch.tanh(self.proj(x))                                   # (B, N, 128)
        att = torch.softmax(torch.einsum("bnd,pd->bpn", h, self.queries), -1)
        pooled = torch.einsum("bpn,bnd->bpd", att, h)
        return (pooled * self.out).sum(-1) + self.bias


def run_probe(kind, xtr, ytr, xte, yte, steps: int, seed: int):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    probe = Probe(kind, xtr.shape[-1], ytr.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(probe(xtr), ytr)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = probe(xte) > 0
    truth = yte > 0.5
    tp = (pred & truth).sum().item()
    f1 = 2 * tp / (pred.sum().item() + truth.sum().item())
    exact = (pred == truth).all(1).float().mean().item()
    return {"probe": kind, "seed": seed, "pair_f1": round(f1, 4), "scene_exact": round(exact, 4),
            "seconds": round(time.perf_counter() - t0, 1)}


# --- 2. a small captioner from scratch --------------------------------------------------------------
class SmallCaptioner(nn.Module):
    def __init__(self, d_in: int, vocab: int, grid: int, positions: bool, d: int = 256, max_len: int = 32):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.LayerNorm(d))
        self.pos2d = nn.Parameter(torch.randn(grid * grid, d) * 0.02) if positions else None
        self.enc = nn.TransformerEncoderLayer(d, 4, 4 * d, 0.1, batch_first=True, norm_first=True)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        layer = nn.TransformerDecoderLayer(d, 4, 4 * d, 0.1, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def memory(self, x):
        h = self.proj(x)
        if self.pos2d is not None:
            h = h + self.pos2d
        return self.enc(h)

    def forward(self, mem, ids):
        T = ids.shape[1]
        h = self.emb(ids) + self.pos[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T)
        return self.head(self.norm(self.dec(h, mem, tgt_mask=causal, tgt_is_causal=True)))


def train_small(manifest, xs, positions: bool, seed: int, max_epochs: int, patience: int = 3):
    from vgpt_cli.data.shapes import object_scores
    from vgpt_cli.train.warm_start import teacher_forcing

    words = sorted({w for it in manifest.items("train") for c in it.captions for w in c.split()})
    vocab = ["<pad>", "<bos>", "<eos>", *words]
    wid = {w: i for i, w in enumerate(vocab)}

    def encode(split):
        rows = []
        for i, it in enumerate(manifest.items(split)):
            for c in it.captions:
                rows.append((i, [1, *[wid[w] for w in c.split() if w in wid], 2]))
        return rows

    def batch(rows, x):
        ids, tgt = teacher_forcing([r for _, r in rows])
        return x[[i for i, _ in rows]], ids, tgt

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    flat = xs["train"].reshape(-1, xs["train"].shape[-1])
    mu, sd = flat.mean(0), flat.std(0) + 1e-4
    norm = {k: (v - mu) / sd for k, v in xs.items()}
    model = SmallCaptioner(flat.shape[1], len(vocab), int(math.isqrt(xs["train"].shape[1])), positions)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    train_rows, val_rows = encode("train"), encode("val")
    best, best_state, bad, t0, epochs = float("inf"), None, 0, time.perf_counter(), 0
    for epoch in range(max_epochs):
        model.train()
        order = rng.permutation(len(train_rows))
        for s in range(0, len(order), 64):
            f, ids, tgt = batch([train_rows[j] for j in order[s:s + 64]], norm["train"])
            loss = nn.functional.cross_entropy(model(model.memory(f), ids).transpose(1, 2), tgt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            f, ids, tgt = batch(val_rows, norm["val"])
            val = nn.functional.cross_entropy(model(model.memory(f), ids).transpose(1, 2), tgt).item()
        epochs = epoch + 1
        if val < best - 1e-3:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    items = manifest.items("test")
    with torch.no_grad():  # greedy decoding
        mem = model.memory(norm["test"])
        ids = torch.ones(len(items), 1, dtype=torch.long)
        done = torch.zeros(len(items), dtype=torch.bool)
        for _ in range(30):
            nxt = model(mem, ids)[:, -1].argmax(-1)
            nxt[done] = 0
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == 2
            if done.all():
                break
    caps = {}
    for it, row in zip(items, ids[:, 1:].tolist()):
        out = []
        for t in row:
            if t in (0, 2):
                break
            out.append(vocab[t])
        caps[it.id] = " ".join(out)
    scores = object_scores(caps, {it.id: it.extra["objects"] for it in items})
    return {"positions": positions, "seed": seed, "epochs": epochs, "val_loss": round(best, 4),
            "seconds": round(time.perf_counter() - t0, 1), **{k: round(v, 4) for k, v in scores.items()},
            "examples": [{"id": it.id, "caption": caps[it.id]} for it in items[:3]]}


def main() -> None:
    global PAIRS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=None,
                   help="default /tmp/vgpt-grounding (--smoke: a temporary folder)")
    p.add_argument("--scenes", type=int, default=1000, help="shapes scenes, split 80/10/10 (the demo's 1,000)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--probe-steps", type=int, default=400)
    p.add_argument("--max-epochs", type=int, default=25)
    p.add_argument("--positions", default="off,on", help="small captioner without / with 2-D positions")
    p.add_argument("--skip-probes", action="store_true", help="keep the probe results already in the JSON")
    p.add_argument("--image-size", type=int, default=None, help="backbone input size (default: the demo's)")
    p.add_argument("--probes", default="pooled,per-token,attention")
    p.add_argument("--tag", default="", help="label of these features in the results (e.g. 448px)")
    p.add_argument("--smoke", action="store_true", help="seconds, checks that it runs: 50 scenes, seed 1, 3 probe "
                   "steps, 1 epoch, into grounding_ceiling_smoke.json")
    a = p.parse_args()
    stem = "grounding_ceiling"
    if a.smoke:
        a.scenes, a.seeds, a.probe_steps, a.max_epochs, stem = 50, "1", 3, 1, "grounding_ceiling_smoke"
        # a throw-away workspace: the full run's (/tmp/vgpt-grounding) holds its 1,000 scenes' features
        a.workspace = a.workspace or scratch_dir("vgpt-grounding-ceiling-smoke-")
    a.workspace = a.workspace or Path("/tmp/vgpt-grounding")
    out = results_dir() / f"{stem}.json"
    from vgpt_cli.data.shapes import COLOURS, SHAPES

    PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
    seeds = [int(s) for s in a.seeds.split(",")]
    manifest, store = demo_data(a.workspace, scenes=a.scenes, image_size=a.image_size)
    xs = {}
    for split in ("train", "val", "test"):
        xs[split] = split_arrays(manifest, store, split)[1]
    tag = a.tag or f"{xs['train'].shape[1]} tokens x {xs['train'].shape[2]}"
    ytr, yte = pair_targets(manifest.items("train")), pair_targets(manifest.items("test"))
    old = json.loads(out.read_text())["raw"] if out.exists() else {"probes": [], "small_captioner": []}
    probes = old["probes"]
    if not a.skip_probes:
        flat = xs["train"].reshape(-1, xs["train"].shape[-1])
        mu, sd = flat.mean(0), flat.std(0) + 1e-4
        xtr, xte = (xs["train"] - mu) / sd, (xs["test"] - mu) / sd
        for kind in a.probes.split(","):
            for s in seeds:
                r = dict(features=tag, **run_probe(kind, xtr, ytr, xte, yte, a.probe_steps, s))
                print(json.dumps(r), flush=True)
                probes = [x for x in probes if (x.get("features", DEMO_TAG), x["probe"], x["seed"])
                          != (tag, kind, s)] + [r]
    print_table(probes, "multi-object probes (30 colour-shape pairs; test 100 scenes)")
    small = list(old["small_captioner"])
    for pos in (p == "on" for p in a.positions.split(",")):
        for s in seeds:
            r = dict(features=tag, **train_small(manifest, xs, pos, s, a.max_epochs))
            print(json.dumps(r), flush=True)
            small = [x for x in small if (x.get("features", DEMO_TAG), x["positions"], x["seed"])
                     != (tag, pos, s)] + [r]
    print_table([{k: v for k, v in r.items() if k != "examples"} for r in small],
                "small captioner from scratch (greedy, test 100 scenes)")
    best = max(np.mean([r["object_f1"] for r in small if r["positions"] == pos] or [0.0]) for pos in (False, True))
    write_results(__file__, {"probes": probes, "small_captioner": small},
                  {"small_captioner_object_f1": goal(best, 0.9)}, name=stem)


if __name__ == "__main__":
    main()
