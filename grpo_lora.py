"""
grpo_lora.py -- the Tina stage: GRPO reinforcement learning where only LoRA adapters train.

Usage
  CPU, a tiny random model with a character tokenizer, on a local file (a fraction of a second per step):
    python -c "from toy.chars import build_char_tokenizer as b; b('out/chartok')"
    python -c "from toy.world import write_sets; write_sets('out/toydata')"      # train.jsonl, test.jsonl
    python grpo_lora.py --model random:tiny-qwen2 --tokenizer out/chartok --dataset out/toydata/train.jsonl \
        --max_prompt_len 128 --max_completion_len 32 --max_steps 20 --device cpu --out_dir out/grpo_cpu
  GPU, Tina's open_rs2 recipe (the defaults; recipes/ holds every experiment):
    python grpo_lora.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --dataset open_rs2 --out_dir out/open_rs2
  Several GPUs (the same global batch; each rank owns whole prompt groups):
    torchrun --nproc_per_node 2 grpo_lora.py ...
  The effective configuration without running anything: add --dry_run.

Per optimizer step: take prompts_per_step prompts (all processes together), sample num_generations
completions of each with the LoRA merged into the weights, score them with the weighted rewards,
turn rewards into group-relative advantages, then (in grad_accum micro-batches, also counted over all
processes) minimise
    -(min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) - beta * KL_k3(policy || policy with LoRA off))
aggregated per --loss_type, clip the gradient norm, step AdamW on the cosine-with-min-lr schedule.

Simplifications versus the paper's TRL 0.15 setup, all deliberate:
  * Rewards are computed per prompt group (Tina's per-device batch was exactly one group, so the length
    reward's min/max range is the same).
  * A reward of None (gold answer unparseable) is left out of the weighted sum (nansum) and counted; Tina's
    cosine and length rewards scored such cases as correct, ours never do.
  * With --num_iterations N > 1 one batch of rollouts feeds N consecutive optimizer steps and the old
    log-probs are those of the first; with N = 1 (Tina) the ratio is exactly 1 and only the gradient counts.
  * Log-probs are computed at --logprob_temperature, by default the sampling temperature (logits / T) as
    later TRL versions do; trl 0.15.2, which Tina ran, used 1.0, and the Tina recipes set that.
  * --rollout vllm runs vLLM in-process and syncs the policy by saving the adapter every step (no server); it logs
    the sampler-trainer log-prob gap, and --vllm_is_correction applies TRL's truncated importance weights.
  * Correctness is graded with Tina's settings: the accuracy reward's (data.grade mode "reward") and, inside the
    length and cosine rewards, theirs (mode "reward_length": LaTeX-only gold, boxed=True, verify(answer, gold)).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import common as C
import data as D
import lora as L
import model as M
import sampling as SM

# what --resume accepts changed from the saved run (everything else must match, or the run is refused; not
# --max_steps: it defines the warm-up and the cosine, so a run continues on its recorded schedule, --stop_step
# moves where it ends)
RESUME_MAY_CHANGE = ("stop_step", "save_every", "log_every", "resume", "overwrite", "wandb",
                     "device", "gpu_hour_usd", "model_dir", "rollout")

# -----------------------------------------------------------------------------------------------
# Rewards: fn(completions of one group, gold answer) -> list of float or None (Tina's definitions)


@lru_cache(maxsize=1 << 14)
def correct(completion: str, gold: str, mode: str = "reward") -> float | None:
    """Tina's accuracy grading ("reward"), or the one inside its length and cosine rewards ("reward_length")."""
    return D.grade(completion, gold, mode=mode)


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
        ok, lam = correct(c, gold, "reward_length"), 0.5 - (n - lo) / (hi - lo)
        out.append(None if ok is None else (lam if ok else min(0.0, lam)))
    return out


def reward_cosine(completions, gold, max_len: int = 1000, correct_range=(0.5, 1.0), wrong_range=(0.0, -0.5)):
    """Correct: 1.0 at length 0 down to 0.5 at max_len; wrong: 0.0 down to -0.5 (length in characters).
    As in Tina, progress = len / max_len is not clamped, so the cosine wraps past max_len."""
    out = []
    for c in completions:
        ok = correct(c, gold, "reward_length")
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


