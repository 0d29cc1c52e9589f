"""
grpo_lora.py -- the Tina stage: GRPO reinforcement learning where only LoRA adapters train.

Usage
  CPU, a tiny random model with a character tokenizer, on a local file (a fraction of a second per step):
    python -c "from toy.chars import build_char_tokenizer as b; b('out/chartok')"
    python grpo_lora.py --model random:tiny-qwen2 --tokenizer out/chartok --dataset ../shared/data/train/gsm8k_train.jsonl \
        --max_prompt_len 128 --max_completion_len 32 --max_steps 20 --device cpu --out_dir out/grpo_cpu
  GPU, Tina's open_rs2 recipe (the defaults; recipes/ holds every experiment):
    python grpo_lora.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --dataset open_rs2 --out_dir out/open_rs2
  Several GPUs (each rank owns whole prompt groups):
    torchrun --nproc_per_node 2 grpo_lora.py ...

Per optimizer step (DESIGN.md 4.2): take prompts_per_step prompts per process, sample num_generations
completions of each with the LoRA merged into the weights, score them with the weighted rewards,
turn rewards into group-relative advantages, then (in grad_accum micro-batches) minimise
    -(min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) - beta * KL_k3(policy || policy with LoRA off))
aggregated per --loss_type, clip the gradient norm, step AdamW on the cosine-with-min-lr schedule.

Simplifications versus the paper's TRL 0.15 setup, all deliberate:
  * Rewards are computed per prompt group (Tina's per-device batch was exactly one group, so the length
    reward's min/max range is the same).
  * A reward of None (gold answer unparseable) is left out of the weighted sum (nansum) and counted; Tina's
    cosine and length rewards scored such cases as correct, ours never do.
  * With --num_iterations N > 1 one batch of rollouts feeds N consecutive optimizer steps and the old
    log-probs are those of the first; with N = 1 (Tina) the ratio is exactly 1 and only the gradient counts.
  * Log-probs are computed at the sampling temperature (logits / T), as later TRL versions do.
  * --rollout vllm runs vLLM in-process and syncs the policy by saving the adapter every step (no server).
  * The reward functions all grade correctness with data.grade(mode="reward"), Tina's accuracy settings.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

import data as D
import lora as L
import model as M

# -----------------------------------------------------------------------------------------------
# Rewards: fn(completions of one group, gold answer) -> list of float or None (Tina's definitions)


@lru_cache(maxsize=1 << 14)
def correct(completion: str, gold: str) -> float | None:
    return D.grade(completion, gold, mode="reward")


def reward_accuracy(completions, gold):
    return [correct(c, gold) for c in completions]


def reward_format(completions, gold):
    # the prompt already opens the think block, so only the closing tag is checked
    return [1.0 if c.count("\n</think>\n") == 1 else 0.0 for c in completions]


def reward_tag_count(completions, gold):
    return [0.5 * (c.count("<think>\n") == 1) + 0.5 * (c.count("\n</think>\n") == 1) for c in completions]


def reward_length(completions, gold):
    """Kimi 1.5: lambda = 0.5 - (len - min) / (max - min); correct -> lambda, wrong -> min(0, lambda)."""
    lens = [len(c) for c in completions]
    lo, hi = min(lens), max(lens)
    if hi == lo:
        return [0.0] * len(completions)
    out = []
    for c, n in zip(completions, lens):
        ok, lam = correct(c, gold), 0.5 - (n - lo) / (hi - lo)
        out.append(None if ok is None else (lam if ok else min(0.0, lam)))
    return out


def reward_cosine(completions, gold, max_len: int = 1000, correct_range=(0.5, 1.0), wrong_range=(0.0, -0.5)):
    """Correct: 1.0 at length 0 down to 0.5 at max_len; wrong: 0.0 down to -0.5 (length in characters).
    As in Tina, progress = len / max_len is not clamped, so the cosine wraps past max_len."""
    out = []
    for c in completions:
        ok = correct(c, gold)
        if ok is None:
            out.append(None)
            continue
        at_zero, at_max = correct_range[::-1] if ok else wrong_range
        cosine = math.cos(math.pi * len(c) / max_len)
        out.append(at_max + 0.5 * (at_zero - at_max) * (1.0 + cosine))
    return out


def reward_repetition(completions, gold, n: int = 3, max_penalty: float = -1.0):
    """-(fraction of repeated word n-grams) (Demystifying long CoT, appendix C.2)."""
    out = []
    for c in completions:
        words = c.lower().split()
        if len(words) < n:
            out.append(0.0)
            continue
        grams = list(zip(*[words[i:] for i in range(n)]))
        out.append((1 - len(set(grams)) / len(grams)) * max_penalty)
    return out


REWARDS = {"accuracy": reward_accuracy, "format": reward_format, "tag_count": reward_tag_count,
           "length": reward_length, "cosine": reward_cosine, "repetition": reward_repetition}


def score(completions: list[str], gold: str, names, weights):
    """-> total [G] (weighted nansum), per-reward [R, G] with NaN for None."""
    per = torch.tensor([[float("nan") if v is None else v for v in REWARDS[n](completions, gold)] for n in names])
    w = torch.tensor(weights, dtype=torch.float32)[:, None]
    return (per * w).nansum(0), per


# -----------------------------------------------------------------------------------------------
# GRPO math


def group_advantages(rewards, group_size: int, scale: bool):
    """rewards [N] (N = prompts x G, groups contiguous) -> advantages [N]: r - group mean (/ (std + 1e-4))."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)       # Bessel-corrected std, as TRL
    return adv.reshape(-1)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, *, beta: float, epsilon: float, loss_type: str,
              max_completion_len: int):
    """Per-token clipped objective with the k3 KL penalty. logp/old/ref/mask [N, C], adv [N].
    Returns (loss, mean KL over completion tokens, clipped-token fraction)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    tok = -torch.min(ratio * adv[:, None], clipped * adv[:, None])
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        tok = tok + beta * kl
    if loss_type == "grpo":         # mean over each sequence's tokens, then over sequences
        loss = ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":    # sum over tokens / (sequences x max completion length)
        loss = (tok * mask).sum() / (logp.shape[0] * max_completion_len)
    elif loss_type == "dapo":       # sum over tokens / number of tokens
        loss = (tok * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    n = mask.sum().clamp(min=1)
    was_clipped = ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).to(mask.dtype)
    return loss, ((kl * mask).sum() / n).detach(), ((was_clipped * mask).sum() / n).detach()


def lr_factor(step: int, max_steps: int, warmup_ratio: float, min_lr_rate: float) -> float:
    """Linear warm-up over ceil(warmup_ratio * max_steps) steps, then cosine to min_lr_rate (HF's
    cosine_with_min_lr)."""
    warmup = math.ceil(max_steps * warmup_ratio)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, max_steps - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)) * (1 - min_lr_rate) + min_lr_rate)


# -----------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor      # [N, Tp] left-padded
    prompt_mask: torch.Tensor     # [N, Tp]
    completion_ids: torch.Tensor  # [N, C] pad after EOS
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]              # N decoded completions
    finished: torch.Tensor        # [N] an EOS ended it (else truncated at max_completion_len)


def encode_prompts(tok, prompts: list[str], max_len: int, device):
    """Left-truncate each prompt to max_len tokens, left-pad the batch. -> ids, mask [P, Tp]."""
    enc = [tok(p, add_special_tokens=False).input_ids[-max_len:] for p in prompts]
    T = max(len(e) for e in enc)
    ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, T - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, T - len(e):] = 1
    return ids.to(device), mask.to(device)


def rollout_hf(net, tok, prompts, args, eos_ids, generator) -> Rollouts:
    ids, mask = encode_prompts(tok, prompts, args.max_prompt_len, net.device)
    ids, mask = ids.repeat_interleave(args.num_generations, 0), mask.repeat_interleave(args.num_generations, 0)
    with L.lora_merged(net):
        out = M.generate(net, ids, mask, max_new_tokens=args.max_completion_len, temperature=args.temperature,
                         top_p=args.top_p, eos_ids=eos_ids, pad_id=tok.pad_token_id, generator=generator)
    steps = torch.arange(out.tokens.shape[1], device=out.tokens.device)
    cmask = (steps[None] < out.lengths[:, None]).long()
    texts = tok.batch_decode([t[:n].tolist() for t, n in zip(out.tokens, out.lengths)], skip_special_tokens=True)
    return Rollouts(ids, mask, out.tokens, cmask, texts, out.finished)


def rollout_vllm(net, tok, prompts, args, eos_ids, step) -> Rollouts:
    """Generate with vLLM (in-process), the current adapter passed as a LoRARequest. Not exercised by the
    test suite: vLLM does not install on the machines this project is tested on."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise SystemExit("--rollout vllm needs vLLM (pip install vllm, GPU only); or use --rollout hf") from None
    global _VLLM
    if "_VLLM" not in globals():
        _VLLM = LLM(model=args.model_dir, enable_lora=True, max_lora_rank=args.lora_r, seed=args.seed,
                    max_model_len=args.max_prompt_len + args.max_completion_len, gpu_memory_utilization=0.4,
                    dtype="bfloat16")
    adapter_dir = Path(args.out_dir) / "_rollout_adapter"
    L.save_adapter(net, adapter_dir, base_model=args.model)
    ids, mask = encode_prompts(tok, prompts, args.max_prompt_len, "cpu")
    token_prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    sp = SamplingParams(n=args.num_generations, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_completion_len, stop_token_ids=eos_ids, seed=args.seed + step)
    outs = _VLLM.generate(token_prompts, sp, lora_request=LoRARequest("policy", step + 1, str(adapter_dir)),
                          use_tqdm=False)
    comps = [list(o.token_ids) for out in outs for o in out.outputs]
    N, C = len(comps), args.max_completion_len
    cids = torch.full((N, C), tok.pad_token_id, dtype=torch.long)
    for i, c in enumerate(comps):
        cids[i, :len(c)] = torch.tensor(c[:C])
    lengths = torch.tensor([min(len(c), C) for c in comps])
    finished = torch.tensor([bool(c) and c[-1] in eos_ids for c in comps])
    cmask = (torch.arange(C)[None] < lengths[:, None]).long()
    dev = net.device
    return Rollouts(ids.repeat_interleave(args.num_generations, 0).to(dev),
                    mask.repeat_interleave(args.num_generations, 0).to(dev), cids.to(dev), cmask.to(dev),
                    tok.batch_decode(comps, skip_special_tokens=True), finished.to(dev))


