"""Caption decoding over the captioner's KV cache: beam search, greedy, sampling (for SCST).

All three encode the images once (`model.encode`), then feed one token per row per step
(`model.decode_step`), so a step costs one token's work per row, not the whole prefix.

Beam search is batched over images x beams (rows b*K .. b*K+K-1 belong to image b) and follows the
classic rules (those of transformers' beam search with early_stopping=False):
- each step takes the 2K best (beam, token) candidates of an image, in score order;
- a candidate ending in EOS whose rank is below K becomes a finished hypothesis (the image keeps its
  K best finished ones, by score / length**length_penalty, length counting the EOS);
- the first K candidates that do not end in EOS are the next beams;
- an image is done when it has K finished hypotheses and none of its beams can still beat the worst
  of them (exact for length_penalty 0: scores only fall); done images leave the batch;
- after max_length steps, the beams still running are scored as finished (without EOS).
The score of a hypothesis is the sum of its tokens' log-probabilities (EOS included) divided by
length**length_penalty: length_penalty=0 (the default, the authors' setting) is the plain sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vgpt_cli.decode.options import DecodeOptions
from vgpt_cli.errors import ConfigError

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One decoded caption of one image."""

    token_ids: list[int]            # generated tokens, the final EOS included when there is one
    token_logprobs: list[float]     # log p of each of them
    score: float                    # sum(token_logprobs) / len(token_ids)**length_penalty
    ended: bool = False             # True: ended with EOS; False: cut at max_length
    gates: list[tuple[float, float]] | None = None  # per token (linguistic, visual) mean gate values
    text: str = ""

    def word_ids(self) -> list[int]:
        """The caption's tokens without the final EOS."""
        return self.token_ids[:-1] if self.ended else list(self.token_ids)


def cut_note(cut: int, total: int, max_length: int) -> str | None:
    """The line that says how many captions reached the token limit without ending (None: none did)."""
    if not cut:
        return None
    return (f"{cut} of {total} captions reached the {max_length}-token limit without ending and are cut there; "
            "raise --max-length to let them finish")


def _text(model, ids: Sequence[int]) -> str:
    return model.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _finish(model, hyp: Hypothesis) -> Hypothesis:
    hyp.text = _text(model, hyp.word_ids())
    return hyp


def ban_repeated_ngrams(logp: Tensor, seqs: Tensor, n: int) -> None:
    """In place: -inf on every token that would repeat an n-gram already in the row. seqs (R, t)."""
    t = seqs.shape[1]
    if n <= 0 or t < n - 1 or t == 0:
        return
    if n == 1:
        logp.scatter_(1, seqs, NEG_INF)
        return
    if t < n:
        return
    grams = seqs.unfold(1, n, 1)                                        # (R, t-n+1, n)
    match = (grams[:, :, :-1] == seqs[:, t - n + 1:].unsqueeze(1)).all(-1)  # prefix == the last n-1 tokens
    rows, pos = match.nonzero(as_tuple=True)
    if rows.numel():
        logp[rows, grams[rows, pos, -1]] = NEG_INF


def _prepare_logp(logits: Tensor, step: int, opts: DecodeOptions, eos: int, seqs: Tensor) -> Tensor:
    logp = logits.float().log_softmax(-1)
    if step < opts.min_length:
        logp[:, eos] = NEG_INF
    if opts.no_repeat_ngram_size:
        ban_repeated_ngrams(logp, seqs, opts.no_repeat_ngram_size)
    return logp


# tokens per slice of a log-probability row when looking for its best tokens (see row_topk)
TOPK_SLICE = 64


