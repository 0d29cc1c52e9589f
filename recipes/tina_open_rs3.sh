#!/usr/bin/env bash
# Tina open_rs3: open-rs data, format 1 + cosine 2 (over 3584 characters, as Tina's launch script passes), 6 generations,
# schedule 1500 steps, stopped at 850.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset open_rs3 --rewards format,cosine --reward_weights 1,2 --num_generations 6 --max_steps 1500 --stop_step 850 --save_every 50 --cosine_max_len 3584 --out_dir out/tina_open_rs3 "$@"
