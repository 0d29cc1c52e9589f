"""Our vLLM paths against vLLM itself: vllm-cpu 0.32.0 on this CPU, float32, a tiny untied Qwen2 with head_dim 32
(vLLM's CPU attention refuses 16). Each check compares vLLM's output with our own sampler on the same weights and
adapter. Run where vLLM is installed (.ci/run's second environment):  python -m pytest -q -m vllm
"""
import json
import os

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")        # GiB

import evaluate as E        # noqa: E402
import grpo_lora as G       # noqa: E402
import lora as L            # noqa: E402
import model as M           # noqa: E402
import sampling as SM       # noqa: E402
from conftest import make_char_model, randomize_B  # noqa: E402

PROMPTS = [f"Q: {a}+{b}\nA: " for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (12, 30), (5, 0), (8, 13)]]


@pytest.fixture(scope="module")
def vmodel(tmp_path_factory):
    return make_char_model(tmp_path_factory.mktemp("vllm_model"), seed=1, hidden=128, tied=False)


def adapter_dir(net_dir, out, seed):
    """A LoRA adapter (ours, PEFT format) with lora_B moved off zero, so that it changes the output."""
    net = M.load_model(str(net_dir))
    torch.manual_seed(seed)
    L.attach_lora(net, 8, 16, 0.0)
    randomize_B(net, seed, 0.3)
    L.save_adapter(net, out, base_model=str(net_dir))
    return net


def ours_greedy(net, tok, prompts, n_new):
    ids, mask = SM.encode_prompts(tok, prompts, "cpu")
    with torch.no_grad(), L.lora_merged(net):
        out = SM.generate(net, ids, mask, max_new_tokens=n_new, temperature=0.0, eos_ids=[tok.eos_token_id],
                          pad_id=tok.pad_token_id)
    return [t[:n].tolist() for t, n in zip(out.tokens, out.lengths.tolist())]


