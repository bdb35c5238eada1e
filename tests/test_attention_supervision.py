"""Supervised cross-attention (train/attention_supervision.py): the attention the loss reads is the model's
own (checked against vgpt_cli.attention's read-out), the loss is -log(mass) (a float64 loop), the targets
are the shape words' first tokens and their objects' cells (the real GPT-2 tokenizer on real scenes), the
weight reaches the backward, and training with it moves the attention onto the named objects."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gpt2_tokenizer
from test_train import D_IN, make_workspace, quick, tiny_captioner
from typer.testing import CliRunner

from vgpt_cli.attention import attention_weights, grid_shape, region_cells
from vgpt_cli.cli import app
from vgpt_cli.data.build import SamplingOptions, prepare_shapes
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.data.shapes import SHAPES, make_scene, naming_words, object_mask, scene_captions
from vgpt_cli.distributed import DistContext
from vgpt_cli.errors import ConfigError
from vgpt_cli.features.store import StoreWriter, open_workspace_store
from vgpt_cli.train import TrainConfig, train
from vgpt_cli.train.attention_supervision import (
    attention_loss_sum,
    caption_targets,
    grid_cells_for,
    shapes_targets,
    target_tensor,
)
from vgpt_cli.train.data import caption_examples, collate
from vgpt_cli.train.objectives import cross_entropy_step, token_loss_sum
from vgpt_cli.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRID = 16  # 4 x 4 tokens per scene
# timm's eval transform that leaves a 224-pixel scene as it is (so the cells can be checked on the scene)
IDENTITY = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "center"}


def shapes_workspace(root: Path, scenes: int = 24) -> Workspace:
    """Real shapes scenes (their recorded objects) with random 4 x 4-token features and a store whose
    data config is IDENTITY."""
    ws = Workspace(root)
    manifest, _ = prepare_shapes(ws, scenes, 7, SamplingOptions(seed=7))
    rng = np.random.default_rng(0)
    meta = {"dim": D_IN, "fingerprint": "grid16", "backbone": "toy", "data_config": IDENTITY}
    with StoreWriter(ws.features_root / "grid16", meta) as w:
        w.append([(it.id, it.images, rng.standard_normal((GRID, D_IN)).astype(np.float16))
                  for it in manifest.all_items()])
    ws.set_current(dataset="shapes", features="grid16")
    return ws


def supervised_setup(root: Path, scenes: int = 24):
    """A tiny captioner on shapes_workspace(root), with the store, the train items and their targets."""
    ws = shapes_workspace(root, scenes)
    model = tiny_captioner()
    store = open_workspace_store(ws)
    items = Manifest.load(ws.manifest_path("shapes")).items("train")
    return ws, model, store, items, shapes_targets(items, model.tokenizer, grid_cells_for(store.meta, GRID))


def scene_cells(obj) -> np.ndarray:
    """The reference: the 4 x 4 cells that hold the object's pixels, straight from the scene's mask."""
    return region_cells(np.asarray(object_mask(obj)) > 0, grid_shape(GRID)).reshape(-1)


# --- the attention the loss reads ---------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True])
def test_attention_is_the_models_own_cross_attention(grad):
    model = tiny_captioner(seed=3).eval()
    for xa in model.xattn:  # sharper than the init, so that a wrong row or level would show
        torch.nn.init.normal_(xa.q.weight, std=0.5)
        torch.nn.init.normal_(xa.k.weight, std=0.5)
    feats = torch.randn(1, 9, D_IN)
    ids = model.tokenizer("a red circle and a blue star", add_special_tokens=False)["input_ids"]
    want = attention_weights(model, feats[0], ids).mean(dim=(1, 2))  # (layers, T, N): mean over levels, heads
    with torch.set_grad_enabled(grad):
        out = model(feats, torch.tensor([9]), torch.tensor([[model.bos_token_id, *ids[:-1]]]),
                    return_attention=True)
    assert len(out.attention) == len(model.xattn)
    got = torch.stack([a[0] for a in out.attention])
    assert got.shape == want.shape == (2, len(ids), 9)
    torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)
    assert out.attention[0].requires_grad == grad
    assert model(feats, torch.tensor([9]), torch.tensor([[1, 2]])).attention is None  # only when asked


def test_padded_image_tokens_get_no_attention():
    model = tiny_captioner(seed=1).eval()
    feats = torch.randn(2, 9, D_IN)
    with torch.no_grad():
        out = model(feats, torch.tensor([9, 4]), torch.tensor([[1, 2, 3], [1, 2, 3]]), return_attention=True)
    a = out.attention[1]
    assert float(a[1, :, 4:].abs().max()) == 0.0
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3))


def test_loss_is_minus_log_mass_on_the_target_cells_mean_over_blocks():
    g = torch.Generator().manual_seed(0)
    attention = [torch.randn(2, 5, 6, generator=g).softmax(-1) for _ in range(3)]
    target = torch.zeros(2, 5, 6)
    target[0, 1, [0, 2]] = 1
    target[1, 3, 5] = 1
    target[1, 4, [1, 2, 3]] = 1
    want = 0.0
    for b, t in [(0, 1), (1, 3), (1, 4)]:
        cells = target[b, t].bool()
        want += sum(-math.log(float(a[b, t].double()[cells].sum())) for a in attention) / len(attention)
    assert float(attention_loss_sum(attention, target)) == pytest.approx(want, rel=1e-6)
    assert float(attention_loss_sum(attention, torch.zeros(2, 5, 6))) == 0.0  # nothing supervised


# --- the targets ----------------------------------------------------------------------------------------
def test_targets_are_each_shape_words_first_token_and_its_objects_cells():
    tok = gpt2_tokenizer()
    cells_of = grid_cells_for({"data_config": IDENTITY, "fingerprint": "x"}, GRID)
    checked = 0
    for index in range(12):
        scene = make_scene(5, index)
        for caption in scene_captions(scene, 5, index):
            got = caption_targets(caption, scene["objects"], tok, cells_of)
            named = naming_words(caption, scene["objects"])
            assert len(got) == len(named) == len(scene["objects"])  # every object is named once
            ids = tok(caption, add_special_tokens=False)["input_ids"]
            for (j, cells), (k, obj) in zip(got, named):
                word = caption.split()[k].strip(",.")
                assert word.rstrip("s") in SHAPES
                assert tok.decode(ids[j]).strip() == word[:len(tok.decode(ids[j]).strip())]  # the word's first token
                assert tok.decode(ids[:j]).rstrip() == " ".join(caption.split()[:k])  # and nothing of it before
                np.testing.assert_array_equal(np.asarray(cells).reshape(-1), scene_cells(obj))
                checked += 1
    assert checked > 60
    scene = make_scene(5, 0)
    caption = scene_captions(scene, 5, 0)[0]
    both = caption_targets(caption, scene["objects"], tok, cells_of, words=("colour", "shape"))
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    said = [tok.decode(ids[j]).strip() for j, _ in both]
    assert said[0::2] == [o["colour"] for _, o in naming_words(caption, scene["objects"])]  # colour, then shape


def test_collate_puts_the_targets_at_the_query_that_predicts_the_shape_word_and_drops_cut_ones(tmp_path):
    _, model, store, items, targets = supervised_setup(tmp_path)
    examples = caption_examples(items)[:8]
    full = collate(store, model, examples, max_length=40, attention_targets=targets)
    for b, e in enumerate(examples):
        rows = full.attention_target[b].sum(-1).nonzero().squeeze(1).tolist()
        assert rows == [j for j, _ in targets[(e.item_id, e.caption)]]
        for t in rows:  # position t's label is the shape word's first token
            first = model.tokenizer.decode(full.labels[b, t]).strip()
            assert first and any(s.startswith(first) for s in SHAPES), (e.caption, first)
    cut = collate(store, model, examples, max_length=6, attention_targets=targets)
    for b in range(len(examples)):
        kept = int(cut.attention_mask[b].sum()) - 1  # caption tokens after BOS
        rows = cut.attention_target[b].sum(-1).nonzero().squeeze(1).tolist()
        assert rows == [t for t in full.attention_target[b].sum(-1).nonzero().squeeze(1).tolist() if t < kept]
    assert target_tensor({}, [("x", "y")], [3], 4, 5).abs().sum() == 0


# --- training with it ---------------------------------------------------------------------------------
def test_the_weight_reaches_the_backward_and_the_logged_loss_stays_cross_entropy(tmp_path):
    _, model, store, items, targets = supervised_setup(tmp_path)
    b = collate(store, model, caption_examples(items)[:8], 40, attention_targets=targets)
    with torch.no_grad():
        out = model(b.features, b.lengths, b.input_ids, b.attention_mask, image_index=b.image_index,
                    return_attention=True)
    ce, att = float(token_loss_sum(out.logits, b.labels)), float(attention_loss_sum(out.attention, b.attention_target))
    assert att > 0
    seen: list[float] = []
    grads = {}
    for w in (0.0, 2.0):
        seen.clear()
        model.zero_grad()
        loss, n, _ = cross_entropy_step(model, [b], DistContext(), lambda t: (seen.append(float(t.detach())),
                                                                               t.backward()),
                                        precision="fp32", label_smoothing=0.0, attention_supervision=w)
        assert loss == pytest.approx(ce / n, rel=1e-5)  # logged: the cross-entropy alone
        assert seen[0] == pytest.approx((ce + w * att) / n, rel=1e-5)  # trained: with the attention term
        grads[w] = model.xattn[0].k.weight.grad.clone()
    assert float((grads[2.0] - grads[0.0]).abs().max()) > 1e-6  # the keys learn where to be looked at


@pytest.mark.slow
def test_training_with_it_moves_the_attention_onto_the_named_objects(tmp_path):
    ws, _, store, items, targets = supervised_setup(tmp_path, scenes=30)

    def mass_on_targets(model) -> float:
        b = collate(store, model, caption_examples(items), 40, attention_targets=targets)
        model.eval()
        with torch.no_grad():
            out = model(b.features, b.lengths, b.input_ids, b.attention_mask, image_index=b.image_index,
                        return_attention=True)
        sup = b.attention_target.sum(-1) > 0
        return float(torch.stack([(a * b.attention_target).sum(-1)[sup].mean() for a in out.attention]).mean())

    masses = {}
    for w in (0.0, 1.0):
        model = tiny_captioner(seed=0)
        before = mass_on_targets(model)
        cfg = quick(attention_supervision=w, max_steps=40, batch_size=16, lr=3e-3, dataset="shapes",
                    name=f"w{w}")
        train(cfg, ws, model=model, quiet=True)
        masses[w] = (before, mass_on_targets(model))
    assert masses[0.0][0] == pytest.approx(masses[1.0][0])  # the same start
    assert masses[0.0][0] < 0.35  # objects cover a few of the 16 cells
    start = masses[0.0][0]
    assert abs(masses[0.0][1] - start) < 0.05  # cross-entropy alone does not teach where the objects are
    assert masses[1.0][1] > max(0.45, 2 * start)  # measured: 0.20 -> 0.58


def test_data_without_objects_or_with_coverage_is_refused(tmp_path):
    ws = make_workspace(tmp_path)  # toy captions, no objects
    result = CliRunner().invoke(app, ["-w", str(ws.root), "train", "--device", "cpu", "--name", "att",
                                      "--attention-supervision", "1", "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "item 't0' records none" in text and "vgpt prepare shapes" in text
    assert "Traceback" not in result.output
    with pytest.raises(ConfigError, match="no backbone data config"):  # features that are not a backbone's grid
        grid_cells_for({"fingerprint": "fp0"}, GRID)
    with pytest.raises(ConfigError, match="one or the other"):
        TrainConfig(attention_supervision=1.0, coverage=1.0).validate()
    with pytest.raises(ConfigError, match="must be a finite weight"):
        TrainConfig(attention_supervision=-1.0).validate()
