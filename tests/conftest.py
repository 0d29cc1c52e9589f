"""Shared fixtures: tiny random Hugging Face models saved with transformers' own save_pretrained."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():                 # Triton kernels (sampling.split_key_attention) run in Triton's
    os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU interpreter; set before anything imports triton
torch.set_num_threads(min(2, torch.get_num_threads()))

# tiny architectures covering what the real checkpoints use: GQA, q/k/v bias, tied and untied
# embeddings, llama3 rope scaling (original context small so scaling acts at test lengths)
HF_CONFIGS = {
    "qwen2": dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                  tie_word_embeddings=False, max_position_embeddings=256),
    "qwen2_tied_mha": dict(model_type="qwen2", vocab_size=128, hidden_size=48, intermediate_size=80,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=256),
    "llama3": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=112,
                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=1024,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32), rope_theta=500000.0),
    "llama_tied_bias": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=112,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                            attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                            max_position_embeddings=256),
}


def make_hf_model(kind: str, seed: int = 0):
    """A random transformers model of the given tiny kind (float32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(HF_CONFIGS[kind])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """kind -> (transformers model, folder saved with save_pretrained)."""
    out = {}
    for kind in HF_CONFIGS:
        m = make_hf_model(kind)
        d = tmp_path_factory.mktemp(kind)
        m.save_pretrained(d)
        out[kind] = (m, d)
    return out


def left_padded_batch(vocab: int, lengths, seed: int = 0, pad: int = 0):
    """Random token ids [B, max(lengths)] left-padded with pad, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def make_char_model(d, seed: int = 0, layers: int = 2, embed_scale: float = 5.0, hidden: int = 64, tied: bool = True):
    """A tiny random Qwen2 saved in Hugging Face layout with the toy character tokenizer (hidden 128, untied:
    a shape vLLM's CPU attention takes, head_dim 32)."""
    import model as M
    from toy.chars import build_char_tokenizer
    tok = build_char_tokenizer()
    cfg = M.ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                        max_position_embeddings=512)
    net = M.Transformer(cfg).init_weights(seed=seed)
    with torch.no_grad():   # larger embeddings: the final RMSNorm otherwise caps how peaked logits can get
        net.model.embed_tokens.weight.mul_(embed_scale)
    M.save_model(net, d, tokenizer=tok)
    return d


@pytest.fixture(scope="session")
def char_model_dir(tmp_path_factory):
    return make_char_model(tmp_path_factory.mktemp("charmodel"))


@pytest.fixture(scope="session")
def arith_file(tmp_path_factory):
    """A small question/answer JSONL: two-term sums."""
    import json
    import random
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with open(p, "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            f.write(json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n")
    return p


def identity_sae(d: int):
    """A TopK SAE that reconstructs exactly: latents relu(x) and relu(-x), k = d."""
    import sae as S
    sae = S.SAE(d, 2 * d, d, normalize_decoder=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


def randomize_B(model, seed: int = 0, scale: float = 0.05):
    """Move every LoRA layer off its zero start: lora_B ~ N(0, scale^2), seeded (a trained adapter, in effect)."""
    import lora as L
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


def resume_refuses_every_change_but(out, model_dir, free: set, may_change) -> dict:
    """Against a run's saved resume state in out: each saved argument changed in turn must be refused by
    lora.load_training_state, except those in free (which must load). -> the saved arguments."""
    import json
    import lora as L
    import model as M
    saved = json.loads((out / "resume" / "state.json").read_text())["args"]
    state = json.loads((out / "resume" / "state.json").read_text())
    net = M.load_model(str(model_dir))
    cfg = json.loads((out / "resume" / state["adapter"] / "adapter_config.json").read_text())
    L.attach_lora(net, cfg["r"], cfg["lora_alpha"], 0.0, names=None)
    opt = torch.optim.AdamW(L.lora_parameters(net))
    for k, v in saved.items():
        changed = {**saved, k: (not v) if isinstance(v, bool) else f"{v}x" if isinstance(v, str) else
                   [*v, v[-1]] if isinstance(v, list) and v else ["x"] if isinstance(v, list) else
                   -1 if v is None else v + 1}
        if k in free:
            L.load_training_state(out, net, opt, torch.Generator(), changed, may_change)
        else:
            with pytest.raises(SystemExit, match=f"--{k} was" if k != "data_checksum" else "data changed"):
                L.load_training_state(out, net, opt, torch.Generator(), changed, may_change)
    return saved
