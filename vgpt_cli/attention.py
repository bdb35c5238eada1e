"""Where the captioner looked: per-token cross-attention maps over the image's token grid.

For each token of a caption, teacher-forced (given the tokens before it, as when it was generated),
the decoder's cross-attention weights over the N visual tokens, averaged over heads, encoder levels
and decoder layers, and laid out on the backbone's square token grid: the "show, attend and tell"
figure. `word_attention` is the whole API; `attention_weights` keeps the per-layer/level/head detail.

The model is not changed for this: a forward hook on each block's query projection (`xattn[i].q`,
which both the training and the fused inference path call) keeps the queries of one teacher-forced
pass, and the weights are softmax(q k^T / sqrt(head_dim)) against the keys `Captioner.encode` gives,
exactly the scores the model's scaled_dot_product_attention softmaxes (with coverage, less the same
penalty); tests/test_attention.py checks that these weights times the values reproduce the model's
own attention output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vgpt_cli.model.srau import covered_attention


def _model(captioner: Any):
    # a Captioner, or the ImageCaptioner of vgpt_cli.api (which holds one as .model)
    from vgpt_cli.model import Captioner

    model = captioner if isinstance(captioner, Captioner) else getattr(captioner, "model", None)
    if not isinstance(model, Captioner):
        raise TypeError(f"word_attention needs a Captioner (or vgpt_cli.api.ImageCaptioner), got "
                        f"{type(captioner).__name__}")
    return model


def _real_tokens(features: Tensor | np.ndarray, mask: Tensor | None) -> tuple[Tensor, int]:
    """One image's (N, C) features -> (1, N, C) float32 and the number of real (unpadded) tokens."""
    f = torch.as_tensor(features)
    if f.dim() == 3 and f.shape[0] == 1:
        f = f[0]
    if f.dim() != 2:
        raise ValueError(f"features must be one image's (N, C) token features, got shape {tuple(f.shape)}")
    n = f.shape[0]
    if mask is None:
        return f.float().unsqueeze(0), n
    m = torch.as_tensor(mask).to(torch.bool).flatten().cpu()
    if m.shape != (n,):
        raise ValueError(f"mask must have shape ({n},) (one flag per image token), got {tuple(m.shape)}")
    real = int(m.sum())
    # the model takes padding as a length (real tokens first), so only such a mask can be honoured
    if real == 0 or not bool(m[:real].all()):
        raise ValueError("mask must mark the real image tokens as a non-empty prefix (True... then False...), "
                         "as the feature store pads them")
    return f.float().unsqueeze(0), real


