#!/usr/bin/env bash
# Tina open_rs1: open-s1 data, format 1 + accuracy 2, 4 generations, schedule 5000 steps, stopped at 2400.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset open_rs1 --rewards format,accuracy --reward_weights 1,2 --num_generations 4 --max_steps 5000 --stop_step 2400 --save_every 100 --out_dir out/tina_open_rs1 "$@"
