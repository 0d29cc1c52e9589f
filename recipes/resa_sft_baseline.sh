#!/usr/bin/env bash
# Resa's own SFT baseline (recipes/DeepSeek-R1-Distill-Qwen-1.5B/sft/train_model_still.yaml, resa/post_train_hf/
# sft.py and preprocess.py): LoRA 32/128/0.05 on all seven linears; each STILL example as a chat, the user's
# question and the assistant's "think: \n{answer}\n answer: {answer}" (trace-free), one per row, cut at 2048
# tokens, loss on every token (SFTTrainer, no packing); lr 1e-5, linear decay after a 5% warm-up, weight decay
# 0 (transformers' defaults), 3 epochs, 16 per GPU on 2 GPUs = 32 per step, grad clip 1, shuffled, seed 42.
# No loss on pad-token labels (trl's default collator masks them, and R1-Distill's pad token is its EOS: the
# reply's closing EOS was never a target): --mask_pad_labels.
# For the matched control of SAE-Tuning (its text, loss span and steps) see resa_matched_sft_control.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resa_common.sh
python sae_tune.py --model "$RESA_BASE" --sae none --loss ce --dataset "$RESA_DATA" --text_format resa_sft \
  --no_packing --loss_on all --mask_pad_labels --lora_r 32 --lora_alpha 128 --lora_dropout 0.05 --lr 1e-5 --lr_schedule linear \
  --warmup_ratio 0.05 --weight_decay 0 --epochs 3 --batch_size 32 --ctx_len 2048 --max_grad_norm 1.0 \
  --save_every 500 --system_prompt none --seed 42 --out_dir "$RESA_OUT/sft_resa" "$@"
