"""CIDEr-D with document frequencies fixed from a reference corpus: fast repeated scoring for SCST rewards
and validation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

from vgpt_cli.errors import DataError
from vgpt_cli.evaluate.tokenize import tokenize_caption


class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus, for many fast scorings.

    Built once from the training captions (one list of references per image), it then scores candidate
    sets against their references: `CiderD(corpus).score(candidates, refs) -> (mean, per_item)`. The
    arithmetic is pycocoevalcap's CiderScorer (its n-gram cooking is reused, and the tf-idf vectors,
    clipping, gaussian length penalty with sigma 6, and the quirk of taking the bigram count as the length,
    are reproduced operation by operation), so with the corpus equal to the scored references it returns
    exactly what pycocoevalcap's Cider returns. Reference vectors are cached, as SCST scores the same
    images again and again.

    tokenize: run the pure-Python PTB tokenizer (lower-case, punctuation removed) over corpus, candidates
    and references first; pass False when the text is already tokenised.
    """

    def __init__(self, refs_corpus: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0,
                 tokenize: bool = True) -> None:
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        df: dict[tuple[str, ...], float] = {}
        n_docs = 0
        for refs in refs_corpus:
            n_docs += 1
            cooked = cook_refs([self._tok(r) for r in refs], n)
            for ngram in {g for ref in cooked for g in ref}:
                df[ngram] = df.get(ngram, 0.0) + 1
        if n_docs == 0:
            raise DataError("CIDEr-D needs a non-empty reference corpus (the training captions)")
        self.n_docs = n_docs
        self.ref_len = np.log(float(n_docs))
        self._weight = {g: self.ref_len - np.log(max(1.0, c)) for g, c in df.items()}
        self._ref_cache: dict[tuple[str, ...], list[tuple[list[dict], list[float], int]]] = {}

    def _tok(self, text: str) -> str:
        return tokenize_caption(text) if self.tokenize else text

    def _vec(self, counts: Mapping[tuple[str, ...], int]) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            v = float(tf) * self._weight.get(ngram, self.ref_len)
            vec[k][ngram] = v
            norm[k] += pow(v, 2)
            if k == 1:
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = np.array([0.0] * self.n)
        for k in range(self.n):
            rk = vr[k]
            for ngram, v in vh[k].items():
                r = rk.get(ngram, 0.0)
                val[k] += min(v, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= np.e ** (-(delta**2) / (2 * self.sigma**2))
        return val

    def _refs(self, refs: Sequence[str]):
        key = tuple(refs)
        got = self._ref_cache.get(key)
        if got is None:
            got = [self._vec(c) for c in cook_refs([self._tok(r) for r in refs], self.n)]
            self._ref_cache[key] = got
        return got

    def score_one(self, candidate: str, refs: Sequence[str]) -> float:
        hyp = self._vec(cook_test(self._tok(candidate), self.n))
        ref_vecs = self._refs(refs)
        if not ref_vecs:
            raise DataError("CIDEr-D: an item has no reference captions")
        score = np.array([0.0] * self.n)
        for rv in ref_vecs:
            score += self._sim(hyp, rv)
        return float(np.mean(score) / len(ref_vecs) * 10.0)

    def score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
        """Mean CIDEr-D and the per-candidate array; refs[i] are the references of candidates[i]."""
        if len(candidates) != len(refs):
            raise ValueError(f"{len(candidates)} candidates but {len(refs)} reference lists")
        per = np.array([self.score_one(c, r) for c, r in zip(candidates, refs)], dtype=np.float64)
        return (float(per.mean()) if len(per) else 0.0), per
