#!/usr/bin/env bash
# Tina limr: LIMR data, format 1 + accuracy 2, 4 generations, schedule 360 steps, stopped at 180.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset limr --rewards format,accuracy --reward_weights 1,2 --num_generations 4 --max_steps 360 --stop_step 180 --save_every 10 --out_dir out/tina_limr "$@"
