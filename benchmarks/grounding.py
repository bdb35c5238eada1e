"""Why the demo's captions guess colours, and which way of training SRAU fixes it.

On `vgpt demo`'s data (1,000 shapes scenes, seed 42; lite0 + stage 2 tokens) this trains SmolLM2-135M +
SRAU (K = 1) with several recipes, 2+ seeds each, and for every run records
- the gradient path at steps 0, 50 and the last: per block, the share of gate channels whose visual
  branch is open (1 - g > tau), and the gradient norm reaching the cross-attention and the visual encoder
  (one fixed batch of 16 training captions, dropout off);
- the test scores of the model at its last step (100 scenes, beam 3): object F1, grounded, shape F1, CIDEr;
- the mean visual gate on colour words, shape words and other words (teacher-forced test captions).

    python benchmarks/grounding.py --variants demo,recipe --seeds 1,2    # a few minutes per run
    python benchmarks/grounding.py --list                               # the recipes
    python benchmarks/grounding.py --smoke      # seconds: the demo recipe on 50 scenes, a tiny random LM, 3 steps

Writes benchmarks/results/grounding.json (runs are added to the file, keyed by variant and seed; --smoke:
grounding_smoke.json, its workspace a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    goal,
    parse_with_smoke,
    print_table,
    results_dir,
    scores_without_java,
    scratch_dir,
    tiny_lm,
    write_results,
)


def grid_positions(model, n: int, **_) -> None:
    """Learned row + column embeddings added to every grid token after the encoder's input projection."""
    g, d = int(math.isqrt(n)), model.encoder.proj.out_features
    model.encoder.row_pos = torch.nn.Parameter(torch.randn(g, 1, d) * 0.02)
    model.encoder.col_pos = torch.nn.Parameter(torch.randn(1, g, d) * 0.02)
    model.encoder.proj.register_forward_hook(
        lambda m, i, o: o + (model.encoder.row_pos + model.encoder.col_pos).reshape(n, d).to(o.dtype))


def open_visual_init(bias: float):
    """Gates start at sigmoid(bias) (visual branch open when 1 - g > tau); cross-attention output 0."""
    def hook(model, n: int, **_) -> None:
        with torch.no_grad():
            for gates in model.gates:
                gates.bias.fill_(bias)
            for x in model.xattn:
                x.o.weight.zero_()
    return hook


def gate_inputs(model, batch, record) -> None:
    """One teacher-forced pass over `batch` (eval, no gradient) on the module path, whose gates see (A, C):
    record(a, c, g) is called in every block with A (B, T, D), C (B, K, T, D) and the gates g (B, K, T, D)."""
    was, fused = model.training, model.fused_inference
    model.eval()
    model.fused_inference = False
    hooks = [gates.register_forward_hook(lambda m, i, o: record(i[0], i[1], o)) for gates in model.gates]
    try:
        with torch.no_grad():
            model(batch.features, batch.lengths, batch.input_ids, batch.attention_mask, image_index=batch.image_index)
    finally:
        model.train(was)
        model.fused_inference = fused
        for h in hooks:
            h.remove()


def stream_scaled_output(alpha: float):
    """Each block's cross-attention output projection rescaled so that C's RMS is `alpha` x the typical
    magnitude (median |A|; the RMS is dominated by a few huge channels) of the LM's stream A in that block,
    measured at step 0 on 16 training captions. With std 0.02 weights C starts far below the stream and
    after training is still 2-10% of its norm: the image is a whisper in the stream the frozen LM reads."""
    def hook(model, n: int, manifest, store, **_) -> None:
        from vgpt_cli.train.data import caption_examples, collate

        batch = collate(store, model, caption_examples(manifest.items("train"))[:16], model.config.max_length)
        real = batch.attention_mask.bool()
        rms: list[tuple[float, float]] = []
        gate_inputs(model, batch, lambda a, c, g: rms.append(
            (float(a[real].abs().median()), float(c[real.unsqueeze(1).expand(c.shape[:3])].pow(2).mean().sqrt()))))
        with torch.no_grad():
            for x, (a_med, c_rms) in zip(model.xattn, rms):
                x.o.weight.mul_(alpha * a_med / c_rms)
        print(json.dumps({"stream_scaled_output": [round(alpha * a / c, 1) for a, c in rms]}), flush=True)
    return hook