# -----------------------------------------------------------------------------------------------
# Training


def check_args(args):
    unknown = [r for r in args.rewards if r not in REWARDS]
    if unknown:
        raise SystemExit(f"unknown reward {unknown}; choose from {', '.join(REWARDS)}")
    if len(args.reward_weights) != len(args.rewards):
        raise SystemExit(f"--reward_weights has {len(args.reward_weights)} values for {len(args.rewards)} "
                         f"rewards ({','.join(args.rewards)})")
    if args.num_generations < 2:
        raise SystemExit("--num_generations must be at least 2 (advantages are relative to the group)")
    if args.prompts_per_step % args.grad_accum:
        raise SystemExit(f"--prompts_per_step ({args.prompts_per_step}) must be a multiple of --grad_accum "
                         f"({args.grad_accum}): each micro-batch holds whole groups")
    if args.loss_type not in ("grpo", "dr_grpo", "dapo"):
        raise SystemExit(f"unknown --loss_type {args.loss_type!r}")
    if args.rollout == "vllm" and args.model.startswith("random:"):
        raise SystemExit("--rollout vllm needs a model folder or hub id that vLLM can load, not random:")
    if args.num_iterations < 1 or args.max_steps < 1:
        raise SystemExit("--num_iterations and --max_steps must be >= 1")


