#!/usr/bin/env bash
# Tina deepscaler: DeepScaleR data, format 1 + accuracy 2, 4 generations, schedule 11000 steps, stopped at 5500.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset deepscaler --rewards format,accuracy --reward_weights 1,2 --num_generations 4 --max_steps 11000 --stop_step 5500 --save_every 100 --out_dir out/tina_deepscaler "$@"