def top_blocks_only(n: int):
    """Cross-attention in the last n blocks only: the lower blocks' cross-attention returns zeros and their
    gates (zero weights, bias 5: g = sigmoid(5), visual branch closed) are frozen, so nothing trainable
    reaches the lower blocks and the backward pass stops at the first block with cross-attention. Fewer
    new parameters to learn from a few thousand captions, and a cheaper step (the lower blocks run
    forward only). Decoding (the fused path) computes the same: a closed gate with zero weights ignores C."""
    def hook(model, n_tokens: int, **_) -> None:
        first = model.num_layers - n
        for i in range(first):
            xa = model.xattn[i]
            # CrossAttention.forward(x (B, T, D), k (Bm, K, ...), ...) -> (C (B, K, T, D), no coverage)
            xa.forward = lambda x, k, v, mask, past=None, real=None: (
                x.new_zeros(x.shape[0], k.shape[1], x.shape[1], x.shape[2]), None)
            xa.requires_grad_(False)
            model.gates[i].requires_grad_(False)
    return hook


def readout_supervision(weight: float, gated: bool):
    """Deep supervision of the cross-attention: during cross-entropy steps, every block's cross-attention
    output (mean over levels; with `gated`, the visual contribution (1 - g) 1[1 - g > tau] C that enters
    the LM) must also predict the next token through one small shared head (LayerNorm + Linear over the
    tokens of the training captions). `weight` x the mean over blocks is added to the loss.

    Why: the SRAU read-out learns to bind colour to shape only through the frozen LM's answer to a few
    gated channels; this gives each block's cross-attention a direct signal to fetch the object a word
    needs. The head is thrown away; the captions still come from the LM alone."""
    def hook(model, n: int, manifest, **_) -> None:
        from vgpt_cli.train import objectives

        ids = model.tokenize([c for it in manifest.items("train") for c in it.captions])["labels"]
        vocab = torch.unique(ids[ids != -100])
        remap = torch.full((model.vocab_size,), -100, dtype=torch.long)
        remap[vocab] = torch.arange(len(vocab))
        d = model.xattn[0].o.out_features
        model.readout_head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, len(vocab)))
        captured: list[torch.Tensor] = []
        pending: dict[int, torch.Tensor] = {}

        def keep_c(i):
            def f(m, inp, out):
                out = out[0]  # (C, coverage sum)
                if model.training and torch.is_grad_enabled():
                    pending[i] = out
                    if not gated:
                        captured.append(out.mean(dim=1))
            return f

        def keep_v(i):
            def f(m, inp, g):
                if model.training and torch.is_grad_enabled() and gated:
                    tau = model.config.tau if model.tau_override is None else model.tau_override
                    h = 1 - g
                    captured.append((torch.where(h > tau, h, h.new_zeros(())) * pending[i]).sum(1)
                                    / math.sqrt(g.shape[1]))
            return f

        for i, (x, g) in enumerate(zip(model.xattn, model.gates)):
            x.register_forward_hook(keep_c(i))
            g.register_forward_hook(keep_v(i))
        plain = objectives.token_loss_sum

        def with_readout(logits, labels, label_smoothing=0.0):
            loss = plain(logits, labels, label_smoothing)
            if captured and model.training:
                target = remap.to(labels.device)[labels.clamp(min=0)].masked_fill(labels == -100, -100)
                aux = sum(torch.nn.functional.cross_entropy(
                    model.readout_head(c.float()).flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
                    for c in captured) / len(captured)
                captured.clear()
                loss = loss + weight * aux
            return loss

        model.readout_loss_sum = with_readout  # run_one puts it in place of token_loss_sum while training
    return hook


def lora(rank: int, alpha: float, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """Low-rank adapters on the frozen LM's self-attention projections (y = W x + alpha/rank B A x, B = 0 at
    the start, so the model starts as before). They are new parameters (the LM stays frozen, so a step
    costs about what a frozen-LM step costs) and let the LM's own attention change, e.g. unlearn
    repeating the colour it has just written."""
    def hook(model, n: int, **_) -> None:
        adapters = torch.nn.ModuleDict()
        for name, module in model.lm.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                key = name.replace(".", "_")
                a = torch.nn.Linear(module.in_features, rank, bias=False)
                b = torch.nn.Linear(rank, module.out_features, bias=False)
                torch.nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                torch.nn.init.zeros_(b.weight)
                adapters[key] = torch.nn.Sequential(a, b)
                module.register_forward_hook(
                    lambda m, inp, out, ab=adapters[key]: out + ab(inp[0]) * (alpha / rank))
        model.lora = adapters  # on the captioner, not the LM: trained as a new part while the LM is frozen
    return hook


# Everything not named here is the demo's (`vgpt train --preset demo`, vgpt_cli.train.config.PRESETS). step_factor: more steps for
# recipes whose step is cheaper, so that every recipe trains for about the same wall-clock time.
VARIANTS: dict[str, dict[str, Any]] = {
    "demo": {},
    "soft-start": {"soft_gate_steps_frac": 0.25},
    "lr-3e-3": {"lr": 3e-3},
    "frozen-lm": {"freeze_lm_steps_frac": 1.0, "step_factor": 1.3},
    "pos2d": {"model_hooks": [grid_positions]},
    "open-init": {"model_hooks": [open_visual_init(1.2)]},
    "grouped": {"group_by_image": True},
    "grouped-soft": {"group_by_image": True, "soft_gate_steps_frac": 0.25},
    "grouped-frozen": {"group_by_image": True, "freeze_lm_steps_frac": 1.0, "step_factor": 1.3},
    # `vgpt demo` as committed (LM frozen for the whole run), and alternatives on that base
    "demo-frozen": {"freeze_lm_steps_frac": 1.0},
    "frozen-open-init": {"freeze_lm_steps_frac": 1.0, "model_hooks": [open_visual_init(1.2)]},
    "frozen-lr-3e-3": {"freeze_lm_steps_frac": 1.0, "lr": 3e-3},
    # the encoder trained alone first (vgpt_cli.train.warm_start): `vgpt demo`'s recipe
    "frozen-enc-warm10": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10},
    # warm-start alternatives: the binding must live in the encoder's own tokens (no token layer in the
    # throw-away decoder), a higher rate for the new parameters, a longer warm start
    "warm10-no-memory": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10,
                         "warm_decoder": {"memory_layer": False}},
    "warm10-frozen-encoder": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "freeze_encoder": True},
    "warm10-no-memory-frozen-encoder": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10,
                                        "warm_decoder": {"memory_layer": False}, "freeze_encoder": True},
    "warm10-readout": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10,
                       "model_hooks": [readout_supervision(1.0, gated=False)]},
    "warm10-readout-gated": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10,
                             "model_hooks": [readout_supervision(1.0, gated=True)]},
    "warm10-lora8": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "model_hooks": [lora(8, 16.0)]},
    # gates nearer the threshold (sigmoid(2) = 0.88; the visual branch opens below 0.8): more channels open sooner
    "warm10-gate-bias2": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "gate_init_bias": 2.0},
    # token-level unlikelihood (vgpt train --unlikelihood): the wrong captions copy an earlier colour
    "warm10-unlikelihood": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "unlikelihood": 1.0},
    # coverage (CaptionerConfig.coverage): each head is pushed off the image tokens it already attended to
    "warm10-coverage1": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "coverage": 1.0},
    "warm10-coverage3": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "coverage": 3.0},
    # plain residual cross-attention (no gates, A + C) on the same recipe: does the gate's share of the stream
    # limit what the image can say?
    "warm10-no-gates": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "gating": "none"},
    # the cross-attention's output starts at the stream's typical magnitude (median |A|), not far below it
    "warm10-stream-scaled": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10,
                             "model_hooks": [stream_scaled_output(1.0)]},
    # cross-attention in the top 10 of the 30 blocks only (deep blocks are where the visual channels open)
    "warm10-top10": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "model_hooks": [top_blocks_only(10)]},
    # the cross-attention told which object each colour and shape word is about (supervised attention)
    # (`vgpt train --attention-supervision`, vgpt_cli/train/attention_supervision.py; at first a hook here)
    "warm10-attn-sup": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "attention_supervision": 1.0,
                        "attention_words": ("colour", "shape")},
    "warm10-attn-sup-shape": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "attention_supervision": 1.0},
    "warm10-attn-sup-shape-w3": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "attention_supervision": 3.0},
    # the two that each fixed a part: plain cross-attention (no copied colour) + attention told the shape's object
    "warm10-no-gates-attn-sup-shape": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "gating": "none",
                                       "attention_supervision": 1.0},
    # then one epoch of SCST (CIDEr-D reward, the LM trained too): training on the model's own captions,
    # where a copied colour costs reward
    "warm10-scst": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "scst": True, "scst_epochs": 1,
                    "scst_lr": 5e-5},
    "warm10-lm-trained": {"freeze_lm_steps_frac": 0.0, "encoder_warm_start": 10},
    "warm10-lm-half": {"freeze_lm_steps_frac": 0.5, "encoder_warm_start": 10},
    "warm10-lr-3e-3": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 10, "lr": 3e-3},
    "warm20-no-memory": {"freeze_lm_steps_frac": 1.0, "encoder_warm_start": 20,
                         "warm_decoder": {"memory_layer": False}},
}


