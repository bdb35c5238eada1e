"""The decoding settings, one dataclass that caption, evaluate, serve, training's validation and the model
folder's generation_config.json all read (no torch here: the command line imports it for its help)."""

from __future__ import annotations

from dataclasses import dataclass

from vgpt_cli.errors import ConfigError


@dataclass
class DecodeOptions:
    beam_size: int = 5              # 1 = greedy
    max_length: int = 20            # generated tokens at most, EOS included (the authors: 20)
    min_length: int = 0             # EOS is forbidden before this many tokens
    length_penalty: float = 0.0     # score = sum log p / length**length_penalty; 0: the plain sum
    no_repeat_ngram_size: int = 0   # >0: no n-gram of this size occurs twice in a caption
    # >0: of the beam's captions, keep the one the captions of the `rerank` nearest training images agree
    # with most (consensus reranking, decode/consensus.py; needs the model folder's caption bank); 0: the
    # beam's best. Greedy search has one candidate: nothing to rerank.
    rerank: int = 0
    # >0, with rerank: this many sampled captions per image (decode/search.py sampled_candidates) join the
    # beam's captions as candidates: a more varied set to choose from, at the price of a second decoding pass.
    rerank_samples: int = 0

    def validate(self) -> DecodeOptions:
        if self.beam_size < 1:
            raise ConfigError(f"beam_size={self.beam_size}: use 1 (greedy) or more")
        if self.max_length < 1:
            raise ConfigError(f"max_length={self.max_length}: a caption needs at least one token")
        if not 0 <= self.min_length < self.max_length:
            raise ConfigError(f"min_length={self.min_length} must be >= 0 and below max_length={self.max_length}")
        if self.rerank < 0:
            raise ConfigError(f"rerank={self.rerank}: use 0 (off) or the number of nearest training images")
        if self.rerank_samples < 0:
            raise ConfigError(f"rerank_samples={self.rerank_samples}: use 0 (off) or a number of captions to sample")
        if self.rerank_samples and not self.rerank:
            raise ConfigError(f"rerank_samples={self.rerank_samples}: sampled candidates are chosen among by "
                              "consensus reranking; set rerank (e.g. 20) too, or rerank_samples 0")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size={self.no_repeat_ngram_size}: use 0 (off) or a positive size")
        return self
