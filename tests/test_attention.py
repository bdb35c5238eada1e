"""word_attention: per-token cross-attention maps, checked against the model's own attention output and a
float64 recomputation from the module's projections."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_lm
from PIL import Image
from typer.testing import CliRunner

from vgpt_cli.api import load_captioner
from vgpt_cli.attention import (
    attention_peak_in_object,
    attention_weights,
    grid_shape,
    region_cells,
    word_attention,
)
from vgpt_cli.cli import app
from vgpt_cli.data.shapes import COLOURS, naming_words, object_mask, render_scene
from vgpt_cli.evaluate.attention_figure import colormap, draw_figure, figure_names, word_groups, word_maps
from vgpt_cli.files import atomic_write_json
from vgpt_cli.model import Captioner, CaptionerConfig

D_IN = 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(tok, family="gpt2", seed=0, **kw) -> Captioner:
    torch.manual_seed(seed)
    lm = tiny_lm(len(tok), family)  # GPT-2 tied, Llama untied (their defaults)
    cfg = CaptionerConfig(lm=f"tiny-{family}", d_in=D_IN, encoder_ffn=32, **kw)
    torch.manual_seed(seed + 1)
    model = Captioner.from_config(cfg, lm=lm, tokenizer=tok).eval()
    # sharper than the 0.02-std init, so that maps differ clearly between tokens
    for xa in model.xattn:
        torch.nn.init.normal_(xa.q.weight, std=0.3)
        torch.nn.init.normal_(xa.k.weight, std=0.3)
    return model


def feats(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)).half()  # as the store keeps them


def caption_ids(model, text="a red circle and a blue star"):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"] + [model.eos_token_id]


@pytest.mark.parametrize("family,levels,gating,coverage", [("gpt2", 2, "srau", None), ("llama", 1, "srau", None),
                                                          ("gpt2", 2, "none", None), ("gpt2", 2, "srau", 3.0)])
def test_weights_reproduce_the_models_own_attention_output(tok, family, levels, gating, coverage):
    # The weights times the values must give what the model's scaled_dot_product_attention gave: the
    # input of each block's output projection, caught on the unfused (training) path.
    model = build(tok, family, encoder_layers=levels, gating=gating, coverage=coverage)
    f, ids = feats(9), caption_ids(model)
    w = attention_weights(model, f, ids)
    L, K, h, T, N = w.shape
    assert (L, K, h, T, N) == (2, levels, 4, len(ids), 9)
    seen = {}
    hooks = [xa.o.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i, xa in enumerate(model.xattn)]
    try:
        with torch.enable_grad():  # grad on: the unfused CrossAttention.forward path
            memory = model.encode(f.float()[None], torch.tensor([9]))
            model(f.float()[None], torch.tensor([9]), torch.tensor([[model.bos_token_id, *ids[:-1]]]))
    finally:
        for hk in hooks:
            hk.remove()
    for i in range(L):
        v = memory.values[i][0].detach()                                  # (K, h, N, hd)
        y = torch.einsum("khtn,khnd->kthd", w[i], v).reshape(K, T, -1)    # (K, T, D)
        assert torch.allclose(y, seen[i][0], atol=1e-5), (i, (y - seen[i][0]).abs().max())
    # and the comparison can fail: uniform weights do not reproduce it
    y_flat = torch.einsum("khtn,khnd->kthd", torch.full_like(w[0], 1 / N), memory.values[0][0].detach())
    assert not torch.allclose(y_flat.reshape(K, T, -1), seen[0][0], atol=1e-3)


def test_float64_recomputation_from_the_modules_projections(tok):
    model = build(tok, "gpt2", encoder_layers=2)
    f, ids = feats(16, seed=3), caption_ids(model, "a small green square at the top left")
    maps = word_attention(model, f, ids)
    assert maps.dtype == torch.float32 and maps.device.type == "cpu" and maps.shape == (len(ids), 4, 4)
    # the query projection's inputs (LN1 of the block's hidden state) and the encoder levels, caught by hooks
    xs, enc = {}, {}
    hooks = [xa.q.register_forward_hook(lambda m, a, o, i=i: xs.__setitem__(i, a[0].detach()))
             for i, xa in enumerate(model.xattn)]
    hooks.append(model.encoder.register_forward_hook(lambda m, a, o: enc.__setitem__("e", o.detach())))
    try:
        with torch.no_grad():
            model(f.float()[None], torch.tensor([16]), torch.tensor([[model.bos_token_id, *ids[:-1]]]))
    finally:
        for hk in hooks:
            hk.remove()
    e = enc["e"][0].double()                                              # (K, N, D)
    total = torch.zeros(len(ids), 16, dtype=torch.float64)
    for i, xa in enumerate(model.xattn):
        W = {n: (getattr(xa, n).weight.double(), getattr(xa, n).bias.double()) for n in ("q", "k")}
        q = xs[i][0].double() @ W["q"][0].T + W["q"][1]                   # (T, D)
        ln = model.adapter.ln1(i, enc["e"][0]).double()                   # LN1 of each level (K, N, D)
        k = ln @ W["k"][0].T + W["k"][1]                                  # (K, N, D)
        h, hd = xa.heads, xa.head_dim
        for lv in range(k.shape[0]):
            for head in range(h):
                sl = slice(head * hd, (head + 1) * hd)
                s = q[:, sl] @ k[lv, :, sl].T / math.sqrt(hd)
                total += torch.softmax(s, dim=-1)
        assert e.shape[0] == k.shape[0]
    ref = (total / (len(model.xattn) * e.shape[0] * model.xattn[0].heads)).view(len(ids), 4, 4)
    assert torch.allclose(maps.double(), ref, atol=1e-5), (maps.double() - ref).abs().max()
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(len(ids)), atol=1e-5)
    assert (maps >= 0).all()
    # tokens look at different places (else the test of the figure could not tell words apart)
    assert (maps[0] - maps[2]).abs().max() > 1e-3


def test_padding_is_left_out_and_gives_the_same_maps(tok):
    model = build(tok, encoder_layers=1)
    f, ids = feats(9, seed=1), caption_ids(model, "a blue star")
    padded = torch.cat([f, torch.randn(7, D_IN).half()])                 # 16 rows, 9 real
    mask = torch.arange(16) < 9
    a = word_attention(model, f, ids)
    b = word_attention(model, padded, ids, mask)
    assert a.shape == b.shape == (len(ids), 3, 3)
    assert torch.allclose(a, b, atol=1e-6)
    # numpy features work too (the feature store returns arrays)
    assert torch.allclose(word_attention(model, f.numpy(), ids), a, atol=1e-6)


def test_not_a_square_grid_or_bad_mask_is_a_clear_value_error(tok):
    model = build(tok, encoder_layers=1)
    ids = caption_ids(model, "a star")
    with pytest.raises(ValueError, match="10 image tokens are not a square grid"):
        word_attention(model, feats(10), ids)  # e.g. a 3x3 grid plus a class token
    with pytest.raises(ValueError, match="prefix"):
        holes = torch.zeros(16, dtype=torch.bool)
        holes[[0, 1, 2, 5]] = True  # 4 real tokens (a 2x2 grid), but not first
        word_attention(model, feats(16), ids, holes)
    with pytest.raises(ValueError, match="mask must have shape"):
        word_attention(model, feats(9), ids, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="wide"):
        word_attention(model, torch.zeros(9, D_IN + 1), ids)
    assert grid_shape(49) == (7, 7)


def test_empty_caption_and_image_captioner_wrapper(tok):
    model = build(tok, encoder_layers=1)
    assert word_attention(model, feats(4), []).shape == (0, 2, 2)

    class Wrapper:  # vgpt_cli.api.ImageCaptioner holds the model as .model
        pass

    wrapped = Wrapper()
    wrapped.model = model
    ids = caption_ids(model, "a star")
    assert torch.equal(word_attention(wrapped, feats(4), ids), word_attention(model, feats(4), ids))
    with pytest.raises(TypeError):
        word_attention(object(), feats(4), ids)
    # the model's mode is left as it was
    model.train()
    word_attention(model, feats(4), ids)
    assert model.training


# --- vgpt caption --attention -------------------------------------------------------------------------
skimage = pytest.importorskip("skimage")
PHOTOS = [Path(skimage.__file__).parent / "data" / n for n in ("chelsea.png", "coffee.png")]


@pytest.fixture(scope="module")
def backbone():
    from vgpt_cli.features import load_backbone

    return load_backbone("test_efficientnet", pretrained=False, image_size=96)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, backbone) -> Path:
    model = build(tok, encoder_layers=2)
    model = Captioner.from_config(replace(model.config, d_in=backbone.dim), lm=model.lm, tokenizer=tok).eval()
    for xa in model.xattn:  # sharp attention, so that the words' maps differ
        torch.nn.init.normal_(xa.q.weight, std=0.5)
        torch.nn.init.normal_(xa.k.weight, std=0.5)
    d = tmp_path_factory.mktemp("run") / "best"
    model.save_pretrained(d)
    atomic_write_json(d / "preprocessor.json", backbone.meta)
    return d


def test_caption_attention_writes_one_panel_per_word(model_dir, backbone, tmp_path):
    out = tmp_path / "att"
    r = CliRunner().invoke(app, ["caption", *map(str, PHOTOS), "--model", str(model_dir), "--device", "cpu",
                                 "--attention", str(out), "--beam-size", "2", "--max-length", "8", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.attention.png", "coffee.attention.png"]
    cap = load_captioner(model_dir, device="cpu", beam_size=2, max_length=8)
    [res] = cap.caption([str(PHOTOS[0])], attention=True)
    assert res.caption == got[0]["caption"]
    n_tok = len(res.tokens)
    assert res.attention.shape == (n_tok, 3, 3)  # 96 px / stride 32
    words = word_maps([t["token"] for t in res.tokens], res.caption, res.attention)
    assert [w for w, _ in words] == res.caption.split()  # one panel per word of the caption
    # the figure as written is the one drawn from these maps over the backbone's view of the image
    view = Image.fromarray(backbone.preprocess(Image.open(PHOTOS[0]).convert("RGB")).permute(1, 2, 0).numpy())
    fig, boxes = draw_figure(view, words, title=f"chelsea.png: {res.caption}")
    with Image.open(out / "chelsea.attention.png") as written:
        assert written.format == "PNG" and written.size == fig.size
        diff = np.abs(np.asarray(written.convert("RGB"), dtype=np.int16) - np.asarray(fig, dtype=np.int16))
        assert diff.max() <= 2, diff.max()  # batched vs single-image float rounding at most
    assert len(boxes) == len(words) >= 2
    panels = [np.asarray(fig.crop(b), dtype=np.int16) for b in boxes]
    assert all(p.shape == (96, 96, 3) for p in panels)
    # each panel differs from the plain image (the heat is there) and from the other words' panels
    plain = np.asarray(view, dtype=np.int16)
    assert all(np.abs(p - plain).mean() > 5 for p in panels)
    diffs = [np.abs(panels[i] - panels[j]).max() for i in range(len(panels)) for j in range(i + 1, len(panels))
             if not torch.allclose(words[i][1], words[j][1], atol=1e-4)]
    assert diffs and min(diffs) > 0


def test_heat_follows_the_map(tmp_path):
    # a map with all its weight on the bottom-right cell: the bright end of the ramp is there, not top-left
    grid = torch.zeros(3, 3)
    grid[2, 2] = 1.0
    view = Image.new("RGB", (90, 90), (128, 128, 128))
    fig, [box] = draw_figure(view, [("star", grid)])
    panel = np.asarray(fig.crop(box), dtype=np.int16)
    assert panel[80, 80].sum() > panel[5, 5].sum() + 200
    assert tuple(colormap(np.array([0.0, 1.0]))[1]) == (252, 255, 164)


def test_word_groups_follow_the_caption():
    toks = ["a", "gir", "affe", "on", "grass", ".", "<eos>"]
    assert word_groups(toks, "a giraffe on grass.") == [("a", [0]), ("gir" + "affe", [1, 2]), ("on", [3]),
                                                        ("grass.", [4, 5])]
    # tokens that do not spell the caption: one group per token, never a wrong grouping
    assert word_groups(["a", "b"], "a c") == [("a", [0]), ("b", [1])]
    assert figure_names(["x/a.png", "y/a.jpg", "a-2.png"]) == ["a.attention.png", "a-2.attention.png",
                                                                "a-2-2.attention.png"]


def test_attention_needs_a_square_grid(tok, tmp_path):
    # a ViT's tokens are its 10x10 patches plus a class token: 101, no grid to lay the maps on
    from vgpt_cli.features import load_backbone

    vit = load_backbone("test_vit", pretrained=False)
    assert vit.meta["tokens_per_image"] == 101
    model = build(tok, encoder_layers=1)
    model = Captioner.from_config(replace(model.config, d_in=vit.dim), lm=model.lm, tokenizer=tok).eval()
    d = tmp_path / "best"
    model.save_pretrained(d)
    atomic_write_json(d / "preprocessor.json", vit.meta)
    r = CliRunner().invoke(app, ["caption", str(PHOTOS[0]), "--model", str(d), "--device", "cpu",
                                 "--attention", str(tmp_path / "att"), "--beam-size", "1", "--max-length", "3"])
    assert r.exit_code == 2, r.output
    assert "101 image tokens are not a square grid" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "att").exists()
    # without --attention the same model captions fine
    ok = CliRunner().invoke(app, ["caption", str(PHOTOS[0]), "--model", str(d), "--device", "cpu",
                                  "--beam-size", "1", "--max-length", "3"])
    assert ok.exit_code == 0, ok.output


# --- attention_peak_in_object (the demo's number) ----------------------------------------------------------
def test_region_cells_and_peak_rate_on_a_constructed_case():
    region = np.zeros((64, 64), dtype=bool)
    region[4:12, 36:44] = True          # rows 4-11 -> grid row 0; cols 36-43 -> grid col 2 (of 4, 16 px each)
    cells = region_cells(region, (4, 4))
    assert cells.sum() == 1 and cells[0, 2]
    wide = np.zeros((64, 64), dtype=bool)
    wide[14:18, 0:20] = True            # rows 14-17 span grid rows 0 and 1; cols 0-19 span grid cols 0 and 1
    assert sorted(zip(*np.nonzero(region_cells(wide, (4, 4))))) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    on = torch.zeros(4, 4)
    on[0, 2] = 1.0                      # peaks on the object
    off = torch.full((4, 4), 0.05)
    off[3, 3] = 0.2                     # peaks far from it
    got = attention_peak_in_object([(on, region), (off, region), (on, wide)])
    assert got["object_words"] == 3
    assert got["attention_peak_in_object"] == pytest.approx(1 / 3)
    assert got["attention_peak_chance"] == pytest.approx((1 / 16 + 1 / 16 + 4 / 16) / 3)
    assert attention_peak_in_object([]) == {"attention_peak_in_object": None, "attention_peak_chance": None,
                                            "object_words": 0}
    with pytest.raises(ValueError, match="empty"):
        attention_peak_in_object([(on, np.zeros((64, 64), dtype=bool))])


def test_naming_words_and_object_masks_line_up_with_the_scene():
    red = {"colour": "red", "shape": "circle", "size": "small", "position": "top left", "x": 40, "y": 40, "r": 16}
    green = {"colour": "green", "shape": "star", "size": "large", "position": "centre", "x": 112, "y": 112,
             "r": 30}
    caption = "a small red circle and a blue star on the left and a green star."
    assert naming_words(caption, [red, green]) == [(3, red), (14, green)]  # "star." is word 14
    assert caption.split()[3] == "circle" and naming_words("a red star", [red, green]) == []

    scene = {"background": "white", "objects": [red, green]}
    img = np.asarray(render_scene(scene))
    for obj in (red, green):
        m = np.asarray(object_mask(obj)) > 0
        assert m[obj["y"], obj["x"]] and not m[0, 0]
        # the mask is exactly where the scene shows the object's colour
        assert (img[m] == COLOURS[obj["colour"]]).all()
        assert m.sum() == (img == COLOURS[obj["colour"]]).all(-1).sum()


def test_object_masks_follow_the_backbones_resize_and_crop():
    # the demo takes the mask through backbone.preprocess: it must land where the scene's object lands
    from vgpt_cli.features import load_backbone

    bb = load_backbone("test_efficientnet", pretrained=False, image_size=96)  # crop_pct < 1: a real crop
    obj = {"colour": "blue", "shape": "square", "size": "large", "position": "top right", "x": 180, "y": 50,
           "r": 30}
    view = bb.preprocess(render_scene({"background": "black", "objects": [obj]})).permute(1, 2, 0).numpy()
    region = bb.preprocess(object_mask(obj).convert("RGB"))[0].numpy() > 127
    blue = (np.abs(view.astype(int) - COLOURS["blue"]).sum(-1) < 60)
    assert region.sum() > 20 and (region & blue).sum() >= 0.9 * region.sum() >= 0.8 * blue.sum()


def test_shapes_attention_counts_every_object_word_of_real_scenes(tok, tmp_path):
    # the demo's glue on real rendered scenes, a real (random) backbone and its feature store, and the
    # scenes' own captions: every colour+shape word pair in them names an object, so each is one sample
    from vgpt_cli.data.manifest import Item
    from vgpt_cli.data.shapes import make_scene, scene_captions
    from vgpt_cli.evaluate.grounding import grid_preprocess, shapes_attention
    from vgpt_cli.features import FeatureStore, extract_items, load_backbone

    bb = load_backbone("test_efficientnet", pretrained=False, image_size=96)
    items, captions = [], {}
    for i in range(3):
        scene = make_scene(7, i)
        path = tmp_path / f"s{i}.png"
        render_scene(scene).save(path)
        items.append(Item(f"s{i}", [str(path)], ["x"], {"objects": scene["objects"]}))
        captions[f"s{i}"] = scene_captions(scene, 7, i)[0]
    extract_items(items, bb, tmp_path / "store", num_workers=0, progress=False)
    store = FeatureStore.open(tmp_path / "store")
    model = build(tok, encoder_layers=1)
    model = Captioner.from_config(replace(model.config, d_in=bb.dim), lm=model.lm, tokenizer=tok).eval()
    got = shapes_attention(model, bb.preprocess, store, items, captions)
    # the store's record rebuilds the same resize and crop without the backbone's weights
    assert shapes_attention(model, grid_preprocess(store.meta), store, items, captions) == got
    want_words = sum(len(naming_words(captions[it.id], it.extra["objects"])) for it in items)
    assert want_words >= 3 and got["object_words"] == want_words
    assert 0 <= got["attention_peak_in_object"] <= 1 and 0 < got["attention_peak_chance"] < 1
