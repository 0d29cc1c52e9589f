"""
sae_tune.py -- Resa step 2 (SAE-guided elicitation): train LoRA on a target model so that, with a frozen SAE
replacing its residual stream at layer L, it matches its own output distribution without the SAE.

Usage
  CPU, the toy world:
    python sae_tune.py --model toy/out/base --sae out/toy/sae/layers.2 --dataset toy/out/train.jsonl \
        --ctx_len 256 --lr 1e-3 --device cpu --out_dir out/toy/sae_tuned
  GPU, Resa's recipe (recipes/resa_sae_tune.sh):
    python sae_tune.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --sae out/resa_sae/layers.12 \
        --dataset still --out_dir out/resa_tuned
  The plain SFT-LoRA baseline on the same trace-free text and steps:
    python sae_tune.py ... --sae none --loss ce
  Several GPUs: torchrun --nproc_per_node N sae_tune.py ...

Per step (Resa's objective): teacher = target, LoRA off, no SAE -> p (no grad); student = target + LoRA + the
frozen SAE at its layer -> log q; loss = sum over tokens of KL(p || q) / sequences (torch's kl_div
'batchmean'), computed in row chunks so no float32 [tokens, vocab] tensor exists for the whole sequence.
AdamW (Resa: lr 1e-6, weight decay 0.01 = torch's default), constant lr, 2 epochs, grad-norm clip 1.0.
The result is an ordinary PEFT adapter: use it without the SAE (evaluate.py --adapter ...).

--sae_grad block (default, as Resa's code) runs the SAE under no_grad, so LoRA in layers <= L gets no
gradient and stays at its initialisation; --sae_grad pass lets gradients flow through the frozen SAE.

The text is chunked as for train_sae.py, by data.pack_chunks, which reproduces sparsify's chunk_and_tokenize
(Resa's, for both stages: EOS-joined streams of 2,048 texts, a BOS opening every chunk, tested against it).
Controls (not in Resa): --perturb random_sae inserts an untrained SAE of --sae's shape and k, --perturb noise
Gaussian noise with --sae's FVU on the text (recipes/resa_controls.sh runs every arm).
Simplifications versus Resa's code: no gradient accumulation (Resa used batch 1 without accumulation either).
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import common as C
import data as D
import lora as L
import model as M
import sae as S


def kl_loss(net, ids, sae: S.SAE | None, layer: int, grad: str, chunk_size: int = 512, teacher=None):
    """KL(teacher || target + LoRA + SAE), summed over tokens / batch. -> (loss, sae mse or None).
    The teacher is the target itself without LoRA and SAE (Resa), or `teacher`, another model of the same
    architecture (--teacher_adapter: the upper bound that distils the source's own distribution)."""
    with torch.no_grad(), L.lora_disabled(net):
        h_teacher = (teacher if teacher is not None else net)(ids, hidden=True)     # [B, T, D]
    hook = S.insert_sae(net, sae, layer, grad) if sae is not None else None
    try:
        h_student = net(ids, hidden=True)
    finally:
        if hook is not None:
            hook.remove()
    loss = M.chunked_kl(net.lm_head, h_teacher, h_student, chunk_size=chunk_size) / ids.shape[0]
    return loss, hook.last_mse if hook is not None else None


def ce_loss(net, ids, loss_mask):
    """Mean next-token loss over the tokens loss_mask marks [B, T] (the SFT baselines: the assistant part, or
    every real token)."""
    lp = net.logprobs(ids)                                        # [B, T-1]
    m = loss_mask[:, 1:].to(lp.dtype)
    return -(lp * m).sum() / m.sum().clamp(min=1)


def load_sae_arg(args):
    """--sae -> (SAE or None, layer): the layer from our cfg.json, else the sparsify folder name layers.N,
    else --layer. Runs before the model loads, so a bad path fails at once."""
    if args.sae == "none":
        if args.loss == "kl" and not args.teacher_adapter:
            raise SystemExit("--loss kl needs an SAE or a --teacher_adapter (otherwise the student equals the "
                             "teacher); use --loss ce")
        return None, None
    path = Path(args.sae)
    if path.is_dir() and not (path / "cfg.json").exists() and not list(path.glob("*/cfg.json")):
        raise SystemExit(f"--sae {args.sae}: no cfg.json there; pass an SAE folder (e.g. out/sae/layers.12)")
    try:
        sae = S.load_sae(args.sae, hookpoint=f"layers.{args.layer}" if args.layer is not None else None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--sae {args.sae}: {e}") from None
    if args.layer is not None and sae.layer is not None and args.layer != sae.layer:
        raise SystemExit(f"--layer {args.layer}, but {args.sae} was trained on layer {sae.layer} (its cfg.json or "
                         "folder name): the SAE's own layer wins; drop --layer")
    layer = args.layer if args.layer is not None else sae.layer
    if layer is None:
        raise SystemExit(f"--sae {args.sae}: the SAE names no layer; pass --layer")
    return sae, layer


def perturbation(args, sae: S.SAE, layer: int, net, ids) -> tuple:
    """--perturb: the SAE itself (Resa), an untrained SAE of its shape (random_sae), or Gaussian noise with its
    FVU (noise), measured on the first --calib_chunks chunks of the text; -> (what goes in, its record)."""
    xs = [S.collect_residuals(net, ids[i:i + 1].to(net.device), [layer])[layer][0].float()
          for i in range(min(args.calib_chunks, ids.shape[0]))]                       # [T, D] each
    ref = S.perturbation_fvu(sae, xs)
    if args.perturb == "random_sae":
        sae = S.random_like(sae, xs, args.seed).to(net.device)
    elif args.perturb == "noise":
        sae = S.noise_matching(sae, xs).to(net.device)
    with torch.random.fork_rng(devices=[net.device] if net.device.type == "cuda" else []):
        fvu = S.perturbation_fvu(sae, xs)             # (noise: one draw; its expectation equals ref)
    return sae, {"perturb": args.perturb, "fvu": fvu, "sae_fvu": ref, "calib_tokens": sum(len(x) for x in xs),
                 **({"noise_sigma": float(sae.sigma)} if args.perturb == "noise" else {})}


def check_fit(sae: S.SAE, layer: int, net, grad: str = "block"):
    n = net.cfg.num_hidden_layers
    if not 0 <= layer < n:
        raise SystemExit(f"SAE layer {layer} does not exist: the target has {n} layers (0..{n - 1})")
    if grad == "block" and layer == n - 1:
        raise SystemExit(f"SAE at the last layer ({layer}) with --sae_grad block: no LoRA layer above it would get "
                         "a gradient; use an earlier layer or --sae_grad pass")
    if sae.d_in != net.cfg.hidden_size:
        raise SystemExit(f"SAE d_in={sae.d_in} does not fit the target's hidden size {net.cfg.hidden_size}: "
                         "it was trained on another architecture")


# (not --max_steps or --epochs: they set the lr schedule's length, which a resumed run keeps)
RESUME_MAY_CHANGE = ("save_every", "resume", "overwrite", "device", "gpu_hour_usd")


def lr_factor(step: int, total: int, schedule: str, warmup_ratio: float) -> float:
    """constant (Resa's SAE-Tuning), or linear warm-up over ceil(warmup_ratio x total) steps then linear decay
    to 0 (transformers' default schedule, which Resa's SFT baseline ran)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def batch_rows(step: int, n: int, per_step: int, steps_per_epoch: int, seed: int, rank: int, world: int,
               shuffle: bool = True):
    """The chunk indices of this rank's share of step `step`: a fresh seeded shuffle per epoch, or in order."""
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    rows = order[k * per_step:(k + 1) * per_step][rank::world]
    return epoch, rows if len(rows) else order[:per_step // world]     # a short last step: the epoch's start


def setup(args, device):
    """Text, SAE, model, LoRA, optimizer; the SAE is checked against the model before any step."""
    tok = M.load_tokenizer(args.tokenizer or args.model)
    examples, data_stats = D.load_examples(args.dataset, args.question_field, args.answer_field)
    sp = D.SYSTEM_PROMPTS.get(args.system_prompt, args.system_prompt)
    pieces = D.text_pieces(tok, examples, args.text_format, sp)
    if args.packing:                                              # fixed chunks of the joined texts
        ids, amask = D.pack_chunks(tok, pieces, args.ctx_len)
        valid = torch.ones_like(amask)
    else:                                                         # one example per row, right-padded
        ids, amask, valid = D.pad_rows(tok, pieces, args.ctx_len)
    lmask = valid if args.loss_on == "all" else amask             # what the CE loss counts
    if args.mask_pad_labels:                                      # trl's collator: no loss on pad-token labels
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        data_stats["pad_labels_masked"] = int((lmask & (ids == pad)).sum())
        lmask = lmask & (ids != pad)
    if args.loss == "ce":             # rows with no target token would log ce 0 and still step AdamW: left out
        keep = lmask[:, 1:].any(1)
        data_stats["rows_without_loss_tokens"] = int((~keep).sum())
        if not keep.any():
            raise SystemExit(f"no chunk of {args.ctx_len} tokens holds a token the CE loss counts (--loss_on "
                             f"{args.loss_on}): raise --ctx_len")
        if not keep.all():
            print(f"{args.dataset}: left out {int((~keep).sum())} of {len(keep)} rows with no token to train on")
            ids, lmask = ids[keep], lmask[keep]
    args.data_checksum = zlib.crc32(ids.numpy().tobytes())       # the text's identity: --resume refuses a change
    sae, layer = load_sae_arg(args)
    net = M.load_model(args.model, device, C.pick_dtype(args.dtype, device), seed=args.seed)
    if sae is not None:
        check_fit(sae, layer, net, args.sae_grad)
        sae.to(device=device, dtype=torch.float32)
        sae, data_stats["perturbation"] = perturbation(args, sae, layer, net, ids)
    teacher = None
    if args.teacher_adapter:                                      # the upper bound: the source's own distribution
        teacher = M.load_model(args.model, device, C.pick_dtype(args.dtype, device), seed=args.seed)
        try:
            L.load_adapter(teacher, args.teacher_adapter)
        except ValueError as e:
            raise SystemExit(f"--teacher_adapter {args.teacher_adapter}: {e}") from None
        L.unload_lora(teacher, merge=True)
    torch.manual_seed(args.seed)                                  # same LoRA init on every rank
    L.attach_lora(net, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    net.gradient_checkpointing = C.use_checkpointing(args.gradient_checkpointing, args.ctx_len)
    params = L.lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return ids, lmask, data_stats, sae, layer, net, params, opt, teacher


def check_args(args):
    world = C.world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch_size {args.batch_size} (all processes together) must be a multiple of the "
                         f"number of processes ({world})")
    if args.ctx_len < 2:
        raise SystemExit(f"--ctx_len {args.ctx_len}: a chunk needs at least 2 tokens (one predicts the next)")
    C.check_ranges(args, positive=("lora_r", "lora_alpha", "epochs", "batch_size", "kl_chunk", "ctx_len",
                                   "max_grad_norm", "calib_chunks"),
                   nonnegative=("lr", "max_steps", "save_every", "weight_decay"), fractions=("lora_dropout", "warmup_ratio"))
    loss = resolved_loss(args)
    if args.perturb != "sae" and args.sae == "none":
        raise SystemExit(f"--perturb {args.perturb} is shaped after an SAE: pass its folder with --sae")
    if loss == "kl" and (not args.packing or args.loss_on == "all" or args.mask_pad_labels):
        raise SystemExit("--no_packing, --loss_on all and --mask_pad_labels are for the SFT baselines (--sae none --loss ce): the KL runs "
                         "on packed chunks without padding")


def resolved_loss(args) -> str:
    """--loss, or by default: ce for an SFT baseline (no SAE, no teacher), else kl."""
    return args.loss or ("ce" if args.sae == "none" and not args.teacher_adapter else "kl")


def train(args) -> dict:
    check_args(args)
    if args.dry_run:
        return C.print_config({**vars(args), "loss_resolved": resolved_loss(args),
                               "world_size": C.world_size(),
                               "sequences_per_step": args.batch_size, "tokens_per_step": args.batch_size * args.ctx_len,
                               "total_steps": args.max_steps or None,
                               "chunking": D.CHUNKING if args.packing else
                               {"method": "one example per row, cut at --ctx_len, padded"}})
    rank, world, device = C.setup_distributed(args.device)
    out_dir = Path(args.out_dir)
    args.loss = resolved_loss(args)
    log = C.RunLog(out_dir, vars(args), "sae_tune", enabled=rank == 0, n_gpus=world if device.type == "cuda" else 0,
                   gpu_hour_usd=args.gpu_hour_usd, resume=args.resume, overwrite=args.overwrite)
    ids, lmask, data_stats, sae, layer, net, params, opt, teacher = setup(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed + 1 + rank)                       # dropout noise differs across ranks
    per_step = args.batch_size                                    # sequences per step, all processes together
    steps_per_epoch = math.ceil(ids.shape[0] / per_step)
    total = min(args.epochs * steps_per_epoch, args.max_steps or 1 << 62)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, args.lr_schedule, args.warmup_ratio))
    step = 0
    if args.resume:
        step = L.load_training_state(out_dir, net, opt, generator, vars(args), RESUME_MAY_CHANGE, rank=rank)["step"]
        with warnings.catch_warnings():               # (stepping the schedule to the saved step, no optimizer step)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                sched.step()
        log.resume(step)
    log.write_run(sae=args.sae, sae_layer=layer, sae_grad=args.sae_grad if sae else None, loss=args.loss, sae_source_model=sae.meta.get("source_model") if sae else None,
                  sae_adapter=sae.meta.get("adapter") if sae else None, data=data_stats, chunks=int(ids.shape[0]),
                  ctx_len=int(ids.shape[1]), steps=total, trainable_params=sum(p.numel() for p in params))
    bar = tqdm(total=total, initial=step, desc=f"sae_tune ({args.loss})", disable=rank != 0, dynamic_ncols=True)
    net.train()
    while step < total:
        t0 = time.time()
        epoch, rows = batch_rows(step, ids.shape[0], per_step, steps_per_epoch, args.seed, rank, world, args.shuffle)
        batch, bmask = ids[rows].to(device), lmask[rows].to(device)
        with C.autocast(device, net.dtype):
            if args.loss == "kl":                                 # Resa's objective
                loss, mse = kl_loss(net, batch, sae, layer, args.sae_grad, args.kl_chunk, teacher)
            else:                                                 # the SFT baseline
                loss, mse = ce_loss(net, batch, bmask), None
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step + 1}: loss is {loss.item()} (NaN/inf); " + (
                "at the first step nothing has trained yet: the model, SAE or adapter produce it (check their weights, "
                "or try --dtype fp32)" if step == 0 else "lower --lr"))
        loss.backward()
        C.all_reduce_mean([p.grad for p in params if p.grad is not None], world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        vals = torch.tensor([loss.item(), mse.item() if mse is not None else 0.0], dtype=torch.float64)
        if world > 1:                                             # averaged over ranks
            vals = vals.to(device)
            dist.all_reduce(vals)
            vals = (vals / world).cpu()
        row = {"step": step, "epoch": epoch, args.loss: vals[0].item(), "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": batch.numel() * world / (time.time() - t0)}   # (rank 0's share x world)
        if mse is not None:
            row["sae_mse"] = vals[1].item()
        log.metrics(row)
        bar.update(1)
        bar.set_postfix({args.loss: f"{row[args.loss]:.4f}"})
        if (args.save_every and step % args.save_every == 0) or step == total:
            L.save_checkpoint(net, opt, out_dir, step, {"epoch": epoch}, generator, args.model, log, vars(args), rank,
                              world)
    bar.close()
    L.save_final(net, out_dir, step, args.model, log, rank, world)
    return {"step": step, "out_dir": str(out_dir)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(usage='python sae_tune.py --model TARGET --sae SAE_FOLDER (or none) --dataset DATA --out_dir OUT [flags]', description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = C.add_run_args(p, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "out/sae_tune")
    g = p.add_argument_group("SAE")
    g.add_argument("--sae", default="none", help="SAE folder (ours or sparsify's), or none for the SFT baseline")
    g.add_argument("--layer", type=int, default=None, help="SAE layer when its cfg.json and folder name give none")
    g.add_argument("--sae_grad", default="block", choices=["block", "pass"],
                   help="block: SAE under no_grad as in Resa (default); pass: gradients flow through it")
    g.add_argument("--loss", default=None, choices=["kl", "ce"], help="kl (default with an SAE) or ce (default without)")
    g.add_argument("--teacher_adapter", default=None,
                   help="KL to the target + this adapter instead of the target itself (with --sae none: the upper "
                   "bound that distils the source's logits on the same text)")
    g.add_argument("--perturb", default="sae", choices=["sae", "random_sae", "noise"],
                   help="what replaces the residual stream at the SAE's layer: the SAE (Resa, default); controls: "
                   "an untrained SAE of its shape and k (random_sae: random encoder, unit-norm decoder rows, b_dec = "
                   "the text's mean), or Gaussian noise with the SAE's FVU on the text (noise)")
    g.add_argument("--calib_chunks", type=int, default=16,
                   help="chunks of the text on which --perturb measures the SAE's FVU (%(default)s)")
    g.add_argument("--kl_chunk", type=int, default=512, help="rows per vocabulary chunk in the KL (%(default)s)")
    g = D.add_text_args(p, "elicitation")
    g.add_argument("--no_packing", dest="packing", action="store_false",
                   help="one example per row, cut at --ctx_len and padded (SFTTrainer without packing); default: "
                   "the texts joined and cut into --ctx_len chunks")
    g.add_argument("--mask_pad_labels", action="store_true",
                   help="no loss on tokens equal to the tokenizer's pad token (or EOS without one), as transformers' "
                   "DataCollatorForLanguageModeling under Resa's SFTTrainer: R1-Distill's pad is its EOS, so Resa's "
                   "SFT baseline never trained on the reply's closing EOS (CE only)")
    g.add_argument("--loss_on", default="assistant", choices=["assistant", "all"],
                   help="what the CE loss counts: the assistant part (default) or every token (SFTTrainer's default)")
    L.add_lora_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-6, help="AdamW lr, constant (%(default)s)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (torch default, as Resa)")
    g.add_argument("--epochs", type=int, default=2, help="(%(default)s)")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = all epochs)")
    g.add_argument("--batch_size", type=int, default=1,
                   help="sequences per step, all processes together (%(default)s; Resa: 2, one per GPU on 2 GPUs)")
    g.add_argument("--no_shuffle", dest="shuffle", action="store_false",
                   help="read the chunks in order, as Resa's DataLoader does; default: a fresh shuffle per epoch")
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "linear"],
                   help="constant (Resa's SAE-Tuning) or linear decay to 0 after the warm-up (Resa's SFT baseline)")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="linear warm-up share of the steps (%(default)s)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="(%(default)s)")
    C.add_checkpointing_arg(g)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save_every", type=int, default=500, help="adapter + resume state every N steps (%(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/resume")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    train(args)


if __name__ == "__main__":
    C.cli(main)
