"""model.py against transformers' own Qwen2ForCausalLM / LlamaForCausalLM, and float64 references."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import sampling as SM
from conftest import HF_CONFIGS, left_padded_batch, make_hf_model

KINDS = list(HF_CONFIGS)


def hf_logits(hf, ids, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # what generate() passes for left padding
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_left_padded(hf_models, kind):
    hf, path = hf_models[kind]
    ours = M.load_model(str(path))
    ids, mask = left_padded_batch(128, [40, 17, 5, 1], seed=1)
    with torch.no_grad():
        got = ours(ids, mask)
    ref = hf_logits(hf, ids, mask)
    real = mask.bool()
    assert got.shape == ref.shape
    assert (got[real] - ref[real]).abs().max().item() < 1e-4
    # positions come from the mask: the same row unpadded gives the same logits
    with torch.no_grad():
        alone = ours(ids[1:2, -17:])
    assert (alone[0] - got[1, -17:]).abs().max().item() < 1e-4


def test_config_variants_are_covered(hf_models):
    cfgs = {k: M.load_model(str(p)).cfg for k, (_, p) in hf_models.items()}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen2"].num_key_value_heads < cfgs["qwen2"].num_attention_heads
    assert cfgs["qwen2_tied_mha"].tie_word_embeddings
    assert cfgs["llama3"].rope_scaling["rope_type"] == "llama3" and not cfgs["llama3"].qkv_bias
    plain = M.ModelConfig(**{**cfgs["llama3"].__dict__, "rope_scaling": None})
    assert not torch.allclose(M.rope_inv_freq(plain), M.rope_inv_freq(cfgs["llama3"]))
    assert cfgs["llama_tied_bias"].o_bias and cfgs["llama_tied_bias"].mlp_bias


def test_old_style_config_keys():
    # published checkpoints (R1-Distill, Llama 3.2) use rope_theta / rope_scaling, not rope_parameters
    d = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
             num_attention_heads=2, rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192))
    cfg = M.ModelConfig.from_hf(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 32.0
    assert M.ModelConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError, match="model_type"):
        M.ModelConfig.from_hf({**d, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope type"):
        M.ModelConfig.from_hf({**d, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_sharded_checkpoint_and_roundtrip(hf_models, tmp_path):
    hf, _ = hf_models["qwen2"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ours = M.load_model(str(tmp_path / "sharded"))
    ids, mask = left_padded_batch(128, [9, 4], seed=2)
    with torch.no_grad():
        got = ours(ids, mask)
    assert (got - hf_logits(hf, ids, mask))[mask.bool()].abs().max() < 1e-4
    # our save_model writes a folder transformers loads back to the same logits
    M.save_model(ours, tmp_path / "ours")
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (hf_logits(back, ids, mask) - got)[mask.bool()].abs().max() < 1e-4


def test_bad_checkpoints_give_clear_errors(hf_models, tmp_path):
    _, path = hf_models["qwen2"]
    sd = load_file(str(path / "model.safetensors"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text((path / "config.json").read_text())
    sd2 = dict(sd)
    sd2.pop("model.norm.weight")
    save_file(sd2, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        M.load_model(str(tmp_path / "a"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        M.load_model(str(tmp_path / "a"))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x01" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        M.load_model(str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError):
        M.load_model(str(tmp_path / "nowhere" / "x"))
    with pytest.raises(ValueError, match="unknown preset"):
        M.load_model("random:nope")


def test_random_presets_build():
    m = M.load_model("random:tiny-llama", seed=3)
    m2 = M.load_model("random:tiny-llama", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    for name in ("r1-distill-qwen-1.5b", "qwen2.5-1.5b", "llama-3.2-1b"):
        with torch.device("meta"):
            big = M.Transformer(M.preset_config(name))
        n = sum(p.numel() for p in big.parameters())
        assert 1.0e9 < n < 2.0e9, (name, n)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_greedy_generation_matches_transformers(hf_models, kind, static):
    hf, path = hf_models[kind]
    ours = M.load_model(str(path))
    ids, mask = left_padded_batch(128, [11, 6, 3], seed=4)
    n = 24
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    out = SM.generate(ours, ids, mask, max_new_tokens=n, temperature=0.0, static=static)
    assert torch.equal(out.tokens, ref)
    assert out.lengths.tolist() == [n] * 3 and not out.finished.any()


def test_eos_stops_each_row_and_pads_after(hf_models):
    _, path = hf_models["qwen2"]
    ours = M.load_model(str(path))
    ids, mask = left_padded_batch(128, [8, 5, 6, 7], seed=5)
    free = SM.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0)
    # choose the tokens greedy decoding emits at steps 2 and 4 of row 0 as two EOS ids
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 4])]
    out = SM.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0, eos_ids=eos, pad_id=0)
    for b in range(4):
        row = free.tokens[b].tolist()
        hits = [i for i, t in enumerate(row) if t in eos]
        n = hits[0] + 1 if hits else 12
        assert out.lengths[b] == n and bool(out.finished[b]) == bool(hits)
        assert out.tokens[b, :n].tolist() == row[:n]
        assert (out.tokens[b, n:] == 0).all()


def test_kv_cache_decoding_matches_full_forward(hf_models):
    _, path = hf_models["llama_tied_bias"]
    ours = M.load_model(str(path))
    ids, mask = left_padded_batch(128, [10, 4, 7], seed=6)
    extra = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(full_ids, full_mask)
        cache = SM.KVCache(ours.cfg, 3, full_ids.shape[1], "cpu", torch.float32)
        steps = [ours(ids, mask, cache=cache)]
        steps.append(ours(extra[:, :2], cache=cache))          # a 2-token chunk
        for t in range(2, 6):                                  # then one token at a time
            steps.append(ours(extra[:, t:t + 1], cache=cache))
    inc = torch.cat(steps, 1)
    real = full_mask.bool()
    assert (inc - full)[real].abs().max().item() < 1e-4


def test_sampling_seeded_reproducible_and_filters():
    m = M.load_model("random:tiny-qwen2", seed=0)
    ids, mask = left_padded_batch(256, [5, 9], seed=7)
    a = SM.generate(m, ids, mask, max_new_tokens=16, temperature=1.0, seed=123)
    b = SM.generate(m, ids, mask, max_new_tokens=16, temperature=1.0, seed=123)
    c = SM.generate(m, ids, mask, max_new_tokens=16, temperature=1.0, seed=124)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = SM.generate(m, ids, mask, max_new_tokens=16, temperature=0.0)
    k1 = SM.generate(m, ids, mask, max_new_tokens=16, temperature=1.0, top_k=1, seed=5)
    p0 = SM.generate(m, ids, mask, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=5)
    assert torch.equal(greedy.tokens, k1.tokens) and torch.equal(greedy.tokens, p0.tokens)


@pytest.mark.parametrize("race", [False, True])     # torch.multinomial; the exponential race (CUDA's default)
def test_sample_next_distribution(race):
    # top_p keeps the smallest set of tokens whose mass reaches p; top_k keeps k tokens; the frequencies of
    # 4,000 draws within 0.03 of the filtered, renormalised probabilities (about 4 standard deviations)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    p = torch.bincount(SM.sample_next(logits, 1.0, top_p=0.7, generator=g, race=race), minlength=4) / 4000
    assert p[2] == 0 and p[3] == 0 and abs(p[0] - 0.625) < 0.03
    k = torch.bincount(SM.sample_next(logits, 1.0, top_k=3, generator=g, race=race), minlength=4) / 4000
    assert k[3] == 0 and abs(k[2] - 0.15 / 0.95) < 0.03
    t = torch.bincount(SM.sample_next(logits, 0.5, generator=g, race=race), minlength=4) / 4000
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(t, want / want.sum(), atol=0.03)


@pytest.mark.parametrize("frozen_head", [False, True])    # True: gradients from _VocabChunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_grads_match_float64(hf_models, temperature, frozen_head):
    _, path = hf_models["qwen2"]
    ours = M.load_model(str(path))
    ours.lm_head.weight.requires_grad_(not frozen_head)
    ids, mask = left_padded_batch(128, [12, 8], seed=8)
    start = 3
    lp = ours.logprobs(ids, mask, start=start, temperature=temperature, chunk_size=5)  # uneven chunks
    h = ours(ids, mask, hidden=True)[:, start:-1]
    ref = torch.log_softmax(ours.lm_head(h).double() / temperature, -1)
    ref = ref.gather(-1, ids[:, start + 1:, None]).squeeze(-1)
    assert lp.dtype == torch.float32 and lp.shape == ref.shape
    assert (lp.double() - ref).abs().max().item() < 1e-5
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [ours.model.layers[0].self_attn.q_proj.weight] + ([] if frozen_head else [ours.lm_head.weight])
    g_ours = torch.autograd.grad((lp.double() * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g_ours, g_ref):
        assert (a.double() - b).abs().max().item() < 1e-5 * max(1.0, b.abs().max().item())


def test_logprob_gradient_of_confident_tokens_in_bf16():
    # A frozen bf16 head and hidden states whose target token has p > 0.99: the gradient wrt h is (onehot - p) W,
    # a small difference of two large rows. It must be formed before rounding to bf16 (forming W[tgt] - bf16(p) W
    # gave a median relative error of ~100% per token). Reference: float64 on the same bf16 weights and inputs.
    g = torch.Generator().manual_seed(0)
    V, D, N = 512, 64, 48
    head = torch.nn.Linear(D, V, bias=False).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) / D ** 0.5)
    tgt = torch.randint(0, V, (N,), generator=g)
    h = (head.weight[tgt].float() * 20 + 0.3 * torch.randn(N, D, generator=g)).to(torch.bfloat16)  # aims at tgt
    h.requires_grad_(True)
    lp = M.token_logprobs(head, h[None], tgt[None], chunk_size=16)[0]
    assert lp.exp().min() > 0.99                                     # every token confident
    grad, = torch.autograd.grad(lp.sum(), h)
    h64 = h.detach().double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ head.weight.double().T, -1).gather(-1, tgt[:, None]).sum()
    want, = torch.autograd.grad(ref, h64)
    rel = (grad.double() - want).norm(dim=-1) / want.norm(dim=-1)    # per token
    assert rel.median() < 0.05, rel.median()


def test_gradient_checkpointing_same_gradients():
    m = M.load_model("random:tiny-llama", seed=1).train()
    ids, mask = left_padded_batch(256, [10, 6], seed=9)
    loss = m.logprobs(ids, mask).sum()
    g1 = torch.autograd.grad(loss, list(m.parameters()))
    m.gradient_checkpointing = True
    loss2 = m.logprobs(ids, mask).sum()
    g2 = torch.autograd.grad(loss2, list(m.parameters()))
    assert torch.allclose(loss, loss2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_stop_after_and_residual_hook(hf_models):
    hf, path = hf_models["qwen2"]
    ours = M.load_model(str(path))
    ids, mask = left_padded_batch(128, [9, 6], seed=10)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        h1 = ours(ids, mask, stop_after=1)   # output of decoder layer 1 = hidden_states[2]
        real = mask.bool()
        assert (h1 - ref[2])[real].abs().max() < 1e-4
        base = ours(ids, mask)
        ours.set_residual_hook(1, lambda h: h * 0)
        zeroed = ours(ids, mask)
        ours.set_residual_hook(1, lambda h: h.clone())
        same = ours(ids, mask)
        ours.set_residual_hook(1, None)
    assert torch.allclose(same, base) and not torch.allclose(zeroed, base)
    with pytest.raises(ValueError, match="out of range"):
        ours.set_residual_hook(3, lambda h: h)


@pytest.mark.parametrize("static", [False, True])
def test_compaction_drops_finished_rows_without_changing_greedy_output(hf_models, static):
    _, path = hf_models["qwen2"]
    ours = M.load_model(str(path))
    ids, mask = left_padded_batch(128, [8, 5, 6, 7, 3, 9], seed=12)
    free = SM.generate(ours, ids, mask, max_new_tokens=16, temperature=0.0, compact=False)
    eos = sorted({int(free.tokens[0, 1]), int(free.tokens[2, 3]), int(free.tokens[4, 0])})
    a = SM.generate(ours, ids, mask, max_new_tokens=16, temperature=0.0, eos_ids=eos, compact=False)
    b = SM.generate(ours, ids, mask, max_new_tokens=16, temperature=0.0, eos_ids=eos, compact=True, static=static)
    c = SM.generate(ours, ids, mask, max_new_tokens=16, temperature=0.0, eos_ids=eos, static=static, sync_every=3)
    assert a.finished.sum() >= 2
    for x in (b, c):
        assert torch.equal(a.tokens, x.tokens) and torch.equal(a.lengths, x.lengths) and torch.equal(a.finished, x.finished)
    s1 = SM.generate(ours, ids, mask, max_new_tokens=16, temperature=1.0, eos_ids=eos, seed=4)
    s2 = SM.generate(ours, ids, mask, max_new_tokens=16, temperature=1.0, eos_ids=eos, seed=4)
    assert torch.equal(s1.tokens, s2.tokens)


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_prompt_plus_completion_rows_match_transformers(hf_models, kind):
    # GRPO's layout: left-padded prompts then right-padded completions. Such rows are rotated to start at
    # column 0 and run with plain causal attention; a row with a gap in it takes the masked path instead.
    path = hf_models[kind][1]
    hf = make_hf_model(kind)              # a fresh copy: other tests may have frozen the shared one
    ours = M.load_model(str(path))
    prompt, pmask = left_padded_batch(128, [7, 3, 5], seed=13)
    comp, cmask = left_padded_batch(128, [6, 2, 4], seed=14)
    comp, cmask = comp.flip(1), cmask.flip(1)                  # right padding
    ids, mask = torch.cat([prompt, comp], 1), torch.cat([pmask, cmask], 1)
    assert M.contiguous_shift(mask.bool()).tolist() == [0, 4, 2]
    gap = mask.clone()
    gap[0, 3] = 0                                              # row 0 now has a hole: not contiguous
    assert M.contiguous_shift(gap.bool()) is None
    for m in (mask, gap):
        with torch.no_grad():
            got = ours(ids, m)
        ref = hf(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits
        real = m.bool()
        assert (got[real] - ref[real]).abs().max().item() < 1e-4
    # log-probs and their gradients through the rotated path equal transformers' (masked attention)
    P = prompt.shape[1]
    lp = ours.logprobs(ids, mask, start=P - 1)                              # [B, N]
    g, = torch.autograd.grad((lp * cmask).sum(), ours.model.embed_tokens.weight)
    ref_logits = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    ref_lp = ref_logits[:, P - 1:-1].log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)
    g_ref, = torch.autograd.grad((ref_lp * cmask).sum(), hf.model.embed_tokens.weight)
    assert (lp - ref_lp)[cmask.bool()].abs().max().item() < 1e-4
    assert (g - g_ref).abs().max().item() < 1e-4 * max(1.0, g_ref.abs().max().item())


def test_roll_rows_inverts():
    x = torch.arange(24).view(2, 4, 3)
    shift = torch.tensor([1, 3])
    assert torch.equal(M.roll_rows(M.roll_rows(x, shift), -shift), x)
    assert M.roll_rows(x, shift)[1, 0].tolist() == x[1, 3].tolist()


@pytest.fixture
def interpreted_triton(monkeypatch):
    """Triton kernels on this machine: on a CPU, Triton's interpreter (conftest sets TRITON_INTERPRET before
    anything imports triton); skipped without Triton."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rep,rotate", [(6, True), (1, False)])
