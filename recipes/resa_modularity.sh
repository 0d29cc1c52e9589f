#!/usr/bin/env bash
# Modularity, Resa's direction: extract the reasoning ability with SAE-Tuning on another base of the same
# architecture (EXTRACT_BASE, Qwen2.5-Math-1.5B by default: the model R1-Distill-Qwen-1.5B was distilled
# from), with the SAE trained on the Tina checkpoint (resa_train_sae.sh), then attach that adapter at test
# time to RESA_BASE (R1-Distill-Qwen-1.5B) and evaluate it there and on its own base, each with and without
# the adapter (Resa's scripts/train/sae_tuning_model.sh and eval_sae_tuning.sh name Qwen2.5-Math-1.5B and
# Qwen2.5-1.5B as targets), with eval_sae_tuning.sh's settings (resa_eval.sh). Qwen2.5-Math has 4,096
# positions: evaluate.py caps prompt + completion there, as that script's max_model_length 4096 did. Extra flags go to evaluate.py, e.g. --data_dir ../shared/data/eval for local sets.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
EXTRACT_BASE=${EXTRACT_BASE:-Qwen/Qwen2.5-Math-1.5B}
# the tuned target's checkpoint-500, as Resa's merge script (resa/sae/merge_sae_tuned_models.py, --target_model_ckpt)
ADAPTER=${RESA_ADAPTER:-$RESA_OUT/tuned_on_$(basename "$EXTRACT_BASE")/step_000500}
if [ -z "${RESA_ADAPTER:-}" ]; then
  python sae_tune.py --model "$EXTRACT_BASE" --sae "${RESA_SAE:-$RESA_OUT/sae/layers.$RESA_LAYER}" --dataset "$RESA_DATA" \
    --loss kl --sae_grad block --lora_r 32 --lora_alpha 128 --lora_dropout 0.05 --lr 1e-6 --epochs 2 --batch_size 2 \
    --no_shuffle --ctx_len 2048 --max_grad_norm 1.0 --save_every 500 --system_prompt resa --seed 42 \
    --out_dir "$(dirname "$ADAPTER")"
fi
for base in "$RESA_BASE" "$EXTRACT_BASE"; do
  python evaluate.py --model "$base" --adapter "base,$ADAPTER" --benchmarks aime24,amc23,math_500 \
    --n 1 --temperature 0.6 --top_p 0.95 --max_new_tokens 32768 --max_model_len 32768 --seed 42 --scorer lighteval \
    --out_dir "$RESA_OUT/modularity/$(basename "$base")" "$@"
done
