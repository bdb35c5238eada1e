"""The encoder warm start (vgpt_cli.train.warm_start) on a tiny GPT-2 captioner and synthetic scenes
whose caption is decided by the image: it must learn to read the image, touch only the encoder, and be
reproducible without disturbing the global RNG."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.train.warm_start import caption_words, warm_start_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, N_TOKENS = 16, 5


@dataclass
class Item:
    id: str
    captions: list[str]


class Store:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def get(self, key: str) -> np.ndarray:
        return self.arrays[key]


def scenes(n: int = 48) -> tuple[list[Item], Store]:
    """Half the images are red squares, half blue circles; only the features say which."""
    rng = np.random.default_rng(0)
    items, arrays = [], {}
    for i in range(n):
        red = i % 2 == 0
        x = rng.normal(size=(N_TOKENS, D_IN)).astype(np.float16)
        x[rng.integers(N_TOKENS), 0] = 4.0 if red else -4.0  # one token carries the object
        arrays[f"s{i}"] = x
        caption = "a red square" if red else "a blue circle"
        items.append(Item(f"s{i}", [caption, caption.upper() + "."]))
    return items, Store(arrays)


def tiny_captioner(tok) -> Captioner:
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64))
    cfg = CaptionerConfig(lm="tiny-gpt2", d_in=D_IN, encoder_layers=1, encoder_ffn=32, tau=0.2, gate_init_bias=5.0)
    return Captioner.from_config(cfg, lm=lm, tokenizer=tok)


def test_caption_words_lowercase_and_strip_punctuation():
    assert caption_words("A RED square, on grey.") == ["a", "red", "square", "on", "grey"]


@pytest.mark.slow
@pytest.mark.parametrize("decoder_options", [None, {"memory_layer": False}])
def test_warm_start_learns_to_read_the_image(tok, decoder_options):
    # without the decoder's own token layer, what it reads must be in the encoder's tokens themselves
    items, store = scenes()
    model = tiny_captioner(tok)
    result = warm_start_encoder(model, items, store, 40, seed=0, lr=3e-3, decoder_options=decoder_options)
    # Words per caption: a, colour, shape, <eos>. Blind to the image, the colour costs ln 2 and the rest
    # is predictable: ln(2) / 4 nats per word is the best a decoder that ignores the image can do.
    blind = math.log(2) / 4
    assert result.losses[0] > blind
    assert result.losses[-1] < 0.3 * blind, result.losses
    assert result.vocabulary == 3 + 5  # <pad> <bos> <eos> a red blue square circle


def test_warm_start_changes_only_the_encoder_and_is_reproducible(tok):
    items, store = scenes(16)
    model = tiny_captioner(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    warm_start_encoder(model, items, store, 2, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("encoder.proj") for k in changed)

    again = tiny_captioner(tok)
    warm_start_encoder(again, items, store, 2, seed=3)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)
    other = tiny_captioner(tok)
    warm_start_encoder(other, items, store, 2, seed=4)
    assert not torch.equal(after["encoder.proj.weight"], other.state_dict()["encoder.proj.weight"])


def test_warm_start_refuses_nothing_to_learn(tok):
    model = tiny_captioner(tok)
    with pytest.raises(ValueError, match="no training captions"):
        warm_start_encoder(model, [Item("x", [])], Store({}), 1, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        warm_start_encoder(model, scenes(4)[0], scenes(4)[1], 0, seed=0)
