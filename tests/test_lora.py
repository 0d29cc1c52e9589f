"""lora.py: behaviour, and PEFT-format files checked against peft itself."""
import json
import math

import pytest
import torch

import lora as L
import model as M
import sampling as SM
from conftest import left_padded_batch, randomize_B

ALL = list(L.ALL_LINEARS)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask)


@pytest.fixture
def batch():
    return left_padded_batch(128, [9, 5, 2], seed=3)


def test_fresh_adapter_is_identity_and_only_lora_trains(hf_models, batch):
    ours = M.load_model(str(hf_models["qwen2"][1]))
    base = logits(ours, *batch)
    names = L.attach_lora(ours, r=8, alpha=32, dropout=0.0, targets=ALL)
    assert len(names) == 3 * 7
    assert torch.equal(logits(ours, *batch), base)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    m = ours.model.layers[0].self_attn.q_proj
    bound = 1 / math.sqrt(m.in_features)   # kaiming_uniform(a=sqrt(5)) bound
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.5 * bound
    assert (m.lora_B.weight == 0).all() and m.scaling == 32 / 8


def test_merge_unmerge_disable(hf_models, batch):
    ours = M.load_model(str(hf_models["llama3"][1]))
    base = logits(ours, *batch)
    w0 = ours.model.layers[1].mlp.down_proj.weight.clone()
    L.attach_lora(ours, r=4, alpha=16, dropout=0.05, targets=ALL)
    randomize_B(ours)
    ours.eval()
    adapted = logits(ours, *batch)
    assert (adapted - base).abs().max() > 1e-3                   # the adapter does something
    with L.lora_disabled(ours):
        assert torch.equal(logits(ours, *batch), base)            # disabled == base
    with L.lora_merged(ours):
        assert (logits(ours, *batch) - adapted).abs().max() < 1e-5  # merged == unmerged
        assert not torch.equal(ours.model.layers[1].mlp.down_proj.weight, w0)
    assert torch.equal(ours.model.layers[1].mlp.down_proj.weight, w0)   # unmerge restores exactly
    assert torch.equal(logits(ours, *batch), adapted)
    # merging without a backup and unloading gives a plain model with the adapter baked in
    L.unload_lora(ours, merge=True)
    assert not L.lora_layers(ours)
    assert (logits(ours, *batch) - adapted).abs().max() < 1e-5


def test_dropout_only_in_training(hf_models, batch):
    ours = M.load_model(str(hf_models["qwen2"][1]))
    L.attach_lora(ours, r=4, alpha=8, dropout=0.5, targets=["q_proj", "v_proj"])
    randomize_B(ours, scale=0.5)
    ours.eval()
    a, b = logits(ours, *batch), logits(ours, *batch)
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(0)
    c = logits(ours, *batch)
    d = logits(ours, *batch)
    assert not torch.allclose(c, d) and not torch.allclose(a, c)


def test_bf16_base_keeps_fp32_lora():
    m = M.load_model("random:tiny-qwen2", dtype=torch.bfloat16)
    L.attach_lora(m, r=4, alpha=8, dropout=0.0)
    lay = m.model.layers[0].mlp.up_proj
    assert lay.weight.dtype == torch.bfloat16 and lay.lora_A.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 7))
    out = m.logprobs(ids)
    out.sum().backward()
    assert lay.lora_A.weight.grad is None or lay.lora_A.weight.grad.abs().sum() == 0  # B = 0 -> dA = 0
    assert lay.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,rslora", [("qwen2", False), ("llama_tied_bias", True)])
def test_our_adapter_loads_in_peft(hf_models, batch, tmp_path, kind, rslora):
    from peft import PeftModel
    hf, path = hf_models[kind]
    ours = M.load_model(str(path))
    L.attach_lora(ours, r=4, alpha=16, dropout=0.05, targets=ALL, use_rslora=rslora)
    randomize_B(ours, seed=1)
    ours.eval()
    L.save_adapter(ours, tmp_path / "ad", base_model=str(path))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    ids, mask = batch
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = logits(ours, ids, mask)
    real = mask.bool()
    assert (ref - got)[real].abs().max() < 1e-4
    base = hf_models[kind][0]
    with peft_model.disable_adapter(), torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (plain - ref)[real].abs().max() > 1e-3
    peft_model.unload()


