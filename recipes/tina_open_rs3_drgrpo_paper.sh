#!/usr/bin/env bash
# open_rs3 with the Dr.GRPO paper's objective: advantages not divided by the group's reward std, token losses
# summed and divided by (completions x max completion length). (Tina's own trainer, had the flag reached it,
# would have divided each micro-batch's token sum by that micro-batch's completion tokens, Tina's
# tina/post_train_hf/grpo_trainer.py line 734: --loss_type bnpo, not dapo's per-step count.)
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset open_rs3 --rewards format,cosine --reward_weights 1,2 --num_generations 6 --max_steps 1500 --stop_step 850 --save_every 50 --cosine_max_len 3584 --no_scale_rewards --loss_type dr_grpo --out_dir out/tina_open_rs3_drgrpo_paper "$@"
