"""
train_sae.py -- Resa step 1 (reasoning-ability extraction): TopK SAEs on a source model's residual stream.

Usage
  CPU, the toy world (under a minute; as toy/pipeline.py does, on the toy's general text):
    python train_sae.py --model out/toy/base --adapter out/toy/grpo/final --dataset out/toy/data/corpus.jsonl \
        --text_format plain --max_tokens 1000000 --layers 2 --expansion_factor 8 --k 32 --ctx_len 256 \
        --batch_size 8 --lr 3e-3 --system_prompt none --device cpu --out_dir out/toy/sae
  GPU, Resa's recipe (SAE on a Tina checkpoint, the STILL trigger set; recipes/resa_train_sae.sh):
    python train_sae.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter TINA_CHECKPOINT \
        --dataset still --layers 12 --out_dir out/resa_sae

The source model reads Resa's trace-free text (system prompt, the question, and the answer standing in for
the reasoning trace), joined with EOS and cut into --ctx_len chunks; or, with --text_format plain, a general
corpus's text column as is (Resa's other way: an SAE pre-trained on general text, e.g. sparsify on
EleutherAI/SmolLM2-135M-10B, then fine-tuned on the trigger set with --init_from). The forward pass stops after the
highest requested layer; the residual stream after each requested layer (the output of decoder layer L,
sparsify's hookpoint layers.L) trains its own SAE, all from that single pass. Each SAE is written to
out_dir/layers.L/ in sparsify's format (cfg.json + sae.safetensors) with our keys layer, source_model,
adapter added.

Per step and layer (sparsify's trainer): decoder rows renormalised, FVU (+ auxk_alpha x AuxK on latents dead
for --dead_tokens tokens, + multi-TopK FVU / 8 with --multi_topk on) backward, the gradient parallel to each
decoder row removed, an optimizer step (--optimizer adam, or signum: sparsify's default, Resa's). b_dec is set to the first batch's mean at
step 0, also when starting from another SAE (--init_from), as sparsify's trainer does.

Simplifications versus Resa / sparsify: Adam runs at a constant lr after an optional linear warm-up
(--warmup_steps) instead of sparsify's linear decay; b_dec starts at the batch mean, not a geometric median;
no multi-GPU sharding (one pass over a few thousand examples takes minutes on one GPU; Resa's 2-GPU batch is
reproduced as one batch of 32).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import common as C
import data as D
import lora as L
import model as M
import sae as S


def default_lr(num_latents: int, optimizer: str = "adam") -> float:
    """sparsify's rules: Adam 2e-4, signum 5e-3, each / sqrt(num_latents / 2**14)."""
    return (5e-3 if optimizer == "signum" else 2e-4) / math.sqrt(num_latents / 2 ** 14)


