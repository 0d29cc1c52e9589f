"""
bench.py -- speed and memory of the hot paths, each against its baseline measured in the same run.

    python bench.py                       # GPU: the R1-Distill-Qwen-1.5B shape with random weights, bf16
    python bench.py --only decode,lora    # a subset
    python bench.py --smoke               # tiny sizes on CPU in seconds (the tests run this; not timed)

Benchmarks (each prints a table row and goes into --out as JSON):
  decode    our sampler vs transformers' generate (same weights, batch, prompt, new tokens, sampling, EOS
            off; --hf_static adds transformers' compiled static cache): tokens/s, the ratio, and the share
            of the memory-bandwidth floor (weight + KV-cache bytes read per step / measured copy bandwidth)
  grpo      one GRPO update: policy forward + backward through chunked log-probs and the reference pass
            with LoRA off, vs the same with peft's LoRA on the transformers model and per-row log-softmax:
            tokens/s, seconds, peak memory, MFU against a measured matmul peak (6 x params x tokens FLOPs)
  lora      one LoRA Linear (r 32) forward + backward vs the plain Linear, ours and peft's: overhead ratios
  sae       SAE training step on layer L: our early-stopped forward + SAE vs a full forward + sparsify's
            SparseCoder on the same activations: tokens/s and the ratio
  sae_tune  one SAE-Tuning step (teacher pass, student pass through the SAE, chunked KL, backward):
            tokens/s and peak memory

Baselines (transformers, peft, sparsify) are imported here only, lazily; the product never imports them.
Times are medians over --repeat runs after --warmup runs, with the device synchronised.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import lora as L
import model as M
import sae as S

FULL = dict(preset="r1-distill-qwen-1.5b", batch=32, prompt=512, new=512, grpo_seqs=6, grpo_len=4096,
            lora_tokens=8192, sae_layer=12, sae_latents=65536, sae_k=32, sae_batch=16, sae_len=2048, tune_len=2048)
SMOKE = dict(preset="tiny-qwen2", batch=2, prompt=8, new=8, grpo_seqs=2, grpo_len=32, lora_tokens=64,
             sae_layer=1, sae_latents=256, sae_k=8, sae_batch=2, sae_len=32, tune_len=32)


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


def peak_memory(device, fn) -> float | None:
    """Peak GiB allocated while fn runs (CUDA only)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


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


def bench_decode(net, hf, cfg, args, device):
    B, P, N = cfg["batch"], cfg["prompt"], cfg["new"]
    ids = torch.randint(0, net.cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(device)
    ours = timed(lambda: M.generate(net, ids, max_new_tokens=N, temperature=1.0, seed=0), device, args.warmup,
                 args.repeat)
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
               eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = timed(lambda: hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen), device,
                       args.warmup, args.repeat)
        static = None
        if args.hf_static:
            static = timed(lambda: hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               cache_implementation="static", **gen), device, 1, args.repeat)
    c = net.cfg
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    kv_bytes = B * (P + N / 2) * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * net.dtype.itemsize
    floor = (weight_bytes + kv_bytes) / args.bandwidth        # seconds per decode step at the bandwidth limit
    row = {"tokens_per_s": B * N / ours, "hf_tokens_per_s": B * N / theirs, "vs_hf": theirs / ours,
           "ms_per_step": 1000 * ours / N, "floor_ms_per_step": 1000 * floor, "share_of_floor": floor / (ours / N)}
    if static is not None:
        row.update(hf_static_tokens_per_s=B * N / static, vs_hf_static=static / ours)
    return row


def bench_grpo(net, hf, cfg, args, device):
    n, T = cfg["grpo_seqs"], cfg["grpo_len"]
    ids = torch.randint(0, net.cfg.vocab_size, (n, T), generator=torch.Generator().manual_seed(1)).to(device)
    start = T // 8                                             # prompt share; log-probs on the rest
    lora_training(net, 32, 64, on=True)

    def ours():
        with M.autocast(device):
            with torch.no_grad(), L.lora_disabled(net):
                ref = net.logprobs(ids, start=start)
            lp = net.logprobs(ids, start=start)
            (lp - ref).sum().backward()
        net.zero_grad(set_to_none=True)

    t_ours = timed(ours, device, args.warmup, args.repeat)
    mem_ours = peak_memory(device, ours)
    lora_training(net, on=False)
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(hf, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=list(L.ALL_LINEARS)))
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()

    def peft_logprobs():
        logits = pm(input_ids=ids).logits[:, start:-1]
        return torch.stack([torch.log_softmax(r.float(), -1).gather(-1, t[:, None]).squeeze(-1)
                            for r, t in zip(logits, ids[:, start + 1:])])   # one row at a time

    def theirs():
        with M.autocast(device):
            with torch.no_grad(), pm.disable_adapter():
                ref = peft_logprobs()
            (peft_logprobs() - ref).sum().backward()
        pm.zero_grad(set_to_none=True)

    t_peft = timed(theirs, device, args.warmup, args.repeat)
    mem_peft = peak_memory(device, theirs)
    pm.unload()
    params = sum(p.numel() for p in net.parameters())
    flops = 6 * params * n * T
    return {"seconds": t_ours, "peft_seconds": t_peft, "vs_peft": t_ours / t_peft, "tokens_per_s": n * T / t_ours,
            "peak_gib": mem_ours, "peft_peak_gib": mem_peft, "mfu": flops / t_ours / args.peak_flops}


