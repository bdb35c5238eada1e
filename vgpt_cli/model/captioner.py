"""The captioner: visual encoder + a pretrained LM whose blocks get SRAU cross-attention.

Shapes: B batch, N visual tokens, K encoder levels, T caption tokens, D the LM width, V vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgpt_cli.errors import ConfigError, DataError
from vgpt_cli.model.artifact import CONFIG_FILE as CONFIG_FILE
from vgpt_cli.model.artifact import WEIGHTS_FILE as WEIGHTS_FILE
from vgpt_cli.model.artifact import load_folder, save_folder
from vgpt_cli.model.config import CaptionerConfig
from vgpt_cli.model.decode_state import DecodeState as DecodeState
from vgpt_cli.model.decode_state import VisualMemory as VisualMemory
from vgpt_cli.model.encoder import VisualEncoder, padding_mask
from vgpt_cli.model.lm import LMAdapter, adapter_for, as_float32, load_language_model
from vgpt_cli.model.lm_reference import reference_for
from vgpt_cli.model.srau import (
    CrossAttention,
    LevelGates,
    coverage_groups,
    coverage_real,
    coverage_rows,
    residual_combine,
    srau_combine,
)


@dataclass
class CaptionerOutput:
    logits: Tensor                  # (B, T, V)
    loss: Tensor | None = None      # mean cross-entropy over tokens whose label is not -100
    gates: Tensor | None = None     # (B, T, 2): [..., 0] linguistic, [..., 1] visual (SRAU only)
    attention: list[Tensor] | None = None  # per block (B, T, N): where each position's cross-attention looks


class Captioner(nn.Module):
    """VisualGPT: a pretrained causal LM as caption decoder, joined to image features by SRAU."""

    def __init__(self, config: CaptionerConfig, lm: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config.validate()
        self.lm = lm
        self.adapter: LMAdapter = adapter_for(lm)
        self.tokenizer = tokenizer
        a = self.adapter
        D, heads = a.hidden_size, a.num_heads
        enc_heads = config.encoder_heads or heads
        if D % enc_heads:
            raise ConfigError(f"encoder_heads={enc_heads} does not divide the LM width {D}: choose a divisor")
        self.encoder = VisualEncoder(config.d_in, D, config.encoder_layers, enc_heads, config.encoder_ffn,
                                     config.encoder_dropout)
        self.xattn = nn.ModuleList([CrossAttention(D, heads, config.cross_attn_dropout, config.coverage)
                                    for _ in range(a.num_layers)])
        if config.gating == "srau":
            self.gates = nn.ModuleList([LevelGates(config.encoder_layers, D, config.gate_init_bias) for _ in range(a.num_layers)])
        else:
            self.gates = None
        self._init_new()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = a.special_tokens(tokenizer)
        # A first training phase may run soft gates (tau 0); the config keeps the architecture's tau.
        self.tau_override: float | None = None
        # What the model folder carries beside the weights (artifact.py): the decoding settings it was
        # selected with (DecodeOptions fields; empty: the decoder's defaults), how images become its
        # features (the feature store's record; None: not known), the caption bank, and notes from loading
        # an older folder.
        self.generation: dict[str, Any] = {}
        self.preprocessor: dict[str, Any] | None = None
        self.caption_bank: Any = None  # the training images' captions for consensus reranking (decode/consensus.py)
        self.load_notes: list[str] = []
        # Inference runs cross-attention + SRAU fused (`_cross_srau`, the same maths in fewer kernels);
        # False runs the training modules, e.g. as the tests' independent reference.
        self.fused_inference = True
        # Where the LM's pretrained weights come from (lm_reference.py): while unchanged, not copied on save.
        self.lm_reference: dict[str, str] | None = None
        # fp32 as trained, or the narrower weights vgpt_cli.model.precision.narrow_model made at load time
        self.precision = "fp32"

    def _init_new(self) -> None:
        # New parameters: small normal weights as in GPT-2 (std 0.02), zero biases; gates start near 0.5
        # (LevelGates initialises itself the same way).
        for m in self.xattn.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: CaptionerConfig, lm: nn.Module | None = None, tokenizer: Any = None) -> Captioner:
        """Build from a config, loading `config.lm` (or wrapping the given in-memory HF causal LM)."""
        config.validate()
        reference = None
        if lm is None:
            lm, loaded_tok = load_language_model(config.lm, config.lm_init)  # float32 already
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
            if config.lm_init == "pretrained":
                reference = reference_for(config.lm, lm)
        if tokenizer is None:
            raise ConfigError("Captioner.from_config(lm=...) also needs tokenizer=...: the LM's tokenizer")
        model = cls(config, as_float32(lm), tokenizer)
        model.lm_reference = reference
        return model

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"lm": the pretrained LM's parameters, "new": encoder, cross-attention, gates}."""
        lm_ids = {id(p) for p in self.lm.parameters()}
        new = [p for p in self.parameters() if id(p) not in lm_ids]
        return {"lm": list(self.lm.parameters()), "new": new}

    # ------------------------------------------------------------------ tokens
    def tokenize(self, captions: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Captions -> input_ids (BOS w1..wn), labels (w1..wn EOS, already shifted; -100 on padding) and
        attention_mask, at most `max_length` tokens a row (default the config's): vgpt_cli.text.caption_tensors."""
        from vgpt_cli.text import caption_tensors

        return caption_tensors(self.tokenizer, captions, max_length or self.config.max_length,
                               self.bos_token_id, self.eos_token_id, self.pad_token_id)

    # ------------------------------------------------------------------ encoder
    def encode(self, features: Tensor, lengths: Tensor) -> VisualMemory:
        """Visual encoder + every decoder layer's cross-attention keys/values, computed once."""
        if features.dim() != 3 or features.shape[-1] != self.config.d_in:
            raise DataError(f"features must have shape (B, N, {self.config.d_in}), got {tuple(features.shape)}")
        lengths = lengths.to(features.device)
        if lengths.shape != features.shape[:1]:
            raise DataError(f"lengths must have shape ({features.shape[0]},), got {tuple(lengths.shape)}")
        mask = padding_mask(lengths, features.shape[1])
        e = self.encoder(features.to(self.adapter.embedding_dtype()), mask)  # (B, K, N, D)
        keys, values = [], []
        for i in range(self.num_layers):
            k, v = self.xattn[i].project_memory(self.adapter.ln1(i, e))
            keys.append(k)
            values.append(v)
        return VisualMemory(keys, values, mask)

    # ------------------------------------------------------------------ decoder
    def _decode(self, input_ids: Tensor, memory: VisualMemory, key_mask: Tensor | None,
                cache: Tensor | None, past: int, want_gates: bool, xmask: Tensor | None = None,
                coverage: Tensor | None = None, want_attention: bool = False):
        """Run the SRAU decoder over new tokens input_ids (B, T) after `past` cached tokens.

        key_mask (B, >= past + T): True where a token is real; None: every token is real, and then no
        mask is built at all (a causal flag, or for one new token nothing: it sees every cached key),
        so the step never asks the device whether the mask has holes.
        cache: None (teacher forcing: nothing is kept), or the (layers, 2, B, H_kv, capacity, hd) buffer
        of DecodeState, whose positions past..past+T-1 are written in place.
        xmask: `_memory_mask(memory)` when the caller keeps it across steps.
        coverage: with config.coverage, the (layers, B, K, heads, N) attention of the steps before (None at
        the first step or in teacher forcing).
        want_attention: also return, per block, the cross-attention of every position over the image tokens
        (B, T, N), mean over levels and heads (CrossAttention.attention_probs), else None.
        Positions are step indices. Returns logits (B, T, V), gates (B, T, 2) or None, the new coverage
        (None without config.coverage) and the attention.
        """
        a = self.adapter
        B, T = input_ids.shape
        L0, L = past, past + T
        if a.max_positions is not None and L > a.max_positions:
            raise ValueError(f"{L} caption tokens exceed the LM's {a.max_positions} positions; "
                             "decode fewer tokens (max_length)")
        positions = torch.arange(L0, L, device=input_ids.device)
        h = a.embed(input_ids, positions)
        ctx = a.position_context(h, positions)
        allowed, is_causal = None, False
        if key_mask is not None:
            # (B, 1, T, L): causal and real keys; a query always sees itself so that a padded row
            # never has an all-masked softmax (its output is never used)
            causal = torch.ones(T, L, dtype=torch.bool, device=h.device).tril(L0)
            diag = torch.zeros_like(causal)
            diag[:, L0:] = torch.eye(T, dtype=torch.bool, device=h.device)
            allowed = ((causal & key_mask[:, None, :L]) | diag).unsqueeze(1)
        elif T > 1 and L0 == 0:
            is_causal = True
        elif T > 1:
            allowed = torch.ones(T, L, dtype=torch.bool, device=h.device).tril(L0)
        ling_sum = vis_sum = None
        tau = self.config.tau if self.tau_override is None else self.tau_override
        rep = a.num_heads // a.num_kv_heads
        # inference takes the fused cross-attention + SRAU path (same maths, fewer kernels)
        fused = (self.fused_inference and self.gates is not None and not self.training
                 and not torch.is_grad_enabled() and not want_attention)
        if fused and xmask is None:
            xmask = self._memory_mask(memory)
        covering = self.config.coverage is not None
        Bm = memory.batch_size
        real = None
        if covering and key_mask is not None:
            real = coverage_real(key_mask[:, L0:L], Bm, memory.keys[0].shape[1])
        new_coverage = []
        attention: list[Tensor] | None = [] if want_attention else None
        for i in range(self.num_layers):
            past_i = None if coverage is None else coverage_groups(coverage[i], Bm)
            x = a.ln1(i, h)
            q, k, v = a.qkv(i, x, ctx)  # q (B, H, T, hd), k/v (B, H_kv, T, hd)
            if cache is not None:
                cache[i, 0, :, :, L0:L] = k
                cache[i, 1, :, :, L0:L] = v
                k, v = cache[i, 0, :, :, :L], cache[i, 1, :, :, :L]
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            p = a.attn_dropout(i) if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal, dropout_p=p,
                                               scale=a.attn_scale(i))
            y = y.transpose(1, 2).reshape(B, T, -1)
            A = h + a.attn_out(i, y)                                     # (B, T, D)
            if fused:
                o, ling, vis, total = self._cross_srau(i, A, memory, xmask, tau, want_gates, past_i, real)
                if covering:
                    new_coverage.append(coverage_rows(total, Bm, memory.keys[i].shape[1]))
                if want_gates:
                    ling_sum = ling if ling_sum is None else ling_sum + ling
                    vis_sum = vis if vis_sum is None else vis_sum + vis
                h = o + a.mlp(i, a.ln2(i, o))
                continue
            x_in = a.ln1(i, A)
            C, total = self.xattn[i](x_in, memory.keys[i], memory.values[i], memory.mask, past_i,
                                     real)  # (B, K, T, D)
            if attention is not None:
                attention.append(self.xattn[i].attention_probs(x_in, memory.keys[i], memory.mask))
            if covering:
                new_coverage.append(coverage_rows(total, Bm, memory.keys[i].shape[1]))
            if self.gates is not None:
                o, ling, vis = srau_combine(A, C, self.gates[i], tau, want_gates)
                if want_gates:
                    ling_sum = ling if ling_sum is None else ling_sum + ling
                    vis_sum = vis if vis_sum is None else vis_sum + vis
            else:
                o = residual_combine(A, C)
            h = o + a.mlp(i, a.ln2(i, o))
        logits = a.head(h)
        gates = None
        if want_gates and ling_sum is not None:
            gates = torch.stack([ling_sum, vis_sum], dim=-1) / self.num_layers
        return logits, gates, (torch.stack(new_coverage) if covering else None), attention

    def _memory_mask(self, memory: VisualMemory) -> Tensor:
        """The memory's padding as the additive mask (Bm*K, 1, 1, N) of the cross-attention's
        scaled_dot_product_attention (0 on real tokens, -inf on padding): what it would otherwise
        rebuild from the boolean mask in every layer of every step."""
        Bm, K, _, N, _ = memory.keys[0].shape
        m = torch.zeros(Bm, N, dtype=memory.keys[0].dtype, device=memory.mask.device)
        m.masked_fill_(~memory.mask, float("-inf"))
        return m.view(Bm, 1, 1, 1, N).expand(Bm, K, 1, 1, N).reshape(Bm * K, 1, 1, N)

    def _cross_srau(self, i: int, A: Tensor, memory: VisualMemory, xmask: Tensor, tau: float, want_gates: bool,
                    past: Tensor | None = None, real: Tensor | None = None):
        """Block i's cross-attention and SRAU combine at inference: the maths of CrossAttention.forward
        + srau_combine in fewer kernels. The K levels stay level-major (K, B*T, D) from the output
        projection through the gates (no permutes), the gate bias rides in the batched matmul, and
        each threshold is one F.threshold (x if x > tau else 0, i.e. torch.where(x > tau, x, 0)).
        A (B, T, D) -> (O (B, T, D), ling (B, T), vis (B, T)) like srau_combine, and the coverage sum
        (CrossAttention.attend)."""
        xa, gates = self.xattn[i], self.gates[i]
        B, T, D = A.shape
        k, v = memory.keys[i], memory.values[i]
        Bm, K, h, N, hd = k.shape
        beams, R = B // Bm, B * T
        q = xa.q(self.adapter.ln1(i, A)).view(Bm, beams * T, h, hd).transpose(1, 2)
        q = q.unsqueeze(1).expand(Bm, K, h, beams * T, hd).reshape(Bm * K, h, beams * T, hd)
        y, total = xa.attend(q, k.reshape(Bm * K, h, N, hd), v.reshape(Bm * K, h, N, hd), xmask, beams,
                             past, real)                             # (Bm*K, h, beams*T, hd)
        y = y.view(Bm, K, h, R // Bm, hd).permute(1, 0, 3, 2, 4).reshape(K, R, D)
        c = xa.o(y)                                                          # (K, R, D): C_k
        a = A.reshape(1, R, D)
        x = torch.cat([a.expand(K, R, D), c], dim=-1)                        # (K, R, 2D): [A ; C_k]
        g = gates.level_logits(x).sigmoid_()
        ling = F.threshold(g, tau, 0.0)
        vis = F.threshold(g.neg_().add_(1), tau, 0.0)                        # g is now 1 - g
        means = (ling.mean(dim=(0, 2)).view(B, T), vis.mean(dim=(0, 2)).view(B, T)) if want_gates else (None, None)
        o = (ling.mul_(a).add_(vis.mul_(c))).sum(dim=0).div_(math.sqrt(K))
        return (o.view(B, T, D), *means, total)

    def forward(self, features: Tensor, lengths: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, return_gates: bool = False,
                label_smoothing: float = 0.0, image_index: Tensor | None = None,
                return_attention: bool = False) -> CaptionerOutput:
        """Teacher-forced pass. features (B, N, d_in), lengths (B,), input_ids (B, T) -> logits (B, T, V).

        image_index (B,): caption row b reads image row image_index[b] of features (I, N, d_in), so an
        image with several captions in the batch is encoded once. return_attention: CaptionerOutput.attention
        holds each block's (B, T, N) cross-attention (mean over levels and heads), for a loss on where the
        model looks."""
        check_rows(features.shape[0], input_ids.shape[0], image_index)
        memory = self.encode(features, lengths)
        if image_index is not None:
            memory = memory.index_select(image_index.to(memory.mask.device))
        key_mask = None if attention_mask is None else attention_mask.to(input_ids.device).bool()
        logits, gates, _, attention = self._decode(input_ids, memory, key_mask, None, 0, return_gates,
                                                   want_attention=return_attention)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   label_smoothing=label_smoothing)
        return CaptionerOutput(logits, loss, gates, attention)

    # ------------------------------------------------------------------ incremental decoding
    def start_decoding(self, memory: VisualMemory, beams: int = 1, max_length: int | None = None) -> DecodeState:
        """An empty cache for memory.batch_size * beams rows (row b reads memory row b // beams).

        max_length: the tokens that will be fed, when known: the cache is allocated for that many
        at once (else it starts small and doubles when full).
        """
        if beams < 1:
            raise ValueError(f"beams must be >= 1, got {beams}")
        return DecodeState(memory, beams, capacity_hint=max_length or 0)

    @staticmethod
    def expand_memory(memory: VisualMemory, beams: int) -> VisualMemory:
        """Memory with each row repeated `beams` times (not needed: start_decoding(memory, beams) shares it)."""
        idx = torch.arange(memory.batch_size, device=memory.mask.device).repeat_interleave(beams)
        return memory.index_select(idx)

    def _cache_for(self, state: DecodeState, B: int, T: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The state's cache buffer (and key mask) with room for T more tokens: allocated at the first
        step (capacity_hint tokens, at least 16), doubled when full."""
        a, L = self.adapter, state.length + T
        buf, mask = state.buffer, state.key_mask
        cap = 0 if buf is None else buf.shape[4]
        if L <= cap:
            return buf, mask
        new_cap = max(L, state.capacity_hint, 16, 2 * cap)
        hd = a.hidden_size // a.num_heads
        new = like.new_empty(self.num_layers, 2, B, a.num_kv_heads, new_cap, hd)
        if buf is not None:
            new[..., :state.length, :] = buf[..., :state.length, :]
        if mask is not None:
            grown = mask.new_ones(B, new_cap)
            grown[:, :state.length] = mask[:, :state.length]
            mask = grown
        return new, mask

    def decode_step(self, token_ids: Tensor, state: DecodeState, attention_mask: Tensor | None = None,
                    return_gates: bool = False) -> tuple[Tensor, DecodeState]:
        """Feed one token per row: token_ids (B, 1) -> (logits (B, V), new state).

        attention_mask (B, 1): 0 marks a padding token that later tokens must not attend to.
        With return_gates, the new state's `gates` holds this step's (B, 2) linguistic/visual gates.
        The step writes into `state`'s cache buffer: continue from the returned state only.
        """
        B = state.memory.batch_size * state.beams
        if token_ids.dim() != 2 or token_ids.shape != (B, 1):
            raise ValueError(f"token_ids must have shape ({B}, 1), got {tuple(token_ids.shape)}")
        L0 = state.length
        like = state.memory.keys[0] if state.memory.keys else state.memory.mask.float()
        buf, key_mask = self._cache_for(state, B, 1, like)
        padded = state.padded or attention_mask is not None
        if padded:
            if key_mask is None:  # the first mask given: every earlier token was real
                key_mask = torch.ones(B, buf.shape[4], dtype=torch.bool, device=token_ids.device)
            step = (torch.ones(B, dtype=torch.bool, device=token_ids.device) if attention_mask is None
                    else attention_mask.to(token_ids.device).bool().view(B))
            key_mask[:, L0] = step
        xmask = state.xmask if state.xmask is not None else self._memory_mask(state.memory)
        logits, gates, coverage, _ = self._decode(token_ids, state.memory, key_mask if padded else None, buf, L0,
                                               return_gates, xmask, state.coverage)
        spare = state.spare if buf is state.buffer else None  # a grown buffer leaves the old spare behind
        new = DecodeState(state.memory, state.beams, buf, key_mask, gates[:, -1].float() if gates is not None else None,
                          L0 + 1, padded, state.capacity_hint, xmask, spare, coverage)
        return logits[:, -1].float(), new

    # ------------------------------------------------------------------ save / load (artifact.py)
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model folder (vgpt_cli.model.artifact): weights, config, decoding settings,
        preprocessing record and tokenizer, each file atomically."""
        return save_folder(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Captioner:
        """Load a model folder (or an older layout). Needs neither the hub nor the training data."""
        return load_folder(cls, directory)


def check_rows(images: int, captions: int, image_index: Tensor | None) -> None:
    """Captions that do not line up with the images are refused in one line (not a reshape error deep inside)."""
    if image_index is None:
        if images != captions:
            raise ValueError(f"{captions} caption rows for {images} image rows: pass image_index (B,), the image row "
                             "of each caption (train.data.collate gives it as Batch.image_index), or one image per caption")
    elif image_index.shape != (captions,) or (captions and image_index.device.type == "cpu"  # no GPU sync per step
                                               and not 0 <= int(image_index.min()) <= int(image_index.max()) < images):
        raise ValueError(f"image_index must hold one image row in [0, {images}) for each of the {captions} captions, "
                         f"got shape {tuple(image_index.shape)}")
