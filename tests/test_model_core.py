"""The captioner's decoder against transformers' own models, the KV cache, SRAU semantics, padding."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

from vgpt_cli.errors import ConfigError, DataError
from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.model.lm import VOCAB_SLICE, vocab_logits
from vgpt_cli.model.srau import LevelGates, srau_combine

D_IN = 16


@pytest.fixture(scope="module")
def tok(gpt2_bpe_dir):
    t = GPT2TokenizerFast(vocab=str(gpt2_bpe_dir / "vocab.json"), merges=str(gpt2_bpe_dir / "merges.txt"))
    assert len(t) > 50000  # the other constructor forms silently give an empty tokenizer
    return t


def tiny_lm(family: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=64)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=vocab, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def build(tok, family="gpt2", seed=0, **kw) -> Captioner:
    lm = tiny_lm(family, len(tok), seed)
    cfg = CaptionerConfig(lm=f"tiny-{family}", d_in=D_IN, encoder_ffn=32, **kw)
    torch.manual_seed(seed + 1)
    return Captioner.from_config(cfg, lm=lm, tokenizer=tok).eval()


def set_gates(model: Captioner, bias: float, weight_std: float = 0.0) -> None:
    for g in model.gates:
        torch.nn.init.normal_(g.weight, std=weight_std) if weight_std else torch.nn.init.zeros_(g.weight)
        torch.nn.init.constant_(g.bias, bias)


def features(b: int, n: int, lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D_IN, generator=gen), torch.tensor(lengths)


# a. equivalence with transformers' own models ------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_language_only_equals_transformers(tok, family):
    model = build(tok, family, encoder_layers=1)
    set_gates(model, bias=50.0)  # sigmoid(50) == 1.0 in float32: the visual branch is cut exactly
    batch = model.tokenize(["a dog lying on a red couch", "two cats", "a man riding a wave on a surfboard"])
    f, lengths = features(3, 6, [6, 2, 4])
    with torch.no_grad():
        ours = model(f, lengths, batch["input_ids"], batch["attention_mask"]).logits
        ref = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert ours.shape == ref.shape == (3, batch["input_ids"].shape[1], len(tok))
    assert (ours - ref)[real].abs().max().item() <= 1e-4
    # and the check can fail: with the visual branch on, the logits move
    set_gates(model, bias=0.0)
    with torch.no_grad():
        mixed = model(f, lengths, batch["input_ids"], batch["attention_mask"]).logits
    assert (mixed - ref)[real].abs().max().item() > 1e-2


def test_sqrt_k_scaling_means_k3_is_not_the_plain_lm(tok):
    # visualgpt.md: with K > 1 and every gate linguistic, the block input to the MLP is sqrt(K) * A
    model = build(tok, "gpt2", encoder_layers=3)
    set_gates(model, bias=50.0)
    batch = model.tokenize(["a dog"])
    f, lengths = features(1, 4, [4])
    with torch.no_grad():
        ours = model(f, lengths, batch["input_ids"]).logits
        ref = model.lm(input_ids=batch["input_ids"]).logits
    assert (ours - ref).abs().max().item() > 1e-2


# b. incremental decoding with cache, padding and beam reorder --------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("cross_group", [False, True])
def test_cached_decoding_matches_full_forward(tok, family, cross_group):
    model = build(tok, family, encoder_layers=2, tau=0.2)
    set_gates(model, bias=0.0, weight_std=0.3)  # gates spread over (0, 1), thresholds active
    n_img, beams, T, split = 2, 3, 8, 4
    B = n_img * beams
    gen = torch.Generator().manual_seed(3)
    ids_a = torch.randint(0, len(tok), (B, T), generator=gen)
    ids_b = torch.randint(0, len(tok), (B, T), generator=gen)
    mask_a = torch.ones(B, T, dtype=torch.long)
    mask_a[1, 2:] = 0   # right padding
    mask_a[4, :2] = 0   # left padding
    mask_a[5, 3] = 0    # a hole
    f, lengths = features(n_img, 5, [5, 3], seed=1)
    img_of_row = torch.arange(B) // beams

    if cross_group:
        beam_idx = torch.tensor([5, 1, 3, 0, 2, 4])
    else:
        beam_idx = torch.tensor([2, 0, 0, 4, 5, 3])
    # the histories after the reorder, and the image each new row now reads
    ids_r = torch.cat([ids_a[beam_idx, :split], ids_b[:, split:]], dim=1)
    mask_r = torch.cat([mask_a[beam_idx, :split], mask_a[:, split:]], dim=1)
    img_r = img_of_row[beam_idx]

    with torch.no_grad():
        full_a = model(f[img_of_row], lengths[img_of_row], ids_a, mask_a).logits
        full_r = model(f[img_r], lengths[img_r], ids_r, mask_r).logits
        state = model.start_decoding(model.encode(f, lengths), beams=beams)
        steps = []
        for t in range(T):
            if t == split:
                state = state.reorder(beam_idx)
            src_ids, src_mask = (ids_a, mask_a) if t < split else (ids_r, mask_r)
            logits, state = model.decode_step(src_ids[:, t:t + 1], state, src_mask[:, t:t + 1])
            steps.append(logits)
    inc = torch.stack(steps, dim=1)
    assert state.length == T
    real_a = mask_a.bool()
    real_a[:, split:] = False
    real_r = mask_r.bool()
    real_r[:, :split] = False
    assert (inc - full_a)[real_a].abs().max().item() <= 1e-4
    assert (inc - full_r)[real_r].abs().max().item() <= 1e-4
    # the memory is shared, not copied, as long as rows stay with their image
    assert (state.beams == beams) is (not cross_group)


def test_decode_step_gates_match_full_forward(tok):
    model = build(tok, "gpt2", encoder_layers=2)
    set_gates(model, bias=0.0, weight_std=0.3)
    batch = model.tokenize(["a cat on a mat", "a red bus"])
    f, lengths = features(2, 4, [4, 2])
    with torch.no_grad():
        full = model(f, lengths, batch["input_ids"], batch["attention_mask"], return_gates=True).gates
        state = model.start_decoding(model.encode(f, lengths))
        per_step = []
        for t in range(batch["input_ids"].shape[1]):
            _, state = model.decode_step(batch["input_ids"][:, t:t + 1], state, return_gates=True)
            per_step.append(state.gates)
    assert full.shape == (2, batch["input_ids"].shape[1], 2)
    assert torch.allclose(torch.stack(per_step, 1)[0], full[0], atol=1e-5)
    assert bool(((full >= 0) & (full <= 1)).all())


# c. SRAU against a float64 recomputation ------------------------------------------------------
def srau_reference(a, c, gates, tau):
    a, c = a.double(), c.double()
    K = c.shape[1]
    out = torch.zeros_like(a)
    gs = []
    for k in range(K):
        w, b = gates.weight[k].double(), gates.bias[k].double()  # level k's Linear(2D -> D)
        g = torch.sigmoid(torch.cat([a, c[:, k]], -1) @ w.T + b)
        gs.append(g)
        out = out + (g > tau) * g * a + ((1 - g) > tau) * (1 - g) * c[:, k]
    return out / math.sqrt(K), gs


@pytest.mark.parametrize("tau", [0.2, 0.0])
def test_srau_matches_float64_formulas(tau):
    torch.manual_seed(0)
    D, K = 32, 3
    a, c = torch.randn(2, 5, D), torch.randn(2, K, 5, D)
    gates = LevelGates(K, D)
    torch.nn.init.normal_(gates.weight, std=0.4)
    torch.nn.init.normal_(gates.bias, std=0.5)
    o, ling, vis = srau_combine(a, c, gates, tau)
    ref, gs = srau_reference(a, c, gates, tau)
    # elements within float32 rounding of a threshold could legitimately fall either way
    near = sum((((g - tau).abs() < 1e-5) | ((g - (1 - tau)).abs() < 1e-5)).double() for g in gs) > 0
    assert (o.double() - ref)[~near].abs().max().item() <= 1e-5
    if tau > 0:  # both cut regions occur, so the test exercises them
        assert any(bool((g <= tau).any()) and bool((g >= 1 - tau).any()) for g in gs)


def test_srau_threshold_semantics_elementwise():
    torch.manual_seed(1)
    D = 64
    a, c = torch.randn(1, 7, D), torch.randn(1, 1, 7, D)
    gate = LevelGates(1, D)
    torch.nn.init.normal_(gate.weight, std=0.5)
    g = torch.sigmoid(torch.cat([a, c[:, 0]], -1) @ gate.weight[0].T + gate.bias[0]).double()
    a64, c64 = a.double(), c[:, 0].double()
    o, ling, vis = srau_combine(a, c, gate, 0.2)
    o = o.double()
    low, high = g <= 0.2, g >= 0.8
    mid = ~low & ~high
    assert low.any() and high.any() and mid.any()
    assert torch.allclose(o[low], ((1 - g) * c64)[low], atol=1e-6)    # no linguistic contribution
    assert torch.allclose(o[high], (g * a64)[high], atol=1e-6)        # no visual contribution
    assert torch.allclose(o[mid], (g * a64 + (1 - g) * c64)[mid], atol=1e-6)
    # tau = 0: the soft gate everywhere
    o0, _, _ = srau_combine(a, c, gate, 0.0)
    assert torch.allclose(o0.double(), g * a64 + (1 - g) * c64, atol=1e-6)
    # the reported per-position gates are the effective gates' channel means
    assert torch.allclose(ling.double(), (g * (g > 0.2)).mean(-1), atol=1e-6)
    assert torch.allclose(vis.double(), ((1 - g) * ((1 - g) > 0.2)).mean(-1), atol=1e-6)


@pytest.mark.parametrize("tau", [-0.1, 0.5, 0.7])
def test_tau_out_of_range_is_refused(tau):
    with pytest.raises(ConfigError, match="tau"):
        CaptionerConfig(tau=tau).validate()


# d. self-resurrection ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [-2.2, 2.2])  # g ~ 0.1: linguistic cut; g ~ 0.9: visual cut
def test_cut_branch_gate_still_gets_gradient(tok, bias):
    model = build(tok, "gpt2", encoder_layers=2, tau=0.2).train()
    set_gates(model, bias=bias)
    batch = model.tokenize(["a dog on a couch", "a cat"])
    f, lengths = features(2, 4, [4, 3])
    out = model(f, lengths, batch["input_ids"], batch["attention_mask"], batch["labels"], return_gates=True)
    # every element of every gate is on one side: one branch is cut everywhere
    cut = out.gates[..., 0] if bias < 0 else out.gates[..., 1]
    assert bool((cut == 0).all())
    out.loss.backward()
    for g in model.gates:
        for k in range(g.levels):  # every level's gate layer of every block
            assert g.weight.grad[k].abs().sum().item() > 0
            assert g.bias.grad[k].abs().sum().item() > 0


def test_plain_threshold_gate_would_die():
    # the contrast that makes the test above meaningful: without the complementary branch, a cut gate
    # gets exactly zero gradient
    a = torch.randn(3, 8)
    b = torch.full((8,), -2.2, requires_grad=True)
    g = torch.sigmoid(b).expand(3, 8)
    (g * (g > 0.2) * a).sum().backward()
    assert b.grad.abs().sum().item() == 0


def test_no_dead_parameters_and_groups_partition(tok):
    for gating in ("srau", "none"):
        model = build(tok, "llama", encoder_layers=2, gating=gating)
        set_gates(model, bias=0.0, weight_std=0.3) if gating == "srau" else None
        batch = model.tokenize(["a dog on a couch", "a cat"])
        f, lengths = features(2, 4, [4, 3])
        model(f, lengths, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
        groups = model.param_groups()
        ids = [id(p) for g in groups.values() for p in g]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert {id(p) for p in groups["lm"]} == {id(p) for p in model.lm.parameters()}
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert dead == []


def test_captions_that_do_not_line_up_with_the_images_are_refused_in_one_line(tok):
    model = build(tok, "gpt2")
    batch = model.tokenize(["a red circle", "a blue square", "two cats"])
    f, n = torch.randn(2, 5, D_IN), torch.tensor([5, 3])
    with pytest.raises(ValueError, match="3 caption rows for 2 image rows: pass image_index"):
        model(f, n, batch["input_ids"], batch["attention_mask"])
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 1])):
        with pytest.raises(ValueError, match="one image row in \\[0, 2\\) for each of the 3 captions"):
            model(f, n, batch["input_ids"], batch["attention_mask"], image_index=bad)
    with torch.no_grad():  # lined up through image_index: caption rows 0 and 2 read image 0
        shared = model(f, n, batch["input_ids"], batch["attention_mask"], image_index=torch.tensor([0, 1, 0])).logits
        alone = model(f[[0, 1, 0]], n[[0, 1, 0]], batch["input_ids"], batch["attention_mask"]).logits
    assert torch.allclose(shared, alone, atol=1e-5)


def test_gating_none_is_the_residual_baseline(tok):
    model = build(tok, "gpt2", encoder_layers=2, gating="none")
    assert model.gates is None
    batch = model.tokenize(["a dog"])
    f, lengths = features(1, 4, [4])
    out = model(f, lengths, batch["input_ids"], return_gates=True)
    assert out.gates is None and out.logits.shape[-1] == len(tok)


# e. padding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_visual_tokens_change_nothing(tok, family):
    model = build(tok, family, encoder_layers=3)
    set_gates(model, bias=0.0, weight_std=0.3)
    batch = model.tokenize(["a dog on a couch", "a cat", "a bus"])
    f, lengths = features(3, 6, [6, 2, 4])
    f2 = f.clone()
    for b, n in enumerate(lengths.tolist()):
        f2[b, n:] = 1e4
    with torch.no_grad():
        ref = model(f, lengths, batch["input_ids"], batch["attention_mask"]).logits
        out = model(f2, lengths, batch["input_ids"], batch["attention_mask"]).logits
        # and the real tokens do matter
        f3 = f.clone()
        f3[1, 0] += 1.0
        moved = model(f3, lengths, batch["input_ids"], batch["attention_mask"]).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-5
    assert (moved[1] - ref[1]).abs().max().item() > 1e-4


def test_bad_lengths_are_refused(tok):
    model = build(tok, "gpt2", encoder_layers=1)
    batch = model.tokenize(["a dog"])
    f, _ = features(1, 4, [4])
    for bad in ([0], [5]):
        with pytest.raises(DataError, match="lengths"):
            model(f, torch.tensor(bad), batch["input_ids"])


# tokens ------------------------------------------------------------------------------------------
def test_tokenize_bos_eos_truncation_and_padding(tok):
    model = build(tok, "gpt2", encoder_layers=1)
    long = "a very long caption about a man who is riding a big wave on top of a surfboard near the shore"
    batch = model.tokenize(["a dog", long], max_length=8)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, 8)
    assert bool((ids[:, 0] == model.bos_token_id).all())
    n0 = int(mask[0].sum())
    assert labels[0, n0 - 1].item() == model.eos_token_id and bool((labels[0, n0:] == -100).all())
    assert labels[1, -1].item() == model.eos_token_id  # EOS kept after truncation
    assert tok.decode(labels[1, :-1]) == tok.decode(tok(long)["input_ids"][:7])
    assert torch.equal(labels[0, : n0 - 1], ids[0, 1:n0])  # labels are the next tokens
    assert model.bos_token_id == model.eos_token_id == model.pad_token_id == 50256


def test_padding_never_reaches_the_loss(tok):
    model = build(tok, "gpt2", encoder_layers=1)
    batch = model.tokenize(["a dog on a couch", "a cat"])
    f, lengths = features(2, 4, [4, 3])
    with torch.no_grad():
        out = model(f, lengths, batch["input_ids"], batch["attention_mask"], batch["labels"])
        real = batch["labels"] != -100
        manual = torch.nn.functional.cross_entropy(out.logits[real], batch["labels"][real])
        ids2 = batch["input_ids"].clone()
        ids2[~batch["attention_mask"].bool()] = 123  # other pad ids
        out2 = model(f, lengths, ids2, batch["attention_mask"], batch["labels"])
        smooth = model(f, lengths, batch["input_ids"], batch["attention_mask"], batch["labels"],
                       label_smoothing=0.1)
    assert abs(out.loss.item() - manual.item()) < 1e-5
    assert abs(out.loss.item() - out2.loss.item()) < 1e-6
    assert smooth.loss.item() != out.loss.item()


def test_decoding_past_gpt2_positions_is_refused(tok):
    model = build(tok, "gpt2", encoder_layers=1)  # n_positions = 64
    f, lengths = features(1, 4, [4])
    ids = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="64 positions"):
        model(f, lengths, ids)
    with pytest.raises(DataError, match="no captions"):
        model.tokenize([])


def test_gate_init_bias_starts_every_gate_at_sigmoid_b(tok):
    # The authors' init spreads g over (0, 1) (A is the unnormalised residual stream); a bias init
    # puts every gate at exactly sigmoid(b), so with K = 1 and a large b the model starts as the LM.
    model = build(tok, encoder_layers=1, gate_init_bias=50.0)
    assert all(float(g.weight.detach().abs().max()) == 0.0 for g in model.gates)
    batch = model.tokenize(["a dog lying on a red couch", "two cats"])
    f, lengths = features(2, 5, [5, 3])
    with torch.no_grad():
        out = model(f, lengths, batch["input_ids"], batch["attention_mask"], return_gates=True)
        ref = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (out.logits - ref)[real].abs().max().item() <= 1e-4
    assert torch.allclose(out.gates[..., 0][real], torch.ones(()))  # linguistic gate 1, visual 0
    assert float(out.gates[..., 1][real].abs().max()) == 0.0
    default = build(tok, encoder_layers=1)
    assert float(default.gates[0].weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ConfigError):
        CaptionerConfig(gate_init_bias=float("nan")).validate()


@pytest.mark.parametrize("bias", [False, True])
def test_sliced_vocabulary_logits_are_bit_identical_to_the_lm_head(tok, bias):
    # CPU inference computes the LM head slice by slice of the vocabulary (faster); every logit must
    # come out exactly as the head's own one product gives it, for decode steps (rows, 1, D) and for
    # teacher-forced sequences (rows, T, D); with autograd on it is the head itself (gradient flows).
    torch.manual_seed(0)
    head = torch.nn.Linear(64, len(tok), bias=bias)
    assert head.out_features > 3 * VOCAB_SLICE
    for shape in ((80, 1, 64), (5, 1, 64), (3, 7, 64)):
        h = torch.randn(shape)
        with torch.inference_mode():
            assert torch.equal(vocab_logits(head, h), head(h))
    h = torch.randn(2, 3, 64, requires_grad=True)
    out = vocab_logits(head, h)
    assert out.grad_fn is not None and torch.equal(out, head(h))
