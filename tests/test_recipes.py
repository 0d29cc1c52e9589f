"""recipes/*.sh hold the papers' flags: each must parse with its stage's argparse and keep the recipe values."""
import os
import subprocess
from pathlib import Path

import pytest

import grpo_lora as G

ROOT = Path(__file__).resolve().parents[1]


def recipe_argv(name: str) -> list[str]:
    """The arguments the recipe passes to python, captured by a stand-in `python` shell function."""
    env = {**os.environ, "BASH_FUNC_python%%": '() { printf "%s\\n" "$@"; }'}
    out = subprocess.run(["bash", str(ROOT / "recipes" / name)], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return out.splitlines()


EXPECT = {  # name: (dataset, rewards, weights, G, max_steps, stop_step)
    "tina_open_rs1.sh": ("open_rs1", ["format", "accuracy"], [1, 2], 4, 5000, 2400),
    "tina_open_rs2.sh": ("open_rs2", ["format", "accuracy"], [1, 2], 6, 1500, 850),
    "tina_open_rs3.sh": ("open_rs3", ["format", "cosine"], [1, 2], 6, 1500, 850),
    "tina_open_rs3_drgrpo.sh": ("open_rs3", ["format", "cosine"], [1, 2], 6, 1500, 850),
    "tina_still.sh": ("still", ["length", "accuracy"], [1, 2], 4, 7500, 3750),
    "tina_deepscaler.sh": ("deepscaler", ["format", "accuracy"], [1, 2], 4, 11000, 5500),
    "tina_limr.sh": ("limr", ["format", "accuracy"], [1, 2], 4, 360, 180),
}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_tina_recipes_parse(name):
    argv = recipe_argv(name)
    assert argv[0] == "grpo_lora.py"
    a = G.build_parser().parse_args(argv[1:])
    assert (a.dataset, a.rewards, a.reward_weights, a.num_generations, a.max_steps, a.stop_step) == EXPECT[name]
    assert (a.lora_r, a.lora_alpha, a.lora_dropout, a.lr, a.beta, a.temperature) == (32, 128, 0.05, 1e-6, 0.04, 0.7)
    assert (a.max_prompt_len, a.max_completion_len, a.prompts_per_step, a.grad_accum) == (512, 3584, 4, 4)
    assert a.scale_rewards == (name != "tina_open_rs3_drgrpo.sh")
    assert a.loss_type == ("dr_grpo" if name == "tina_open_rs3_drgrpo.sh" else "grpo")


def recipe_calls(name: str, env: dict) -> list[list[str]]:
    """Every python call a recipe makes, each as its argument list."""
    stub = '() { printf "CALL\\n"; printf "%s\\n" "$@"; }'
    out = subprocess.run(["bash", str(ROOT / "recipes" / name)], env={**os.environ, **env, "BASH_FUNC_python%%": stub},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [c.strip("\n").splitlines() for c in out.split("CALL\n") if c.strip()]


def test_resa_recipes_parse():
    import evaluate as E
    import sae_tune as ST
    import train_sae as T
    (call,) = recipe_calls("resa_train_sae.sh", {"TINA_ADAPTER": "ckpt", "RESA_LAYERS": "2,6,10"})
    a = T.build_parser().parse_args(call[1:])
    assert (a.adapter, a.layers, a.num_latents, a.k, a.batch_size, a.ctx_len) == ("ckpt", [2, 6, 10], 65536, 32, 16, 2048)
    (call,) = recipe_calls("resa_sae_tune.sh", {})
    a = ST.build_parser().parse_args(call[1:])
    assert (a.sae, a.loss, a.sae_grad, a.lr, a.epochs, a.batch_size) == ("out/resa/sae/layers.12", "kl", "block", 1e-6, 2, 1)
    assert (a.lora_r, a.lora_alpha, a.lora_dropout) == (32, 128, 0.05)
    (call,) = recipe_calls("resa_sft_baseline.sh", {})
    b = ST.build_parser().parse_args(call[1:])
    assert (b.sae, b.loss) == ("none", "ce")
    assert (b.lr, b.epochs, b.batch_size, b.ctx_len, b.dataset) == (a.lr, a.epochs, a.batch_size, a.ctx_len, a.dataset)
    calls = recipe_calls("resa_modularity.sh", {})
    bases = [E.build_parser().parse_args(c[1:]) for c in calls]
    assert [x.model for x in bases] == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/Qwen2.5-Math-1.5B"]
    assert all(x.adapter == ["base", "out/resa/tuned/final"] for x in bases)