def recipe_config(variant: dict[str, Any], seed: int, steps: int, name: str, precision: str, lm: str | None = None):
    from vgpt_cli.train import TrainConfig
    from vgpt_cli.train.config import PRESETS

    d = PRESETS["demo"]
    base = dict(lm=lm or d["lm"], **{k: d[k] for k in ("gating", "encoder_layers", "tau", "gate_init_bias", "lr", "lm_lr",
                                                       "warmup", "schedule", "batch_size", "val_beam", "max_length")},
                max_steps=steps, val_every=steps, val_size=5, precision=precision, seed=seed, device="cpu", name=name,
                patience=100, encoder_warm_start=0)
    base.update({k: v for k, v in variant.items() if k in TrainConfig.__dataclass_fields__})
    for key in ("soft_gate_steps", "freeze_lm_steps"):  # given as a fraction of the run's steps
        if f"{key}_frac" in variant:
            base[key] = int(round(variant[f"{key}_frac"] * steps))
    return TrainConfig(**base)


# --- the gradient path ------------------------------------------------------------------------------
def gradient_path(model, batch, tau: float) -> dict[str, Any]:
    """Open visual channels per block and gradient norms on one batch (eval mode: no dropout), with `tau` in
    force: benchmarks.common.gradient_path under this file's record names."""
    from benchmarks.common import gradient_path as probe

    was_tau = model.tau_override
    model.tau_override = tau
    try:
        rec = probe(model, batch)
    finally:
        model.tau_override = was_tau
    opened = rec["open_visual_channels"]
    return {"loss": rec["loss"], "open_share_per_block": opened,
            "open_share_mean": round(sum(opened) / len(opened), 4) if opened else None,
            "xattn_grad_norm_per_block": rec["xattn_grad"], "xattn_grad_norm": rec["xattn_grad_total"],
            "encoder_grad_norm": rec["encoder_grad"]}


