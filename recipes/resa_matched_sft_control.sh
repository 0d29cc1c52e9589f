#!/usr/bin/env bash
# The matched control for SAE-Tuning (not Resa's own SFT baseline, which used SFTTrainer with its own text
# template, loss on the whole sequence, lr 1e-5, 3 epochs): the same trace-free text, LoRA, optimiser and
# steps as resa_sae_tune.sh, but plain next-token loss on the assistant part and no SAE.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
python sae_tune.py --model "$RESA_BASE" --sae none --loss ce --dataset "$RESA_DATA" \
  --lora_r 32 --lora_alpha 128 --lora_dropout 0.05 --lr 1e-6 --epochs 2 --batch_size 2 --no_shuffle \
  --ctx_len 2048 --max_grad_norm 1.0 --save_every 500 --system_prompt resa --seed 42 --out_dir "$RESA_OUT/sft" "$@"
