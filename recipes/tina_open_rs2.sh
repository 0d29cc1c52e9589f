#!/usr/bin/env bash
# Tina open_rs2: open-rs data, format 1 + accuracy 2, 6 generations, schedule 1500 steps, stopped at 850 (the paper's best AIME24 run).
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset open_rs2 --rewards format,accuracy --reward_weights 1,2 --num_generations 6 --max_steps 1500 --stop_step 850 --save_every 50 --out_dir out/tina_open_rs2 "$@"
