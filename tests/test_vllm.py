"""The vLLM route (sampling.VLLMEngine, used by grpo_lora.py --rollout vllm and evaluate.py --backend vllm),
checked against a stand-in with vLLM's interface (the names the engine uses: LLM, SamplingParams, LoRARequest)
only for what vLLM itself cannot show on a CPU: the LoRA rank rounding and refusal, torchrun's external
launcher and the GPU memory share. Everything vLLM computes (greedy equality with ours, adapters of ours and peft's, seeds, the per-step
adapter, one BOS, resume, the dtype, two ranks) is tested against vLLM itself in tests/test_vllm_real.py."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import sampling as SM


class FakeLLM:
    def __init__(self, **kw):
        self.kw = kw


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


@pytest.mark.parametrize("free, total, cap, share", [(30, 40, 0.9, 29 / 40), (80, 80, 0.9, 0.9), (80, 80, 0.4, 0.4),
                                                     (1.5, 40, 0.9, None)])
def test_vllm_gpu_share_is_sized_from_the_free_memory(monkeypatch, free, total, cap, share):
    # vLLM refuses to start unless gpu_memory_utilization x the card is free: the share is what is free now less
    # 1 GiB of headroom, capped (0.4 beside GRPO's trainer), refused when almost nothing is free
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free * 2 ** 30, total * 2 ** 30))
    if share is None:
        with pytest.raises(SystemExit, match="only 1.5 of 40.0 GiB are free"):
            SM.vllm_memory_share(cap)
    else:
        assert SM.vllm_memory_share(cap) == pytest.approx(share)