def bench_lora(cfg, args, device, dtype):
    d_in, d_out, N = 1536, 8960, cfg["lora_tokens"]
    if args.smoke:
        d_in, d_out = 64, 128
    base = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(N, d_in, device=device, dtype=dtype, requires_grad=True)

    def run(layer):
        def f():
            layer(x).sum().backward()
            x.grad = None
        return timed(f, device, args.warmup, args.repeat)

    plain = run(base)
    ours = L.LoRALinear(base, 32, 64, 0.0)
    t_ours = run(ours)
    from peft import LoraConfig, get_peft_model
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype))
    pm = get_peft_model(holder, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=["proj"]))
    t_peft = run(pm.base_model.model.proj)
    return {"plain_ms": 1000 * plain, "ours_overhead": t_ours / plain, "peft_overhead": t_peft / plain}


def sparsify_coder(device):
    """sparsify's SparseCoder and its config. The package __init__ imports sparsify's trainer, which needs
    `datasets`; where that is missing (the GPU image), load the coder's modules without the __init__."""
    import importlib.util
    import os
    import sys
    import types
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None:
            raise SystemExit("the sae benchmark's baseline needs eai-sparsify (pip install eai-sparsify)") from None
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    return SparseCoder, SparseCoderConfig


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
    SparseCoder, SparseCoderConfig = sparsify_coder(device)
    sc = SparseCoder(d, SparseCoderConfig(num_latents=cfg["sae_latents"], k=cfg["sae_k"]), device=device)
    sopt = torch.optim.Adam(sc.parameters(), lr=1e-4)

    def theirs():   # sparsify's trainer: a full forward with a hook on the layer, then the same coder step
        with torch.no_grad():
            x = hf(input_ids=ids, output_hidden_states=True).hidden_states[Ly + 1].reshape(-1, d).float()
        S.train_step(sc, sopt, x)

    t_sp = timed(theirs, device, args.warmup, args.repeat)
    return {"tokens_per_s": B * T / t_ours, "sparsify_tokens_per_s": B * T / t_sp, "vs_sparsify": t_sp / t_ours}


def bench_sae_tune(net, cfg, args, device):
    import sae_tune as ST
    T = cfg["tune_len"]
    ids = torch.randint(0, net.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(3)).to(device)
    sae = S.SAE(net.cfg.hidden_size, cfg["sae_latents"], cfg["sae_k"], device=device)
    lora_training(net, 32, 128, on=True)

    def step():
        with M.autocast(device):
            loss, _ = ST.kl_loss(net, ids, sae, cfg["sae_layer"], "block")
        loss.backward()
        net.zero_grad(set_to_none=True)

    t = timed(step, device, args.warmup, args.repeat)
    mem = peak_memory(device, step)
    lora_training(net, on=False)
    return {"tokens_per_s": T / t, "seconds": t, "peak_gib": mem}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds)")
    p.add_argument("--only", type=M.csv_list(), default=["decode", "grpo", "lora", "sae", "sae_tune"],
                   help="comma-separated subset of decode, grpo, lora, sae, sae_tune")
    p.add_argument("--device", default="auto")
    p.add_argument("--hf_static", action="store_true", help="also time transformers' static-cache generate")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="out/bench.json", help="JSON results (%(default)s)")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cpu") if args.smoke else M.pick_device(args.device)
    dtype = M.pick_dtype("auto", device)
    args.bandwidth = copy_bandwidth(device, 64 if args.smoke else 2048)
    args.peak_flops = matmul_peak(device, dtype, 256 if args.smoke else 8192)
    net = M.load_model(f"random:{cfg['preset']}", device, dtype, seed=0)
    hf = hf_twin(net) if {"decode", "grpo", "sae"} & set(args.only) else None
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "preset": cfg["preset"], "sizes": cfg, "copy_bandwidth_GBps": args.bandwidth / 1e9,
               "matmul_peak_TFLOPs": args.peak_flops / 1e12, "date": time.strftime("%Y-%m-%d")}
    runners = {"decode": lambda: bench_decode(net, hf, cfg, args, device),
               "grpo": lambda: bench_grpo(net, hf, cfg, args, device),
               "lora": lambda: bench_lora(cfg, args, device, dtype),
               "sae": lambda: bench_sae(net, hf, cfg, args, device),
               "sae_tune": lambda: bench_sae_tune(net, cfg, args, device)}
    unknown = [b for b in args.only if b not in runners]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; choose from {', '.join(runners)}")
    for name in args.only:
        results[name] = runners[name]()
        print(f"{name:9s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in results[name].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