def train(args) -> dict:
    check_args(args)
    rank, world, device = M.setup_distributed(args.device)
    dtype = M.pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed + rank)
    out_dir = Path(args.out_dir)

    # data: every rank reads the same shuffled order and takes its own slice of each step's prompts
    examples, data_stats = D.load_examples(args.dataset, args.question_field, args.answer_field)
    usable = [e for e in examples if D.gold_parses(e.answer, "reward")] if "accuracy" in args.rewards else examples
    data_stats["unparseable_gold"] = len(examples) - len(usable)
    if not usable:
        raise SystemExit(f"{args.dataset}: no example has a gold answer math-verify can parse")
    system_prompt = D.system_prompt_for(args.system_prompt, args.dataset)

    # model, tokenizer, LoRA, optimiser
    net = M.load_model(args.model, device, dtype, seed=args.seed)
    args.model_dir = str(M.resolve_model_dir(args.model)) if not args.model.startswith("random:") else None
    tok = M.load_tokenizer(args.tokenizer or args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    eos_ids = M.eos_token_ids(tok, args.model, net.cfg)
    if not eos_ids:
        raise SystemExit("the tokenizer and model config name no EOS token: completions could never end")
    torch.manual_seed(args.seed)                 # identical LoRA init on every rank
    L.attach_lora(net, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    net.gradient_checkpointing = M.use_checkpointing(args.gradient_checkpointing,
                                                     args.max_prompt_len + args.max_completion_len)
    params = L.lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.max_steps, args.warmup_ratio, args.min_lr_rate))
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    stop = min(args.stop_step or args.max_steps, args.max_steps)

    step, epoch, pos = 0, 0, 0
    log = D.RunLog(out_dir, {k: v for k, v in vars(args).items()}, "grpo_lora", enabled=rank == 0,
                   n_gpus=world if device.type == "cuda" else 0, gpu_hour_usd=args.gpu_hour_usd)
    if args.resume:
        state = L.load_training_state(out_dir, net, opt, generator)
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        for _ in range(step):
            sched.step()
        if rank == 0 and (out_dir / "metrics.jsonl").exists():   # drop rows logged after the saved step
            rows = [r for r in map(json.loads, open(out_dir / "metrics.jsonl")) if r["step"] <= step]
            M.atomic_write(out_dir / "metrics.jsonl",
                           lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    log.write_run(data=data_stats, trainable_params=sum(p.numel() for p in params), eos_ids=eos_ids)

    def order(ep):  # a fresh shuffle per epoch, the same on every rank
        return torch.randperm(len(usable), generator=torch.Generator().manual_seed(args.seed + ep)).tolist()

    perm = order(epoch)
    G, P = args.num_generations, args.prompts_per_step
    buffer = None
    from tqdm import tqdm
    bar = tqdm(total=stop, initial=step, desc="grpo", disable=rank != 0, dynamic_ncols=True)
    while step < stop:
        t0 = time.time()
        net.train()
        if step % args.num_iterations == 0 or buffer is None:
            # ---- take this step's prompts (whole groups per rank)
            batch = []
            for _ in range(P * world):
                if pos >= len(perm):
                    epoch, pos = epoch + 1, 0
                    perm = order(epoch)
                batch.append(usable[perm[pos]])
                pos += 1
            mine = batch[rank * P:(rank + 1) * P]
            prompts = [D.format_prompt(tok, e.question, system_prompt) for e in mine]
            # ---- rollouts
            if args.rollout == "vllm":
                ro = rollout_vllm(net, tok, prompts, args, eos_ids, step)
            else:
                ro = rollout_hf(net, tok, prompts, args, eos_ids, generator)
            t_roll = time.time() - t0
            # ---- rewards and advantages
            t1 = time.time()
            totals, pers = zip(*(score(ro.texts[i * G:(i + 1) * G], e.answer, args.rewards, args.reward_weights)
                                 for i, e in enumerate(mine)))
            rewards, per_reward = torch.cat(totals), torch.cat(pers, dim=1)    # [P*G], [R, P*G]
            adv = group_advantages(rewards, G, args.scale_rewards).to(device)
            t_reward = time.time() - t1
            old = None
            if args.num_iterations > 1:             # old log-probs of the policy that sampled
                with torch.no_grad(), M.autocast(device, dtype):
                    old = [micro_logprobs(net, ro, sl, args.temperature) for sl in micro_slices(P, G, args.grad_accum)]
            buffer = (ro, rewards, per_reward, adv, old, mine, prompts, t_roll, t_reward)
        else:
            ro, rewards, per_reward, adv, old, mine, prompts, _, _ = buffer
            t_roll = t_reward = 0.0
        # ---- update: grad_accum micro-batches of whole groups
        t2 = time.time()
        kls, clips, losses = [], [], []
        for j, sl in enumerate(micro_slices(P, G, args.grad_accum)):
            with M.autocast(device, dtype):
                logp = micro_logprobs(net, ro, sl, args.temperature)
                ref = None
                if args.beta != 0.0:
                    with torch.no_grad(), L.lora_disabled(net):
                        ref = micro_logprobs(net, ro, sl, args.temperature)
            old_lp = logp.detach() if old is None else old[j]
            loss, kl, clip = grpo_loss(logp, old_lp, ref, adv[sl], ro.completion_mask[sl], beta=args.beta,
                                       epsilon=args.epsilon, loss_type=args.loss_type,
                                       max_completion_len=args.max_completion_len)
            if not torch.isfinite(loss):
                raise SystemExit(f"step {step}: loss is {loss.item()} (NaN/inf); lower --lr or check the data")
            (loss / args.grad_accum).backward()
            kls.append(kl)
            clips.append(clip)
            losses.append(loss.detach())
        M.all_reduce_mean([p.grad for p in params if p.grad is not None], world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        t_update = time.time() - t2

        # ---- metrics (averaged over ranks)
        lens = ro.completion_mask.sum(1).float()
        groups = rewards.view(-1, G)
        local = torch.tensor([rewards.mean(), groups.std(1).mean(), (groups.std(1) == 0).float().mean(),
                              lens.mean().item(), lens.max().item(), (~ro.finished).float().mean().item(),
                              torch.stack(kls).mean().item(), torch.stack(clips).mean().item(),
                              torch.stack(losses).mean().item(), *per_reward.nanmean(1).tolist(),
                              *torch.isnan(per_reward).float().sum(1).tolist()], dtype=torch.float64)
        if world > 1:
            local = local.to(device)
            dist.all_reduce(local)
            local = (local / world).cpu()
        v = local.tolist()
        R = len(args.rewards)
        dt = time.time() - t0
        row = {"step": step, "reward": v[0], "reward_std": v[1], "zero_spread_groups": v[2],
               "completion_len_mean": v[3], "completion_len_max": v[4], "truncated": v[5], "kl": v[6],
               "clip_fraction": v[7], "loss": v[8],
               **{f"reward/{n}": v[9 + i] for i, n in enumerate(args.rewards)},
               **{f"reward_none/{n}": v[9 + R + i] * world for i, n in enumerate(args.rewards)},
               "lr": lr, "grad_norm": float(grad_norm), "epoch": epoch, "seconds_rollout": t_roll,
               "seconds_reward": t_reward, "seconds_update": t_update,
               "tokens_per_s": float(ro.completion_mask.sum() + ro.prompt_mask.sum()) * world / dt}
        log.metrics(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['completion_len_mean']:.0f}", kl=f"{row['kl']:.4f}")
        if args.wandb and rank == 0:
            import wandb
            if wandb.run is None:
                wandb.init(project=args.wandb, config=vars(args))
            wandb.log(row, step=step)
        if step % args.log_every == 0 or step == 1:
            log.samples([{"step": step, "prompt": prompts[0], "gold": mine[0].answer, "completion": ro.texts[k],
                          "reward": float(rewards[k])} for k in range(G)])
        if step % args.save_every == 0 or step == stop:
            if rank == 0:
                L.save_adapter(net, out_dir / f"step_{step:06d}", base_model=args.model)
                L.save_training_state(out_dir, net, opt, step, {"epoch": epoch, "pos": pos}, generator)
                log.write_run(last_step=step)
            if world > 1:
                dist.barrier()
    bar.close()
    if rank == 0:
        L.save_adapter(net, out_dir / "final", base_model=args.model)
        log.write_run(last_step=step, finished=True)
    if world > 1:
        dist.destroy_process_group()
    return {"step": step, "out_dir": str(out_dir)}


def micro_slices(P: int, G: int, grad_accum: int):
    per = P // grad_accum * G
    return [slice(j * per, (j + 1) * per) for j in range(grad_accum)]


def micro_logprobs(net, ro: Rollouts, sl: slice, temperature: float):
    """Log-probs [n, C] of the completion tokens of rows sl, given prompt + completion."""
    ids = torch.cat([ro.prompt_ids[sl], ro.completion_ids[sl]], 1)
    mask = torch.cat([ro.prompt_mask[sl], ro.completion_mask[sl]], 1)
    return net.logprobs(ids, mask, start=ro.prompt_ids.shape[1] - 1, temperature=temperature)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    M.add_run_args(p, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "out/grpo")
    p.add_argument_group("model and run").add_argument(
        "--tokenizer", default=None, help="tokenizer folder or hub id when --model has none (random: models)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="open_rs2", help=f"registry name ({', '.join(D.TRAIN_SETS)}) or a local "
                   ".jsonl/.json/.parquet file (%(default)s)")
    g.add_argument("--question_field", default=None, help="question column (default: problem, question, prompt, context)")
    g.add_argument("--answer_field", default=None, help="answer column (default: answer, final_answer, solution)")
    g.add_argument("--system_prompt", default="auto",
                   help="auto (Tina: open_rs for the open-rs sets, open_r1 otherwise), open_r1, open_rs, none, "
                   "or a literal prompt text")
    L.add_lora_args(p)
    g = p.add_argument_group("GRPO")
    g.add_argument("--rewards", type=M.csv_list(), default=["format", "accuracy"],
                   help=f"comma-separated, from {', '.join(REWARDS)} (%(default)s)")
    g.add_argument("--reward_weights", type=M.csv_list(float), default=[1.0, 2.0], help="one per reward (%(default)s)")
    g.add_argument("--num_generations", type=int, default=6, help="completions per prompt, G (%(default)s)")
    g.add_argument("--prompts_per_step", type=int, default=4, help="prompts per optimizer step per process (%(default)s)")
    g.add_argument("--grad_accum", type=int, default=4, help="micro-batches per step (%(default)s)")
    g.add_argument("--beta", type=float, default=0.04, help="KL coefficient; 0 skips the reference pass (%(default)s)")
    g.add_argument("--epsilon", type=float, default=0.2, help="ratio clip range (%(default)s)")
    g.add_argument("--num_iterations", type=int, default=1, help="optimizer steps per batch of rollouts (%(default)s)")
    g.add_argument("--loss_type", default="grpo", choices=["grpo", "dr_grpo", "dapo"], help="loss aggregation")
    g.add_argument("--scale_rewards", dest="scale_rewards", action="store_true", default=True,
                   help="divide advantages by the group's reward std (default)")
    g.add_argument("--no_scale_rewards", dest="scale_rewards", action="store_false",
                   help="do not (the Dr.GRPO ablation)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-6, help="peak learning rate (%(default)s)")
    g.add_argument("--min_lr_rate", type=float, default=0.1, help="final lr as a fraction of --lr (%(default)s)")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="linear warm-up share of max_steps (%(default)s)")
    g.add_argument("--max_steps", type=int, default=1500, help="length of the lr schedule (%(default)s)")
    g.add_argument("--stop_step", type=int, default=850, help="stop early at this step (Tina: 850 of 1500)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (%(default)s)")
    M.add_checkpointing_arg(g)
    g = p.add_argument_group("sampling")
    g.add_argument("--rollout", default="hf", choices=["hf", "vllm"], help="built-in sampler or vLLM")
    g.add_argument("--temperature", type=float, default=0.7, help="(%(default)s)")
    g.add_argument("--top_p", type=float, default=1.0, help="(%(default)s)")
    g.add_argument("--max_prompt_len", type=int, default=512, help="prompts are left-truncated (%(default)s)")
    g.add_argument("--max_completion_len", type=int, default=3584, help="(%(default)s)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save_every", type=int, default=50, help="adapter + resume state every N steps (%(default)s)")
    g.add_argument("--log_every", type=int, default=10, help="write sample completions every N steps (%(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/resume")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
