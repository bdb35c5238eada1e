"""The captioner: visual encoder + a pretrained LM whose blocks get SRAU cross-attention.

Shapes: B batch, N visual tokens, K encoder levels, T caption tokens, D the LM width, V vocabulary.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgpt_cli.errors import ConfigError, DataError, ModelLoadError
from vgpt_cli.model.config import CaptionerConfig
from vgpt_cli.model.encoder import VisualEncoder, padding_mask
from vgpt_cli.model.lm import LMAdapter, adapter_for, as_float32, load_language_model
from vgpt_cli.model.srau import CrossAttention, LevelGates, residual_combine, srau_combine

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vgpt-captioner"
FORMAT_VERSION = 1


@dataclass
class CaptionerOutput:
    logits: Tensor                  # (B, T, V)
    loss: Tensor | None = None      # mean cross-entropy over tokens whose label is not -100
    gates: Tensor | None = None     # (B, T, 2): [..., 0] linguistic, [..., 1] visual (SRAU only)


@dataclass
class VisualMemory:
    """What decoding needs from one batch of images, computed once by `Captioner.encode`."""

    keys: list[Tensor]     # per decoder layer: (B, K, heads, N, head_dim), LN1 and projection applied
    values: list[Tensor]
    mask: Tensor           # (B, N) True on real visual tokens

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def index_select(self, idx: Tensor) -> VisualMemory:
        return VisualMemory([k.index_select(0, idx) for k in self.keys],
                            [v.index_select(0, idx) for v in self.values], self.mask.index_select(0, idx))


@dataclass
class DecodeState:
    """Incremental-decoding state: the self-attention cache plus the (shared) visual memory.

    Rows are `beams` consecutive copies per memory row: row b reads memory row b // beams.
    """

    memory: VisualMemory
    beams: int
    cache: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per layer (B, H_kv, L, hd) k and v
    key_mask: Tensor | None = None    # (B, L) True where the cached token is real
    gates: Tensor | None = None       # (B, 2) of the last step, when asked for

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def reorder(self, beam_idx: Tensor) -> DecodeState:
        """New row b continues old row beam_idx[b] (beam search). Returns a new state.

        Reordering within each image's group of `beams` rows (what beam search does) touches only
        the self-attention cache; a row taken from another image's group makes the memory
        follow (one index_select of the memory, then one memory row per decoder row).
        """
        beam_idx = beam_idx.to(device=self.memory.mask.device, dtype=torch.long)
        B = self.memory.batch_size * self.beams
        if beam_idx.shape != (B,):
            raise ValueError(f"beam_idx must have shape ({B},), got {tuple(beam_idx.shape)}")
        memory, beams = self.memory, self.beams
        group = torch.arange(B, device=beam_idx.device) // beams
        if not torch.equal(beam_idx // beams, group):
            memory, beams = memory.index_select(beam_idx // self.beams), 1
        cache = [(k.index_select(0, beam_idx), v.index_select(0, beam_idx)) for k, v in self.cache]
        key_mask = None if self.key_mask is None else self.key_mask.index_select(0, beam_idx)
        gates = None if self.gates is None else self.gates.index_select(0, beam_idx)
        return DecodeState(memory, beams, cache, key_mask, gates)


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
        self.xattn = nn.ModuleList([CrossAttention(D, heads, config.cross_attn_dropout)
                                    for _ in range(a.num_layers)])
        if config.gating == "srau":
            self.gates = nn.ModuleList([LevelGates(config.encoder_layers, D, config.gate_init_bias) for _ in range(a.num_layers)])
        else:
            self.gates = None
        self._init_new()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = a.special_tokens(tokenizer)
        # Training may run a first phase with soft gates (tau 0) before the configured threshold; the
        # config keeps the architecture's tau, so anything saved or decoded later uses that.
        self.tau_override: float | None = None
        # The decoding settings the model was validated and selected with (beam_size, max_length,
        # min_length, length_penalty), saved in config.json as "generation", like transformers'
        # generation_config; vgpt_cli.runtime.decode_options applies them. Empty: the decoder's defaults.
        self.generation: dict[str, Any] = {}

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
        if lm is None:
            lm, loaded_tok = load_language_model(config.lm, config.lm_init)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if tokenizer is None:
            raise ConfigError("Captioner.from_config(lm=...) also needs tokenizer=...: the LM's tokenizer")
        return cls(config, as_float32(lm), tokenizer)

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
        """Captions -> input_ids (BOS w1..wn), labels (w1..wn EOS; -100 on padding), attention_mask.

        labels are already shifted: labels[:, t] is the target of position t. At most `max_length`
        tokens per row; words are cut so that EOS always stays. Rows are right-padded with pad id.
        """
        max_length = max_length or self.config.max_caption_tokens
        if max_length < 2:
            raise ConfigError(f"max_length={max_length}: needs room for a word and EOS (>= 2)")
        if not captions:
            raise DataError("tokenize() got no captions: pass a non-empty list of strings")
        rows = []
        for text in captions:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        T = max(len(r) - 1 for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r) - 1
            input_ids[b, :n] = torch.tensor(r[:-1])
            labels[b, :n] = torch.tensor(r[1:])
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ encoder
    def encode(self, features: Tensor, lengths: Tensor) -> VisualMemory:
        """Visual encoder + every decoder layer's cross-attention keys/values, computed once."""
        if features.dim() != 3 or features.shape[-1] != self.config.d_in:
            raise DataError(f"features must have shape (B, N, {self.config.d_in}), got {tuple(features.shape)}")
        lengths = lengths.to(features.device)
        if lengths.shape != features.shape[:1]:
            raise DataError(f"lengths must have shape ({features.shape[0]},), got {tuple(lengths.shape)}")
        mask = padding_mask(lengths, features.shape[1])
        e = self.encoder(features.float(), mask)  # (B, K, N, D)
        keys, values = [], []
        for i in range(self.num_layers):
            k, v = self.xattn[i].project_memory(self.adapter.ln1(i, e))
            keys.append(k)
            values.append(v)
        return VisualMemory(keys, values, mask)

    # ------------------------------------------------------------------ decoder
    def _decode(self, input_ids: Tensor, memory: VisualMemory, key_mask: Tensor,
                past: list[tuple[Tensor, Tensor]] | None, want_gates: bool):
        """Run the SRAU decoder over new tokens input_ids (B, T) after `past` cached tokens.

        key_mask (B, L_past + T): True where a token is real. Positions are step indices.
        Returns logits (B, T, V), the new cache, gates (B, T, 2) or None.
        """
        a = self.adapter
        B, T = input_ids.shape
        L0 = 0 if not past else past[0][0].shape[2]
        if a.max_positions is not None and L0 + T > a.max_positions:
            raise ValueError(f"{L0 + T} caption tokens exceed the LM's {a.max_positions} positions; "
                             "decode fewer tokens (max_caption_tokens)")
        positions = torch.arange(L0, L0 + T, device=input_ids.device)
        h = a.embed(input_ids, positions)
        ctx = a.position_context(h, positions)
        # self-attention mask (B, 1, T, L0+T): causal and real keys; a query always sees itself so
        # that a padded row never has an all-masked softmax (its output is never used).
        use_causal_flag = L0 == 0 and bool(key_mask.all())
        allowed = None
        if not use_causal_flag:
            causal = torch.ones(T, L0 + T, dtype=torch.bool, device=h.device).tril(L0)
            diag = torch.zeros_like(causal)
            diag[:, L0:] = torch.eye(T, dtype=torch.bool, device=h.device)
            allowed = ((causal & key_mask[:, None, :].bool()) | diag).unsqueeze(1)
        new_cache = []
        ling_sum = vis_sum = None
        tau = self.config.tau if self.tau_override is None else self.tau_override
        rep = a.num_heads // a.num_kv_heads
        for i in range(self.num_layers):
            x = a.ln1(i, h)
            q, k, v = a.qkv(i, x, ctx)  # q (B, H, T, hd), k/v (B, H_kv, T, hd)
            if past:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            new_cache.append((k, v))
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            p = a.attn_dropout(i) if self.training else 0.0
            if use_causal_flag:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=a.attn_scale(i))
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=a.attn_scale(i))
            y = y.transpose(1, 2).reshape(B, T, -1)
            A = h + a.attn_out(i, y)                                     # (B, T, D)
            C = self.xattn[i](a.ln1(i, A), memory.keys[i], memory.values[i], memory.mask)  # (B, K, T, D)
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
        return logits, new_cache, gates

    def forward(self, features: Tensor, lengths: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, return_gates: bool = False,
                label_smoothing: float = 0.0, image_index: Tensor | None = None) -> CaptionerOutput:
        """Teacher-forced pass. features (B, N, d_in), lengths (B,), input_ids (B, T) -> logits (B, T, V).

        image_index (B,): caption row b reads image row image_index[b] of features (I, N, d_in), so an
        image with several captions in the batch is encoded once."""
        memory = self.encode(features, lengths)
        if image_index is not None:
            memory = memory.index_select(image_index.to(memory.mask.device))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits, _, gates = self._decode(input_ids, memory, attention_mask.to(input_ids.device).bool(), None,
                                        return_gates)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   label_smoothing=label_smoothing)
        return CaptionerOutput(logits, loss, gates)

    # ------------------------------------------------------------------ incremental decoding
    def start_decoding(self, memory: VisualMemory, beams: int = 1) -> DecodeState:
        """An empty cache for memory.batch_size * beams rows (row b reads memory row b // beams)."""
        if beams < 1:
            raise ValueError(f"beams must be >= 1, got {beams}")
        return DecodeState(memory, beams)

    @staticmethod
    def expand_memory(memory: VisualMemory, beams: int) -> VisualMemory:
        """Memory with each row repeated `beams` times (not needed: start_decoding(memory, beams) shares it)."""
        idx = torch.arange(memory.batch_size, device=memory.mask.device).repeat_interleave(beams)
        return memory.index_select(idx)

    def decode_step(self, token_ids: Tensor, state: DecodeState, attention_mask: Tensor | None = None,
                    return_gates: bool = False) -> tuple[Tensor, DecodeState]:
        """Feed one token per row: token_ids (B, 1) -> (logits (B, V), new state).

        attention_mask (B, 1): 0 marks a padding token that later tokens must not attend to.
        With return_gates, the new state's `gates` holds this step's (B, 2) linguistic/visual gates.
        """
        B = state.memory.batch_size * state.beams
        if token_ids.dim() != 2 or token_ids.shape != (B, 1):
            raise ValueError(f"token_ids must have shape ({B}, 1), got {tuple(token_ids.shape)}")
        step_mask = (torch.ones_like(token_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(token_ids.device).bool().view(B, 1))
        key_mask = step_mask if state.key_mask is None else torch.cat([state.key_mask, step_mask], dim=1)
        logits, cache, gates = self._decode(token_ids, state.memory, key_mask, state.cache or None, return_gates)
        new = DecodeState(state.memory, state.beams, cache, key_mask, gates[:, -1] if gates is not None else None)
        return logits[:, -1], new

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors + the tokenizer files into `directory` (atomically per file)."""
        from safetensors.torch import save_model

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "captioner": self.config.to_dict(),
            "lm_family": self.adapter.family,
            "lm_config": {k: v for k, v in self.lm.config.to_dict().items() if k != "quantization_config"},
            "special_tokens": {"bos": self.bos_token_id, "eos": self.eos_token_id, "pad": self.pad_token_id},
        }
        if self.generation:
            meta["generation"] = dict(self.generation)
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".safetensors.tmp")
        os.close(fd)
        try:
            # save_model drops the duplicate of tied tensors (GPT-2 lm_head = wte) and restores them on load
            save_model(self, tmp, metadata={"format": "pt"})
            os.replace(tmp, out / WEIGHTS_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.tokenizer.save_pretrained(str(out))
        tmpj = out / (CONFIG_FILE + ".tmp")
        tmpj.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmpj, out / CONFIG_FILE)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Captioner:
        """Load a folder written by save_pretrained. Needs neither the hub nor the training data."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not d.is_dir():
            raise ModelLoadError(f"{d}: model folder not found; give a folder written by training "
                                 f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: missing; the model folder must hold the {CONFIG_FILE} "
                                 "written with the weights")
        try:
            meta = json.loads(cfg_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            config = CaptionerConfig.from_dict(meta["captioner"], source=str(cfg_path))
            lm_cfg = dict(meta["lm_config"])
            model_type = lm_cfg.pop("model_type")
            generation = _generation_block(meta.get("generation"))
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ModelLoadError(f"{cfg_path}: not a valid vgpt captioner config ({exc}); "
                                 "re-save the model or point to the right folder") from exc
        if not w_path.is_file():
            raise ModelLoadError(f"{w_path}: weights file missing; copy {WEIGHTS_FILE} from the training run "
                                 "folder next to its config.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{d}: cannot load the tokenizer files ({exc}); they are written by "
                                 "save_pretrained next to config.json") from exc
        if len(tokenizer) < 2:
            raise ModelLoadError(f"{d}: the tokenizer files are missing or empty (tokenizer.json)")
        lm_config = AutoConfig.for_model(model_type, **lm_cfg)
        # Build the LM skeleton without initialising weights that the file will overwrite.
        lm = AutoModelForCausalLM.from_config(lm_config, dtype=torch.float32)
        model = cls(config, lm, tokenizer)
        try:
            load_model(model, str(w_path), strict=True)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{w_path}: unreadable or corrupt weights file ({exc}); re-save the "
                                 "model or copy the file again") from exc
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelLoadError(f"{w_path}: the weights do not match {cfg_path} ({first} ...); the two files "
                                 "come from different models") from exc
        model.generation = generation
        model.eval()
        return model


GENERATION_KEYS = {"beam_size": int, "max_length": int, "min_length": int, "length_penalty": float}


def _generation_block(block: Any) -> dict[str, Any]:
    """The saved generation block, checked: known keys with numbers of the right kind."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError("generation must be an object")
    out: dict[str, Any] = {}
    for key, value in block.items():
        kind = GENERATION_KEYS.get(key)
        if kind is None:
            raise ValueError(f"unknown generation setting {key!r} (known: {', '.join(GENERATION_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"generation.{key}={value!r} is not a {kind.__name__}")
        out[key] = kind(value)
    return out