GOLD_REWARDS = {"accuracy": "reward", "length": "reward_length", "cosine": "reward_length"}   # reward -> grade mode
LOSS_NORMALISATION = {       # --loss_type -> how grpo_loss aggregates token losses (as --dry_run reports it)
    "grpo": "each completion's token mean, then the mean over completions",
    "dr_grpo": "token sum / (completions x --max_completion_len)",
    "dapo": "token sum / the optimizer step's completion tokens (all micro-batches, all processes)",
    "bnpo": "token sum / each micro-batch's own completion tokens, then the mean over micro-batches"}
LOSS_TYPES = tuple(LOSS_NORMALISATION)
REWARDS = {"accuracy": reward_accuracy, "format": reward_format, "tag_count": reward_tag_count,
           "length": reward_length, "cosine": reward_cosine, "repetition": reward_repetition}


def score(completions: list[str], gold: str, names, weights, cosine_max_len: int = 1000):
    """-> total [G] (weighted nansum), per-reward [R, G] with NaN for None."""
    def run(n):
        return REWARDS[n](completions, gold, max_len=cosine_max_len) if n == "cosine" else REWARDS[n](completions, gold)
    per = torch.tensor([[float("nan") if v is None else v for v in run(n)] for n in names])
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
              max_completion_len: int, step_tokens_per_micro_batch=None, is_weight=None):
    """Per-token clipped objective with the k3 KL penalty. logp/old/ref/mask [N, C], adv [N].
    dapo divides by step_tokens_per_micro_batch (the optimizer step's completion tokens, all micro-batches and
    processes, / their number: update() passes it, so that the mean over micro-batches and ranks is the step's
    token sum / its token count); bnpo (and dapo without it) by this micro-batch's own token count.
    is_weight [N, C] (no gradient): each token's loss times it, TRL's truncated importance-sampling correction for
    a sampler that is not the trainer (vLLM): min(exp(old - sampler log-prob), cap).
    Returns (loss, mean KL over completion tokens, TRL's clip ratios: {"low", "high", "region"})."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    tok = -torch.min(ratio * adv[:, None], clipped * adv[:, None])
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        tok = tok + beta * kl
    if is_weight is not None:
        tok = tok * is_weight
    if loss_type == "grpo":         # mean over each sequence's tokens, then over sequences
        loss = ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":    # sum over tokens / (sequences x max completion length)
        loss = (tok * mask).sum() / (logp.shape[0] * max_completion_len)
    elif loss_type in ("dapo", "bnpo"):   # sum over tokens / tokens (dapo: the step's; bnpo: this micro-batch's)
        per_mb = step_tokens_per_micro_batch if loss_type == "dapo" else None
        loss = (tok * mask).sum() / (mask.sum().clamp(min=1) if per_mb is None else per_mb)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    n = mask.sum().clamp(min=1)
    # TRL's clip ratios: only a clip that zeroes the gradient counts (ratio below 1 - eps with A < 0, above
    # 1 + eps with A > 0); region = either
    low = (ratio < 1 - epsilon) & (adv[:, None] < 0)
    high = (ratio > 1 + epsilon) & (adv[:, None] > 0)
    clip = {name: ((c.to(mask.dtype) * mask).sum() / n).detach() for name, c in
            (("low", low), ("high", high), ("region", low | high))}
    return loss, ((kl * mask).sum() / n).detach(), clip


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
    sampler_logp: torch.Tensor | None = None   # [N, C] each sampled token's log-prob as the sampler saw it (vLLM)


def rollout_hf(net, tok, prompts, args, eos_ids, generator) -> Rollouts:
    ids, mask = SM.encode_prompts(tok, prompts, net.device, args.max_prompt_len)
    ids, mask = ids.repeat_interleave(args.num_generations, 0), mask.repeat_interleave(args.num_generations, 0)
    with L.lora_merged(net):
        out = SM.generate(net, ids, mask, max_new_tokens=args.max_completion_len, temperature=args.temperature,
                          top_p=args.top_p, eos_ids=eos_ids, pad_id=tok.pad_token_id, generator=generator,
                          logprob_temperature=getattr(args, "logprob_temperature", args.temperature))   # (the gap)
    steps = torch.arange(out.tokens.shape[1], device=out.tokens.device)
    cmask = (steps[None] < out.lengths[:, None]).long()
    texts = tok.batch_decode([t[:n].tolist() for t, n in zip(out.tokens, out.lengths)], skip_special_tokens=True)
    return Rollouts(ids, mask, out.tokens, cmask, texts, out.finished, out.logprobs)


def rollout_vllm(engine: SM.VLLMEngine, net, tok, prompts, args, eos_ids, step, rank: int = 0) -> Rollouts:
    """The same rollouts through vLLM: the current adapter is saved (one folder per rank) and sent as a new LoRA
    version; vLLM's KV cache is freed again afterwards where it shares the GPU with the trainer (sleep mode)."""
    adapter_dir = Path(args.out_dir) / f"_rollout_adapter_rank{rank}"
    L.save_adapter(net, adapter_dir, base_model=args.model)
    G = args.num_generations
    enc = [e for e in SM.prompt_token_ids(tok, prompts, args.max_prompt_len) for _ in range(G)]
    seeds = [zlib.crc32(f"{args.seed}/{rank}/{step}/{i}".encode()) for i in range(len(enc))]   # per completion
    outs = engine.generate(enc, seeds, temperature=args.temperature, top_p=args.top_p,
                           max_tokens=args.max_completion_len, stop_ids=eos_ids, adapter=(adapter_dir, step),
                           with_logprobs=True)
    engine.sleep()
    C, dev = args.max_completion_len, net.device
    cids = torch.full((len(outs), C), tok.pad_token_id, dtype=torch.long)
    slogp = torch.zeros(len(outs), C)
    for i, (toks, _, lps) in enumerate(outs):
        cids[i, :len(toks)] = torch.tensor(toks[:C], dtype=torch.long)
        slogp[i, :len(lps)] = torch.tensor(lps[:C])
    lengths = torch.tensor([min(len(t), C) for t, _, _ in outs])
    cmask = (torch.arange(C)[None] < lengths[:, None]).long()
    ids, mask = SM.left_pad(enc, tok.pad_token_id, dev)
    return Rollouts(ids, mask, cids.to(dev), cmask.to(dev), tok.batch_decode([t for t, _, _ in outs], skip_special_tokens=True),
                    torch.tensor([f for _, f, _ in outs], device=dev), slogp.to(dev))


