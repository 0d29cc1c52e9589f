"""
toy/train_base.py -- train the toy world's tiny Qwen2 base model from scratch (CPU by default), saved in Hugging
Face format (config.json, model.safetensors, tokenizer files) so every stage loads it like a real model.

    python toy/train_base.py --out toy/out/base --seed 1 --exclude toy/out/test.jsonl

The corpus is generated on the fly by toy/world.py: chat-formatted problems whose answers are worked
(a scratchpad in <think>) with probability --worked_fraction and direct otherwise, joined with EOS and
cut into --ctx_len windows; next-token cross-entropy on everything, AdamW with warm-up and cosine decay.
Held-out questions (--exclude) never appear in the corpus.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import model as M  # noqa: E402
from toy.chars import build_char_tokenizer  # noqa: E402
from toy.world import pretraining_text  # noqa: E402


def batches(tok, rng: random.Random, args, exclude: set[str]):
    """Endless (inputs, targets) [batch, ctx_len]: whole documents packed from the start of each row (as at
    inference, where the prompt starts at position 0), the rest padded; loss only on the replies."""
    while True:
        rows, targets = [], []
        for _ in range(args.batch_size):
            ids, tgt = [], []
            while True:
                text = pretraining_text(rng, args.worked_fraction, args.min_terms, args.max_terms, exclude)
                doc = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
                if len(ids) + len(doc) > args.ctx_len + 1:
                    break
                cut = text.index("<think>\n") + len("<think>\n")      # characters = tokens here
                ids += doc
                tgt += [-100] * cut + doc[cut:]
            pad = args.ctx_len + 1 - len(ids)
            rows.append(ids + [tok.pad_token_id] * pad)
            targets.append(tgt + [-100] * pad)
        rows, targets = torch.tensor(rows), torch.tensor(targets)
        yield rows[:, :-1], targets[:, 1:]


def train(args):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_char_tokenizer()
    exclude = set()
    if args.exclude:
        exclude = {json.loads(line)["problem"] for line in open(args.exclude)}
    cfg = M.ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=args.hidden,
                        intermediate_size=args.mlp, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, tie_word_embeddings=True, max_position_embeddings=1024,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    device = C.pick_device(args.device)
    net = M.Transformer(cfg).init_weights(seed=args.seed).to(device).train()   # same weights on any device
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    log = C.RunLog(args.out, vars(args), "toy_train_base", overwrite=True)   # a rerun trains anew
    n_params = sum(p.numel() for p in net.parameters())
    from tqdm import tqdm
    t0 = time.time()
    bar = tqdm(zip(range(args.steps), batches(tok, rng, args, exclude)), total=args.steps, desc="base",
               dynamic_ncols=True)
    for step, (inputs, targets) in bar:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = net(inputs)                                         # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            row = {"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                   "tokens_per_s": (step + 1) * inputs.numel() / (time.time() - t0)}
            log.metrics(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    net.cpu().eval()
    M.save_model(net, args.out, tokenizer=tok)
    log.write_run(params=n_params, finished=True)
    return net


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="toy/out/base", help="output folder (Hugging Face layout)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--exclude", default=None, help="JSONL of held-out problems never to train on")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    g = p.add_argument_group("corpus")
    g.add_argument("--worked_fraction", type=float, default=0.35, help="share of answers with a scratchpad")
    g.add_argument("--min_terms", type=int, default=2)
    g.add_argument("--max_terms", type=int, default=6)
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--mlp", type=int, default=384)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv_heads", type=int, default=2)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=600)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--ctx_len", type=int, default=256)
    g.add_argument("--lr", type=float, default=3e-3)
    return p


if __name__ == "__main__":
    train(build_parser().parse_args())
