"""Encoder warm start: train the visual encoder alone under a small captioning decoder, before SRAU.

Why (docs/research/grounding.md): a 135M-parameter LM makes every SRAU step expensive, so in the
demo's ten CPU minutes the captioner sees each training caption about once, and the cross-attention
and encoder, learning together from scratch, never separate the objects of a scene: the captions
name the shapes and guess the colours. A 2-layer decoder 256 wide, trained from scratch on the same
tokens, binds colour to shape within a few epochs at a small fraction of the cost. Training the
encoder first under such a decoder, then dropping the decoder, gives SRAU tokens that already
describe each object; its cross-attention then only has to learn to read them.

The decoder works on whole words of the training captions (lowercased, letters and digits), not on
the LM's tokens: it is thrown away, and a small vocabulary keeps it cheap. Each batch holds all the
captions of a few images, so each image is encoded once per batch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vgpt_cli.model.encoder import padding_mask
from vgpt_cli.train.data import pad_features

_WORD = re.compile(r"[a-z0-9]+")
MAX_WORDS = 40  # longer captions are cut for this auxiliary loss only (COCO's are 8-20 words)


def caption_words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())[:MAX_WORDS]


def teacher_forcing(sequences: Sequence[list[int]]) -> tuple[Tensor, Tensor]:
    """Word-id sequences (each <bos> ... <eos>) -> inputs (B, T) padded with 0 and next-word targets (B, T)
    padded with -100 (ignored by cross_entropy), T = the longest sequence minus one."""
    T = max(len(r) for r in sequences) - 1
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    target = torch.full((len(sequences), T), -100, dtype=torch.long)
    for j, r in enumerate(sequences):
        ids[j, : len(r) - 1] = torch.tensor(r[:-1])
        target[j, : len(r) - 1] = torch.tensor(r[1:])
    return ids, target


class WordDecoder(nn.Module):
    """Encoder tokens (B, N, D) -> next-word logits: 1 memory layer + 2 decoder layers, 256 wide.

    memory_layer=False reads the encoder's tokens with no token layer of its own (measured: the same
    SRAU result, docs/research/grounding.md)."""

    def __init__(self, d_model: int, vocab: int, width: int = 256, heads: int = 4, max_words: int = MAX_WORDS + 1,
                 memory_layer: bool = True):
        super().__init__()
        self.adapt = nn.Sequential(nn.Linear(d_model, width), nn.GELU(), nn.LayerNorm(width))
        self.memory_layer = nn.TransformerEncoderLayer(width, heads, 4 * width, 0.1, batch_first=True,
                                                       norm_first=True) if memory_layer else None
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(max_words, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, 0.1, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor, mask: Tensor, ids: Tensor, image_index: Tensor) -> Tensor:
        # tokens (Bi, N, D) one row per image, mask (Bi, N) True = real; ids (B, T); image_index (B,)
        memory = self.adapt(tokens)
        if self.memory_layer is not None:
            memory = self.memory_layer(memory, src_key_padding_mask=~mask)
        memory = memory[image_index]
        T = ids.shape[1]
        h = self.embed(ids) + self.pos[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        out = self.decoder(h, memory, tgt_mask=causal, tgt_is_causal=True,
                           memory_key_padding_mask=~mask[image_index])
        return self.head(self.norm(out))


@dataclass
class WarmStartResult:
    epochs: int
    losses: list[float]  # mean cross-entropy (nats per word) of each epoch
    vocabulary: int
    seconds: float


def warm_start_encoder(model: Any, items: Sequence[Any], store: Any, epochs: int, *, seed: int,
                       images_per_batch: int = 16, lr: float = 5e-4, autocast_dtype: torch.dtype | None = None,
                       log: Callable[[str], None] = lambda s: None, decoder_options: dict[str, Any] | None = None,
                       ) -> WarmStartResult:
    """Train `model.encoder` (in place) for `epochs` passes over `items`' captions under a WordDecoder.

    items: objects with `.id` (the feature store key) and `.captions`. The LM, the cross-attention and
    the gates are not touched. Deterministic for a given seed; the global RNG is left as it was.
    decoder_options: keywords of the throw-away WordDecoder (e.g. {"memory_layer": False}).
    """
    if epochs < 1:
        raise ValueError(f"warm start: epochs must be >= 1, got {epochs}")
    items = [it for it in items if it.captions]
    if not items:
        raise ValueError("warm start: no training captions")
    words = sorted({w for it in items for c in it.captions for w in caption_words(c)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", *words])}
    rows_of = [[[1, *[vocab[w] for w in caption_words(c)], 2] for c in it.captions] for it in items]
    encoder = model.encoder
    device = next(encoder.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        decoder = WordDecoder(encoder.proj.out_features, len(vocab), **(decoder_options or {})).to(device)
        params = [p for p in encoder.parameters() if p.requires_grad] + list(decoder.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        order_rng = torch.Generator().manual_seed(seed)
        was_training = encoder.training
        encoder.train()
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for chunk in torch.randperm(len(items), generator=order_rng).split(images_per_batch):
                    idx = chunk.tolist()
                    feats, lengths = pad_features([store.get(items[i].id) for i in idx])
                    feats, lengths = feats.to(device), lengths.to(device)
                    rows = [(b, r) for b, i in enumerate(idx) for r in rows_of[i]]
                    ids, target = teacher_forcing([r for _, r in rows])
                    image_index = torch.tensor([b for b, _ in rows], device=device)
                    mask = padding_mask(lengths, feats.shape[1])
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        tokens = encoder(feats.float(), mask)[:, -1]  # the top encoder level
                        logits = decoder(tokens, mask, ids.to(device), image_index)
                    loss = nn.functional.cross_entropy(logits.float().transpose(1, 2), target.to(device))
                    if not math.isfinite(float(loss.detach())):
                        raise FloatingPointError(f"warm start: the loss became {float(loss)} in epoch {epoch + 1}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    total, count = total + float(loss.detach()), count + 1
                losses.append(total / count)
                log(f"encoder warm start: epoch {epoch + 1}/{epochs}, loss {losses[-1]:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)")
        finally:
            encoder.train(was_training)
    return WarmStartResult(epochs=epochs, losses=[round(v, 4) for v in losses], vocabulary=len(vocab),
                           seconds=round(time.perf_counter() - t0, 1))
