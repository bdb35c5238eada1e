"""The visual encoder: region/grid features -> K stacked levels (B, K, N, D)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vgpt_cli.errors import DataError


def padding_mask(lengths: Tensor, n: int) -> Tensor:
    """(B,) real lengths -> (B, N) bool, True on real tokens. Never derived from feature values."""
    if lengths.dim() != 1:
        raise DataError(f"lengths must have shape (B,), got {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > n).any()):
        raise DataError(f"visual lengths must be in 1..{n} (the feature count N), got "
                        f"min {int(lengths.min())} max {int(lengths.max())}")
    return torch.arange(n, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class VisualEncoder(nn.Module):
    """Linear(d_in -> D) + GELU + dropout + LayerNorm, then K post-norm transformer layers.

    Returns every layer's output stacked: (B, K, N, D). Padded tokens are masked as keys
    (their own outputs are computed but never attended to, here or in the decoder).
    """

    def __init__(self, d_in: int, d_model: int, layers: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(d_in, d_model)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(layers)
        ])

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        # features (B, N, d_in), mask (B, N) True = real
        x = self.norm(self.drop(self.act(self.proj(features))))  # (B, N, D)
        pad = ~mask  # nn.TransformerEncoderLayer: True = ignore this key
        levels = []
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
            levels.append(x)
        return torch.stack(levels, dim=1)  # (B, K, N, D)
