"""Encoder-decoder attention over the K encoder levels and the self-resurrecting gates (SRAU).

    C_k = EncDecAttn(LN1(A), LN1(E_k))          one attention module per block, shared over k
    g_k = sigmoid(W_k [A ; C_k] + b_k)          one gate layer per level
    O_k = 1[g_k > tau] g_k A + 1[1 - g_k > tau] (1 - g_k) C_k
    O   = (O_1 + ... + O_K) / sqrt(K)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def covered_attention(scores: Tensor, weight: Tensor, past: Tensor | None = None,
                      real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention with coverage: each head's scores minus weight[h] x the attention its earlier queries
    of the same caption gave each memory token (before this penalty, so all positions are computed at
    once in teacher forcing, and decoding carries one running sum).

    scores (G, h, R, T, N): logits with the memory mask applied, for R caption rows of T positions;
    weight (h,); past (G, h, R, N): the running sum of earlier steps (decoding), or None;
    real (G, 1, R, T, 1): 1 on real caption positions (a padded step adds no coverage), or None.
    Returns the attention (G, h, R, T, N) and the new running sum (G, h, R, N).
    """
    raw = scores.softmax(dim=-1)
    if real is not None:
        raw = raw * real
    seen = raw.cumsum(dim=3)
    before = seen - raw                       # exclusive: position t sees positions < t
    total = seen[:, :, :, -1]
    if past is not None:
        before = before + past.unsqueeze(3)
        total = total + past
    penalty = weight.view(1, -1, 1, 1, 1).to(scores.dtype) * before
    return (scores - penalty).softmax(dim=-1), total