def dead_window(run_tokens: int) -> int:
    """A latent silent this many tokens is dead: sparsify's 10M, or a tenth of a shorter run (so that the
    dead fraction means something in a small run such as the toy world's)."""
    return max(1, min(10_000_000, run_tokens // 10))


def make_optimizer(sae: S.SAE, name: str, lr: float):
    return S.Signum(sae.parameters(), lr=lr, momentum=0.95) if name == "signum" else torch.optim.Adam(sae.parameters(), lr=lr)


def load_source(args, device, dtype):
    """The source model with its adapter merged in (the SAE sees exactly what the tuned model computes)."""
    net = M.load_model(args.model, device, dtype, seed=args.seed)
    if args.adapter and args.adapter != "none":
        L.load_adapter(net, args.adapter)
        L.unload_lora(net, merge=True)
    return net.eval()


def trigger_chunks(args, tok):
    """The training text as [N, ctx_len] token chunks: trace-free text made from a question/answer set, or with
    --text_format plain a corpus's text column as is (read up to about 8 characters per wanted token)."""
    if args.text_format == "plain":
        texts, stats = D.load_texts(args.dataset, args.question_field or "text", 8 * args.max_tokens)
        pieces = [("", t) for t in texts]
    else:
        examples, stats = D.load_examples(args.dataset, args.question_field, args.answer_field)
        sp = D.SYSTEM_PROMPTS.get(args.system_prompt, args.system_prompt)
        pieces = D.text_pieces(tok, examples, args.text_format, sp)
    ids, _ = D.pack_chunks(tok, pieces, args.ctx_len)
    n = ids.shape[0]
    n_train = min(n, max(1, args.max_tokens // ids.shape[1])) if args.max_tokens else n
    n_eval = args.eval_chunks if args.eval_chunks >= 0 else min(8, n // 10)
    if n_eval >= n:
        raise SystemExit(f"--eval_chunks {n_eval}: the text has only {n} chunks of {args.ctx_len} tokens; hold out fewer")
    if n_eval > n - n_train:          # no spare text beyond --max_tokens: the last training chunks are held out
        n_train = n - n_eval
    stats = {**stats, "train_chunks": n_train, "held_out_chunks": n_eval}
    return ids[:n_train], ids[n_train:n_train + n_eval], stats


@torch.no_grad()
def held_out_metrics(net, saes: dict[int, S.SAE], ids, batch_size: int) -> dict:
    """On chunks never trained on, per layer (the figures SAE-Tuning depends on, as SAELens reports them): FVU;
    KL(model || model with the SAE inserted) per token; the next-token CE clean, with the SAE, and with the
    layer's residual stream zero-ablated; and the share of CE recovered, (CE_zero - CE_sae) / (CE_zero - CE_clean)."""
    acc = {layer: dict.fromkeys(("kl", "ce_sae", "ce_zero"), 0.0) for layer in saes}
    xs: dict[int, list] = {layer: [] for layer in saes}                          # residuals for the FVU
    ce_clean, tokens, targets = 0.0, 0, 0
    for i in range(0, ids.shape[0], batch_size):
        b = ids[i:i + batch_size].to(net.device)                                  # [B, T]
        h = net(b, hidden=True)                                                   # [B, T, D]
        nll = lambda hs: -M.token_logprobs(net.lm_head, hs[:, :-1], b[:, 1:]).double().sum().item()  # noqa: E731
        ce_clean += nll(h)
        tokens, targets = tokens + b.numel(), targets + b.shape[0] * (b.shape[1] - 1)
        acts = S.collect_residuals(net, b, list(saes))
        for layer, sae in saes.items():
            a = acc[layer]
            xs[layer].append(acts[layer])                                         # [B, T, d]
            hook = S.insert_sae(net, sae, layer)
            try:
                hs = net(b, hidden=True)
            finally:
                hook.remove()
            a["kl"] += M.chunked_kl(net.lm_head, h, hs).item()
            a["ce_sae"] += nll(hs)
            net.set_residual_hook(layer, torch.zeros_like)
            try:
                a["ce_zero"] += nll(net(b, hidden=True))
            finally:
                net.set_residual_hook(layer, None)
    out = {}
    for layer, a in acc.items():
        clean, with_sae, zero = ce_clean / targets, a["ce_sae"] / targets, a["ce_zero"] / targets
        out[str(layer)] = {"fvu": S.perturbation_fvu(saes[layer], xs[layer]), "kl_per_token": a["kl"] / tokens, "ce_clean": clean,
                           "ce_with_sae": with_sae, "ce_zero_ablated": zero,
                           "ce_recovered": (zero - with_sae) / (zero - clean) if zero != clean else None,
                           "tokens": tokens}
    return out


def load_start(init_from: str, layer: int) -> S.SAE:
    """Resa's "finetuned" start: the SAE for `layer` in init_from (a local folder or hub repo of hookpoint
    folders, or one SAE folder): layers.L, model.layers.L, or layers.L.mlp, where EleutherAI's published SAEs
    for R1-Distill-Qwen-1.5B live. Those were trained on the MLP's output, not the residual stream; Resa
    starts from them all the same (scripts/train/finetune.py maps model.layers.L to layers.L.mlp), so they
    load, with a warning."""
    for hook in (f"layers.{layer}", f"model.layers.{layer}", f"layers.{layer}.mlp"):
        try:
            sae = S.load_sae(init_from, hookpoint=hook)
        except FileNotFoundError:                         # not this hookpoint's folder
            continue
        if sae.layer is not None and sae.layer != layer:
            raise SystemExit(f"--init_from {init_from}: the SAE found for layer {layer} says it was trained at layer "
                             f"{sae.layer} (its cfg.json); pass the folder of layer {layer}'s SAE")
        if hook.endswith(".mlp"):
            print(f"warning: --init_from {init_from}: {hook} was trained on the output of layer {layer}'s MLP, not "
                  f"on the residual stream after layer {layer}; it is only a starting point here (as in Resa)")
        return sae
    raise SystemExit(f"--init_from {init_from}: no SAE for layer {layer} (looked for layers.{layer}, "
                     f"model.layers.{layer} and layers.{layer}.mlp)")


def make_saes(args, d_in: int, n_layers: int) -> dict[int, S.SAE]:
    for layer in args.layers:
        if not 0 <= layer < n_layers:
            raise SystemExit(f"--layers: layer {layer} does not exist; the model has {n_layers} layers (0..{n_layers - 1})")
    saes = {}
    for layer in args.layers:
        meta = {"layer": layer, "hookpoint": f"layers.{layer}", "source_model": args.model, "adapter": args.adapter,
                "trigger_dataset": args.dataset}
        if args.init_from:   # Resa's "finetuned" variant: continue from an existing SAE (ours or sparsify's)
            sae = load_start(args.init_from, layer)
            if sae.d_in != d_in:
                raise SystemExit(f"--init_from: SAE d_in={sae.d_in} does not fit the model's hidden size {d_in}")
            m = args.num_latents or (d_in * args.expansion_factor if args.expansion_factor else None)
            if m is not None and m != sae.num_latents:
                raise SystemExit(f"--init_from {args.init_from}: its layer {layer} SAE has {sae.num_latents} latents, "
                                 f"not the {m} asked for; drop --num_latents / --expansion_factor or start elsewhere")
            # k and multi_topk as asked (Resa's finetune.py builds the SAE from its own SaeConfig, k 32 and
            # multi_topk False, and loads only the weights), else the file's
            sae.k = args.k if args.k is not None else sae.k
            sae.multi_topk = {"on": True, "off": False}.get(args.multi_topk, sae.multi_topk)
            sae.meta.update(meta, init_from=args.init_from)
        else:
            torch.manual_seed(args.seed + layer)          # each layer's init independent of the others
            m = args.num_latents or (d_in * args.expansion_factor if args.expansion_factor else 65536)
            sae = S.SAE(d_in, m, args.k or 32, multi_topk=args.multi_topk == "on", **meta)
        saes[layer] = sae.float()
    return saes


def check_args(args):
    if args.num_latents is not None and args.expansion_factor is not None:
        raise SystemExit("give --num_latents or --expansion_factor, not both")
    if args.ctx_len < 2:
        raise SystemExit(f"--ctx_len {args.ctx_len}: a chunk needs at least 2 tokens")
    C.check_ranges(args, positive=("num_latents", "expansion_factor", "k", "batch_size", "ctx_len", "dead_tokens"),
                   nonnegative=("lr", "max_tokens", "warmup_steps", "auxk_alpha", "save_every"))


def train(args) -> dict[int, S.SAE]:
    check_args(args)
    if args.dry_run:
        return C.print_config({**vars(args), "world_size": 1, "sequences_per_step": args.batch_size,
                               "tokens_per_step": args.batch_size * args.ctx_len,
                               "num_latents_resolved": args.num_latents or (None if args.expansion_factor else 65536),
                               "lr_resolved": args.lr if args.lr is not None else
                               (default_lr(args.num_latents or 65536, args.optimizer) if not args.expansion_factor
                                else None),
                               "total_steps": -(-args.max_tokens // (args.batch_size * args.ctx_len))
                               if args.max_tokens else None, "chunking": D.CHUNKING})
    device = C.pick_device(args.device)
    dtype = C.pick_dtype(args.dtype, device)
    out_dir = Path(args.out_dir)
    if args.init_from and not Path(args.init_from).exists() and args.init_from.count("/") != 1:
        raise SystemExit(f"--init_from {args.init_from!r}: no such SAE folder")
    log = C.RunLog(out_dir, vars(args), "train_sae", can_resume=False, n_gpus=int(device.type == "cuda"),
                   gpu_hour_usd=args.gpu_hour_usd,
                   overwrite=args.overwrite)
    tok = M.load_tokenizer(args.tokenizer or args.model)
    ids, held_ids, data_stats = trigger_chunks(args, tok)
    net = load_source(args, device, dtype)
    saes = make_saes(args, net.cfg.hidden_size, net.cfg.num_hidden_layers)
    for sae in saes.values():
        sae.to(device)
    lr = args.lr if args.lr is not None else default_lr(next(iter(saes.values())).num_latents, args.optimizer)
    opts = {layer: make_optimizer(sae, args.optimizer, lr) for layer, sae in saes.items()}
    dead_tokens = args.dead_tokens or dead_window(ids.numel())
    trackers = {layer: S.DeadLatentTracker(sae.num_latents, dead_tokens, device) for layer, sae in saes.items()}
    log.write_run(data=data_stats, chunks=int(ids.shape[0]), ctx_len=int(ids.shape[1]), lr=lr, dead_tokens=dead_tokens,
                  saes={layer: {"num_latents": sae.num_latents, "k": sae.k, "multi_topk": sae.multi_topk}
                        for layer, sae in saes.items()})

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(ids.shape[0], generator=g) if args.shuffle else torch.arange(ids.shape[0])
    steps = math.ceil(len(order) / args.batch_size)
    from tqdm import tqdm
    bar = tqdm(range(steps), desc="sae", dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        batch = ids[order[step * args.batch_size:(step + 1) * args.batch_size]].to(device)
        acts = S.collect_residuals(net, batch, args.layers)
        row = {"step": step + 1, "lr": lr * min(1.0, (step + 1) / max(1, args.warmup_steps))}
        for layer, sae in saes.items():
            x = acts[layer].reshape(-1, sae.d_in).float()                  # [B*T, d]
            if step == 0:                                 # b_dec = the first batch's mean, also when starting
                sae.init_b_dec(x)                         # from another SAE (as sparsify's trainer, so Resa)
            for grp in opts[layer].param_groups:
                grp["lr"] = row["lr"]
            dead = trackers[layer].dead_mask() if args.auxk_alpha > 0 else None
            try:
                out = S.train_step(sae, opts[layer], x, dead, args.auxk_alpha)
            except FloatingPointError as e:
                raise SystemExit(f"step {step + 1}, layer {layer}: {e}") from None
            trackers[layer].update(out.indices, out.acts)
            row.update({f"fvu/{layer}": out.fvu.item(), f"auxk/{layer}": out.auxk_loss.item(),
                        f"dead_fraction/{layer}": trackers[layer].dead_fraction(),
                        **({f"multi_topk_fvu/{layer}": out.multi_topk_fvu.item()} if sae.multi_topk else {}),
                        f"l0/{layer}": (out.acts > 0).sum(-1).float().mean().item()})
        row["tokens_per_s"] = batch.numel() / (time.time() - t0)
        log.metrics(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith("fvu/")})
        if args.save_every and (step + 1) % args.save_every == 0:
            save_all(saes, out_dir, opts)
    save_all(saes, out_dir, opts)
    if held_ids.shape[0]:             # what was saved (a schedule-free optimizer's average) on text never trained on
        for opt in opts.values():
            if isinstance(opt, S.Signum):
                opt.eval()
        held = held_out_metrics(net.eval(), saes, held_ids, args.batch_size)
        log.write_run(held_out=held)
        for layer, h in held.items():
            print(f"layer {layer}, {held_ids.shape[0]} held-out chunks: FVU {h['fvu']:.4f}, KL {h['kl_per_token']:.4f} "
                  f"nats/token, CE {h['ce_clean']:.4f} clean / {h['ce_with_sae']:.4f} with the SAE / "
                  f"{h['ce_zero_ablated']:.4f} zero-ablated: {h['ce_recovered']:.1%} of CE recovered"
                  if h["ce_recovered"] is not None else f"layer {layer}: {h}")
    log.write_run(steps=steps, finished=True)
    return saes


def save_all(saes: dict[int, S.SAE], out_dir: Path, opts: dict):
    """Write every SAE; a schedule-free optimizer's weights are saved at its average (eval), then training
    goes on from where it was (train)."""
    for layer, sae in saes.items():
        opt = opts[layer]
        if isinstance(opt, S.Signum):
            opt.eval()
        sae.save(out_dir / f"layers.{layer}")
        if isinstance(opt, S.Signum):
            opt.train()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(usage='python train_sae.py --model MODEL [--adapter SOURCE_ADAPTER] --dataset DATA --layers L --out_dir OUT [flags]', description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = C.add_run_args(p, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "out/sae")
    g.add_argument("--adapter", default=None, help="LoRA adapter on the source model (e.g. a grpo_lora.py checkpoint); none: the model itself")
    g = D.add_text_args(p, "trigger")
    g.add_argument("--max_tokens", type=int, default=0, help="stop after about this many tokens (0 = one full pass)")
    g.add_argument("--eval_chunks", type=int, default=-1,
                   help="chunks held out of training, on which the saved SAE's FVU, KL and CE recovered are measured at "
                   "the end (taken from the text beyond --max_tokens where there is some); -1 (default): min(8, a tenth "
                   "of the chunks); 0: none")
    g = p.add_argument_group("SAE")
    g.add_argument("--layers", type=C.csv_list(int), default=[12], help="comma-separated layer indices (%(default)s)")
    g.add_argument("--num_latents", type=int, default=None, help="latents per SAE (Resa: 65536, the default)")
    g.add_argument("--expansion_factor", type=int, default=None, help="or num_latents = d_in x this")
    g.add_argument("--k", type=int, default=None, help="active latents per token (default: 32, or the --init_from SAE's)")
    g.add_argument("--multi_topk", default=None, choices=["on", "off"],
                   help="add sparsify's multi-TopK term (the FVU with 4k latents, / 8) to the loss (default: off, or "
                   "the --init_from SAE's cfg.json; Resa: off)")
    g.add_argument("--init_from", default=None, help="start from this SAE (folder of layers.N folders, ours or sparsify's)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=16,
                   help="sequences per step (%(default)s; Resa: 32, sparsify's 16 per GPU on 2 GPUs)")
    g.add_argument("--no_shuffle", dest="shuffle", action="store_false",
                   help="read the chunks in order, as sparsify's trainer (and so Resa) does; default: shuffled")
    g.add_argument("--optimizer", default="adam", choices=["adam", "signum"],
                   help="adam (default) or signum, sparsify's default and so Resa's (schedule-free SignSGD, "
                   "momentum 0.95)")
    g.add_argument("--lr", type=float, default=None,
                   help="default: sparsify's, 2e-4 (adam) or 5e-3 (signum) / sqrt(num_latents / 2^14)")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear lr warm-up steps (%(default)s)")
    g.add_argument("--auxk_alpha", type=float, default=0.0, help="weight of the AuxK loss on dead latents (%(default)s)")
    g.add_argument("--dead_tokens", type=int, default=None,
                   help="a latent silent this many tokens is dead (default: 10M as sparsify, or a tenth of a shorter run)")
    g.add_argument("--save_every", type=int, default=0, help="also save every N steps (0 = at the end only)")
    return p


def main(argv=None):
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    C.cli(main)
