"""
model.py -- a Qwen2 / Llama decoder in plain PyTorch that loads Hugging Face checkpoints.

One `Transformer` covers Qwen2, Qwen2.5(-Math), DeepSeek-R1-Distill-Qwen and Llama 3.x: RMSNorm, RoPE
(default, linear and llama3 scaling), grouped-query attention through scaled_dot_product_attention,
SwiGLU MLP, optional q/k/v (and o, mlp) bias, tied or untied embeddings. Module and parameter names
mirror transformers' (model.embed_tokens, model.layers.N.self_attn.q_proj, ..., model.norm, lm_head), so
checkpoints load 1:1 and LoRA adapter keys match PEFT's.

What else lives here:
  * load_model(name)       local HF folder (single or sharded safetensors), hub id, or random:<preset>
  * save_model(model, dir)  write config.json + model.safetensors (HF layout); load_tokenizer, eos_token_ids
  * Transformer.forward     left-padded batches, an optional KV cache; a hook slot after any layer (the SAE
                            goes there); stop after layer L (activation collection needs no higher layers)
  * Transformer.logprobs, token_logprobs, chunked_kl   per-token log-probs and KL in row chunks, never a
                            float32 [B, T, V] tensor (their hand-written gradient is the last section)
Sampling (generate, the CUDA-graph decoder) is in sampling.py; run plumbing (devices, files, argparse
conventions, torchrun, run records) in common.py.

Simplifications versus transformers: no sliding-window attention (none of the supported checkpoints
enable it), no rope types other than default / linear / llama3, no dropout inside the model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import atomic_write

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    model_type: str = "qwen2"            # "qwen2" or "llama"
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 0                    # 0 -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    qkv_bias: bool = True                # Qwen2: always; Llama: attention_bias
    o_bias: bool = False                 # Llama: attention_bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back on save

    def __post_init__(self):
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict (old `rope_theta`/`rope_scaling` or new `rope_parameters`)."""
        mt = d.get("model_type", "qwen2")
        if mt not in ("qwen2", "llama"):
            raise ValueError(f"unsupported model_type {mt!r}: model.py implements 'qwen2' and 'llama' "
                             "(Qwen2, Qwen2.5, Qwen2.5-Math, DeepSeek-R1-Distill-Qwen, Llama 3.x)")
        if d.get("use_sliding_window"):
            raise ValueError("config has use_sliding_window=true; sliding-window attention is not implemented")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, linear, llama3)")
        rope = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        attn_bias = d.get("attention_bias", False)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (the SwiGLU MLP uses silu)")
        known = set(cls.__dataclass_fields__) | {"rope_parameters", "attention_bias", "architectures",
                                                 "hidden_act", "use_sliding_window", "dtype", "torch_dtype"}
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=True if mt == "qwen2" else attn_bias, o_bias=False if mt == "qwen2" else attn_bias,
            mlp_bias=d.get("mlp_bias", False), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            extra={k: v for k, v in d.items() if k not in known and not k.startswith("_")},
        )

    def to_hf(self) -> dict:
        """A config.json that transformers (and vLLM) read back into the same architecture."""
        d = {**self.extra, "model_type": self.model_type,
             "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"]}
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            d[k] = getattr(self, k)
        d["rope_scaling"] = self.rope_scaling
        d["hidden_act"] = "silu"
        if self.model_type == "llama":
            d["attention_bias"], d["mlp_bias"] = self.qkv_bias, self.mlp_bias
        else:
            d.setdefault("use_sliding_window", False)
        return d