def word_gates(model, items, store, max_length: int) -> dict[str, float]:
    """Teacher-forced on the test references: the mean effective visual gate on colour / shape / other
    words, and what the model predicts where the reference names a colour or a shape:
    - colour_present: the predicted word at a colour position is a colour of the scene;
    - shape_present: the predicted word at a shape position is a shape of the scene;
    - shape_bound: ... and it is the shape of the object with the colour just named (binding);
    - first_colour_right: the colour of the caption's first object is predicted right;
    - later_colour_right / later_colour_copied: where the reference names the colour of its second or third
      object, the predicted colour is that one / is one the caption has already named (a repeat)."""
    from vgpt_cli.data.shapes import COLOURS, SHAPES, SIZES
    from vgpt_cli.train.data import pad_features

    sums = {"colour": [0.0, 0], "shape": [0.0, 0], "other": [0.0, 0]}
    hits = {"colour_present": [0, 0], "shape_present": [0, 0], "shape_bound": [0, 0],
            "first_colour_right": [0, 0], "later_colour_right": [0, 0], "later_colour_copied": [0, 0]}

    def word_of(token: int) -> str:
        return model.tokenizer.decode([token]).strip().lower()

    def kind_of(word: str) -> str:
        return "colour" if word in COLOURS else "shape" if word.rstrip("s") in SHAPES else "other"

    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 25):
            chunk = items[start:start + 25]
            caps = [it.captions[0] for it in chunk]
            feats, lengths = pad_features([store.get(it.id) for it in chunk])
            tok = model.tokenize(caps, max_length)
            out = model(feats, lengths, tok["input_ids"], tok["attention_mask"], return_gates=True)
            pred = out.logits.argmax(-1)
            for b, it in enumerate(chunk):
                objects = it.extra["objects"]
                colours, shapes = {o["colour"] for o in objects}, {o["shape"] for o in objects}
                pairs = {(o["colour"], o["shape"]) for o in objects}
                last_colour, said = None, []
                # gates at position t belong to the token fed there; the word predicted next is labels[t]
                for t in range(int(tok["attention_mask"][b].sum())):
                    label = int(tok["labels"][b, t])
                    if label < 0:
                        continue
                    word, guess = word_of(label), word_of(int(pred[b, t]))
                    kind = kind_of(word)
                    sums[kind][0] += float(out.gates[b, t, 1]) if out.gates is not None else 0.0
                    sums[kind][1] += 1
                    if kind == "colour":
                        hits["colour_present"][0] += guess in colours
                        hits["colour_present"][1] += 1
                        if said:
                            hits["later_colour_right"][0] += guess == word
                            hits["later_colour_copied"][0] += guess != word and guess in said
                            hits["later_colour_right"][1] += 1
                            hits["later_colour_copied"][1] += 1
                        else:
                            hits["first_colour_right"][0] += guess == word
                            hits["first_colour_right"][1] += 1
                        said.append(word)
                    elif kind == "shape":
                        g = guess.rstrip("s")
                        hits["shape_present"][0] += g in shapes
                        hits["shape_present"][1] += 1
                        if last_colour is not None:
                            hits["shape_bound"][0] += (last_colour, g) in pairs
                            hits["shape_bound"][1] += 1
                    last_colour = word if kind == "colour" else last_colour if word in SIZES else None
    # no gates (gating "none"): no visual gate per word
    return {**{k: round(s / max(1, n), 4) if model.gates is not None else None for k, (s, n) in sums.items()},
            **{k: round(h / max(1, n), 4) for k, (h, n) in hits.items()}}


