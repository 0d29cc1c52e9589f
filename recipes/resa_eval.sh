#!/usr/bin/env bash
# Resa's evaluation of an SAE-tuned target (scripts/eval/eval_sae_tuning.sh): the tuned target's checkpoint-500
# (the default of resa/sae/merge_sae_tuned_models.py, --target_model_ckpt) beside the base, on its six tasks,
# one sample per problem at temperature 0.6, top_p 0.95, at most 32,768 tokens with the prompt inside them
# (max_model_length), graded as lighteval graded (--scorer lighteval; --scorer ours on the same --out_dir
# regrades the samples). Resa merged the adapter into the base in bf16 before evaluating; evaluate.py applies it
# unmerged (see docs/recipes.md).
# Extra flags go to evaluate.py, e.g. --data_dir ../shared/data/eval for local sets, --backend vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
ADAPTER=${RESA_ADAPTER:-$RESA_OUT/tuned/step_000500}
python evaluate.py --model "$RESA_BASE" --adapter "base,$ADAPTER" \
  --benchmarks aime24,aime25,amc23,math_500,minerva,gpqa_diamond \
  --n 1 --temperature 0.6 --top_p 0.95 --max_new_tokens 32768 --max_model_len 32768 --seed 42 --scorer lighteval \
  --out_dir "$RESA_OUT/eval" "$@"
