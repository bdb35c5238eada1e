"""Decoding: cached beam search against the no-cache reference (full forward every step), greedy,
sampling and recomputed log-probabilities, gates, n-gram and length constraints."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_lm

from vgpt_cli.decode.reference import reference_beam_search
from vgpt_cli.decode.search import (
    DecodeOptions,
    beam_search,
    best_continuations,
    decode,
    greedy,
    row_topk,
    sample,
    sequence_log_probs,
)
from vgpt_cli.errors import ConfigError
from vgpt_cli.model import Captioner, CaptionerConfig

D_IN = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


def tiny_captioner(tok, family: str = "gpt2", levels: int = 3) -> Captioner:
    """A tiny random captioner whose EOS sometimes wins early, sometimes never (so that finished
    hypotheses, images done early and captions cut at max_length all occur)."""
    torch.manual_seed(0)
    lm = tiny_lm(len(tok), family, tie=False)
    head = lm.lm_head.weight
    with torch.no_grad():
        torch.nn.init.normal_(head, std=0.3)  # peaked distributions: no near-ties between candidates
        head[tok.eos_token_id] *= 5.0
    model = Captioner.from_config(CaptionerConfig(lm=f"tiny-{family}", d_in=D_IN, encoder_ffn=32,
                                                  encoder_layers=levels), lm=lm,
                                  tokenizer=tok).eval()
    for g in model.gates:  # gates that really vary
        torch.nn.init.normal_(g.weight, std=0.3)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_captioner(tok)


def images(b: int = 8, n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (b,), generator=gen)
    return torch.randn(b, n, D_IN, generator=gen), lengths


def assert_same(ours, ref):
    assert len(ours) == len(ref)
    for hyps, ref_hyps in zip(ours, ref):
        assert [h.token_ids for h in hyps] == [h.token_ids for h in ref_hyps]
        for h, r in zip(hyps, ref_hyps):
            assert h.score == pytest.approx(r.score, abs=1e-4)
            assert h.ended == r.ended and h.text == r.text
            assert h.token_logprobs == pytest.approx(r.token_logprobs, abs=1e-4)


@pytest.mark.parametrize("opts", [
    DecodeOptions(beam_size=3, max_length=10, min_length=2),
    DecodeOptions(beam_size=4, max_length=10, min_length=1, length_penalty=1.0, no_repeat_ngram_size=2),
], ids=["plain", "lp-norepeat"])
def test_cached_beam_search_equals_full_forward_reference(model, opts):
    f, lengths = images(6, seed=3)  # a seed whose images cover every case asserted below
    ours = beam_search(model, f, lengths, opts, num_return=opts.beam_size)
    ref = reference_beam_search(model, f, lengths, opts, num_return=opts.beam_size)
    assert_same(ours, ref)
    hyps = [h for hs in ours for h in hs]
    # the case covers what it should: captions ended by EOS and captions cut at max_length
    assert any(h.ended for h in hyps) and any(not h.ended for h in hyps)
    assert any(all(h.ended for h in hs) for hs in ours)  # an image done early, which left the batch
    assert all(opts.min_length < len(h.token_ids) or not h.ended for h in hyps)
    for hs in ours:
        assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
    if opts.no_repeat_ngram_size == 2:
        for h in hyps:
            grams = list(zip(h.token_ids, h.token_ids[1:]))
            assert len(grams) == len(set(grams))


@pytest.mark.parametrize("levels", [1, 3])
def test_fast_decoding_gives_the_tokens_of_the_unfused_reference(tok, levels):
    # What decoding runs (cached self-attention written in place, memory keys/values projected once per
    # image, cross-attention + SRAU fused in `_cross_srau`) against the no-cache reference running the
    # modules training runs (CrossAttention.forward + srau_combine): same tokens, scores, log-probs.
    model = tiny_captioner(tok, levels=levels)
    torch.manual_seed(1)
    for g in model.gates:  # tiny_captioner's gates stay within (0.4, 0.6): here the thresholds must cut
        torch.nn.init.normal_(g.weight, std=3.0)
    f, lengths = images(6, seed=3)
    opts = DecodeOptions(beam_size=4, max_length=10, min_length=1)
    seen = []
    hooks = [g.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().flatten())) for g in model.gates]
    calls = []
    fused = model._cross_srau
    model._cross_srau = lambda *a, **k: calls.append(1) or fused(*a, **k)  # counts, then runs the real one
    try:
        fast = beam_search(model, f, lengths, opts, num_return=4)
        n_fast = len(calls)
        model.fused_inference = False
        ref = reference_beam_search(model, f, lengths, opts, num_return=4)
    finally:
        model.fused_inference = True
        del model._cross_srau
        for h in hooks:
            h.remove()
    assert n_fast > 0 and len(calls) == n_fast  # the fast path ran fused, the reference did not
    g = torch.cat(seen)  # the reference's gate values (LevelGates runs only in the unfused path)
    tau = model.config.tau
    assert (g <= tau).float().mean() > 0.01 and (1 - g <= tau).float().mean() > 0.01  # both branches get cut
    assert_same(fast, ref)
    assert any(h.ended for hs in fast for h in hs) and any(not h.ended for hs in fast for h in hs)


def test_llama_family_cache_equals_reference(tok):
    llama = tiny_captioner(tok, "llama")
    f, lengths = images(4, seed=1)
    opts = DecodeOptions(beam_size=3, max_length=8)
    assert_same(beam_search(llama, f, lengths, opts, num_return=3), reference_beam_search(llama, f, lengths, opts,
                                                                                            num_return=3))


def test_beam_one_equals_greedy(model):
    f, lengths = images(seed=2)
    opts = DecodeOptions(beam_size=1, max_length=12)
    g = greedy(model, f, lengths, opts)
    b = beam_search(model, f, lengths, opts)
    for x, (y,) in zip(g, b):
        assert x.token_ids == y.token_ids and x.score == pytest.approx(y.score, abs=1e-4)
    assert [h.text for h in decode(model, f, lengths, opts)] == [h.text for h in g]


def test_gates_match_the_teacher_forced_forward(model):
    f, lengths = images(4, seed=3)
    hyps = [hs[0] for hs in beam_search(model, f, lengths, DecodeOptions(beam_size=3, max_length=8),
                                        return_gates=True)]
    for i, h in enumerate(hyps):
        assert len(h.gates) == len(h.token_ids)
        ids = torch.tensor([[model.bos_token_id, *h.token_ids[:-1]]])
        with torch.no_grad():
            gates = model(f[i:i + 1], lengths[i:i + 1], ids, return_gates=True).gates[0]
        assert torch.allclose(torch.tensor(h.gates), gates, atol=1e-5)
        assert all(0 <= lg <= 1 and 0 <= vg <= 1 for lg, vg in h.gates)


def test_sampling_log_probs_recompute_and_carry_gradient(model):
    f, lengths = images(3, seed=4)
    s = sample(model, f, lengths, num_samples=4, max_length=8, generator=torch.Generator().manual_seed(0))
    assert s.token_ids.shape[0] == 12 and s.image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert s.log_probs.requires_grad
    again = sequence_log_probs(model, f, lengths, s.token_ids, s.mask, s.image_index)
    assert torch.allclose(again, s.log_probs, atol=1e-4)
    assert (s.log_probs[~s.mask] == 0).all() and (s.log_probs[s.mask] < 0).all()
    model.zero_grad()
    (-again.sum()).backward()
    assert model.encoder.parameters().__next__().grad.abs().sum() > 0
    model.zero_grad()
    # same seed, same samples; a vanishing top-p is greedy
    s2 = sample(model, f, lengths, num_samples=4, max_length=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.token_ids, s2.token_ids)
    s3 = sample(model, f, lengths, max_length=8, top_p=1e-9)
    assert s3.texts == [h.text for h in greedy(model, f, lengths, DecodeOptions(beam_size=1, max_length=8))]


def _nucleus_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The tokens of the smallest most-probable set of mass >= top_p, from a float64 sort of the whole row."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for r, row in enumerate(logits.double()):
        probs, order = row.softmax(-1).sort(descending=True)
        n = int((probs.cumsum(0) - probs <= top_p).sum())
        keep[r, order[:n]] = True
    return keep


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_top_p_keeps_the_nucleus_whether_or_not_the_shortlist_holds_it(top_p, monkeypatch):
    import vgpt_cli.decode.search as search

    monkeypatch.setattr(search, "TOP_P_SHORTLIST", 16)
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(6, 500, generator=g) * 6    # a few tokens hold the nucleus: within the shortlist
    flat = torch.randn(4, 500, generator=g) * 0.1    # the nucleus runs to hundreds of tokens: sorted whole
    for logits in (peaked, flat, torch.cat([peaked[:3], flat[:2], peaked[3:]])):
        out = search._top_p_filter(logits, top_p)
        kept = out > search.NEG_INF
        assert torch.equal(kept, _nucleus_reference(logits, top_p))
        assert torch.equal(out[kept], logits[kept])    # the kept logits are untouched
    assert (_nucleus_reference(flat, top_p).sum(1) > 16).all()   # the wide rows did go past the shortlist


def test_sampling_drops_finished_images_without_changing_what_the_others_draw(model):
    # Without gradient, an image whose samples all ended leaves the batch; with gradient every image stays
    # to the end. Per-image generators draw the same captions either way.
    f, lengths = images(5, seed=4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(5)]  # noqa: E731
    with torch.no_grad():
        dropped = sample(model, f, lengths, num_samples=3, max_length=12, top_p=0.9, generators=gens())
    kept = sample(model, f, lengths, num_samples=3, max_length=12, top_p=0.9, generators=gens())
    ends = dropped.mask.sum(1).view(5, 3).max(1).values
    assert ends.min() < ends.max()                  # some images did finish before others
    assert torch.equal(dropped.token_ids, kept.token_ids) and torch.equal(dropped.mask, kept.mask)
    assert dropped.texts == kept.texts
    assert torch.allclose(dropped.log_probs, kept.log_probs.detach(), atol=1e-5)


def test_bad_options_are_config_errors(model):
    f, lengths = images(1)
    for opts in (DecodeOptions(beam_size=0), DecodeOptions(max_length=0), DecodeOptions(min_length=20)):
        with pytest.raises(ConfigError):
            beam_search(model, f, lengths, opts)
    with pytest.raises(ConfigError):
        sample(model, f, lengths, temperature=0)


def test_cache_grows_past_its_first_allocation_and_a_late_mask_counts(model):
    # No max_length hint: the cache starts at 16 tokens and must double, keeping what it holds; a
    # padding mask given only from step 5 on must still hide the later padded token from the rest.
    f, lengths = images(3, seed=4)
    T = 21
    ids = torch.randint(0, model.vocab_size, (3, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 9] = 0
    with torch.no_grad():
        full = model(f, lengths, ids, mask).logits
        state = model.start_decoding(model.encode(f, lengths))
        steps = []
        for t in range(T):
            step_mask = mask[:, t:t + 1] if t >= 5 else None
            logits, state = model.decode_step(ids[:, t:t + 1], state, step_mask)
            steps.append(logits)
    assert state.length == T and state.buffer.shape[4] >= T and state.padded
    real = mask.bool()
    assert (torch.stack(steps, 1) - full)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("vocab", [64 * 40 + 17, 64 * 40, 300])
def test_best_continuations_are_those_of_topk_over_every_beam_and_token(vocab):
    # What beam search took before (topk over all K x V sums score + log p of an image) against what it
    # takes now (each row's best tokens found slice by slice, then the best of those): the same values,
    # beams and tokens, best first. Rows with banned (-inf) tokens, an image with dead beams (-inf
    # scores, as at step 0), a row whose best tokens all sit in one slice, a vocabulary with a shorter
    # last slice, one without, and one of fewer slices than candidates (plain topk).
    gen = torch.Generator().manual_seed(0)
    B, K = 5, 4
    logp = torch.randn(B * K, vocab, generator=gen).mul(3).log_softmax(-1)
    logp[1, ::2] = float("-inf")
    logp[6, 128:192] += 25.0
    logp[7, -3:] += 25.0  # the best tokens in the last (shorter) slice
    scores = torch.randn(B, K, generator=gen) * 4
    scores[2, 1:] = float("-inf")
    top, src, tok = best_continuations(scores, logp, 2 * K)
    ref_top, idx = (scores.reshape(-1, 1) + logp).reshape(B, K * vocab).topk(2 * K, dim=1)
    assert torch.equal(top, ref_top)
    assert torch.equal(src, idx // vocab) and torch.equal(tok, idx % vocab)
    values, cols = row_topk(logp, 2 * K)
    ref_values, ref_cols = logp.topk(2 * K, dim=1)
    assert torch.equal(values, ref_values) and torch.equal(cols, ref_cols)
