"""A plain beam search without a cache: the yardstick for the cached one (tests, benchmark).

At every step it recomputes the whole prefix of every live beam with the full teacher-forced forward
pass (`model(features, lengths, input_ids)`), and does the beam bookkeeping image by image with
Python lists. Same rules as vgpt_cli.decode.search.beam_search (see its module docstring); written
independently, so that the two agreeing checks the cache and the vectorised bookkeeping together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vgpt_cli.decode.search import DecodeOptions, Hypothesis, _text


@torch.no_grad()
def reference_beam_search(model, features: Tensor, lengths: Tensor, opts: DecodeOptions | None = None,
                          *, num_return: int = 1) -> list[list[Hypothesis]]:
    opts = (opts or DecodeOptions()).validate()
    K, lp_pow = opts.beam_size, opts.length_penalty
    B = features.shape[0]
    eos, bos = model.eos_token_id, model.bos_token_id

    def norm(raw: float, n: int) -> float:
        return raw / (n ** lp_pow) if lp_pow else raw

    # per image: live beams as (score tensor, tokens, token log-probs); finished as Hypothesis
    running: list[list[tuple[Tensor, list[int], list[float]]]] = [
        [(torch.zeros((), device=features.device), [], [])] for _ in range(B)]
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    active = list(range(B))

    def add(b: int, h: Hypothesis) -> None:
        finished[b].append(h)
        finished[b].sort(key=lambda x: -x.score)  # stable
        del finished[b][K:]

    for step in range(opts.max_length):
        rows = [(b, beam) for b in active for beam in running[b]]
        input_ids = torch.tensor([[bos, *beam[1]] for _, beam in rows], device=features.device)
        img = torch.tensor([b for b, _ in rows], device=features.device)
        logits = model(features[img], lengths[img], input_ids).logits[:, -1].float()
        logp = logits.log_softmax(-1)
        if step < opts.min_length:
            logp[:, eos] = float("-inf")
        n = opts.no_repeat_ngram_size
        if n:
            for r, (_, beam) in enumerate(rows):
                toks = beam[1]
                for i in range(len(toks) - n + 1):
                    if toks[i:i + n - 1] == toks[len(toks) - n + 1:] or n == 1:
                        logp[r, toks[i + n - 1]] = float("-inf")
        r0 = 0
        still = []
        for b in active:
            beams = running[b]
            block = logp[r0: r0 + len(beams)]
            cand = (torch.stack([s for s, _, _ in beams])[:, None] + block).reshape(-1)
            V = block.shape[1]
            top, idx = cand.topk(2 * K)
            nxt = []
            for rank, (score, i) in enumerate(zip(top, idx.tolist())):
                src, tok = divmod(i, V)
                s_toks, s_lps = beams[src][1], beams[src][2]
                tok_lp = float(block[src, tok])
                if tok == eos:
                    if rank < K and torch.isfinite(score):
                        ids = [*s_toks, tok]
                        add(b, Hypothesis(ids, [*s_lps, tok_lp], norm(float(score), len(ids)), True))
                else:
                    nxt.append((score, [*s_toks, tok], [*s_lps, tok_lp]))
                if len(nxt) == K:
                    break
            r0 += len(beams)
            running[b] = nxt
            cur_len = step + 1
            done = (len(finished[b]) == K and cur_len < opts.max_length
                    and finished[b][-1].score >= norm(float(nxt[0][0]), cur_len))
            if not done:
                still.append(b)
        active = still
        if not active:
            break
    for b in active:
        for score, toks, lps in running[b]:
            if torch.isfinite(score):
                add(b, Hypothesis(toks, lps, norm(float(score), len(toks)), False))
    for hyps in finished:
        for h in hyps:
            h.text = _text(model, h.word_ids())
    return [hyps[:num_return] for hyps in finished]