def row_topk(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest values of each row of x (R, V) and their columns, largest first: x.topk(n, dim=1)
    in fewer passes over a long row. A row's n largest values lie in the n slices of TOPK_SLICE columns
    whose maxima are largest, so topk looks at those slices only (one amax pass, then a few hundred
    columns a row). The values are exactly topk's; among equal values the column may differ."""
    R, V = x.shape
    m = V // TOPK_SLICE
    if m <= n:
        return x.topk(n, dim=1)
    whole = m * TOPK_SLICE
    best_slices = x[:, :whole].reshape(R, m, TOPK_SLICE).amax(-1).topk(n, dim=1).indices      # (R, n)
    cols = (best_slices[:, :, None] * TOPK_SLICE + torch.arange(TOPK_SLICE, device=x.device)).reshape(R, -1)
    if whole < V:  # the last, shorter slice: always looked at
        cols = torch.cat([cols, torch.arange(whole, V, device=x.device).expand(R, -1)], 1)
    values, j = x.gather(1, cols).topk(n, dim=1)
    return values, cols.gather(1, j)


def best_continuations(scores: Tensor, logp: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The n best (beam, token) continuations of each image, best first: scores (B, K) of its beams and
    logp (B*K, V) of their next tokens -> (score + log p (B, n), beam (B, n), token (B, n)).

    The same as topk over all B x K*V sums, without forming them: adding a beam's score keeps the order
    of its tokens, so an image's n best are among its beams' n best tokens each (row_topk), and each sum
    is the same float addition."""
    B, K = scores.shape
    values, tokens = row_topk(logp, n)                              # (B*K, n)
    top, j = (scores.reshape(-1, 1) + values).reshape(B, K * n).topk(n, dim=1)
    return top, j // n, tokens.reshape(B, K * n).gather(1, j)


class _Pool:
    """The K best finished hypotheses of one image."""

    def __init__(self, k: int, length_penalty: float) -> None:
        self.k, self.lp, self.hyps = k, length_penalty, []

    def add(self, ids: list[int], lps: list[float], raw: float, gates, eos: bool) -> None:
        score = raw / (len(ids) ** self.lp) if self.lp else raw
        if len(self.hyps) == self.k and score <= self.hyps[-1].score:
            return
        h = Hypothesis(ids, lps, score, eos, gates)
        i = len(self.hyps)
        while i > 0 and self.hyps[i - 1].score < score:  # stable: earlier ones first on ties
            i -= 1
        self.hyps.insert(i, h)
        del self.hyps[self.k:]

    @property
    def worst(self) -> float:
        return self.hyps[-1].score if len(self.hyps) == self.k else NEG_INF


def _is_done(pool: _Pool, best_running: float, cur_len: int) -> bool:
    if len(pool.hyps) < pool.k:
        return False
    bound = best_running / (cur_len ** pool.lp) if pool.lp else best_running
    return pool.worst >= bound


def image_rows(images: Tensor, per_image: int) -> Tensor:
    """The decoder rows of the given images, where image b has rows b*per_image .. b*per_image+per_image-1."""
    return (images[:, None] * per_image + torch.arange(per_image, device=images.device)).reshape(-1)


@torch.no_grad()
def beam_search(model, features: Tensor, lengths: Tensor, opts: DecodeOptions | None = None, *,
                num_return: int = 1, return_gates: bool = False) -> list[list[Hypothesis]]:
    """Beam search with the KV cache. features (B, N, d_in), lengths (B,) -> per image the
    `num_return` best hypotheses (best first)."""
    opts = (opts or DecodeOptions()).validate()
    K = opts.beam_size
    if not 1 <= num_return <= K:
        raise ConfigError(f"num_return={num_return} must be between 1 and beam_size={K}")
    B = features.shape[0]
    dev = features.device
    eos, bos = model.eos_token_id, model.bos_token_id
    memory = model.encode(features, lengths)
    # step 0 runs one row per image (its K beams would be K copies of the same BOS row), then the
    # rows are repeated; the other K-1 beams start at -inf, so only beam 0's candidates count
    state = model.start_decoding(memory, beams=1, max_length=opts.max_length)
    pools = [_Pool(K, opts.length_penalty) for _ in range(B)]
    img = torch.arange(B, device=dev)              # original index of each active image
    scores = torch.full((B, K), NEG_INF, device=dev)
    scores[:, 0] = 0.0                             # one live beam per image at the start
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=dev)
    lps = torch.empty(B * K, 0, device=dev)
    gts = torch.empty(B * K, 0, 2, device=dev)
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=dev)
    rank = torch.arange(2 * K, device=dev)
    for step in range(opts.max_length):
        logits, state = model.decode_step(tokens, state, return_gates=return_gates)
        if step == 0 and K > 1:
            logits, state = logits.repeat_interleave(K, dim=0), state.repeat_rows(K)
        logp = _prepare_logp(logits, step, opts, eos, seqs)       # (R, V)
        Ba = scores.shape[0]
        top, src, tok = best_continuations(scores, logp, 2 * K)
        is_eos = tok == eos
        rows_of = torch.arange(Ba, device=dev)[:, None] * K     # first row of each image
        fin = is_eos & (rank < K) & torch.isfinite(top)
        if fin.any():
            for b, j in fin.nonzero().tolist():
                row = b * K + int(src[b, j])
                g = None
                if return_gates:
                    g = [tuple(x) for x in gts[row].tolist()] + [tuple(state.gates[row].tolist())]
                pools[int(img[b])].add(seqs[row].tolist() + [eos], lps[row].tolist() + [float(logp[row, eos])],
                                       float(top[b, j]), g, True)
        # the next beams: the K best candidates that do not end in EOS, in rank order
        order = (rank + is_eos * (2 * K)).argsort(dim=1)[:, :K]
        nsrc, ntok, scores = src.gather(1, order), tok.gather(1, order), top.gather(1, order)
        rows = (rows_of + nsrc).reshape(-1)
        ntok = ntok.reshape(-1)
        seqs = torch.cat([seqs.index_select(0, rows), ntok[:, None]], 1)
        lps = torch.cat([lps.index_select(0, rows), logp[rows, ntok][:, None]], 1)
        if return_gates:
            gts = torch.cat([gts.index_select(0, rows), state.gates.index_select(0, rows)[:, None]], 1)
        tokens = ntok[:, None]
        cur_len = step + 1
        if cur_len == opts.max_length:
            break  # no step follows: the cache needs no reorder
        state = state.reorder(rows, within_groups=True)  # rows never leave their image's group
        best = scores[:, 0].tolist()
        done = torch.tensor([_is_done(pools[int(i)], best[b], cur_len) for b, i in enumerate(img.tolist())],
                            device=dev)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                img = img[:0]
                break
            krows = image_rows(keep, K)
            state = state.select_images(keep, krows)
            seqs, lps, gts, tokens = seqs[krows], lps[krows], gts[krows], tokens[krows]
            scores, img = scores[keep], img[keep]
    # beams still running at max_length are scored as they are
    for b, i in enumerate(img.tolist()):
        for k in range(K):
            row = b * K + k
            if math.isfinite(float(scores[b, k])):
                g = [tuple(x) for x in gts[row].tolist()] if return_gates else None
                pools[i].add(seqs[row].tolist(), lps[row].tolist(), float(scores[b, k]), g, False)
    return [[_finish(model, h) for h in p.hyps[:num_return]] for p in pools]


@torch.no_grad()
def greedy(model, features: Tensor, lengths: Tensor, opts: DecodeOptions | None = None, *,
           return_gates: bool = False) -> list[Hypothesis]:
    """The most likely token at every step, with the KV cache. One hypothesis per image."""
    opts = (opts or DecodeOptions(beam_size=1)).validate()
    B, dev = features.shape[0], features.device
    eos = model.eos_token_id
    state = model.start_decoding(model.encode(features, lengths), max_length=opts.max_length)
    tokens = torch.full((B, 1), model.bos_token_id, dtype=torch.long, device=dev)
    seqs = torch.empty(B, 0, dtype=torch.long, device=dev)
    lps = torch.empty(B, 0, device=dev)
    gts = torch.empty(B, 0, 2, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    for step in range(opts.max_length):
        logits, state = model.decode_step(tokens, state, return_gates=return_gates)
        logp = _prepare_logp(logits, step, opts, eos, seqs)
        lp, tok = logp.max(-1)
        tok = torch.where(alive, tok, torch.full_like(tok, eos))
        seqs = torch.cat([seqs, tok[:, None]], 1)
        lps = torch.cat([lps, lp[:, None]], 1)
        if return_gates:
            gts = torch.cat([gts, state.gates[:, None]], 1)
        alive = alive & (tok != eos)
        if not alive.any():
            break
        tokens = tok[:, None]
    out = []
    for b in range(B):
        ids = seqs[b].tolist()
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        h = Hypothesis(ids[:n], lps[b, :n].tolist(), float(lps[b, :n].sum()), eos in ids,
                       [tuple(x) for x in gts[b, :n].tolist()] if return_gates else None)
        if opts.length_penalty:
            h.score /= n ** opts.length_penalty
        out.append(_finish(model, h))
    return out


def decode(model, features: Tensor, lengths: Tensor, opts: DecodeOptions | None = None, *,
           return_gates: bool = False) -> list[Hypothesis]:
    """The best caption of each image: greedy for beam_size 1, else beam search (and, with opts.rerank, the
    consensus choice among the beam's captions)."""
    opts = (opts or DecodeOptions()).validate()
    if opts.beam_size == 1 and not opts.rerank_samples:
        return greedy(model, features, lengths, opts, return_gates=return_gates)
    return [h[0] for h in decode_candidates(model, features, lengths, opts, return_gates=return_gates)]


def decode_candidates(model, features: Tensor, lengths: Tensor, opts: DecodeOptions, *,
                      return_gates: bool = False) -> list[list[Hypothesis]]:
    """Per image every finished beam, the chosen caption first: the beam's best, or with opts.rerank the
    one the captions of the nearest training images agree with most (decode/consensus.py)."""
    opts = opts.validate()
    bank = getattr(model, "caption_bank", None)
    if opts.rerank and bank is None:  # refused before the search, not after it
        raise ConfigError(f"rerank={opts.rerank}: this model folder has no caption bank (caption_bank.json, "
                          "written by `vgpt train`); decode with --rerank 0")
    if opts.rerank_samples and return_gates:
        raise ConfigError(f"rerank_samples={opts.rerank_samples}: sampled captions carry no gate values; decode "
                          "with --rerank-samples 0 to see the gates")
    hyps = beam_search(model, features, lengths, opts, num_return=opts.beam_size, return_gates=return_gates)
    if not opts.rerank:
        return hyps
    if opts.rerank_samples:
        for own, sampled in zip(hyps, sampled_candidates(model, features, lengths, opts)):
            seen = {h.text for h in own}
            own += [h for h in sampled if h.text not in seen and not seen.add(h.text)]
    from vgpt_cli.decode.consensus import pooled_features

    return bank.rerank(hyps, pooled_features(features, lengths), opts.rerank)


# Sampled candidates for consensus reranking (DecodeOptions.rerank_samples), as measured on Flickr8k dev
# (benchmarks/consensus.py).
RERANK_TEMPERATURE, RERANK_TOP_P, RERANK_SEED = 0.8, 0.95, 0


def sampled_candidates(model, features: Tensor, lengths: Tensor, opts: DecodeOptions) -> list[list[Hypothesis]]:
    """opts.rerank_samples sampled captions per image, each image with its own generator seeded alike, so that
    an image gets the same candidates whatever batch it is decoded in."""
    m = opts.rerank_samples
    generators = [torch.Generator(device=features.device).manual_seed(RERANK_SEED) for _ in range(features.shape[0])]
    s = sample(model, features, lengths, m, max_length=opts.max_length, min_length=opts.min_length,
               temperature=RERANK_TEMPERATURE, top_p=RERANK_TOP_P, generators=generators)
    hyps = []
    for r in range(s.token_ids.shape[0]):
        ids, lps = s.token_ids[r][s.mask[r]].tolist(), s.log_probs[r][s.mask[r]].tolist()
        score = sum(lps) / (len(ids) ** opts.length_penalty if opts.length_penalty else 1)
        hyps.append(Hypothesis(ids, lps, score, bool(ids) and ids[-1] == model.eos_token_id, text=s.texts[r]))
    return [hyps[b * m:(b + 1) * m] for b in range(features.shape[0])]


# --- sampling and log-probabilities for SCST -------------------------------------------------------
@dataclass
class Samples:
    """num_samples sampled captions per image: rows b*n .. b*n+n-1 belong to image b."""

    token_ids: Tensor     # (R, T) long, padded with EOS after the end
    log_probs: Tensor     # (R, T) log p of each sampled token under the model (temperature 1), 0 on padding;
                          # carries gradient when sampling ran with grad enabled
    mask: Tensor          # (R, T) bool: real tokens (EOS included)
    texts: list[str]
    image_index: Tensor   # (R,) the image of each row

    def sum_log_probs(self) -> Tensor:
        return (self.log_probs * self.mask).sum(1)


TOP_P_SHORTLIST = 256  # tokens sorted first; the whole vocabulary only for rows whose nucleus is wider


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """logits with every token outside the smallest most-probable set of mass >= top_p at -inf. Sorting the
    whole vocabulary at every step was most of the cost of sampling: the top TOP_P_SHORTLIST tokens hold the
    nucleus of almost every row, and the rows where they do not are sorted whole."""
    if top_p >= 1.0:
        return logits
    out = torch.full_like(logits, NEG_INF)
    top, order = logits.topk(min(TOP_P_SHORTLIST, logits.shape[-1]), dim=-1)   # sorted, descending
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()                  # under the full softmax
    wide = probs.sum(-1) <= top_p                                                # the nucleus may go on past them
    if not wide.any():
        return _keep_nucleus(top, order, probs, top_p, out)
    narrow = ~wide
    out[narrow] = _keep_nucleus(top[narrow], order[narrow], probs[narrow], top_p, out[narrow])
    full, full_order = logits[wide].sort(dim=-1, descending=True)
    out[wide] = _keep_nucleus(full, full_order, full.softmax(-1), top_p, out[wide])
    return out


def _keep_nucleus(sorted_logits: Tensor, order: Tensor, probs: Tensor, top_p: float, out: Tensor) -> Tensor:
    cut = probs.cumsum(-1) - probs > top_p          # keep the smallest prefix whose mass reaches top_p
    return out.scatter(-1, order, sorted_logits.masked_fill(cut, NEG_INF))


def sample(model, features: Tensor, lengths: Tensor, num_samples: int = 1, *, max_length: int = DecodeOptions.max_length,
           min_length: int = 0, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, generators: Sequence[torch.Generator] | None = None) -> Samples:
    """Sample captions token by token with the KV cache. Gradient flows into `log_probs` unless the
    caller runs under torch.no_grad(); or recompute them with `sequence_log_probs`. `generators`, one per
    image, instead of `generator`: each image's draws come from its own generator (by the inverse of the
    cumulative distribution), so they do not depend on the other images of the batch."""
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature}: must be > 0 (use beam_size=1 for greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: must be in (0, 1]")
    B, dev = features.shape[0], features.device
    if generators is not None and len(generators) != B:
        raise ConfigError(f"{len(generators)} generators for {B} images: give one per image")
    R = B * num_samples
    eos = model.eos_token_id
    state = model.start_decoding(model.encode(features, lengths), beams=num_samples, max_length=max_length)
    tokens = torch.full((R, 1), model.bos_token_id, dtype=torch.long, device=dev)
    alive = torch.ones(R, dtype=torch.bool, device=dev)
    images = torch.arange(B, device=dev)  # the images still in the batch; an image leaves when all its rows ended
    rows = torch.arange(R, device=dev)    # their rows, in the full (R,) numbering
    ids, lps, masks = [], [], []
    for step in range(max_length):
        logits, state = model.decode_step(tokens, state)
        logp = logits.float().log_softmax(-1)
        dist = logits.detach().float() / temperature
        if step < min_length:
            dist[:, eos] = NEG_INF
        probs = _top_p_filter(dist, top_p).softmax(-1)
        if generators is None:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            u = torch.cat([torch.rand(num_samples, 1, generator=generators[i], device=dev) for i in images.tolist()])
            cdf = probs.cumsum(-1)  # right=True and u < 1 of the total: never a token of probability 0
            tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        tok = torch.where(alive, tok, torch.full_like(tok, eos))
        lp = logp.gather(1, tok[:, None]).squeeze(1) * alive
        # rows of images that left the batch: EOS, log p 0, masked out
        ids.append(torch.full((R,), eos, dtype=torch.long, device=dev).index_put((rows,), tok))
        lps.append(lp.new_zeros(R).index_put((rows,), lp))
        masks.append(torch.zeros(R, dtype=torch.bool, device=dev).index_put((rows,), alive))
        alive = alive & (tok != eos)
        running = alive.view(-1, num_samples).any(1)
        if not running.any():
            break
        tokens = tok[:, None]
        # drop the finished images (the rest decode as they would have); not with gradient, which the cache
        # copy does not carry
        if not running.all() and not torch.is_grad_enabled():
            keep = running.nonzero().squeeze(1)
            krows = image_rows(keep, num_samples)
            state = state.select_images(keep, krows)
            images, rows, alive, tokens = images[keep], rows[krows], alive[krows], tokens[krows]
    token_ids, mask = torch.stack(ids, 1), torch.stack(masks, 1)
    texts = []
    for r in range(R):
        row = token_ids[r][mask[r]].tolist()
        texts.append(_text(model, row[:-1] if row and row[-1] == eos else row))
    image_index = torch.arange(B, device=dev).repeat_interleave(num_samples)
    return Samples(token_ids, torch.stack(lps, 1), mask, texts, image_index)


def sequence_log_probs(model, features: Tensor, lengths: Tensor, token_ids: Tensor, mask: Tensor,
                       image_index: Tensor | None = None) -> Tensor:
    """log p of given captions (R, T) under the model, by one teacher-forced forward pass (with
    gradient). Row r reads image image_index[r] (default r). Returns (R, T), 0 where mask is False."""
    if image_index is not None:
        features, lengths = features.index_select(0, image_index), lengths.index_select(0, image_index)
    bos = torch.full_like(token_ids[:, :1], model.bos_token_id)
    input_ids = torch.cat([bos, token_ids[:, :-1]], 1)
    attention = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1).long()
    logits = model(features, lengths, input_ids, attention).logits
    return logits.float().log_softmax(-1).gather(2, token_ids[:, :, None]).squeeze(2) * mask


# --- batching numpy features -------------------------------------------------------------------------
def pad_features(arrays: Sequence[np.ndarray], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """A list of (N_i, C) arrays -> features (B, max N, C) float32 and lengths (B,)."""
    n = max(a.shape[0] for a in arrays)
    c = arrays[0].shape[1]
    out = np.zeros((len(arrays), n, c), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)
    return torch.from_numpy(out).to(device), lengths.to(device)


def decode_arrays(model, arrays: Sequence[np.ndarray], opts: DecodeOptions | None = None, *,
                  batch_size: int = 32, device: torch.device | str = "cpu", return_gates: bool = False,
                  progress: Callable[[int], None] | None = None) -> list[Hypothesis]:
    """Decode many images' cached features in batches; `progress(n)` after each batch of n images."""
    out: list[Hypothesis] = []
    for i in range(0, len(arrays), batch_size):
        chunk = arrays[i: i + batch_size]
        f, lengths = pad_features(chunk, device)
        out.extend(decode(model, f, lengths, opts, return_gates=return_gates))
        if progress is not None:
            progress(len(chunk))
    return out
