# Settings shared by the Resa recipes (sourced). Override any of them from the environment.
RESA_BASE=${RESA_BASE:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}   # the target (and the source's base)
RESA_DATA=${RESA_DATA:-still}                                       # trigger = elicitation set (STILL-3)
RESA_LAYER=${RESA_LAYER:-12}                                        # SAE hookpoint layers.L
RESA_OUT=${RESA_OUT:-out/resa}
