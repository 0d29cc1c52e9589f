#!/usr/bin/env bash
# Modularity: the SAE-tuned adapter (trained with RESA_BASE as target) evaluated on its own target and on
# another base of the same architecture (Qwen2.5-Math-1.5B, the model R1-Distill-Qwen-1.5B was built on),
# each with and without the adapter. Pass --data_dir ../shared/data/eval to use the local test sets.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
OTHER_BASE=${OTHER_BASE:-Qwen/Qwen2.5-Math-1.5B}
ADAPTER=${RESA_ADAPTER:-$RESA_OUT/tuned/final}
for base in "$RESA_BASE" "$OTHER_BASE"; do
  python evaluate.py --model "$base" --adapter "base,$ADAPTER" --benchmarks aime24,amc23,math_500 \
    --n 1 --temperature 0.6 --top_p 0.95 --max_new_tokens 32768 --seed 42 \
    --out_dir "$RESA_OUT/modularity/$(basename "$base")" "$@"
done