def errors_by_object_count(preds: dict[str, str], items) -> dict[str, Any]:
    """Object F1 by the scene's number of objects, and what the wrong (colour, shape) pairs are: both
    words in the scene but not as a pair (binding), a colour not in the scene, a shape not in the scene;
    `distinct_named_per_object`: distinct pairs named per object there (a repeated pair counts once)."""
    from vgpt_cli.data.shapes import mentioned_objects

    out: dict[str, Any] = {}
    kinds = {"binding": 0, "colour_not_in_scene": 0, "shape_not_in_scene": 0, "missed": 0}
    for n in (1, 2, 3):
        tp = named = true = 0
        for it in (it for it in items if len(it.extra["objects"]) == n):
            objs = it.extra["objects"]
            truth = {(o["colour"], o["shape"]) for o in objs}
            said = mentioned_objects(preds[it.id])
            tp, named, true = tp + len(said & truth), named + len(said), true + len(truth)
            colours, shapes = {c for c, _ in truth}, {s for _, s in truth}
            for c, s in said - truth:
                key = "shape_not_in_scene" if s not in shapes else "colour_not_in_scene" if c not in colours \
                    else "binding"
                kinds[key] += 1
            kinds["missed"] += len(truth - said)
        if true:
            out[str(n)] = {"object_f1": round(2 * tp / (named + true), 4),
                           "distinct_named_per_object": round(named / true, 3)}
    return {"object_f1": out, "wrong_pairs": kinds}


def attention_at_colours(model, items, store) -> dict[str, Any]:
    """Teacher-forced on the references of multi-object test scenes: where the cross-attention (mean over
    heads, levels, layers) peaks at the token that predicts a colour word: on the object that colour names
    (`about_to_be_named`), on an object the caption has already named, on another object, or on none;
    separately for the caption's first object and for the later ones."""
    from vgpt_cli.attention import region_cells, word_attention
    from vgpt_cli.data.shapes import COLOURS
    from vgpt_cli.demo import BACKBONE, DemoSettings
    from vgpt_cli.evaluate.grounding import object_region
    from vgpt_cli.features import load_backbone

    backbone = load_backbone(BACKBONE, device="cpu", add_stages=DemoSettings().add_stages)
    tok = model.tokenizer
    counts: dict[str, dict[str, int]] = {"first": {}, "later": {}}
    model.eval()
    for it in items:
        objs = it.extra["objects"]
        if len(objs) < 2:
            continue
        shapes = {o["shape"] for o in objs}
        feats = torch.from_numpy(store.get(it.id).astype("float32"))
        side = math.isqrt(feats.shape[0])  # 7 x 7 tokens at 224 px, 14 x 14 at 448
        cells = [region_cells(object_region(backbone.preprocess, o), (side, side)) for o in objs]
        for caption in it.captions:
            ids = tok(caption, add_special_tokens=False)["input_ids"]
            words = [tok.decode([t]).strip().lower().rstrip(",") for t in ids]
            maps = word_attention(model, feats, ids)  # (T, 7, 7): maps[t] is the query that predicts token t + 1
            said: list[int] = []
            for t, w in enumerate(words):
                if t == 0 or w not in COLOURS:
                    continue
                shape = next((x.rstrip("s") for x in words[t + 1:t + 3] if x.rstrip("s") in shapes), None)
                target = next((k for k, o in enumerate(objs) if (o["colour"], o["shape"]) == (w, shape)), None)
                if target is None:
                    continue
                peak = int(torch.argmax(maps[t - 1].flatten()))
                hit = [bool(c.flat[peak]) for c in cells]
                kind = ("about_to_be_named" if hit[target] else "already_named" if any(hit[k] for k in said)
                        else "another_object" if any(hit) else "no_object")
                bucket = counts["later" if said else "first"]
                bucket[kind] = bucket.get(kind, 0) + 1
                said.append(target)
    return {k: {**{kind: round(n / max(1, sum(v.values())), 4) for kind, n in v.items()}, "n": sum(v.values())}
            for k, v in counts.items()}


