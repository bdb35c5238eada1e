"""word_attention: per-token cross-attention maps, checked against the model's own attention output and a
float64 recomputation from the module's projections."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from vgpt_cli.attention import attention_weights, grid_shape, word_attention
from vgpt_cli.model import Captioner, CaptionerConfig

D_IN = 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(tok, family="gpt2", seed=0, **kw) -> Captioner:
    torch.manual_seed(seed)
    if family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=64))
    else:
        lm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=96, vocab_size=len(tok),
                                          max_position_embeddings=64, tie_word_embeddings=False))
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


@pytest.mark.parametrize("family,levels,gating", [("gpt2", 2, "srau"), ("llama", 1, "srau"), ("gpt2", 2, "none")])
def test_weights_reproduce_the_models_own_attention_output(tok, family, levels, gating):
    # The weights times the values must give what the model's scaled_dot_product_attention gave: the
    # input of each block's output projection, caught on the unfused (training) path.
    model = build(tok, family, encoder_layers=levels, gating=gating)
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
