#!/usr/bin/env bash
# Tina open_rs3_drgrpo: the Dr.GRPO ablation of open_rs3: no reward std-scaling, dr_grpo loss aggregation.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset open_rs3 --rewards format,cosine --reward_weights 1,2 --num_generations 6 --max_steps 1500 --stop_step 850 --save_every 50 --no_scale_rewards --loss_type dr_grpo --out_dir out/tina_open_rs3_drgrpo "$@"
