#!/usr/bin/env bash
# Resa step 2: SAE-Tuning of the base with the frozen SAE at layer RESA_LAYER: LoRA r 32 / alpha 128 /
# dropout 0.05 on all seven linears, KL to the base's own distribution, AdamW lr 1e-6, 2 epochs, batch 1,
# grad clip 1.0, SAE gradient blocked (as Resa's code). The adapter is then used without the SAE.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
python sae_tune.py --model "$RESA_BASE" --sae "${RESA_SAE:-$RESA_OUT/sae/layers.$RESA_LAYER}" --dataset "$RESA_DATA" \
  --loss kl --sae_grad block --lora_r 32 --lora_alpha 128 --lora_dropout 0.05 --lr 1e-6 --epochs 2 --batch_size 1 \
  --ctx_len 2048 --max_grad_norm 1.0 --save_every 500 --system_prompt resa --seed 42 --out_dir "$RESA_OUT/tuned" "$@"
