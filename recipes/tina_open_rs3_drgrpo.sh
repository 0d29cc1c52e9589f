#!/usr/bin/env bash
# Tina's "Dr.GRPO" ablation of open_rs3 as it actually ran. Its YAML (train_model_open_rs3_drgrpo_ablation.yaml)
# sets `scale_reward: false`, but the trainer's field is `scale_rewards`, so the setting was dropped and the
# run used std-scaled advantages and the per-sequence mean loss: the same objective as open_rs3 (same data,
# rewards, seed). For the Dr.GRPO paper's objective see tina_open_rs3_drgrpo_paper.sh.
# Extra flags are passed through, e.g. --rollout vllm, --out_dir, --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/tina_common.sh
python grpo_lora.py "${TINA_FLAGS[@]}" --dataset open_rs3 --rewards format,cosine --reward_weights 1,2 --num_generations 6 --max_steps 1500 --stop_step 850 --save_every 50 --cosine_max_len 3584 --loss_type grpo --out_dir out/tina_open_rs3_drgrpo "$@"