# -----------------------------------------------------------------------------------------------
# One step's pieces, in the order train() calls them


def check_args(args):
    C.check_ranges(args, positive=("lora_r", "lora_alpha", "prompts_per_step", "grad_accum", "save_every", "vllm_is_cap",
                                   "log_every", "max_prompt_len", "max_completion_len", "max_grad_norm",
                                   "logprob_temperature", "cosine_max_len"),
                   nonnegative=("lr", "beta", "epsilon", "min_lr_rate", "stop_step"), fractions=("lora_dropout", "warmup_ratio"))
    unknown = [r for r in args.rewards if r not in REWARDS]
    if unknown:
        raise SystemExit(f"unknown reward {unknown}; choose from {', '.join(REWARDS)}")
    if len(args.reward_weights) != len(args.rewards):
        raise SystemExit(f"--reward_weights has {len(args.reward_weights)} values for {len(args.rewards)} "
                         f"rewards ({','.join(args.rewards)}): give one weight per reward, e.g. --reward_weights "
                         f"{','.join(['1'] * len(args.rewards))}")
    if args.num_generations < 2:
        raise SystemExit("--num_generations must be at least 2 (advantages are relative to the group)")
    world = C.world_size()
    if args.prompts_per_step % args.grad_accum or args.grad_accum % world:
        raise SystemExit(f"--prompts_per_step ({args.prompts_per_step}) must be a multiple of --grad_accum "
                         f"({args.grad_accum}), and --grad_accum of the number of processes ({world}): each "
                         "micro-batch holds whole prompt groups and every process runs as many")
    if args.loss_type not in LOSS_TYPES:
        raise SystemExit(f"unknown --loss_type {args.loss_type!r}")
    if args.rollout == "vllm" and args.model.startswith("random:"):
        raise SystemExit("--rollout vllm needs a model folder or hub id that vLLM can load, not random:")
    if args.num_iterations < 1 or args.max_steps < 1:
        raise SystemExit("--num_iterations and --max_steps must be >= 1")
    if args.save_every % args.num_iterations:     # a checkpoint inside a reused batch could not resume exactly
        raise SystemExit(f"--save_every {args.save_every} must be a multiple of --num_iterations {args.num_iterations}: "
                         "a batch of rollouts feeds that many steps, and a resume starts with fresh rollouts")
    if args.vllm_is_correction and args.rollout != "vllm":
        raise SystemExit("--vllm_is_correction corrects vLLM's sampling: it needs --rollout vllm")
    if args.rollout == "vllm" and args.temperature < 0.01:
        raise SystemExit(f"--temperature {args.temperature}: vLLM raises temperatures below 0.01 to 0.01; give "
                         "at least 0.01 with --rollout vllm")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature {args.temperature}: GRPO needs sampling (> 0); the log-probs are taken "
                         "at that temperature, and groups of identical greedy completions carry no advantage")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.logprob_temperature is None:
        args.logprob_temperature = args.temperature
    if args.wandb:
        if importlib.util.find_spec("wandb") is None:      # found out now, not after the first step
            raise SystemExit("--wandb needs the wandb package (pip install wandb)")