class CrossAttention(nn.Module):
    """Multi-head attention of decoder states over the K memory levels, with shared projections.

    Keys/values of the memory are projected once per image (`project_memory`). Decoder rows may be
    `beams` consecutive copies per image: their queries are stacked along the query axis against
    the one copy of that image's memory, so beam search never copies the memory.

    coverage: None (the paper), or the initial per-head weight of a learned coverage penalty
    (`covered_attention`): a head is pushed away from the image tokens it already attended to while
    writing this caption, so that after naming one object it looks for the next.
    """

    def __init__(self, d_model: int, heads: int, dropout: float, coverage: float | None = None):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"cross-attention width {d_model} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)
        self.coverage = None if coverage is None else nn.Parameter(torch.full((heads,), float(coverage)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, beams: int,
               past: Tensor | None = None, real: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """q (G, h, beams*T, hd) against k, v (G, h, N, hd); mask (G, 1, 1, N), boolean (True = real) or
        additive. Without coverage: scaled_dot_product_attention, and no running sum. With it: past /
        real / the returned running sum as in `covered_attention`, rows laid out (G, h, beams, ...)."""
        if self.coverage is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        G, h, R, hd = q.shape
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p, total = covered_attention(scores.view(G, h, beams, R // beams, -1), self.coverage, past, real)
        return (p.view(G, h, R, -1) @ v), total

    def attention_probs(self, x: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """Where queries x (B, T, D) look: the attention over the memory's N tokens, mean over the K levels
        and the heads, (B, T, N) float32, with gradient. For a loss on where the model looks
        (train/attention_supervision.py); decoding never computes it. k (Bm, K, h, N, hd); mask (Bm, N)."""
        if self.coverage is not None:
            raise ValueError("attention_probs is the plain softmax attention; with coverage the model attends "
                             "otherwise (covered_attention): use one or the other")
        B, T, _ = x.shape
        Bm, K, h, N, hd = k.shape
        q = self.q(x).float().view(Bm, (B // Bm) * T, h, hd)
        scores = torch.einsum("brhd,bkhnd->bkhrn", q, k.float()) / math.sqrt(hd)
        scores = scores.masked_fill(~mask.view(Bm, 1, 1, 1, N), float("-inf"))
        return scores.softmax(dim=-1).mean(dim=(1, 2)).view(B, T, N)

    def project_memory(self, e: Tensor) -> tuple[Tensor, Tensor]:
        # e (B, K, N, D), already normalised by the block's LN1 -> k, v (B, K, h, N, hd)
        B, K, N, _ = e.shape
        k = self.k(e).view(B, K, N, self.heads, self.head_dim).transpose(2, 3)
        v = self.v(e).view(B, K, N, self.heads, self.head_dim).transpose(2, 3)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, past: Tensor | None = None,
                real: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        # x (B, T, D) with B = Bm * beams; k, v (Bm, K, h, N, hd); mask (Bm, N) True = real
        # -> C (B, K, T, D) and, with coverage, the running sum (see coverage_rows)
        B, T, D = x.shape
        Bm, K, h, N, hd = k.shape
        beams = B // Bm
        q = self.q(x).view(Bm, beams * T, h, hd).transpose(1, 2)  # (Bm, h, beams*T, hd)
        q = q.unsqueeze(1).expand(Bm, K, h, beams * T, hd).reshape(Bm * K, h, beams * T, hd)
        m = mask.view(Bm, 1, 1, 1, N).expand(Bm, K, 1, 1, N).reshape(Bm * K, 1, 1, N)
        y, total = self.attend(q, k.reshape(Bm * K, h, N, hd), v.reshape(Bm * K, h, N, hd), m, beams,
                               past, real)  # (Bm*K, h, beams*T, hd)
        y = y.view(Bm, K, h, beams, T, hd).permute(0, 3, 1, 4, 2, 5).reshape(B, K, T, D)
        return self.drop(self.o(y)), total


def coverage_rows(total: Tensor, Bm: int, K: int) -> Tensor:
    """A running coverage sum (Bm*K, h, beams, N), as attention makes it, -> (B, K, h, N) per decoder row."""
    _, h, beams, N = total.shape
    return total.view(Bm, K, h, beams, N).permute(0, 3, 1, 2, 4).reshape(Bm * beams, K, h, N)


def coverage_groups(rows: Tensor, Bm: int) -> Tensor:
    """The inverse of coverage_rows: (B, K, h, N) -> (Bm*K, h, beams, N)."""
    B, K, h, N = rows.shape
    return rows.view(Bm, B // Bm, K, h, N).permute(0, 2, 3, 1, 4).reshape(Bm * K, h, B // Bm, N)


def coverage_real(step_mask: Tensor, Bm: int, K: int) -> Tensor:
    """Real caption positions (B, T) -> (Bm*K, 1, beams, T, 1) floats for covered_attention."""
    B, T = step_mask.shape
    r = step_mask.float().view(Bm, 1, 1, B // Bm, T, 1)
    return r.expand(Bm, K, 1, B // Bm, T, 1).reshape(Bm * K, 1, B // Bm, T, 1)


class LevelGates(nn.Module):
    """The K gate layers of one block: g_k = sigmoid(W_k [A ; C_k] + b_k), W_k: Linear(2D -> D).

    Stored as one (K, D, 2D) weight and (K, D) bias (weight[k] is level k's Linear weight), so that
    all levels are evaluated in one batched matmul instead of K small ones.
    """

    def __init__(self, levels: int, d_model: int, init_bias: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(levels, d_model, 2 * d_model))
        self.bias = nn.Parameter(torch.zeros(levels, d_model))
        if init_bias is None:
            nn.init.normal_(self.weight, std=0.02)  # the authors' random init: g near 0.5 on average
        else:
            # Every gate starts at exactly sigmoid(init_bias), whatever the (large, unnormalised)
            # residual stream A holds: a large bias starts from the pretrained LM (with K = 1).
            nn.init.zeros_(self.weight)
            nn.init.constant_(self.bias, init_bias)

    @property
    def levels(self) -> int:
        return self.weight.shape[0]

    def level_logits(self, x: Tensor) -> Tensor:
        # x (K, R, 2D), level-major [A ; C_k] -> (K, R, D) before the sigmoid, the bias in the batched matmul
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def forward(self, a: Tensor, c: Tensor) -> Tensor:
        # a (B, T, D), c (B, K, T, D) -> g (B, K, T, D)
        x = torch.cat([a.unsqueeze(1).expand_as(c), c], dim=-1)  # (B, K, T, 2D)
        return torch.sigmoid(torch.einsum("bktj,kdj->bktd", x, self.weight) + self.bias[:, None, :])


def srau_combine(a: Tensor, c: Tensor, gates: LevelGates, tau: float,
                 want_gates: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """SRAU over K levels. a (B, T, D), c (B, K, T, D) -> (O (B, T, D), ling (B, T), vis (B, T)).

    ling / vis are the effective linguistic g*1[g > tau] and visual (1-g)*1[(1-g) > tau] gates,
    averaged over levels and channels (for the per-word analysis; None unless want_gates). The
    indicator only selects: where one branch is cut, gradient still reaches g through the other.
    """
    K = c.shape[1]
    g = gates(a, c)                          # (B, K, T, D)
    h = 1 - g
    zero = g.new_zeros(())
    g_ling = torch.where(g > tau, g, zero)
    g_vis = torch.where(h > tau, h, zero)
    o = (g_ling * a.unsqueeze(1) + g_vis * c).sum(dim=1) / math.sqrt(K)
    if not want_gates:
        return o, None, None
    return o, g_ling.detach().mean(dim=(1, 3)), g_vis.detach().mean(dim=(1, 3))


def residual_combine(a: Tensor, c: Tensor) -> Tensor:
    """The ungated baseline: O = A + (C_1 + ... + C_K) / K."""
    return a + c.mean(dim=1)
