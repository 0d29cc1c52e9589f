#!/usr/bin/env bash
# Tina's evaluation of a GRPO-LoRA checkpoint (shangshang-wang/Tina: scripts/eval/eval_post_train.sh with
# lighteval and scripts/eval/run_eval_custom_tasks.py): the adapter beside the base on six tasks, one sample per
# problem at seed 42, temperature 0.6, top_p 0.95, at most 32,768 tokens with the prompt inside them
# (max_model_length), graded as lighteval graded (--scorer lighteval; our default scorer regrades the same
# samples without resampling: evaluate.py --scorer ours on the same --out_dir). Tina merged the adapter into the
# base in bf16 before evaluating; evaluate.py applies it unmerged (docs/recipes.md).
#   TINA_ADAPTER=out/tina_open_rs2/step_000850 bash recipes/tina_eval.sh [--backend vllm] [--data_dir ../shared/data/eval]
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
ADAPTER=${TINA_ADAPTER:-out/tina_open_rs2/final}
python evaluate.py --model "$TINA_MODEL" --adapter "base,$ADAPTER" \
  --benchmarks aime24,aime25,amc23,math_500,minerva,gpqa_diamond \
  --n 1 --temperature 0.6 --top_p 0.95 --max_new_tokens 32768 --max_model_len 32768 --seed 42 --scorer lighteval \
  --out_dir "${TINA_EVAL_OUT:-out/tina_eval}" "$@"