def test_evaluate_vllm_equals_hf_greedy_with_and_without_an_adapter(vmodel, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": "1"}) + "\n" for p in PROMPTS))
    adapter_dir(vmodel, tmp_path / "ad", seed=3)
    common = ["--model", str(vmodel), "--data", str(data), "--template", "none", "--device", "cpu", "--dtype", "fp32",
              "--temperature", "0", "--n", "1", "--max_new_tokens", "24", "--adapter", f"base,{tmp_path / 'ad'}"]
    E.main(common + ["--backend", "hf", "--out_dir", str(tmp_path / "hf")])
    E.main(common + ["--backend", "vllm", "--out_dir", str(tmp_path / "vllm"), "--max_model_len", "40"])
    key = lambda r: (r["adapter"], r["index"])                                   # noqa: E731
    hf = {key(r): r for r in map(json.loads, open(tmp_path / "hf" / "samples.jsonl"))}
    vl = {key(r): r for r in map(json.loads, open(tmp_path / "vllm" / "samples.jsonl"))}
    assert hf.keys() == vl.keys() and len(hf) == 2 * len(PROMPTS)
    tok = M.load_tokenizer(str(vmodel))
    for k, r in vl.items():
        n_prompt = len(tok(r["prompt"], add_special_tokens=False).input_ids)
        assert n_prompt + r["tokens"] <= 40                                       # --max_model_len: prompt inside
        assert hf[k]["completion"].startswith(r["completion"]), k                # hf ran 24 tokens, vLLM fewer
    assert {hf[k]["completion"] for k in hf if k[0] == "base"} != {hf[k]["completion"] for k in hf if k[0] != "base"}
    run = json.loads((tmp_path / "vllm" / "run.json").read_text())
    assert run["vllm"]["dtype"] == "float32"                                      # --dtype reached vLLM


def test_vllm_rollouts_follow_each_step_adapter_and_their_seeds(vmodel, tmp_path):
    tok = M.load_tokenizer(str(vmodel))
    ids = SM.prompt_token_ids(tok, PROMPTS)
    engine = SM.VLLMEngine(vmodel, max_lora_rank=8, seed=0, max_model_len=128, dtype=torch.float32)
    try:
        outs = []
        for version, seed in ((1, 3), (2, 4)):              # one folder rewritten, as GRPO does every step
            net = adapter_dir(vmodel, tmp_path / "pol", seed)
            got = engine.generate(ids, [0] * len(ids), temperature=0.0, top_p=1.0, max_tokens=16,
                                  stop_ids=[tok.eos_token_id], adapter=(tmp_path / "pol", version))
            want = ours_greedy(net, tok, PROMPTS, 16)
            assert [t for t, _ in got] == want, version    # this step's weights, no stale blocks
            outs.append(want)
        assert outs[0] != outs[1]
        # sampling: one seed per completion; the same seeds give the same samples, other seeds other ones
        eight = [ids[0]] * 8
        a = engine.generate(eight, list(range(8)), temperature=1.0, top_p=1.0, max_tokens=12, stop_ids=[])
        b = engine.generate(eight, list(range(8)), temperature=1.0, top_p=1.0, max_tokens=12, stop_ids=[])
        assert a == b and len({tuple(t) for t, _ in a}) >= 6
        with pytest.raises(SystemExit, match="below 0.01"):
            engine.generate(eight, [0] * 8, temperature=0.005, top_p=1.0, max_tokens=2, stop_ids=[])
    finally:
        engine.close()


def grpo_vllm_args(vmodel, data, out, *extra):
    return ["--model", str(vmodel), "--dataset", str(data), "--out_dir", str(out), "--rewards", "not_newline",
            "--reward_weights", "1", "--num_generations", "4", "--prompts_per_step", "2", "--grad_accum", "2",
            "--max_completion_len", "8", "--max_prompt_len", "32", "--lr", "1e-2", "--lora_r", "8", "--lora_alpha",
            "16", "--warmup_ratio", "0", "--system_prompt", "none", "--seed", "0", "--max_steps", "2", "--device",
            "cpu", "--dtype", "fp32", "--rollout", "vllm", "--lora_dropout", "0", *extra]


def test_grpo_with_vllm_rollouts_runs_and_records_the_engine(vmodel, arith_file, tmp_path, monkeypatch):
    monkeypatch.setitem(G.REWARDS, "not_newline", lambda cs, gold: [float(c[:1] not in ("\n", "")) for c in cs])
    out = tmp_path / "grpo"
    G.main(grpo_vllm_args(vmodel, arith_file, out, "--stop_step", "2", "--save_every", "1", "--vllm_is_correction"))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and (out / "final" / "adapter_model.safetensors").exists()
    # the sampler-trainer gap, logged every step: vLLM's log-prob of each sampled token against ours (float32, no
    # dropout here: only the two implementations differ)
    assert all(0 <= r["sampler_logp_gap_mean"] <= r["sampler_logp_gap_max"] < 1e-3 for r in rows), rows
    assert json.loads((out / "run.json").read_text())["vllm"]["dtype"] == "float32"

    # a run stopped after step 1 and resumed gives the uninterrupted run's adapter: vLLM's samples depend only
    # on the adapter and the per-completion seeds, both restored
    G.main(grpo_vllm_args(vmodel, arith_file, tmp_path / "cut", "--stop_step", "1", "--save_every", "1",
                          "--vllm_is_correction"))
    G.main(grpo_vllm_args(vmodel, arith_file, tmp_path / "cut", "--stop_step", "2", "--save_every", "1",
                          "--vllm_is_correction", "--resume"))
    from safetensors.torch import load_file
    wa = load_file(str(out / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert max(v.abs().max().item() for k, v in wa.items() if "lora_B" in k) > 0   # it trained: not two zero starts
    rb = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["reward"] for r in rb] == [r["reward"] for r in rows]
