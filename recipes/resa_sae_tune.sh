#!/usr/bin/env bash
# Resa step 2: SAE-Tuning of the base with the frozen SAE at layer RESA_LAYER: LoRA r 32 / alpha 128 /
# dropout 0.05 on all seven linears, KL to the base's own distribution, AdamW lr 1e-6, 2 epochs, 2 sequences
# per step read in order (Resa: batch 1 on each of 2 GPUs, an unshuffled DataLoader; recipes/.../
# sae_tuning.yaml, scripts/train/sae_tuning.py), grad clip 1.0, SAE gradient blocked (as Resa's code).
# The adapter is then used without the SAE.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
python sae_tune.py --model "$RESA_BASE" --sae "${RESA_SAE:-$RESA_OUT/sae/layers.$RESA_LAYER}" --dataset "$RESA_DATA" \
  --loss kl --sae_grad block --lora_r 32 --lora_alpha 128 --lora_dropout 0.05 --lr 1e-6 --epochs 2 --batch_size 2 --no_shuffle \
  --ctx_len 2048 --max_grad_norm 1.0 --save_every 500 --system_prompt resa --seed 42 --out_dir "$RESA_OUT/tuned" "$@"
