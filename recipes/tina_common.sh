# Flags every Tina experiment shares (sourced by recipes/tina_*.sh). DeepSeek-R1-Distill-Qwen-1.5B, LoRA r 32 /
# alpha 128 / dropout 0.05 on all seven linears, lr 1e-6 cosine to 0.1x with 10% warm-up, temperature 0.7,
# prompts left-truncated to 512 tokens, completions up to 3584, 4 prompts per step in 4 micro-batches, beta 0.04.
TINA_MODEL=${TINA_MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
TINA_FLAGS=(
  --model "$TINA_MODEL" --lora_r 32 --lora_alpha 128 --lora_dropout 0.05
  --lr 1e-6 --min_lr_rate 0.1 --warmup_ratio 0.1 --beta 0.04 --epsilon 0.2 --max_grad_norm 1.0
  --temperature 0.7 --top_p 1.0 --max_prompt_len 512 --max_completion_len 3584
  --prompts_per_step 4 --grad_accum 4 --gradient_checkpointing --seed 42
)