@pytest.mark.parametrize("rslora", [False, True])        # rsLoRA: scale alpha / sqrt(r), read from the file
def test_peft_adapter_loads_in_ours(hf_models, batch, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from conftest import make_hf_model
    hf = make_hf_model("llama3")   # a fresh copy: get_peft_model modifies it in place
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM", use_rslora=rslora)   # init False: B != 0
    pm = get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    ids, mask = batch
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ours = M.load_model(str(hf_models["llama3"][1]))
    base = logits(ours, ids, mask)
    loaded = L.load_adapter(ours, tmp_path / "peft")
    assert loaded["r"] == 8
    assert len(L.lora_layers(ours)) == 2 * 3
    got = logits(ours, ids, mask)
    real = mask.bool()
    assert (ref - got)[real].abs().max() < 1e-4 and (base - got)[real].abs().max() > 1e-3
    assert not any(p.requires_grad for p in ours.parameters())


def test_adapter_that_does_not_fit_is_refused(hf_models, tmp_path):
    big = M.load_model(str(hf_models["qwen2"][1]))               # 3 layers, hidden 64
    L.attach_lora(big, r=4, alpha=8, targets=ALL)
    L.save_adapter(big, tmp_path / "qwen")
    small = M.load_model(str(hf_models["qwen2_tied_mha"][1]))    # 2 layers, hidden 48
    with pytest.raises(ValueError, match="not a Linear layer of this model"):
        L.load_adapter(small, tmp_path / "qwen")
    other = M.load_model("random:tiny-qwen2")                   # 3 layers, but other shapes
    with pytest.raises(ValueError, match="another model size"):
        L.load_adapter(other, tmp_path / "qwen")
    assert not L.lora_layers(other)                             # nothing was attached
    with pytest.raises(ValueError, match="no Linear layer matches"):
        L.attach_lora(other, targets=["qkv_proj"])
    with pytest.raises(FileNotFoundError):
        L.load_adapter(other, tmp_path / "missing")
    (tmp_path / "qwen" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        L.load_adapter(other, tmp_path / "qwen")


def test_generation_ignores_dropout_and_keeps_training_mode(hf_models, batch):
    ours = M.load_model(str(hf_models["qwen2"][1]))
    L.attach_lora(ours, r=4, alpha=8, dropout=0.5)
    randomize_B(ours, scale=0.5)
    ids, mask = batch
    ours.eval()
    ref = SM.generate(ours, ids, mask, max_new_tokens=8, temperature=0.0)
    ours.train()
    with L.lora_merged(ours):
        merged = SM.generate(ours, ids, mask, max_new_tokens=8, temperature=0.0)
    got = SM.generate(ours, ids, mask, max_new_tokens=8, temperature=0.0)
    assert ours.training
    assert torch.equal(ref.tokens, got.tokens) and torch.equal(ref.tokens, merged.tokens)


@pytest.mark.parametrize("path", ["merged", "few_rows", "dropout"])
def test_lora_linear_forward_and_gradients_match_float64(path):
    # each way LoRALinear computes (one matmul on a merged weight; the unmerged sum for few rows; the
    # unmerged sum with dropout while training): output and the gradients of x, A and B against float64
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=True)
    lay = L.LoRALinear(base, r=4, alpha=8, dropout=0.3 if path == "dropout" else 0.0).train()
    torch.nn.init.normal_(lay.lora_B.weight, std=0.3)
    x = torch.randn(2, 5 if path == "few_rows" else 40, 12, requires_grad=True)
    torch.manual_seed(1)
    y = lay(x)
    torch.manual_seed(1)                                   # the same dropout mask for the reference
    keep = torch.nn.functional.dropout(torch.ones_like(x), 0.3) if path == "dropout" else torch.ones_like(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    A = lay.lora_A.weight.detach().double().requires_grad_()
    B = lay.lora_B.weight.detach().double().requires_grad_()
    y64 = x64 @ base.weight.double().T + base.bias.double() + ((x64 * keep.double()) @ A.T) @ B.T * (8 / 4)
    (y64 * g.double()).sum().backward()
    assert (y.double() - y64).abs().max().item() < 1e-5
    for ours, ref in ((x.grad, x64.grad), (lay.lora_A.weight.grad, A.grad), (lay.lora_B.weight.grad, B.grad)):
        assert (ours.double() - ref).abs().max().item() < 1e-5
    assert base.weight.grad is None                            # the base stays frozen


def test_merging_twice_then_unmerging_restores_the_weights():
    net = M.load_model("random:tiny-qwen2")
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, 0, 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    with torch.no_grad():
        adapted = net(ids)
        for keep_backup in (True, False):
            L.merge_lora(net, keep_backup)
            L.merge_lora(net, keep_backup)                        # a second merge must not add B A again
            assert torch.allclose(net(ids), adapted, atol=1e-5)
            L.unmerge_lora(net)
            L.unmerge_lora(net)
            assert torch.allclose(net(ids), adapted, atol=1e-5)
    for n, m in L.lora_layers(net).items():
        assert torch.allclose(m.weight, w0[n + ".weight"], atol=1e-6)


def test_unload_without_merge_gives_the_base_back_even_while_merged():
    # unload_lora(merge=False) on a model whose adapter is merged at the time: the plain base weights, not W + BA
    net = M.load_model("random:tiny-qwen2")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = net(ids)
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, 0, 0.1)
    L.merge_lora(net)
    L.unload_lora(net)
    assert not L.lora_layers(net)
    with torch.no_grad():
        assert torch.allclose(net(ids), base, atol=1e-6)


def test_the_static_decoder_sees_the_weight_lora_applies_now():
    # effective_weight (what StaticDecoder stacks): W while disabled or merged, W + scale B A while enabled;
    # and the static path's greedy tokens under lora_disabled are the base model's
    net = M.load_model("random:tiny-qwen2")
    plain = M.load_model("random:tiny-qwen2")
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, 0, 0.3)
    m = net.model.layers[0].self_attn.q_proj
    want = m.weight.double() + m.scaling * m.lora_B.weight.double() @ m.lora_A.weight.double()
    assert torch.allclose(m.effective_weight().double(), want, atol=1e-6)
    with L.lora_disabled(net):
        assert torch.equal(m.effective_weight(), m.weight)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    greedy = lambda model: SM.generate(model, ids, max_new_tokens=8, temperature=0.0, static=True,  # noqa: E731
                                       compile=False).tokens
    with torch.no_grad():
        with L.lora_disabled(net):
            off = greedy(net)
        on = greedy(net)
        assert torch.equal(off, greedy(plain))
        assert not torch.equal(on, off)