# random:<preset> shapes (HF config.json keys). The 1.5B ones mirror the published checkpoints.
PRESETS = {
    "r1-distill-qwen-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=151646,
                                 eos_token_id=151643),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643,
                         eos_token_id=151643),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         bos_token_id=128000, eos_token_id=128001),
    # tiny shapes for tests: GQA, qkv bias, tied / untied, llama3 rope
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False, eos_token_id=1),
    "tiny-qwen2-tied": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                            tie_word_embeddings=True, eos_token_id=1),
    "tiny-llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=1024,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=64),
                       eos_token_id=1),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset random:{name}; choose from {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    d.setdefault("intermediate_size", 4 * d["hidden_size"])
    return ModelConfig.from_hf({"rms_norm_eps": 1e-6, **d})


# -----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # x * rsqrt(mean(x^2) + eps) in float32, as transformers does; one fused op
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, with linear or llama3 scaling when the config asks for it."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        inv = inv / rs["factor"]
    elif rs.get("rope_type") == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)  # long wavelengths: divide by factor
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # medium: interpolate
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, kv: tuple | None = None):
        # x: [B, T, D]; cos/sin: [B, 1, T, hd]; mask: [B, 1, T, S] bool or None (plain causal)
        # kv: (k_cache, v_cache, start) with caches [B, n_kv, S_max, hd]; new keys go to [start, start+T)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if kv is not None:
            k_cache, v_cache, start = kv
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]     # [B, nkv, S, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------
# The model


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: position of each real token = number of real tokens before it. [B, T] long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def contiguous_shift(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """When every row's real tokens form one run (left pads, tokens, right pads: prompts + completions),
    the column where each row's run starts [B]; None when some row has a gap. Rotating the rows by it puts
    every run at column 0, where plain causal attention is exact for the real tokens: the fused (flash)
    kernels apply and no [B, 1, T, T] mask exists. Pad positions then see earlier tokens: their outputs
    are meaningless either way (losses and reads mask them)."""
    m = attention_mask
    runs = (m[:, 1:] & ~m[:, :-1]).sum(-1) + m[:, 0]          # [B] starts of runs of real tokens
    if not bool((runs <= 1).all()):
        return None
    return m.int().argmax(-1)                                  # [B] first real column (0 if none)


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[b, t] = x[b, (t + shift[b]) % T] for x [B, T, ...]; roll_rows(., -shift) undoes it."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device) + shift[:, None]) % T             # [B, T]
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand_as(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = {}  # device -> [hd/2] float32; a plain attribute, so .to(bf16) never rounds it
        # layer index -> fn(h [B, T, D]) -> h; applied to the residual stream after that layer
        self.residual_hooks: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.gradient_checkpointing = False
        self.name_or_path = ""          # what load_model was given (adapters record their base model by it)

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    @classmethod
    def empty(cls, cfg: ModelConfig, device, dtype) -> "Transformer":
        """Allocate once, uninitialised, directly on device in dtype (built on the meta device first)."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)
        if cfg.tie_word_embeddings:  # to_empty may replace parameter objects: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random init as transformers does (normal(0, 0.02), zero biases, unit norms)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)
        return self

    def set_residual_hook(self, layer: int, fn: Callable | None):
        """Replace the residual stream after decoder layer `layer` by fn(h); fn=None removes it."""
        if not 0 <= layer < self.cfg.num_hidden_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.cfg.num_hidden_layers} "
                             f"layers (0..{self.cfg.num_hidden_layers - 1})")
        if fn is None:
            self.residual_hooks.pop(layer, None)
        else:
            self.residual_hooks[layer] = fn

    def _rope(self, positions):  # positions [B, T] -> cos, sin [B, 1, T, hd] in float32
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.cfg).to(dev)
        freqs = positions[..., None].float() * self._inv_freq[dev]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]

    def _mask(self, key_valid, T: int, start: int):
        """[B, 1, T, S] bool: query i (absolute slot start+i) sees real keys at slots <= start+i."""
        S = start + T
        q_idx = torch.arange(start, S, device=key_valid.device)[:, None]
        k_idx = torch.arange(S, device=key_valid.device)[None, :]
        mask = (k_idx <= q_idx)[None] & key_valid[:, None, :S]
        mask = mask | (k_idx == q_idx)[None]  # a pad query sees itself (no all-masked row -> no NaN)
        return mask[:, None]

    def forward(self, input_ids, attention_mask=None, *, cache=None,
                stop_after: int | None = None, hidden: bool = False):
        """input_ids [B, T] (left-padded, attention_mask [B, T] 1 = real token).

        Returns logits [B, T, V]; with hidden=True the final-norm hidden states [B, T, D] instead;
        with stop_after=L the residual stream after layer L (hook applied) and no higher layer runs.
        With a cache (sampling.KVCache), the tokens are appended at slot cache.pos and attend to everything cached so far.
        With nothing cached, rows whose tokens form one run (left and/or right padding) are rotated to start
        at column 0 and run with plain causal attention (see contiguous_shift); outputs come back in the
        input's layout, and a cache filled this way holds each row's tokens from slot 0 on.
        """
        B, T = input_ids.shape
        start, shift = (cache.pos if cache is not None else 0), None
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        causal = False
        if start == 0:          # nothing cached before: rows of one run of tokens can use plain causal attention
            shift = contiguous_shift(attention_mask)
            causal = shift is not None
            if causal and bool(shift.any()):    # rotate each row's tokens to start at column 0 (and slot 0)
                input_ids, attention_mask = roll_rows(input_ids, shift), roll_rows(attention_mask, shift)
            else:
                shift = None
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {cache.max_len}")
            cache.valid[:, start:start + T] = attention_mask
            # position of a new token = real tokens already cached + real tokens before it in this chunk
            positions = cache.valid[:, :start].sum(-1, keepdim=True) + positions_from_mask(attention_mask)
            mask = None if causal else self._mask(cache.valid, T, start)
        else:
            positions = positions_from_mask(attention_mask)
            mask = None if causal else self._mask(attention_mask, T, 0)
        cos, sin = self._rope(positions)
        x = self.model.embed_tokens(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        last = self.cfg.num_hidden_layers - 1 if stop_after is None else stop_after
        if not 0 <= last < self.cfg.num_hidden_layers:
            raise ValueError(f"stop_after={stop_after} out of range for {self.cfg.num_hidden_layers} layers")
        for i, block in enumerate(self.model.layers[:last + 1]):
            kv = (cache.k[i], cache.v[i], start) if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv)
            if i in self.residual_hooks:
                x = self.residual_hooks[i](x)
        if cache is not None:
            cache.pos = start + T
        if stop_after is None:
            x = self.model.norm(x)
            x = x if hidden else self.lm_head(x)
        return roll_rows(x, -shift) if shift is not None else x

    def logprobs(self, input_ids, attention_mask=None, *, start: int = 0, temperature: float = 1.0,
                 chunk_size: int = 1024):
        """Log-probs of input_ids[:, start+1:] under the model, [B, T-1-start] float32.

        Only the hidden states are kept for the whole sequence; the vocabulary projection runs on
        chunk_size rows at a time. With a frozen lm_head (LoRA) each chunk's gradient wrt the hidden
        states is formed in the same pass (_VocabChunk); otherwise the chunk is recomputed in backward.
        """
        h = self(input_ids, attention_mask, hidden=True)[:, start:-1]   # [B, T', D]
        return token_logprobs(self.lm_head, h, input_ids[:, start + 1:], temperature, chunk_size)


def _chunk_logprobs(lm_head, h, tgt, temperature):
    logits = lm_head(h).float()                                        # [c, V] float32, one chunk only
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_kl(lm_head, h_student, logp_teacher, temperature):
    logq = torch.log_softmax(lm_head(h_student).float() / temperature, dim=-1)   # [c, V]
    return (logp_teacher.exp() * (logp_teacher - logq)).sum()


def token_logprobs(lm_head: nn.Module, hidden, targets, temperature: float = 1.0, chunk_size: int = 1024):
    """log softmax(lm_head(hidden) / temperature)[targets] in row chunks. hidden [B, T, D], targets [B, T]."""
    B, T, D = hidden.shape
    h, tgt = hidden.reshape(B * T, D), targets.reshape(B * T)
    out = [_vocab_chunk("logprobs", lm_head, h[i:i + chunk_size], tgt[i:i + chunk_size], temperature)
           for i in range(0, B * T, chunk_size)]
    return torch.cat(out).view(B, T) if out else hidden.new_zeros(B, T, dtype=torch.float32)


def chunked_kl(lm_head: nn.Module, h_teacher, h_student, temperature: float = 1.0, chunk_size: int = 512):
    """sum over rows of KL(softmax(teacher logits) || softmax(student logits)), in row chunks.

    h_teacher, h_student [B, T, D] final hidden states; only [chunk_size, V] float32 tensors exist at a
    time. Divide by B for torch's kl_div 'batchmean'.
    """
    ht, hs = h_teacher.reshape(-1, h_teacher.shape[-1]), h_student.reshape(-1, h_student.shape[-1])
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk_size):
        with torch.no_grad():
            logp = torch.log_softmax(lm_head(ht[i:i + chunk_size]).float() / temperature, -1)
        total = total + _vocab_chunk("kl", lm_head, hs[i:i + chunk_size], logp, temperature)
    return total


# -----------------------------------------------------------------------------------------------
# Loading and saving (Hugging Face layout)


def resolve_model_dir(name: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, safetensors, tokenizer files)."""
    p = Path(name)
    if p.is_dir():
        return p
    if p.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise FileNotFoundError(f"model {name!r} is neither a local folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                            "*.jinja", "tokenizer*"]))
    except Exception as e:           # offline, a typo, a gated repo: say what was tried
        raise FileNotFoundError(f"model {name!r}: no local folder {Path(name).resolve()}, and the hub gave "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:200]} (offline? a typo in the path?)") from None


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {d} (pytorch_model.bin pickles are not loaded)")
    return files


def load_model(name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    """`random:<preset>`, a local Hugging Face folder, or a hub id -> Transformer in eval mode.

    Weights are streamed one tensor at a time into an uninitialised model: memory holds one copy.
    """
    device = torch.device(device)
    if name.startswith("random:"):
        model = Transformer.empty(preset_config(name.split(":", 1)[1]), device, dtype).init_weights(seed)
        model.name_or_path = name
        return model.eval()
    d = resolve_model_dir(name)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} has no config.json: not a Hugging Face model folder")
    try:
        cfg = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    model = Transformer.empty(cfg, device, dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen = set()
    from safetensors import SafetensorError, safe_open
    for f in _safetensors_files(d):
        try:
            sf = safe_open(str(f), framework="pt", device="cpu")
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from None
        with sf:
            for key in sf.keys():
                if key not in params:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"{f.name}: unexpected tensor {key!r} for a {cfg.model_type} model")
                t = sf.get_tensor(key)
                if t.shape != params[key].shape:
                    raise ValueError(f"{f.name}: {key} has shape {tuple(t.shape)}, config expects "
                                     f"{tuple(params[key].shape)}")
                if not torch.isfinite(t).all():      # else a greedy evaluation reports a real-looking 0%
                    raise ValueError(f"{f}: {key} holds NaN or inf values: the checkpoint is corrupt")
                with torch.no_grad():
                    params[key].copy_(t)
                seen.add(key)
    if cfg.tie_word_embeddings:
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"checkpoint {d} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.name_or_path = name
    return model.eval()


def load_tokenizer(name: str):
    """transformers' AutoTokenizer for a local folder or hub id."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if name.startswith("random:"):
        raise ValueError(f"{name} has random weights and no tokenizer; pass token ids directly (or --tokenizer)")
    d = resolve_model_dir(name)
    cfg = d / "tokenizer_config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
        # a generic tokenizer.json (the toy world's): transformers 5 would otherwise pick the tokenizer class
        # of config.json's model_type (Qwen2's) and replace its pre-tokenizer
        tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    else:
        tok = AutoTokenizer.from_pretrained(str(d))
    probe = tok("Q: 12 + 3 = 15", add_special_tokens=False).input_ids
    if len(tok) < 3 or not probe or all(i == tok.unk_token_id for i in probe):
        raise SystemExit(f"{d}: its tokenizer ({len(tok)} tokens) cannot encode text: the folder lacks tokenizer "
                         "files (tokenizer.json / vocab files)? Pass --tokenizer with a folder that has them")
    return tok


def eos_token_ids(tokenizer, model_name: str, cfg: ModelConfig) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, config.json's and generation_config.json's."""
    ids = {tokenizer.eos_token_id}
    sources = [cfg.eos_token_id]
    if not model_name.startswith("random:"):
        gen = resolve_model_dir(model_name) / "generation_config.json"
        if gen.exists():
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for s in sources:
        ids.update(s if isinstance(s, list) else [s])
    return sorted(i for i in ids if i is not None and i < cfg.vocab_size)


def save_model(model: Transformer, out_dir, tokenizer=None):
    """Write config.json + model.safetensors (+ tokenizer files) in the Hugging Face layout."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if not (model.cfg.tie_word_embeddings and k == "lm_head.weight")}
    if any(".lora_" in k for k in sd):
        raise ValueError("the model has LoRA layers: save them with lora.save_adapter, or export a merged "
                         "model with lora.unload_lora(model, merge=True) first")
    atomic_write(out / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    cfg = {**model.cfg.to_hf(), "torch_dtype": str(model.dtype).replace("torch.", "")}
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)


def save_tokenizer(tokenizer, out_dir):
    """save_pretrained; a generic tokenizer (built from a tokenizers.Tokenizer, like the toy world's) gets
    tokenizer_class PreTrainedTokenizerFast written down, so load_tokenizer loads it back unchanged."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    if type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        cfg_file = out / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_file.write_text(json.dumps(cfg, indent=2))


# -----------------------------------------------------------------------------------------------
# Custom autograd (read last): the vocabulary chunks' gradient formed in the forward pass. The plain
# chunk functions (_chunk_logprobs, _chunk_kl) are what it computes; the tests named below hold it to them.


class _VocabChunk(torch.autograd.Function):
    """One chunk of log-probs (`kind` "logprobs": [c] values of targets) or of summed KL(teacher || student)
    ("kl": a scalar) through a frozen lm_head W, with the gradient wrt h computed in the same pass while
    the [c, V] probabilities are at hand: d logp / d h = (onehot - p) W / T per row, d KL / d h =
    (q - p) W / T. Backward then only scales that [c, D] tensor: one vocabulary matmul fewer than
    recomputing the chunk (checkpointing) and differentiating it. Checked against float64 autograd of the
    plain chunk functions above, values and gradients, frozen and trainable heads:
    tests/test_model.py::test_chunked_logprobs_and_grads_match_float64 and
    tests/test_model.py::test_chunked_kl_and_grads_match_float64."""

    @staticmethod
    def forward(ctx, h, W, other, temperature, kind):     # other: targets [c] or teacher log-probs [c, V]
        logq = torch.log_softmax(F.linear(h, W).float() / temperature, dim=-1)    # [c, V] float32
        if kind == "logprobs":
            out = logq.gather(-1, other[:, None]).squeeze(-1)
        else:
            out = (other.exp() * (other - logq)).sum()
        if ctx.needs_input_grad[0]:
            q = logq.exp_()                                                        # in place: logq is done
            if kind == "logprobs":             # onehot - q in float32 first: for a confident token (p ~ 1)
                q.scatter_add_(-1, other[:, None], q.new_full((q.shape[0], 1), -1.0))   # W[tgt] - q W would
                dh = -(q.to(W.dtype) @ W).float()   # cancel two rounded near-equal rows (bf16: ~100% error)
            else:
                dh = ((q - other.exp()).to(W.dtype) @ W).float()
            ctx.save_for_backward(dh / temperature)
            ctx.h_dtype = h.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        dh, = ctx.saved_tensors
        g = g[:, None] if g.dim() else g
        return (g * dh).to(ctx.h_dtype), None, None, None, None


def _vocab_chunk(kind, lm_head, h, other, temperature):
    """A chunk's value; gradients by _VocabChunk when only h needs them (a frozen lm_head, as under LoRA),
    else by recomputing the chunk in backward (checkpoint)."""
    plain = _chunk_logprobs if kind == "logprobs" else _chunk_kl
    if not (torch.is_grad_enabled() and h.requires_grad):
        return plain(lm_head, h, other, temperature)
    if isinstance(lm_head, nn.Linear) and lm_head.bias is None and not lm_head.weight.requires_grad:
        return _VocabChunk.apply(h, lm_head.weight, other, temperature, kind)
    return checkpoint(plain, lm_head, h, other, temperature, use_reentrant=False)
