"""recipes/*.sh must run what the papers' code ran. Each recipe's --dry_run configuration (every value after
defaults, and the derived ones) is compared with a table transcribed from the original repositories:
shangshang-wang/Tina (recipes/DeepSeek-R1-Distill-Qwen-1.5B/grpo/train_model_<name>.yaml, scripts/train/
post_train_model_grpo.sh, tina/config.py, tina/post_train_hf/grpo.py and grpo_trainer.py) and
shangshang-wang/Resa (recipes/DeepSeek-R1-Distill-Qwen-1.5B/grpo/sae_tuning.yaml, scripts/train/
sae_tuning.py, train_from_scratch.py, pretrain_sae.sh, sae_tuning_model.sh)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo_lora as G

ROOT = Path(__file__).resolve().parents[1]

# Tina, every recipe: LoRA 32/128/0.05 on all seven linears, lr 1e-6 cosine_with_min_lr 0.1, warm-up 0.1,
# temperature 0.7, prompt 512 / completion 3584, seed 42; GRPOConfig's beta 0.04; per_device_train_batch_size
# = num_generations (one prompt per device and micro-batch) x gradient_accumulation_steps 4 x 2 processes
# = 8 prompts per optimizer step; trl 0.15.2's log-probs at temperature 1; REASON_CHAT_TEMPLATE.
TINA_COMMON = dict(lora_r=32, lora_alpha=128.0, lora_dropout=0.05, lr=1e-6, min_lr_rate=0.1, warmup_ratio=0.1,
                   temperature=0.7, max_prompt_len=512, max_completion_len=3584, seed=42, beta=0.04,
                   global_prompts_per_step=8, prompts_per_micro_batch=1, logprob_temperature=1.0,
                   chat_template="tina", lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
# name: (yaml dataset, rewards, weights, num_generations, max_steps, stop step (the YAML's comment),
#        save_steps, cosine_max_len (1000 = tina/config.py's default; 3584 from the launch script), scale, loss)
TINA = {
    "tina_open_rs1.sh": ("open_rs1", ["format", "accuracy"], [1.0, 2.0], 4, 5000, 2400, 100, 1000, True, "grpo"),
    "tina_open_rs2.sh": ("open_rs2", ["format", "accuracy"], [1.0, 2.0], 6, 1500, 850, 50, 1000, True, "grpo"),
    "tina_open_rs3.sh": ("open_rs3", ["format", "cosine"], [1.0, 2.0], 6, 1500, 850, 50, 3584, True, "grpo"),
    # the ablation's `scale_reward: false` never reached the trainer (its field is scale_rewards)
    "tina_open_rs3_drgrpo.sh": ("open_rs3", ["format", "cosine"], [1.0, 2.0], 6, 1500, 850, 50, 3584, True, "grpo"),
    "tina_still.sh": ("still", ["length", "accuracy"], [1.0, 2.0], 4, 7500, 3750, 10, 1000, True, "grpo"),
    "tina_deepscaler.sh": ("deepscaler", ["format", "accuracy"], [1.0, 2.0], 4, 11000, 5500, 100, 1000, True, "grpo"),
    "tina_limr.sh": ("limr", ["format", "accuracy"], [1.0, 2.0], 4, 360, 180, 10, 1000, True, "grpo"),
}
# what the recipes change on purpose (nothing else may differ): the Dr.GRPO paper's objective as its own recipe
DELIBERATE = {"tina_open_rs3_drgrpo_paper.sh": dict(scale_rewards=False, loss_type="dr_grpo")}


def recipe_calls(name: str, env: dict | None = None) -> list[list[str]]:
    """Every python call a recipe makes, each as its argument list (a stand-in `python` shell function)."""
    stub = '() { printf "CALL\\n"; printf "%s\\n" "$@"; }'
    out = subprocess.run(["bash", str(ROOT / "recipes" / name)], env={**os.environ, **(env or {}),
                                                                       "BASH_FUNC_python%%": stub},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [c.strip("\n").splitlines() for c in out.split("CALL\n") if c.strip()]


def dry_run(module, call: list[str]) -> dict:
    """The recipe's call with --dry_run, through the stage's own code path (parse, check, resolve)."""
    args = module.build_parser().parse_args([*call[1:], "--dry_run"])
    return (module.train if hasattr(module, "train") else module.evaluate)(args)


@pytest.mark.parametrize("name", sorted(TINA) + sorted(DELIBERATE))
def test_tina_recipes_reproduce_the_original_runs(name, capsys):
    (call,) = recipe_calls(name)
    assert call[0] == "grpo_lora.py"
    cfg = dry_run(G, call)
    capsys.readouterr()
    ds, rewards, weights, gens, max_steps, stop, save, cos_len, scale, loss = TINA.get(name, TINA["tina_open_rs3.sh"])
    want = {**TINA_COMMON, "dataset": ds, "rewards": rewards, "reward_weights": weights, "num_generations": gens,
            "max_steps": max_steps, "stop_step": stop, "total_steps": stop, "save_every": save,
            "cosine_max_len": cos_len, "scale_rewards": scale, "loss_type": loss,
            "completions_per_step": 8 * gens, **DELIBERATE.get(name, {})}
    got = {k: cfg[k] for k in want}
    assert got == want
    assert cfg["micro_batches_per_process"] == 8 and cfg["world_size"] == 1
    # run time: Tina filtered no prompt (tina/post_train_hf/grpo.py); ours drops one only where no reward could
    # train on it (still: length and accuracy both grade against the gold, so its unparseable golds are dropped)
    assert cfg["unparseable_gold_prompts"] == ("dropped" if name == "tina_still.sh" else "kept")
    assert cfg["loss_normalisation"].startswith({"grpo": "each completion's token mean",
                                                  "dr_grpo": "token sum / (completions x"}[want["loss_type"]])


def test_tina_global_batch_is_the_same_under_torchrun(monkeypatch, capsys):
    (call,) = recipe_calls("tina_open_rs2.sh")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = dry_run(G, call)
    capsys.readouterr()
    assert (cfg["global_prompts_per_step"], cfg["completions_per_step"], cfg["world_size"]) == (8, 48, 2)
    assert (cfg["micro_batches_per_process"], cfg["prompts_per_micro_batch"]) == (4, 1)    # Tina: accum 4 x 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="number of processes"):
        dry_run(G, call)


def test_open_rs_prompts_and_gold_columns_follow_tina():
    import data as D
    assert D.system_prompt_for("auto", "open_rs2") == D.SYSTEM_PROMPTS["open_rs"]     # hub id has "open-rs"
    assert D.system_prompt_for("auto", "open_rs1") == D.SYSTEM_PROMPTS["open_r1"]     # knoveleng/open-s1
    assert D.TRAIN_SETS["open_rs2"].answer == D.TRAIN_SETS["open_rs1"].answer == "solution"
    assert D.TRAIN_SETS["still"].answer == D.TRAIN_SETS["deepscaler"].answer == "answer"


def test_resa_recipes_reproduce_the_original_runs(capsys):
    import evaluate as E
    import sae_tune as ST
    import train_sae as T
    for name in ("resa_train_sae.sh", "resa_train_sae_scratch.sh"):
        (call,) = recipe_calls(name, {"TINA_ADAPTER": "ckpt", "RESA_LAYERS": "2,6,10"})
        a = dry_run(T, call)
        # sparsify TrainConfig in train_from_scratch.py / finetune.py: batch_size 16 per process, 2 processes, in
        # order; 65k latents, k 32
        assert (a["adapter"], a["layers"], a["num_latents_resolved"], a["k"], a["ctx_len"]) == ("ckpt", [2, 6, 10],
                                                                                               65536, 32, 2048)
        assert (a["sequences_per_step"], a["shuffle"], a["dataset"], a["system_prompt"]) == (32, False, "still", "resa")
        assert (a["optimizer"], a["lr_resolved"]) == ("signum", 2.5e-3)     # sparsify's default optimizer and lr rule
        # the SAE route: Resa's default SAE_TYPE="finetuned" (sae_tuning_model.sh) starts from EleutherAI's 65k SAE
        # (finetune.py: its SaeConfig's k 32 and multi_topk False, the file's weights); the other from scratch
        start = "EleutherAI/sae-DeepSeek-R1-Distill-Qwen-1.5B-65k" if name == "resa_train_sae.sh" else None
        assert (a["init_from"], a["multi_topk"] in (None, "off")) == (start, True)
        # sparsify's chunk_and_tokenize (checked against it in test_pack_chunks_equals_sparsify_chunk_and_tokenize)
        assert (a["chunking"]["texts_per_stream"], a["chunking"]["stream_starts_with"]) == (2048, "eos")
    (call,) = recipe_calls("resa_sae_tune.sh")
    b = dry_run(ST, call)
    # sae_tuning.yaml: lr 1e-6, 2 epochs, batch_size 1 per GPU on 2 GPUs, seed 42, save_steps 500; sae_tuning.py:
    # an unshuffled DataLoader, AdamW at torch's default weight decay, clip 1.0
    assert (b["sae"], b["loss_resolved"], b["sae_grad"], b["lr"], b["epochs"]) == ("out/resa/sae/layers.12", "kl",
                                                                                  "block", 1e-6, 2)
    assert (b["sequences_per_step"], b["shuffle"], b["seed"], b["save_every"], b["weight_decay"]) == (2, False, 42, 500,
                                                                                                    0.01)
    assert (b["lora_r"], b["lora_alpha"], b["lora_dropout"], b["max_grad_norm"]) == (32, 128, 0.05, 1.0)
    assert b["chunking"]["method"] == "sparsify chunk_and_tokenize"       # sae_tuning.py line 421
    (call,) = recipe_calls("resa_matched_sft_control.sh")
    c = dry_run(ST, call)
    assert (c["sae"], c["loss_resolved"]) == ("none", "ce")
    same = ("lr", "epochs", "sequences_per_step", "shuffle", "ctx_len", "dataset", "lora_r", "seed")
    assert {k: c[k] for k in same} == {k: b[k] for k in same}
    (call,) = recipe_calls("resa_sft_baseline.sh")          # Resa's own SFT baseline (sft/train_model_still.yaml)
    r = dry_run(ST, call)
    assert (r["sae"], r["loss_resolved"], r["text_format"], r["packing"], r["loss_on"]) == ("none", "ce", "resa_sft",
                                                                                         False, "all")
    assert r["mask_pad_labels"] and not b["mask_pad_labels"]   # trl's collator masks pad = R1's EOS (sft.py)
    assert r["chunking"]["method"].startswith("one example per row")   # SFTTrainer without packing
    assert (r["lr"], r["lr_schedule"], r["warmup_ratio"], r["weight_decay"], r["epochs"]) == (1e-5, "linear", 0.05,
                                                                                            0.0, 3)
    assert (r["sequences_per_step"], r["shuffle"], r["ctx_len"], r["max_grad_norm"], r["seed"]) == (32, True, 2048,
                                                                                                   1.0, 42)
    assert (r["lora_r"], r["lora_alpha"], r["lora_dropout"]) == (32, 128, 0.05)
    # modularity in Resa's direction: SAE-Tuning on Qwen2.5-Math-1.5B, the adapter then attached to R1-Distill
    tune, *evals = recipe_calls("resa_modularity.sh")
    t = dry_run(ST, tune)
    assert t["model"] == "Qwen/Qwen2.5-Math-1.5B" and t["out_dir"] == "out/resa/tuned_on_Qwen2.5-Math-1.5B"
    assert {k: t[k] for k in same if k != "lr"} == {k: b[k] for k in same if k != "lr"} and t["lr"] == b["lr"]
    cfgs = [dry_run(E, x) for x in evals]
    capsys.readouterr()
    assert [x["model"] for x in cfgs] == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/Qwen2.5-Math-1.5B"]
    # the tuned target's checkpoint-500: merge_sae_tuned_models.py's --target_model_ckpt default
    assert all(x["adapters"] == ["base", "out/resa/tuned_on_Qwen2.5-Math-1.5B/step_000500"] for x in cfgs)
    # eval_sae_tuning.sh: lighteval's grading, max_model_length 32768 (4096 for Qwen2.5-Math: its positions cap it)
    assert all((x["max_model_len"], x["scorer"]) == (32768, "lighteval") for x in cfgs)
    assert t["save_every"] == 500
    (call,) = recipe_calls("resa_eval.sh")                 # eval_sae_tuning.sh: six tasks, n 1, T 0.6, top_p 0.95
    e = dry_run(E, call)
    capsys.readouterr()
    assert e["adapters"] == ["base", "out/resa/tuned/step_000500"]
    assert (e["benchmarks"], e["n"], e["temperature"], e["top_p"], e["max_new_tokens"]) == (
        ["aime24", "aime25", "amc23", "math_500", "minerva", "gpqa_diamond"], 1, 0.6, 0.95, 32768)
    # lighteval as the papers ran it: its grading, and the prompt inside max_model_length 32768
    assert (e["scorer"], e["max_model_len"], e["seed"]) == ("lighteval", 32768, 42)
    assert e["token_budget"].startswith("prompt + completion")
    # Tina's evaluation (scripts/eval/eval_post_train.sh): the same tasks and lighteval settings
    (call,) = recipe_calls("tina_eval.sh", {"TINA_ADAPTER": "out/tina_open_rs2/step_000850"})
    t = dry_run(E, call)
    capsys.readouterr()
    assert t["adapters"] == ["base", "out/tina_open_rs2/step_000850"]
    assert {k: t[k] for k in ("benchmarks", "n", "temperature", "top_p", "max_new_tokens", "max_model_len", "seed",
                              "scorer", "system_prompt")} == {k: e[k] for k in ("benchmarks", "n", "temperature", "top_p",
                              "max_new_tokens", "max_model_len", "seed", "scorer", "system_prompt")}
    assert t["model"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def test_a_recipe_dry_run_prints_one_json_object_and_loads_nothing(tmp_path):
    r = subprocess.run(["bash", "recipes/tina_open_rs2.sh", "--dry_run", "--out_dir", str(tmp_path / "never")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads(r.stdout)
    assert cfg["completions_per_step"] == 48 and cfg["total_steps"] == 850 and not (tmp_path / "never").exists()


# ---------------------------------------------------------------- run-time behaviour, against the originals

@pytest.mark.parametrize("bos", [False, True])
def test_pack_chunks_equals_sparsify_chunk_and_tokenize(bos):
    # Resa chunked its SAE and SAE-Tuning text with sparsify's chunk_and_tokenize (scripts/train/finetune.py,
    # sae_tuning.py line 421; resa/sae/sparsify/sparsify/data.py, the same as eai-sparsify 1.3.3's): a stream per 2,048 texts that
    # starts with EOS, texts joined by EOS, every chunk opened by the tokenizer's BOS when it adds one, the last
    # piece of each stream dropped. 2,100 texts: two streams.
    import datasets
    from sparsify.data import chunk_and_tokenize
    from tokenizers.processors import TemplateProcessing
    from toy.chars import build_char_tokenizer
    import data as D
    tok = build_char_tokenizer()
    if bos:                                                        # as R1-Distill's: BOS before every text
        tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    assert (tok("a").input_ids[0] == 2) == bos
    pieces = [(f"Q{i % 7}:", f" {i * 37 % 1000}!") for i in range(2100)]
    ids, mask = D.pack_chunks(tok, pieces, ctx_len=64)
    ref = chunk_and_tokenize(datasets.Dataset.from_dict({"text": [p + a for p, a in pieces]}), tok, max_seq_len=64,
                             num_proc=1, load_from_cache_file=False)
    ref = torch.stack([torch.as_tensor(r["input_ids"]) for r in ref])
    assert ids.shape == ref.shape and torch.equal(ids, ref)
    assert (ids[:, 0] == 2).all() == bos and (ids[0, int(bos)] == tok.eos_token_id)
    text = "".join(tok.convert_ids_to_tokens(int(i)) for i, m in zip(ids.flatten(), mask.flatten()) if m)
    assert set(text) <= set(" 0123456789!") and "!" in text       # the mask covers exactly the assistant parts


def test_prompts_with_an_unparseable_gold_are_dropped_only_when_every_reward_needs_it():
    # Tina kept them (tina/post_train_hf/grpo.py lines 100-170 map the data and filter nothing): their format reward still trains
    import data as D
    ex = [D.Example("1+1", "2", 0), D.Example("draw it", "}{", 1)]
    for rewards, kept, bad in ((["format", "accuracy"], 2, 1), (["length", "accuracy"], 1, 1),
                               (["accuracy", "cosine"], 1, 1), (["format", "tag_count"], 2, 0)):
        usable, n_bad = G.select_prompts(ex, rewards)
        assert (len(usable), n_bad) == (kept, bad), rewards
    total, per = G.score(["\n</think>\n\\boxed{3}", "no tag"], "}{", ["format", "accuracy"], [1.0, 2.0])
    assert total.tolist() == [1.0, 0.0] and torch.isnan(per[1]).all()   # accuracy left out, format kept


def controls_setup(tmp_path, save_every: int = 100000):
    """A tiny random target, a Tina-like adapter, the finetuned route's start SAE, trigger text and two local
    benchmarks: the argv and environment that run recipes/resa_controls.py on them, and the recipe module."""
    import importlib.util
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    import lora as L
    import model as M
    import sae as S
    from conftest import make_char_model, randomize_B
    model = make_char_model(tmp_path / "base", seed=0, layers=3)
    net = M.load_model(str(model))
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, 1, 0.3)
    L.save_adapter(net, tmp_path / "tina", base_model=str(model))
    S.SAE(64, 128, 4, layer=1).save(tmp_path / "start" / "layers.1")                 # the finetuned route's start
    rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (tmp_path / "eval").mkdir()
    for f in ("aime24.jsonl", "math500.jsonl"):
        (tmp_path / "eval" / f).write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "--device cpu --dtype fp32 --system_prompt none"
    out = tmp_path / "controls"
    argv = ["--tina_adapter", str(tmp_path / "tina"), "--out", str(out), "--benchmarks", "aime24,math_500",
            "--sae_args", f"--num_latents 128 --k 4 --ctx_len 64 --batch_size 4 --max_tokens 512 {common}",
            "--tune_args", f"--ctx_len 64 --max_steps 2 --batch_size 2 --lora_r 4 --lora_alpha 8 "
                           f"--save_every {save_every} {common}",
            "--eval_args", f"--limit 3 --max_new_tokens 6 --template none --data_dir {tmp_path / 'eval'} {common}"]
    env = {**os.environ, "RESA_BASE": str(model), "RESA_DATA": str(tmp_path / "data.jsonl"), "RESA_LAYER": "1",
           "RESA_SAE_START": str(tmp_path / "start"), "OMP_NUM_THREADS": "1"}
    spec = importlib.util.spec_from_file_location("resa_controls", ROOT / "recipes" / "resa_controls.py")
    RC = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(RC)
    return argv, env, out, RC


def test_resa_controls_runs_every_arm_end_to_end_and_its_verdict_is_its_json(tmp_path):
    # recipes/resa_controls.py on a tiny random model: three SAEs, eight arms, evaluations grouped by n, the
    # verdict computed from the produced samples (paired differences recomputed here from them)
    argv, env, out, RC = controls_setup(tmp_path)
    dry = subprocess.run([sys.executable, "recipes/resa_controls.py", *argv, "--dry_run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    listed = [line.split(":")[0] for line in dry.stdout.splitlines()]
    assert listed == ["sae_source", "sae_target", "sae_other_seed", *(f"tune_{a}" for a in RC.ARMS), "eval_n4", "eval_n16"]
    assert "--perturb noise" in dry.stdout and "--perturb random_sae" in dry.stdout and "TINA_ADAPTER=none" in dry.stdout
    r = subprocess.run([sys.executable, "recipes/resa_controls.py", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "verdict.json").read_text())
    arms = {row["arm"] for row in rep["rows"]}
    assert arms == {"base", "source (Tina)", *RC.ARMS}
    assert {(row["benchmark"], row["n"]) for row in rep["rows"]} == {("aime24", 16), ("math_500", 4)}
    assert json.loads((out / "noise" / "tuned" / "run.json").read_text())["data"]["perturbation"]["perturb"] == "noise"
    assert json.loads((out / "target_sae" / "sae" / "run.json").read_text())["args"]["adapter"] == "none"
    # every paired difference is the one recomputed from the recorded samples
    for row in rep["rows"]:
        d = out / f"eval_n{row['n']}" / "eval"
        samples = [json.loads(x) for x in open(d / "samples.jsonl")]
        adapter = {"base": "base", "source (Tina)": str(tmp_path / "tina")}.get(row["arm"],
                                                                             str(out / row["arm"] / "tuned" / "final"))
        pp = lambda a: {i: sum(x["correct"] for x in samples if x["adapter"] == a and x["benchmark"] == row["benchmark"]  # noqa: E731
                               and x["index"] == i) / row["n"] for i in range(3)}
        if row["arm"] != "base":
            diffs = [pp(adapter)[i] - pp("base")[i] for i in range(3)]
            assert row["vs_base"] == pytest.approx(sum(diffs) / 3)
        if row["arm"] not in ("base", "target_sae"):
            assert "vs_target_sae" in row
        # its pass@k curve, k = 1..n, from the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem
        c = [sum(x["correct"] for x in samples if x["adapter"] == adapter and x["benchmark"] == row["benchmark"]
                 and x["index"] == i) for i in range(3)]
        n = row["n"]
        want = [sum(1 - math.comb(n - int(ci), k) / math.comb(n, k) for ci in c) / 3 for k in range(1, n + 1)]
        assert row["pass_at_k"] == pytest.approx(want, abs=1e-12)
    assert rep["comparisons"] == sum(("vs_base" in x) + ("vs_target_sae" in x) for x in rep["rows"])
    assert (out / "verdict.md").read_text().count("\n| ") == len(rep["rows"])          # one line per row
    assert (out / "verdict.png").stat().st_size > 10_000                             # the figure
    # a rerun would skip every trained stage (its run.json says finished) and run the evaluations again
    steps = RC.main([*argv, "--dry_run"])
    skipped = [n for n, cmd, e in steps if RC.finished(n, cmd, e)]
    assert skipped == [n for n, _, _ in steps if not n.startswith("eval_")] and len(skipped) == 11


def test_resa_controls_select_on_plans_one_selection_per_arm_and_refuses_a_file_that_leaks(tmp_path):
    argv, env, out, RC = controls_setup(tmp_path)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"problem": f"{a}-{b}", "answer": str(a - b)}) + "\n" for a, b in [(9, 2), (8, 3)]))
    steps = RC.main([*argv, "--select_on", str(val), "--dry_run"])
    names = [n for n, _, _ in steps]
    selects = [n for n in names if n.startswith("select_")]
    assert selects == [f"select_{a}" for a in RC.ARMS]
    assert max(names.index(n) for n in selects) < min(names.index(n) for n in names if n.startswith("eval_"))
    assert all(n.startswith("tune_") for n in names[names.index(selects[0]) - len(RC.ARMS):names.index(selects[0])])
    for n, cmd, e in steps:
        if n.startswith("select_"):                   # validation file only, no benchmark, the arm's own folder
            assert cmd[cmd.index("--data") + 1] == str(val) and cmd[cmd.index("--benchmarks") + 1] == ""
            assert e["RESA_OUT"] == str(out / n[len("select_"):] / "selection")
    leak = tmp_path / "leak.jsonl"
    leak.write_text(val.read_text() + json.dumps({"problem": "1+2", "answer": "3"}) + "\n")   # a question of aime24
    args = type("A", (), {"select_on": str(leak), "benchmarks": ["aime24", "math_500"],
                          "eval_args": argv[argv.index("--eval_args") + 1]})()
    with pytest.raises(SystemExit, match="1 of its 3 questions are also in the test sets"):
        RC.check_validation(args)
    args.select_on = str(val)
    RC.check_validation(args)                                          # a clean file passes


@pytest.mark.slow
def test_resa_controls_with_select_on_evaluates_each_arm_at_its_best_checkpoint(tmp_path):
    # the whole driver with --select_on: every arm saved step_000001, step_000002 and final; each select_<arm> stage
    # scored them on the validation file, and the test sets were evaluated at each arm's argmax alone
    argv, env, out, RC = controls_setup(tmp_path, save_every=1)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"problem": f"{a}-{b}", "answer": str(a - b)}) + "\n" for a, b in [(9, 2), (8, 3)]))
    r = subprocess.run([sys.executable, "recipes/resa_controls.py", *argv, "--select_on", str(val)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "verdict.json").read_text())
    for arm in RC.ARMS:
        scores = json.loads((out / arm / "selection" / "eval" / "results.json").read_text())["results"]
        cands = {a: v["val"]["pass@1"] for a, v in scores.items() if a != "base"}
        assert len(cands) == 3                                          # two steps and final
        best = max(cands.values())
        assert rep["evaluated"][arm] == next(a for a, v in cands.items() if v == best)
    for d in out.glob("eval_n*/eval"):
        tested = set(json.loads((d / "results.json").read_text())["results"])
        assert tested == {"base", str(tmp_path / "tina"), *rep["evaluated"].values()}
    assert "checkpoint best on" in (out / "verdict.md").read_text()
