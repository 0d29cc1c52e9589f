#!/usr/bin/env bash
# Resa step 1, the from-scratch route (SAE_TYPE="trained_from_scratch"; Resa's scripts default to the
# "finetuned" one, resa_train_sae.sh): train a TopK SAE (65,536 latents, k 32, one pass over the trace-free STILL text, in order, 32
# sequences of 2048 tokens per step = sparsify's 16 per GPU on Resa's 2 GPUs; scripts/train/
# train_from_scratch.py) on the residual stream of a Tina checkpoint (the base + its GRPO LoRA adapter).
# The optimizer is sparsify's default, signum (schedule-free SignSGD, momentum 0.95, lr 5e-3 / sqrt(65536 / 2^14)).
#   TINA_ADAPTER=out/tina_still/step_002000 bash recipes/resa_train_sae_scratch.sh
# (Resa's merge script, resa/sae/merge_sae_tuned_models.py, defaults to the source checkpoint-2000 of the
# Tina STILL run and the SAE-tuned target checkpoint-500; the repositories do not say which checkpoints each
# paper number used beyond these defaults.)
#   Layer sweep from one pass: RESA_LAYERS=2,6,10,14,18,22,26 bash recipes/resa_train_sae_scratch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
: "${TINA_ADAPTER:?set TINA_ADAPTER to a Tina checkpoint folder (a grpo_lora.py step_NNNNNN/ or a published adapter)}"
python train_sae.py --model "$RESA_BASE" --adapter "$TINA_ADAPTER" --dataset "$RESA_DATA" \
  --layers "${RESA_LAYERS:-$RESA_LAYER}" --num_latents 65536 --k 32 --ctx_len 2048 --batch_size 32 --no_shuffle \
  --optimizer signum \
  --system_prompt resa --seed 42 --out_dir "$RESA_OUT/sae_scratch" "$@"