def test_split_key_attention_matches_float64(interpreted_triton, dtype, rep, rotate):
    # the Triton split-key kernel against float64 matmul attention: views of a longer cache, a span that is
    # not a multiple of the split, left padding that masks a whole split of one row, a masked key mid-row;
    # rotate: q's rotary embedding applied inside the kernel (cos, sin per row, sin's first half negated)
    b, nkv, hd, S, span = 3, 2, 32, 700, 600
    g = torch.Generator().manual_seed(3)
    kc, vc = (torch.randn(b, nkv, S, hd, generator=g).to(dtype) for _ in range(2))
    k, v = kc[:, :, :span], vc[:, :, :span]
    q = torch.randn(b, nkv * rep + nkv, hd, generator=g).to(dtype)[:, :nkv * rep].reshape(b, nkv, rep, hd)
    bias = torch.zeros(b, S, dtype=dtype)
    bias[0, :300] = float("-inf")
    bias[1, 5:9] = float("-inf")
    q64 = q.double()
    if rotate:
        angle = torch.rand(b, hd // 2, generator=g, dtype=torch.float64) * 6.3
        cos, sin = (torch.cat([f(angle), f(angle)], -1).to(dtype) for f in (torch.cos, torch.sin))   # [b, hd]
        half = torch.tensor([-1.0] * (hd // 2) + [1.0] * (hd // 2), dtype=dtype)
        out = SM.split_key_attention(q, k, v, bias[:, :span], cos, sin * half)
        cos, sin = cos.double()[:, None, None], sin.double()[:, None, None]
        q64 = q64 * cos + torch.cat([-q64[..., hd // 2:], q64[..., :hd // 2]], -1) * sin   # HF's rotate_half
    else:
        out = SM.split_key_attention(q, k, v, bias[:, :span])
    ref = SM._attend(q64, k.double(), v.double(), bias[:, None, None, :span].double(), "matmul")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max().item() < tol


@pytest.mark.parametrize("matmul_from", [1 << 30, 0, 16, "split"])   # SDPA, matmuls, a switch, Triton's kernel
@pytest.mark.parametrize("kind", KINDS)
def test_static_decoder_matches_plain_decoding(hf_models, kind, matmul_from, monkeypatch, request):
    # the fixed-shape step (what a CUDA graph replays) against the plain cached forward, token for token,
    # across key-span blocks and a batch shrink; llama_tied_bias has o / mlp biases, qwen2 GQA and q/k/v bias
    monkeypatch.setattr(SM.StaticDecoder, "SPAN_BLOCK", 8)
    ours = M.load_model(str(hf_models[kind][1]))
    if matmul_from == "split":
        if not SM.split_key_attention_fits(ours.cfg.head_dim):
            pytest.skip(f"head dim {ours.cfg.head_dim}: the split-key kernel takes powers of two")
        request.getfixturevalue("interpreted_triton")
        monkeypatch.setattr(SM.StaticDecoder, "SPLIT_KEY_ATTENTION", True)
    else:
        monkeypatch.setattr(SM.StaticDecoder, "MATMUL_ATTENTION_FROM", matmul_from)
    ids, mask = left_padded_batch(128, [9, 4, 7], seed=15)
    forced = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, static = (SM.KVCache(ours.cfg, 3, 40, "cpu", torch.float32) for _ in range(2))
        ours(ids, mask, cache=plain)
        ours(ids, mask, cache=static)
        dec = SM.StaticDecoder(ours, static, mask.sum(-1), graphs=False)
        rows = torch.arange(3)
        for t in range(20):
            if t == 12:                                        # drop row 1, as compaction does
                rows = torch.tensor([0, 2])
                plain.keep(rows)
                dec.keep(rows)
            a = ours(forced[rows, t:t + 1], cache=plain)[:, -1]
            b = dec.step(forced[rows, t])
            assert (a - b).abs().max().item() < 1e-4, t
        assert dec.filled == plain.pos


def test_static_decoder_folds_in_an_unmerged_lora(hf_models):
    import lora as L
    ours = M.load_model(str(hf_models["qwen2"][1]))
    L.attach_lora(ours, r=4, alpha=8)
    for n, p in ours.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(len(n)))
    ids, mask = left_padded_batch(128, [8, 5], seed=16)
    plain = SM.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0, static=False)
    static = SM.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0, static=True)
    with L.lora_disabled(ours):
        off = SM.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0, static=True)
    assert torch.equal(plain.tokens, static.tokens) and not torch.equal(plain.tokens, off.tokens)


def test_failed_graph_capture_falls_back_to_eager_steps(hf_models):
    # here (no CUDA) every capture fails: decoding must warn once and go on with the same results
    ours = M.load_model(str(hf_models["qwen2"][1]))
    ids, mask = left_padded_batch(128, [6, 3], seed=17)
    ref = SM.generate(ours, ids, mask, max_new_tokens=10, temperature=0.0, static=False)
    with torch.no_grad():
        cache = SM.KVCache(ours.cfg, 2, 16, "cpu", torch.float32)
        logits = ours.lm_head(ours(ids, mask, cache=cache, hidden=True)[:, -1])
        dec = SM.StaticDecoder(ours, cache, mask.sum(-1), graphs=True)
        toks = [logits.argmax(-1)]
        with pytest.warns(UserWarning, match="without graphs"):
            logits = dec.step(toks[-1])                       # the first step tries to capture
        for _ in range(9):
            toks.append(logits.argmax(-1))
            logits = dec.step(toks[-1])
    assert not dec.use_graphs and torch.equal(torch.stack(toks, 1), ref.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("matmul_from", [1 << 30, 0, "split"])
def test_compiled_static_step_matches_the_eager_one(hf_models, monkeypatch, matmul_from, request):
    # torch.compile's fused step (CPU code here, Triton on a GPU) against the eager step, token for token,
    # across key-span blocks and batch shrinks, compiled once for all of them (~1 minute on 2 cores);
    # "split": the Triton kernel as a custom op inside the compiled step
    from torch._dynamo.utils import counters
    monkeypatch.setattr(SM.StaticDecoder, "SPAN_BLOCK", 8)
    if matmul_from == "split":
        request.getfixturevalue("interpreted_triton")
        monkeypatch.setattr(SM.StaticDecoder, "SPLIT_KEY_ATTENTION", True)
    else:
        monkeypatch.setattr(SM.StaticDecoder, "MATMUL_ATTENTION_FROM", matmul_from)
    ours = M.load_model(str(hf_models["qwen2"][1]))
    ids, mask = left_padded_batch(128, [9, 4, 7, 8, 6], seed=18)
    eager = SM.generate(ours, ids, mask, max_new_tokens=30, temperature=0.0, static=True, compile=False)
    eos = sorted({int(t) for t in eager.tokens[:3, 5]})                # three rows stop early: the batch shrinks
    eager = SM.generate(ours, ids, mask, max_new_tokens=30, temperature=0.0, static=True, compile=False, eos_ids=eos)
    before = counters["stats"]["unique_graphs"]
    comp = SM.generate(ours, ids, mask, max_new_tokens=30, temperature=0.0, static=True, compile=True, eos_ids=eos)
    assert torch.equal(eager.tokens, comp.tokens) and torch.equal(eager.lengths, comp.lengths)
    assert eager.finished[:3].all() and eager.lengths.max() > 20      # one row runs on past three spans
    # 5 rows, then 2 (and maybe 1): not per span; the split path's layer is two graphs around the kernel
    assert counters["stats"]["unique_graphs"] - before <= (4 if matmul_from == "split" else 2)


def test_static_decoding_under_autocast_runs_in_the_model_dtype():
    # a caller's autocast must not break the static step (in-place matmuls need one dtype)
    net = M.load_model("random:tiny-qwen2")
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = SM.generate(net, ids, max_new_tokens=6, temperature=0.0, static=True)
        b = SM.generate(net, ids, max_new_tokens=6, temperature=0.0, static=False)
    assert a.tokens.shape == (2, 6) and torch.equal(a.tokens[:, 0], b.tokens[:, 0])   # same prefill


def test_static_decoding_refuses_residual_hooks():
    net = M.load_model("random:tiny-qwen2")
    net.set_residual_hook(1, lambda h: h * 0.5)
    ids = torch.randint(3, 256, (1, 4))
    with pytest.raises(ValueError, match="residual hooks"):
        SM.generate(net, ids, max_new_tokens=2, static=True)
    assert SM.generate(net, ids, max_new_tokens=2).tokens.shape == (1, 2)     # auto: the plain path


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_kl_and_grads_match_float64(frozen_head):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(not frozen_head)
    ht, hs = torch.randn(2, 9, 16), torch.randn(2, 9, 16, requires_grad=True)
    kl = M.chunked_kl(head, ht, hs, temperature=0.8, chunk_size=4)          # uneven chunks
    W = head.weight.double()
    hs64 = hs.detach().double().requires_grad_()
    p = torch.softmax(ht.double() @ W.T / 0.8, -1)
    ref = (p * (p.log() - torch.log_softmax(hs64 @ W.T / 0.8, -1))).sum()
    assert abs(kl.item() - ref.item()) < 1e-5
    g = torch.randn(()).double()
    assert torch.allclose(torch.autograd.grad(kl.double() * g, hs)[0].double(),
                          torch.autograd.grad(ref * g, hs64)[0], atol=1e-6)


@pytest.mark.parametrize("scaling", ["default", "linear", "llama3"])
def test_rope_inverse_frequencies_match_transformers(scaling):
    # Llama 3.2's real rope scaling (its head_dim 64 puts frequencies in all three llama3 bands: kept, smoothed
    # and divided), a linear config, and none: each against transformers' own rotary embedding
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = M.preset_config("llama-3.2-1b")
    if scaling == "linear":
        cfg.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    elif scaling == "default":
        cfg.rope_scaling = None
    d = cfg.to_hf()
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    ref = LlamaRotaryEmbedding(config=hf_cfg).inv_freq.float()
    ours = M.rope_inv_freq(cfg)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    if scaling == "llama3":                                   # every band is exercised
        rs = cfg.rope_scaling
        wavelen = 2 * torch.pi / M.rope_inv_freq(M.ModelConfig(**{**cfg.__dict__, "rope_scaling": None}))
        old = rs["original_max_position_embeddings"]
        bands = {int((w > old / rs["low_freq_factor"]).item()) - int((w < old / rs["high_freq_factor"]).item())
                 for w in wavelen}
        assert bands == {-1, 0, 1}


def test_generate_samples_at_its_temperature():
    # the first new token must be drawn from softmax(logits / T) of the prompt: the same draw by hand
    net = M.load_model("random:tiny-qwen2")
    with torch.no_grad():
        net.lm_head.weight.mul_(30)                           # peaked logits, so T changes the draw
    ids = torch.randint(3, 100, (64, 6), generator=torch.Generator().manual_seed(0))
    for T in (0.3, 3.0):
        out = SM.generate(net, ids, max_new_tokens=1, temperature=T, seed=5)
        with torch.no_grad():
            logits = net(ids)[:, -1]
        g = torch.Generator().manual_seed(5)
        want = torch.multinomial((logits.float() / T).softmax(-1), 1, generator=g).squeeze(-1)
        assert torch.equal(out.tokens[:, 0], want), T


def test_long_prompts_keep_their_end():
    # a prompt over max_len keeps its last tokens (the question and the generation prompt), as TRL's left cut
    import sampling as SM
    from toy.chars import build_char_tokenizer
    tok = build_char_tokenizer()
    ids = SM.prompt_token_ids(tok, ["abcdefgh", "xy"], max_len=3)
    assert [tok.decode(i) for i in ids] == ["fgh", "xy"]
    pids, mask = SM.encode_prompts(tok, ["abcdefgh", "xy"], "cpu", max_len=3)
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]] and tok.decode(pids[1, 1:]) == "xy"
