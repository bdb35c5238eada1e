"""Coverage in the cross-attention (CaptionerConfig.coverage): the penalty against a float64 loop, a zero
weight is exactly the model without coverage, and decoding with the running sum (the cache, beam reorders,
images leaving the batch, padded steps, the fused path) gives what the full teacher-forced forward gives."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_lm

from vgpt_cli.decode.reference import reference_beam_search
from vgpt_cli.decode.search import DecodeOptions, beam_search
from vgpt_cli.errors import ConfigError
from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.model.srau import covered_attention

D_IN = 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(tok, coverage: float | None, levels: int = 2, seed: int = 0) -> Captioner:
    """A tiny random captioner with sharp cross-attention (so that coverage moves it) and peaked output."""
    torch.manual_seed(seed)
    lm = tiny_lm(len(tok), "gpt2", tie=False)
    with torch.no_grad():
        torch.nn.init.normal_(lm.lm_head.weight, std=0.3)
        lm.lm_head.weight[tok.eos_token_id] *= 5.0
    torch.manual_seed(seed + 1)
    model = Captioner.from_config(CaptionerConfig(lm="tiny-gpt2", d_in=D_IN, encoder_ffn=32, encoder_layers=levels,
                                                  coverage=coverage), lm=lm, tokenizer=tok).eval()
    with torch.no_grad():
        for xa in model.xattn:
            torch.nn.init.normal_(xa.q.weight, std=0.5)
            torch.nn.init.normal_(xa.k.weight, std=0.5)
            if xa.coverage is not None:  # a different weight per head, one of them zero
                xa.coverage.copy_(torch.linspace(0.0, 2 * coverage, xa.heads))
        for g in model.gates:  # gates that open the visual branch for some channels
            torch.nn.init.normal_(g.weight, std=1.0)
    return model


def images(b: int, n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D_IN, generator=gen), torch.randint(2, n + 1, (b,), generator=gen)


def test_penalty_matches_a_float64_loop():
    gen = torch.Generator().manual_seed(0)
    G, h, R, T, N = 2, 3, 2, 5, 4
    scores = torch.randn(G, h, R, T, N, generator=gen, dtype=torch.float64) * 2
    scores[1, :, :, :, 3] = float("-inf")  # a padded image token
    weight = torch.tensor([0.0, 1.5, 4.0], dtype=torch.float64)
    real = torch.ones(G, 1, R, T, 1, dtype=torch.float64)
    real[0, 0, 1, 2] = 0  # a padded caption step adds nothing to the coverage
    p, total = covered_attention(scores, weight, real=real)
    for g in range(G):
        for hh in range(h):
            for r in range(R):
                seen = torch.zeros(N, dtype=torch.float64)
                for t in range(T):
                    s = scores[g, hh, r, t]
                    want = torch.softmax(s - weight[hh] * seen, dim=-1)
                    assert torch.allclose(p[g, hh, r, t], want, atol=1e-12)
                    seen += torch.softmax(s, dim=-1) * real[g, 0, r, t]
                assert torch.allclose(total[g, hh, r], seen, atol=1e-12)
    assert (p[1, ..., 3] == 0).all()
    # the penalty is real: head 2 differs from plain attention after the first step, head 0 does not
    assert torch.allclose(p[:, 0], scores[:, 0].softmax(-1))
    assert (p[:, 2, :, 1:] - scores[:, 2, :, 1:].softmax(-1)).abs().max() > 0.05
    # in two pieces with the running sum carried: the same as at once
    p1, t1 = covered_attention(scores[..., :2, :], weight, real=real[..., :2, :])
    p2, t2 = covered_attention(scores[..., 2:, :], weight, past=t1, real=real[..., 2:, :])
    assert torch.allclose(torch.cat([p1, p2], dim=3), p, atol=1e-12) and torch.allclose(t2, total, atol=1e-12)


def test_zero_weight_is_the_model_without_coverage_and_a_weight_changes_it(tok):
    plain, covered = tiny(tok, None), tiny(tok, 1.0)
    missing, unexpected = covered.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"xattn.{i}.coverage" for i in range(len(covered.xattn))] and not unexpected
    f, lengths = images(3, seed=1)
    ids = torch.randint(0, covered.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(f, lengths, ids).logits
        changed = covered(f, lengths, ids).logits
        for xa in covered.xattn:
            xa.coverage.zero_()
        same = covered(f, lengths, ids).logits
    assert torch.allclose(same, want, atol=1e-5)
    assert torch.allclose(changed[:, 0], want[:, 0], atol=1e-5)  # the first token has nothing covered yet
    assert (changed[:, 1:] - want[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "modules"])
def test_cached_beam_search_with_coverage_equals_the_full_forward_reference(tok, fused):
    model = tiny(tok, 1.5)
    model.fused_inference = fused
    f, lengths = images(6, seed=3)
    opts = DecodeOptions(beam_size=3, max_length=10, min_length=1)
    ours = beam_search(model, f, lengths, opts, num_return=3)
    ref = reference_beam_search(model, f, lengths, opts, num_return=3)
    for hyps, ref_hyps in zip(ours, ref):
        assert [h.token_ids for h in hyps] == [h.token_ids for h in ref_hyps]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in ref_hyps], abs=1e-4)
    hyps = [h for hs in ours for h in hs]
    assert any(h.ended for h in hyps) and any(not h.ended for h in hyps)  # images leave the batch early
    assert len({tuple(h.token_ids) for h in hyps}) > 6  # beams really differ (reorders happen)


def test_step_by_step_with_a_padded_step_equals_the_teacher_forced_forward(tok):
    model = tiny(tok, 2.0, levels=1)
    f, lengths = images(3, seed=4)
    T = 12
    ids = torch.randint(0, model.vocab_size, (3, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 4] = 0  # this step must add nothing to row 1's coverage
    with torch.no_grad():
        full = model(f, lengths, ids, mask).logits
        state = model.start_decoding(model.encode(f, lengths))
        steps = []
        for t in range(T):
            logits, state = model.decode_step(ids[:, t:t + 1], state, mask[:, t:t + 1])
            steps.append(logits)
    assert state.coverage.shape == (model.num_layers, 3, 1, model.xattn[0].heads, 6)
    real = mask.bool()
    assert (torch.stack(steps, 1) - full)[real].abs().max().item() <= 1e-4


def test_the_coverage_weight_gets_a_gradient_and_bad_values_are_refused(tok):
    model = tiny(tok, 0.5).train()
    f, lengths = images(2, seed=5)
    batch = model.tokenize(["a red circle and a blue star", "a green square"])
    out = model(f, lengths, batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    assert all(xa.coverage.grad is not None and xa.coverage.grad.abs().sum() > 0 for xa in model.xattn)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="coverage"):
            CaptionerConfig(coverage=bad).validate()
