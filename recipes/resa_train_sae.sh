#!/usr/bin/env bash
# Resa step 1 as Resa's scripts run it by default (SAE_TYPE="finetuned" in scripts/train/sae_tuning_model.sh and
# scripts/eval/eval_sae_tuning.sh; scripts/train/finetune.py, finetune_sae.sh): start from EleutherAI's
# sae-DeepSeek-R1-Distill-Qwen-1.5B-65k SAE for layers.L.mlp (trained on the MLP's output; finetune.py loads it
# at the residual hookpoint model.layers.L all the same), then train it one pass over the trace-free STILL text
# on the residual stream of a Tina checkpoint (the base + its GRPO LoRA adapter). finetune.py builds the SAE from
# its own SaeConfig (k 32, multi_topk off, 65,536 latents) and loads only the weights: --k 32 --multi_topk off.
# The rest as train_from_scratch.py (resa_train_sae_scratch.sh, the other route): 32 sequences of 2048 tokens
# per step in order (sparsify's 16 per GPU on Resa's 2 GPUs), signum (schedule-free SignSGD, momentum 0.95,
# lr 5e-3 / sqrt(65536 / 2^14)), b_dec reset to the first batch's mean (sparsify's trainer).
#   TINA_ADAPTER=out/tina_still/step_002000 bash recipes/resa_train_sae.sh
# (Resa's merge script, resa/sae/merge_sae_tuned_models.py, defaults to the source checkpoint-2000 of the Tina
# STILL run and the SAE-tuned target checkpoint-500.) Another start: RESA_SAE_START=folder-or-hub-repo.
#   Layer sweep from one pass: RESA_LAYERS=2,6,10,14,18,22,26 bash recipes/resa_train_sae.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
: "${TINA_ADAPTER:?set TINA_ADAPTER to a Tina checkpoint folder (a grpo_lora.py step_NNNNNN/ or a published adapter)}"
python train_sae.py --model "$RESA_BASE" --adapter "$TINA_ADAPTER" --dataset "$RESA_DATA" \
  --layers "${RESA_LAYERS:-$RESA_LAYER}" --init_from "${RESA_SAE_START:-EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k}" \
  --num_latents 65536 --k 32 --multi_topk off --ctx_len 2048 --batch_size 32 --no_shuffle --optimizer signum \
  --system_prompt resa --seed 42 --out_dir "$RESA_OUT/sae" "$@"
