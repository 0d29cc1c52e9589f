# Flags every Tina experiment shares (sourced by recipes/tina_*.sh), as Tina's code ran them
# (shangshang-wang/Tina: recipes/DeepSeek-R1-Distill-Qwen-1.5B/grpo/train_model_*.yaml, scripts/train/
# post_train_model_grpo.sh, tina/post_train_hf/grpo.py and grpo_trainer.py, trl 0.15.2):
#   LoRA r 32 / alpha 128 / dropout 0.05 on all seven linears; lr 1e-6, cosine to 0.1x after 10% warm-up;
#   temperature 0.7; prompts left-truncated to 512 tokens, completions up to 3584; beta 0.04, eps 0.2;
#   global batch: 2 processes x per-device batch G completions (one prompt) x grad-accum 4 = 8 prompts per
#   optimizer step, in 8 micro-batches of one prompt (on N GPUs under torchrun: the same 8 and 8, split);
#   log-probs at temperature 1 (trl 0.15.2 divides only the sampling logits by the temperature);
#   Tina's chat template (the generation prompt ends at the assistant tag, no '<think>\n').
TINA_MODEL=${TINA_MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
TINA_FLAGS=(
  --model "$TINA_MODEL" --lora_r 32 --lora_alpha 128 --lora_dropout 0.05
  --lr 1e-6 --min_lr_rate 0.1 --warmup_ratio 0.1 --beta 0.04 --epsilon 0.2 --max_grad_norm 1.0
  --temperature 0.7 --top_p 1.0 --logprob_temperature 1.0 --chat_template tina
  --max_prompt_len 512 --max_completion_len 3584 --prompts_per_step 8 --grad_accum 8
  --gradient_checkpointing --seed 42
)