def test_scores(model, manifest, store, beam: int, max_length: int, bf16: bool | None = None) -> dict[str, Any]:
    """Decode the test scenes (bf16 autocast where the CPU has it, unless bf16=False) and score them."""
    from vgpt_cli.decode import DecodeOptions, decode
    from vgpt_cli.evaluate.report import score_items
    from vgpt_cli.train.data import pad_features

    items = manifest.items("test")
    model.eval()
    preds: dict[str, str] = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16() if bf16 is None else bf16):
        for start in range(0, len(items), 50):
            chunk = items[start:start + 50]
            feats, lengths = pad_features([store.get(it.id) for it in chunk])
            hyps = decode(model, feats, lengths, DecodeOptions(beam_size=beam, max_length=max_length))
            preds.update({it.id: h.text for it, h in zip(chunk, hyps)})
    _, scores = score_items(preds, items, "shapes", spice=False, log=lambda s: None)
    truth = {it.id: " and ".join(f"{o['colour']} {o['shape']}" for o in it.extra["objects"]) for it in items}
    return {"scores": {k: round(float(v), 4) for k, v in scores.items()},
            "by_object_count": errors_by_object_count(preds, items),
            "captions": [{"id": i, "caption": preds[i], "truth": truth[i]} for i in list(preds)[:6]]}


def _bf16() -> bool:
    from vgpt_cli.model.precision import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


@contextlib.contextmanager
def warm_decoder(options: dict[str, Any] | None, freeze_encoder: bool = False):
    """The throw-away decoder of the encoder warm start, built with `options` (WordDecoder's keywords);
    with freeze_encoder, the warm-started encoder is not trained further by SRAU."""
    from vgpt_cli.train import warm_start

    original = warm_start.warm_start_encoder

    def patched(model, *args, **kwargs):
        result = original(model, *args, **kwargs, decoder_options=options)
        if freeze_encoder:
            model.encoder.requires_grad_(False)
        return result

    if options or freeze_encoder:
        warm_start.warm_start_encoder = patched
    try:
        yield
    finally:
        warm_start.warm_start_encoder = original


