#!/usr/bin/env bash
# Tina still: STILL-3 data, length 1 + accuracy 2, 4 generations, schedule 7500 steps, stopped at 3750.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset still --rewards length,accuracy --reward_weights 1,2 --num_generations 4 --max_steps 7500 --stop_step 3750 --save_every 10 --out_dir out/tina_still "$@"