def effective_config(args) -> dict:
    """--dry_run: every argument after defaults, plus what they imply."""
    world = C.world_size()
    return {**vars(args), "world_size": world, "global_prompts_per_step": args.prompts_per_step,
            "completions_per_step": args.prompts_per_step * args.num_generations,
            "prompts_per_micro_batch": args.prompts_per_step // args.grad_accum,
            "micro_batches_per_process": args.grad_accum // world,
            "total_steps": min(args.stop_step or args.max_steps, args.max_steps),
            "system_prompt_text": D.system_prompt_for(args.system_prompt, args.dataset),
            # what the flags do at run time
            "unparseable_gold_prompts": "dropped" if every_reward_needs_gold(args.rewards) else "kept",
            "loss_normalisation": LOSS_NORMALISATION[args.loss_type]}


class PromptStream:
    """Every rank reads the same shuffled order (a fresh shuffle per epoch) and takes its own slice of each
    step's prompts. Its position (epoch, pos) is part of the resume state."""

    def __init__(self, examples, seed: int, epoch: int = 0, pos: int = 0):
        self.examples, self.seed, self.epoch, self.pos = examples, seed, epoch, pos
        self.perm = self._order()

    def _order(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.pos >= len(self.perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self._order()
            out.append(self.examples[self.perm[self.pos]])
            self.pos += 1
        return out


@dataclass
class Batch:
    """One step's rollouts, scored: what the update (and, with --num_iterations > 1, the next ones) uses."""
    examples: list                # this rank's P examples
    prompts: list[str]            # their formatted prompts
    ro: Rollouts                  # P x G completions, groups contiguous
    rewards: torch.Tensor         # [P*G] weighted sums
    per_reward: torch.Tensor      # [R, P*G], NaN where a reward returned None
    adv: torch.Tensor             # [P*G] group-relative advantages
    old: list | None              # old log-probs per micro-batch (num_iterations > 1), else None
    seconds_rollout: float
    seconds_reward: float


def sample_and_score(net, tok, examples, system_prompt, args, eos_ids, generator, engine, step) -> Batch:
    """Rollouts (LoRA merged), rewards, advantages, and the old log-probs when batches are reused."""
    t0 = time.time()
    prompts = [D.format_prompt(tok, e.question, system_prompt, args.chat_template) for e in examples]
    if engine is not None:
        ro = rollout_vllm(engine, net, tok, prompts, args, eos_ids, step, C.rank())
    else:
        ro = rollout_hf(net, tok, prompts, args, eos_ids, generator)
    t1 = time.time()
    G = args.num_generations
    totals, pers = zip(*(score(ro.texts[i * G:(i + 1) * G], e.answer, args.rewards, args.reward_weights,
                               args.cosine_max_len) for i, e in enumerate(examples)))
    rewards, per_reward = torch.cat(totals), torch.cat(pers, dim=1)            # [P*G], [R, P*G]
    adv = group_advantages(rewards, G, args.scale_rewards).to(net.device)
    old = None
    if args.num_iterations > 1:                        # old log-probs of the policy that sampled
        with torch.no_grad(), C.autocast(net.device, net.dtype):
            old = [micro_logprobs(net, ro, sl, args.logprob_temperature)
                   for sl in micro_slices(len(examples), G, args)]
    return Batch(examples, prompts, ro, rewards, per_reward, adv, old, t1 - t0, time.time() - t1)


def micro_slices(P: int, G: int, args):
    """Rows of each micro-batch of this process's P prompt groups: prompts_per_step / grad_accum prompts
    (both counted over all processes) of G completions each."""
    per = args.prompts_per_step // args.grad_accum * G
    return [slice(j * per, (j + 1) * per) for j in range(P * G // per)]


def micro_logprobs(net, ro: Rollouts, sl: slice, temperature: float):
    """Log-probs [n, C] of the completion tokens of rows sl, given prompt + completion."""
    ids = torch.cat([ro.prompt_ids[sl], ro.completion_ids[sl]], 1)
    mask = torch.cat([ro.prompt_mask[sl], ro.completion_mask[sl]], 1)
    return net.logprobs(ids, mask, start=ro.prompt_ids.shape[1] - 1, temperature=temperature)


def update(net, batch: Batch, args, params, world: int, step: int = 1) -> dict:
    """The GRPO objective over grad_accum micro-batches of whole groups, then the clipped gradient (summed
    over ranks). -> mean loss, KL and clip fraction over the micro-batches, and the gradient norm."""
    kls, clips, losses, gaps = [], [], [], []
    slices = micro_slices(len(batch.examples), args.num_generations, args)
    per_mb = None
    if args.loss_type == "dapo":          # the step's completion tokens (all ranks) per micro-batch (all ranks)
        n_tok = C.all_reduce_sum(batch.ro.completion_mask.sum().to(torch.float32), world)
        per_mb = n_tok.clamp(min=1) / (len(slices) * world)
    for j, sl in enumerate(slices):
        with C.autocast(net.device, net.dtype):
            logp = micro_logprobs(net, batch.ro, sl, args.logprob_temperature)
            ref = None
            if args.beta != 0.0:                       # the reference policy: the same weights, LoRA off
                with torch.no_grad(), L.lora_disabled(net):
                    ref = micro_logprobs(net, batch.ro, sl, args.logprob_temperature)
        old = logp.detach() if batch.old is None else batch.old[j]
        if batch.ro.sampler_logp is not None and batch.old is None:   # the sampler-trainer gap (dropout included)
            m = batch.ro.completion_mask[sl].bool()
            gaps.append((logp.detach().float() - batch.ro.sampler_logp[sl])[m])      # trainer - sampler, [tokens]
        is_weight = None
        if batch.ro.sampler_logp is not None and args.vllm_is_correction:     # TRL's truncated IS, token level
            is_weight = torch.exp(old.float() - batch.ro.sampler_logp[sl]).clamp(max=args.vllm_is_cap)
        loss, kl, clip = grpo_loss(logp, old, ref, batch.adv[sl], batch.ro.completion_mask[sl], beta=args.beta,
                                   epsilon=args.epsilon, loss_type=args.loss_type,
                                   max_completion_len=args.max_completion_len, step_tokens_per_micro_batch=per_mb,
                                   is_weight=is_weight)
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step}: loss is {loss.item()} (NaN/inf); " + (
                "at the first step nothing has trained yet: the model or its adapter produce it (check their weights, "
                "or try --dtype fp32)" if step == 1 else "lower --lr or check the data"))
        (loss / len(slices)).backward()                # the mean over this process's micro-batches
        kls.append(kl)
        clips.append(clip)
        losses.append(loss.detach())
    C.all_reduce_mean([p.grad for p in params if p.grad is not None], world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    gap = {}
    if gaps and torch.cat(gaps).numel():
        d = torch.cat(gaps)                            # log(trainer / sampler) per completion token
        r = d.exp()                                    # the importance ratio, before any truncation
        gap = {"sampler_logp_gap_mean": d.abs().mean().item(), "sampler_logp_gap_max": d.abs().max().item(),
               "sampler_is_ratio_min": r.min().item(), "sampler_is_ratio_mean": r.mean().item(),
               "sampler_is_ratio_max": r.max().item()}
    return {"loss": torch.stack(losses).mean().item(), "kl": torch.stack(kls).mean().item(),
            **{f"clip_ratio/{k}": torch.stack([c[k] for c in clips]).mean().item() for k in clips[0]},
            "grad_norm": float(grad_norm), **gap}


def step_metrics(batch: Batch, stats: dict, args, world: int, device) -> dict:
    """The step's metrics by name, averaged over ranks (a *_max: the maximum over ranks, a *_min the minimum)."""
    ro, G = batch.ro, args.num_generations
    lens = ro.completion_mask.sum(1).float()
    spread = batch.rewards.view(-1, G).std(1)
    row = {"reward": batch.rewards.mean().item(), "reward_std": spread.mean().item(),
           "zero_spread_groups": (spread == 0).float().mean().item(), "completion_len_mean": lens.mean().item(),
           "completion_len_max": lens.max().item(), "truncated": (~ro.finished).float().mean().item(), **stats}
    for i, n in enumerate(args.rewards):
        row[f"reward/{n}"] = batch.per_reward[i].nanmean().item()
        row[f"reward_none/{n}"] = torch.isnan(batch.per_reward[i]).float().sum().item() * world  # a count
    if world > 1:
        own = dict(row)
        v = torch.tensor(list(row.values()), dtype=torch.float64, device=device)
        dist.all_reduce(v)
        row = dict(zip(row, (v / world).tolist()))
        # a *_max is the maximum over ranks (the longest completion, the largest gap), a *_min the minimum
        for end, op in (("_max", dist.ReduceOp.MAX), ("_min", dist.ReduceOp.MIN)):
            for k in [k for k in row if k.endswith(end)]:
                x = torch.tensor(own[k], dtype=torch.float64, device=device)
                dist.all_reduce(x, op=op)
                row[k] = x.item()
    return row


# -----------------------------------------------------------------------------------------------
# Training


def every_reward_needs_gold(rewards) -> bool:
    """Whether a prompt whose gold cannot be parsed leaves no reward to train on (then it is dropped)."""
    return all(r in GOLD_REWARDS for r in rewards)


def select_prompts(examples, rewards, name: str = "dataset"):
    """Prompts whose gold math-verify cannot parse: dropped only when every reward grades against the gold (no
    reward could train on them); otherwise kept, as Tina did, their gold-free rewards still training (the
    others score None: left out, counted). -> (usable examples, number with an unparseable gold)."""
    needs_gold = [r in GOLD_REWARDS for r in rewards]
    modes = {GOLD_REWARDS[r] for r in rewards if r in GOLD_REWARDS}
    fails = {e.index: [m for m in modes if not D.gold_parses(e.answer, m)] for e in examples}
    bad = {i for i, f in fails.items() if f}
    if every_reward_needs_gold(rewards):       # dropped when no reward can grade it
        usable = [e for e in examples if len(fails[e.index]) < len(modes)]
    else:
        usable = examples
    if bad and every_reward_needs_gold(rewards):
        print(f"{name}: dropped {len(bad)} of {len(examples)} prompts whose gold answer math-verify cannot parse "
              "(every reward needs it)")
    elif bad:
        print(f"{name}: {len(bad)} of {len(examples)} gold answers math-verify cannot parse: kept for "
              f"{', '.join(r for r, n in zip(rewards, needs_gold) if not n)}; the other rewards score them None")
    return usable, len(bad)


def setup(args, rank: int, device):
    """Data, model, tokenizer, LoRA, optimizer and schedule; everything checked before the first step."""
    examples, data_stats = D.load_examples(args.dataset, args.question_field, args.answer_field)
    usable, data_stats["unparseable_gold"] = select_prompts(examples, args.rewards, args.dataset)
    data_stats["dropped_prompts"] = len(examples) - len(usable)
    # the data's identity, in the run's arguments: a --resume on edited data is refused (load_training_state)
    args.data_checksum = zlib.crc32(json.dumps([[e.question, e.answer] for e in usable]).encode())
    if not usable:
        raise SystemExit(f"{args.dataset}: no example has a gold answer math-verify can parse")
    net = M.load_model(args.model, device, C.pick_dtype(args.dtype, device), seed=args.seed)
    args.model_dir = str(M.resolve_model_dir(args.model)) if not args.model.startswith("random:") else None
    tok = M.load_tokenizer(args.tokenizer or args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if args.max_prompt_len + args.max_completion_len > net.cfg.max_position_embeddings:   # found now, not at step 40
        raise SystemExit(f"--max_prompt_len {args.max_prompt_len} + --max_completion_len {args.max_completion_len} do "
                         f"not fit the model's trained context ({net.cfg.max_position_embeddings} positions)")
    eos_ids = M.eos_token_ids(tok, args.model, net.cfg)
    if not eos_ids:
        raise SystemExit("the tokenizer and model config name no EOS token: completions could never end")
    torch.manual_seed(args.seed)                 # identical LoRA init on every rank
    L.attach_lora(net, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    torch.manual_seed(args.seed + 1 + rank)      # then each rank's own stream (dropout differs across ranks)
    net.gradient_checkpointing = C.use_checkpointing(args.gradient_checkpointing,
                                                     args.max_prompt_len + args.max_completion_len)
    params = L.lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.max_steps, args.warmup_ratio, args.min_lr_rate))
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    engine = None
    if args.rollout == "vllm":        # beside the trainer on one GPU: at most 0.4 of it, and only what is free
        engine = SM.VLLMEngine(args.model_dir, max_lora_rank=args.lora_r, seed=args.seed + rank, dtype=net.dtype,
                               max_model_len=args.max_prompt_len + args.max_completion_len,
                               gpu_memory_utilization=SM.vllm_memory_share(cap=0.4), sleep_mode=True,
                               # the sampled tokens' log-probs as the trainer computes them: at temperature 1
                               # (raw) or at the sampling temperature (processed: after the temperature)
                               logprobs_mode="raw_logprobs" if args.logprob_temperature == 1.0 else "processed_logprobs")
    return usable, data_stats, net, tok, eos_ids, params, opt, sched, generator, engine


def train(args) -> dict:
    """sample -> score -> advantages -> update -> log -> save, for stop_step steps (see the docstring)."""
    check_args(args)
    if args.dry_run:
        return C.print_config(effective_config(args))
    rank, world, device = C.setup_distributed(args.device)
    torch.manual_seed(args.seed + rank)
    out_dir = Path(args.out_dir)
    log = C.RunLog(out_dir, vars(args), "grpo_lora", enabled=rank == 0, n_gpus=world if device.type == "cuda" else 0,
                   gpu_hour_usd=args.gpu_hour_usd, resume=args.resume, overwrite=args.overwrite)
    usable, data_stats, net, tok, eos_ids, params, opt, sched, generator, engine = setup(args, rank, device)
    system_prompt = D.system_prompt_for(args.system_prompt, args.dataset)
    stop = min(args.stop_step or args.max_steps, args.max_steps)
    step, stream = 0, PromptStream(usable, args.seed)
    if args.resume:
        state = L.load_training_state(out_dir, net, opt, generator, run_args=vars(args), may_change=RESUME_MAY_CHANGE,
                                      rank=rank)
        step, stream = state["step"], PromptStream(usable, args.seed, state["epoch"], state["pos"])
        with warnings.catch_warnings():               # (stepping the schedule to the saved step, no optimizer step)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                sched.step()
        log.resume(step)
    log.write_run(data=data_stats, trainable_params=sum(p.numel() for p in params), eos_ids=eos_ids,
                  **({"vllm": engine.settings} if engine is not None else {}))
    P, batch = args.prompts_per_step // world, None            # this process's share of the step's prompts
    bar = tqdm(total=stop, initial=step, desc="grpo", disable=rank != 0, dynamic_ncols=True)
    while step < stop:
        t0 = time.time()
        net.train()
        if step % args.num_iterations == 0 or batch is None:                 # fresh rollouts
            mine = stream.take(P * world)[rank * P:(rank + 1) * P]          # every rank reads the same order
            batch = sample_and_score(net, tok, mine, system_prompt, args, eos_ids, generator, engine, step)
            t_roll, t_reward = batch.seconds_rollout, batch.seconds_reward
        else:                                                                 # the same batch again
            t_roll = t_reward = 0.0
        t2 = time.time()
        stats = update(net, batch, args, params, world, step + 1)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ro = batch.ro
        row = {"step": step, **step_metrics(batch, stats, args, world, device), "lr": lr, "epoch": stream.epoch,
               "seconds_rollout": t_roll, "seconds_reward": t_reward, "seconds_update": time.time() - t2,
               "tokens_per_s": float(ro.completion_mask.sum() + ro.prompt_mask.sum()) * world / (time.time() - t0)}
        log.metrics(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['completion_len_mean']:.0f}", kl=f"{row['kl']:.4f}")
        if args.wandb and rank == 0:
            import wandb
            if wandb.run is None:
                wandb.init(project=args.wandb, config=vars(args))
            wandb.log(row, step=step)
        if step % args.log_every == 0 or step == 1:
            log.samples([{"step": step, "prompt": batch.prompts[0], "gold": batch.examples[0].answer,
                          "completion": ro.texts[k], "reward": float(batch.rewards[k])}
                         for k in range(args.num_generations)])
        if step % args.save_every == 0 or (step == stop and step % args.num_iterations == 0):
            L.save_checkpoint(net, opt, out_dir, step, {"epoch": stream.epoch, "pos": stream.pos}, generator,
                              args.model, log, vars(args), rank, world)
    bar.close()
    if engine is not None:            # before save_final closes torchrun's process group, which vLLM uses
        engine.close()
    L.save_final(net, out_dir, step, args.model, log, rank, world)
    return {"step": step, "out_dir": str(out_dir)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(usage="python grpo_lora.py --model MODEL --dataset DATA --out_dir OUT [flags]   (recipes/tina_*.sh: the papers' runs)", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = C.add_run_args(p, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "out/grpo")
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
    g.add_argument("--rewards", type=C.csv_list(), default=["format", "accuracy"],
                   help=f"comma-separated, from {', '.join(REWARDS)} (%(default)s)")
    g.add_argument("--reward_weights", type=C.csv_list(float), default=[1.0, 2.0], help="one per reward (%(default)s)")
    g.add_argument("--cosine_max_len", type=int, default=1000,
                   help="length (characters) over which the cosine reward falls; past it the cosine wraps, as in "
                   "Tina (%(default)s: Tina's default; its open_rs3 and Dr.GRPO runs used 3584)")
    g.add_argument("--num_generations", type=int, default=6, help="completions per prompt, G (%(default)s)")
    g.add_argument("--prompts_per_step", type=int, default=8,
                   help="prompts per optimizer step, all processes together (%(default)s: Tina's 2 GPUs x 4)")
    g.add_argument("--grad_accum", type=int, default=8,
                   help="micro-batches per optimizer step, all processes together; each holds prompts_per_step / "
                   "grad_accum prompts (%(default)s: Tina's one prompt of G completions per micro-batch)")
    g.add_argument("--beta", type=float, default=0.04, help="KL coefficient; 0 skips the reference pass (%(default)s)")
    g.add_argument("--epsilon", type=float, default=0.2, help="ratio clip range (%(default)s)")
    g.add_argument("--num_iterations", type=int, default=1, help="optimizer steps per batch of rollouts (%(default)s)")
    g.add_argument("--loss_type", default="grpo", choices=LOSS_TYPES,
                   help="loss aggregation: grpo (per-sequence mean, then mean; Tina), dr_grpo (token sum / (sequences x "
                   "max_completion_len)), dapo (token sum / the optimizer step's token count), bnpo (the same per "
                   "micro-batch, TRL's bnpo) (%(default)s)")
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
    C.add_checkpointing_arg(g)
    g = p.add_argument_group("sampling")
    g.add_argument("--rollout", default="hf", choices=["hf", "vllm"], help="built-in sampler or vLLM")
    g.add_argument("--vllm_is_correction", action="store_true",
                   help="with --rollout vllm: TRL's truncated importance-sampling correction, each token's loss times "
                   "min(exp(trainer log-prob - vLLM's), --vllm_is_cap) (off: trl 0.15.2, which Tina ran, had none)")
    g.add_argument("--vllm_is_cap", type=float, default=2.0, help="its truncation (%(default)s: TRL's default)")
    g.add_argument("--temperature", type=float, default=0.7, help="(%(default)s)")
    g.add_argument("--logprob_temperature", type=float, default=None,
                   help="temperature of the policy, reference and KL log-probs (default: --temperature, as later "
                   "TRL versions; 1.0 = trl 0.15.2, which Tina ran: the Tina recipes set it)")
    g.add_argument("--top_p", type=float, default=1.0, help="(%(default)s)")
    g.add_argument("--chat_template", default="auto", choices=["auto", "tina"],
                   help="auto: the tokenizer's template; tina: Tina's, whose generation prompt ends at the assistant "
                   "tag (R1-Distill's own appends '<think>\\n')")
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
    C.cli(main)