# --- one run ----------------------------------------------------------------------------------------
def run_one(ws, manifest, store, name: str, variant: dict[str, Any], seed: int, steps: int,
            eval_at: tuple[int, ...] = (), lm: str | None = None) -> dict[str, Any]:
    from vgpt_cli.train import train
    from vgpt_cli.train.data import caption_examples, collate
    from vgpt_cli.train.loop import build_model

    precision = "bf16" if _bf16() else "fp32"
    steps = int(round(steps * variant.get("step_factor", 1.0)))
    run_name = f"{name}-s{seed}"
    shutil.rmtree(ws.run_dir(run_name), ignore_errors=True)
    config = recipe_config(variant, seed, steps, run_name, precision, lm)
    torch.manual_seed(seed)
    model = build_model(config, int(store.dim))
    t_hooks = time.perf_counter()
    for hook in variant.get("model_hooks", []):
        hook(model, int(store.get(manifest.items("train")[0].id).shape[0]), manifest=manifest, store=store, seed=seed)
    hook_seconds = round(time.perf_counter() - t_hooks, 1)
    diag_examples = caption_examples(manifest.items("train"))[:16]
    diag_batch = collate(store, model, diag_examples, config.max_length)
    tau_at = lambda step: 0.0 if step < config.soft_gate_steps else config.tau  # noqa: E731
    path = [dict(step=0, **gradient_path(model, diag_batch, tau_at(0)))]
    marks = {50, steps}
    frontier: list[dict[str, Any]] = []  # test scores part-way through the run (--eval-at)
    eval_seconds = [0.0]

    def on_step(record: dict[str, Any]) -> None:
        step = record["step"]
        if record.get("phase") == "xe" and step in marks:
            path.append(dict(step=step, **gradient_path(model, diag_batch, tau_at(step))))
        if record.get("phase") == "xe" and step in eval_at and step < steps:
            t = time.perf_counter()
            trained = t - t0 - eval_seconds[0]
            scores = test_scores(model, manifest, store, config.val_beam, config.max_length)["scores"]
            eval_seconds[0] += time.perf_counter() - t
            frontier.append({"step": step, "train_seconds": round(trained, 1),
                             **{k: scores[k] for k in ("object_f1", "grounded", "shape_f1", "CIDEr")}})
            print(json.dumps({"variant": name, "seed": seed, **frontier[-1]}), flush=True)
            model.train()

    t0 = time.perf_counter()
    readout = getattr(model, "readout_loss_sum", None)
    from vgpt_cli.train import attention_supervision, objectives

    words = variant.get("attention_words")  # which words of a caption the supervision reads (default: shape)
    targets = attention_supervision.shapes_targets
    with warm_decoder(variant.get("warm_decoder"), variant.get("freeze_encoder", False)), \
            (mock.patch.object(objectives, "token_loss_sum", readout) if readout else contextlib.nullcontext()), \
            (mock.patch.object(attention_supervision, "shapes_targets",
                               lambda *a, **k: targets(*a, **k, words=words)) if words else contextlib.nullcontext()):
        result = train(config, ws, model=model, on_step=on_step, quiet=True)
    seconds = time.perf_counter() - t0 - eval_seconds[0]
    test = test_scores(model, manifest, store, config.val_beam, config.max_length)
    if eval_at:
        frontier.append({"step": result.steps, "train_seconds": round(seconds, 1),
                         **{k: test["scores"][k] for k in ("object_f1", "grounded", "shape_f1", "CIDEr")}})
    gates_by_word = word_gates(model, manifest.items("test")[:50], store, config.max_length)
    attention = attention_at_colours(model, manifest.items("test")[:50], store)
    shutil.rmtree(ws.run_dir(run_name), ignore_errors=True)  # a SmolLM2 run folder is ~3 GB
    return {"variant": name, "seed": seed, "steps": result.steps, "train_seconds": round(seconds, 1),
            "hook_seconds": hook_seconds,
            "last_loss": round(result.last_loss or float("nan"), 4), **test["scores"],
            "visual_gate_by_word": gates_by_word, "gradient_path": path, "captions": test["captions"],
            "by_object_count": test["by_object_count"], "attention_before_colour": attention,
            "recipe": {k: v for k, v in variant.items() if k != "model_hooks"},
            **({"frontier": frontier} if eval_at else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=None,
                   help="default /tmp/vgpt-grounding (--smoke: a temporary folder)")
    p.add_argument("--variants", default="demo")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps of the demo recipe (others scale)")
    p.add_argument("--scenes", type=int, default=1000, help="shapes scenes, split 80/10/10 (the demo's 1,000)")
    p.add_argument("--lm", default=None, help="the language model (default: the demo's, SmolLM2-135M)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (two runs side by side: 1 each)")
    p.add_argument("--image-size", type=int, default=None, help="backbone input size (default: the demo's)")
    p.add_argument("--caption-order", default="random", choices=("random", "reading"),
                   help="the order in which the scenes' captions name their objects (use its own --workspace)")
    p.add_argument("--results", default=None, help="results file stem (parallel runs: one each; default: grounding, "
                   "or grounding_stream_share with --stream-share)")
    p.add_argument("--eval-at", default="", help="also score the test scenes at these steps (the frontier), "
                   "e.g. 70,140,280,420")
    p.add_argument("--diagnose", type=Path, default=None, metavar="MODEL_DIR",
                   help="no training: the test-scene diagnostics of a saved model (e.g. WORKSPACE/runs/demo/best "
                        "after `vgpt demo`): object F1 by object count, teacher-forced colour/shape/binding, and "
                        "where the attention looks before a colour word")
    p.add_argument("--stream-share", type=Path, default=None, metavar="MODEL_DIR",
                   help="no training: per block, the norm of the image's part of the SRAU output against the LM's "
                        "(teacher-forced on 64 test references); written to --results")
    a = parse_with_smoke(p, "the demo recipe, seed 1, 3 steps, 50 scenes, a tiny random GPT-2, into "
                         "grounding_smoke.json", variants="demo", seeds="1", steps=3, scenes=50)
    if a.smoke:
        a.results = a.results or "grounding_smoke"
        # a throw-away workspace: the full run's (/tmp/vgpt-grounding) holds its 1,000 scenes' features
        a.workspace = a.workspace or scratch_dir("vgpt-grounding-smoke-")
        a.lm = a.lm or str(tiny_lm(a.workspace / "tiny-lm"))
        scores_without_java()
    a.workspace = a.workspace or Path("/tmp/vgpt-grounding")
    a.results = a.results or ("grounding_stream_share" if a.stream_share else "grounding")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.list:
        for k, v in VARIANTS.items():
            print(k, v)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grounding_ceiling import demo_data

    from vgpt_cli.workspace import Workspace

    manifest, store = demo_data(a.workspace, scenes=a.scenes, image_size=a.image_size, caption_order=a.caption_order)
    if a.diagnose:
        diagnose(a.diagnose, manifest, store)
        return
    if a.stream_share:
        from vgpt_cli.model_folders import load_model

        rows = stream_share(load_model(a.stream_share, "cpu"), manifest.items("test"), store)
        print_table(rows, title=f"the image's share of the stream, per block: {a.stream_share}")
        write_results(__file__, {"model": str(a.stream_share), "blocks": rows}, {}, name=a.results)
        return
    ws = Workspace.from_option(a.workspace)
    ws.set_current(features=store.fingerprint)
    out = results_dir() / f"{a.results}.json"
    runs = json.loads(out.read_text())["raw"].get("runs") if out.exists() else []
    if runs is None:  # another kind of result (e.g. --stream-share's) under this stem: do not overwrite it
        sys.exit(f"{out} holds no training runs: give this run its own --results STEM")
    for name in a.variants.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            label = (name + (f"@{a.image_size}px" if a.image_size else "")
                     + (f"@{a.caption_order}-order" if a.caption_order != "random" else ""))
            eval_at = tuple(int(x) for x in a.eval_at.split(",") if x)
            r = run_one(ws, manifest, store, label, VARIANTS[name], seed, a.steps, eval_at, a.lm)
            runs = [x for x in runs if (x["variant"], x["seed"]) != (label, seed)] + [r]
            print(json.dumps({k: v for k, v in r.items() if k not in ("gradient_path", "captions")}), flush=True)
            summarise_and_write(runs, out)


def diagnose(model_dir: Path, manifest, store) -> None:
    """Print the test-scene diagnostics of a saved model (the demo's settings: beam 3, 24 tokens)."""
    from vgpt_cli.model_folders import load_model

    model = load_model(model_dir, "cpu")
    items = manifest.items("test")
    test = test_scores(model, manifest, store, beam=3, max_length=24, bf16=False)  # as `vgpt evaluate` decodes
    print(json.dumps({"model": str(model_dir), **{k: test["scores"][k] for k in ("object_f1", "grounded", "CIDEr")},
                      "by_object_count": test["by_object_count"],
                      "teacher_forced": word_gates(model, items, store, 24),
                      "attention_before_colour": attention_at_colours(model, items, store)}, indent=1))


def stream_share(model, items, store, captions: int = 64) -> list[dict[str, float]]:
    """Per block, teacher-forced on the first reference of `captions` test scenes: how much of the stream
    the image gets. The mean norm per token of the linguistic part g 1[g > tau] A and of the visual part
    (1 - g) 1[1 - g > tau] C of the SRAU output, their ratio, the share of open visual channels, and the
    RMS of A and of C."""
    from vgpt_cli.train.data import caption_examples, collate

    batch = collate(store, model, caption_examples(items)[:captions * 5:5], model.config.max_length)
    real = batch.attention_mask.bool()
    tau = model.config.tau
    rows: list[dict[str, float]] = []

    def record(a, c, g):
        sel = real[:, None, :].expand(g.shape[:3])
        ling = torch.where(g > tau, g, 0.0) * a.unsqueeze(1)
        vis = torch.where(1 - g > tau, 1 - g, 0.0) * c
        lin_norm, vis_norm = float(ling[sel].norm(dim=-1).mean()), float(vis[sel].norm(dim=-1).mean())
        rows.append({"block": len(rows), "open_visual_channels": round(float(((1 - g) > tau)[sel].float().mean()), 4),
                     "linguistic_norm": round(lin_norm, 2), "visual_norm": round(vis_norm, 2),
                     "visual_over_linguistic": round(vis_norm / max(lin_norm, 1e-9), 4),
                     "stream_rms": round(float(a[real].pow(2).mean().sqrt()), 3),
                     "cross_attention_rms": round(float(c[sel].pow(2).mean().sqrt()), 3)})

    gate_inputs(model, batch, record)
    return rows


def summarise_and_write(runs: list[dict[str, Any]], out: Path) -> None:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]

        def ms(key: str, rs=rs) -> str:
            vals = [r[key] for r in rs]
            mean = sum(vals) / len(vals)
            sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            return f"{mean:.3f} ± {sd:.3f}"

        rows.append({"variant": name, "seeds": len(rs), "steps": rs[0]["steps"],
                     "train s": round(sum(r["train_seconds"] for r in rs) / len(rs)),
                     "object_f1": ms("object_f1"), "grounded": ms("grounded"), "shape_f1": ms("shape_f1"),
                     "CIDEr": ms("CIDEr")})
    print_table(rows, "grounding recipes (test 100 scenes, beam 3; mean ± sd over seeds)")
    best = max((sum(r["object_f1"] for r in runs if r["variant"] == v) / sum(1 for r in runs if r["variant"] == v)
                for v in {r["variant"] for r in runs}), default=0.0)
    # the script's own name in the file (the results path gave "script": "<stem>.json" before)
    write_results(__file__, {"runs": runs, "table": rows}, {"best_recipe_object_f1": goal(best, 0.9)},
                  name=out.stem)


if __name__ == "__main__":
    main()