def grid_shape(n: int) -> tuple[int, int]:
    """The (H, W) square grid of n image tokens; ValueError when n tokens are not a square grid."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image tokens are not a square grid (H*W with H == W): the features hold "
                         "non-grid tokens (e.g. a class token) or come from a non-square input, so the "
                         "attention cannot be laid out over the image")
    return side, side


def attention_weights(captioner: Any, features: Tensor | np.ndarray, token_ids: Sequence[int],
                      mask: Tensor | None = None) -> Tensor:
    """Cross-attention weights of a teacher-forced pass: (layers, K levels, heads, T, N_real) float32 on
    the CPU, where row t is the attention while predicting token_ids[t] from BOS + token_ids[:t].
    Each row sums to 1 over the N_real real image tokens (padding gets none and is dropped)."""
    model = _model(captioner)
    f, real = _real_tokens(features, mask)
    if f.shape[-1] != model.config.d_in:
        raise ValueError(f"features are {f.shape[-1]} wide but the model takes {model.config.d_in}: they come "
                         "from another backbone than the model was trained on")
    ids = [int(t) for t in token_ids]
    layers = len(model.xattn)
    if not ids:
        return torch.zeros(layers, 0, 0, 0, real)
    device = next(model.parameters()).device
    f = f.to(device)
    lengths = torch.tensor([real], device=device)
    input_ids = torch.tensor([[model.bos_token_id, *ids[:-1]]], device=device)
    queries: dict[int, list[Tensor]] = {}

    def keep(i: int):
        return lambda _module, _inputs, out: queries.setdefault(i, []).append(out.detach())

    handles = [xa.q.register_forward_hook(keep(i)) for i, xa in enumerate(model.xattn)]
    was_training = model.training
    model.eval()  # no dropout: the attention of the model as it decodes
    try:
        with torch.inference_mode():
            memory = model.encode(f[:, :real], lengths)
            model(f[:, :real], lengths, input_ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if sorted(queries) != list(range(layers)) or any(len(q) != 1 for q in queries.values()):
        raise RuntimeError("the captioner's decoder no longer calls each block's xattn[i].q once per pass; "
                           "vgpt_cli/attention.py must follow the model's cross-attention")
    out = []
    for i in range(layers):
        k = memory.keys[i][0].float()                       # (K, h, N, hd)
        K, h, N, hd = k.shape
        q = queries[i][0][0].float().view(-1, h, hd)        # (T, h, hd)
        scores = torch.einsum("thd,khnd->khtn", q, k) / math.sqrt(hd)
        if model.xattn[i].coverage is not None:  # the penalty the model adds (srau.covered_attention)
            p, _ = covered_attention(scores.unsqueeze(2), model.xattn[i].coverage.detach().float())
            out.append(p.squeeze(2))
        else:
            out.append(scores.softmax(dim=-1))              # (K, h, T, N)
    return torch.stack(out).cpu()


def word_attention(captioner: Any, features: Tensor, token_ids: list[int], mask: Tensor | None = None) -> Tensor:
    """Per-token attention maps of a caption over one image: (len(token_ids), H, W) float32 on the CPU.

    captioner: a Captioner (or vgpt_cli.api.ImageCaptioner). features: that image's (N, C) feature tensor
    as the feature store or Backbone.features_for_images gives it (numpy works too). token_ids: the
    caption's tokens without BOS (EOS may be included: it gets a map too). mask: optional (N,) bool,
    True on real tokens (a prefix), for features padded in a batch; padding is left out of the grid.
    Map t is the cross-attention while predicting token_ids[t] given BOS + token_ids[:t], averaged over
    heads, encoder levels and decoder layers; it sums to 1 over the H*W grid (H*W = the real tokens,
    row-major as the backbone flattened them). ValueError when the tokens are not a square grid."""
    f = torch.as_tensor(features)
    n = f.shape[-2] if f.dim() >= 2 else 0
    real = n if mask is None else int(torch.as_tensor(mask).to(torch.bool).sum())
    H, W = grid_shape(real)  # before running the model: a clear error first
    weights = attention_weights(captioner, f, token_ids, mask)
    if weights.shape[3] == 0:
        return torch.zeros(0, H, W)
    return weights.mean(dim=(0, 1, 2)).reshape(-1, H, W).contiguous()


# --- does a word look at what it names? ---------------------------------------------------------------
def object_pixels(preprocess: Any, obj: dict[str, Any]) -> np.ndarray:
    """A shapes object's pixels as a backbone sees them: `preprocess` is its eval resize + crop (PIL image ->
    (3, h, w) uint8 tensor); returns the (h, w) bool mask over the area the token grid covers."""
    from vgpt_cli.data.shapes import object_mask

    return preprocess(object_mask(obj).convert("RGB"))[0].numpy() > 127


def region_cells(region: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h, w) bool pixel mask over the image the token grid covers -> (H, W) bool: the cells of the grid,
    laid evenly over the image, that hold any pixel of the region."""
    region = np.asarray(region, dtype=bool)
    if region.ndim != 2:
        raise ValueError(f"region must be an (h, w) pixel mask, got shape {region.shape}")
    (h, w), (H, W) = region.shape, grid
    rows, cols = np.nonzero(region)
    cells = np.zeros((H, W), dtype=bool)
    cells[(rows * H) // h, (cols * W) // w] = True
    return cells


def attention_peak_in_object(samples: Iterable[tuple[Tensor, np.ndarray]]) -> dict[str, float | int | None]:
    """How often a word's attention peaks on the object it names.

    samples: one (map (H, W), object pixel mask (h, w)) per object-naming word, the mask over the image
    as the backbone saw it (the area the grid covers). A word hits when its map's highest cell holds part
    of the object (region_cells). Returns {"attention_peak_in_object": the hit rate,
    "attention_peak_chance": the mean fraction of cells holding part of the object (the rate of a peak
    placed uniformly at random), "object_words": the number of samples}; rates are None without samples."""
    hits, chance, n = 0, 0.0, 0
    for grid, region in samples:
        grid = torch.as_tensor(grid)
        cells = region_cells(region, tuple(grid.shape))
        if not cells.any():
            raise ValueError("an object mask is empty: the object is outside the image the grid covers")
        peak = int(torch.argmax(grid.flatten()))
        hits += bool(cells.flat[peak])
        chance += float(cells.mean())
        n += 1
    if n == 0:
        return {"attention_peak_in_object": None, "attention_peak_chance": None, "object_words": 0}
    return {"attention_peak_in_object": hits / n, "attention_peak_chance": chance / n, "object_words": n}
