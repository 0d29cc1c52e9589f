"""train_sae.py and sae_tune.py (Resa): activation collection, SAE training, the SAE-guided KL, gradient
routing, modularity of the tuned adapter, multi-process training and bad input."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora as L
import model as M
import sae as S
import sae_tune as ST
import train_sae as T
from conftest import identity_sae, make_char_model, randomize_B, resume_refuses_every_change_but

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    return make_char_model(tmp_path_factory.mktemp("m3"), seed=0, layers=3)


def sae_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--out_dir", str(out), "--expansion_factor", "4",
            "--k", "8", "--ctx_len", "64", "--batch_size", "4", "--lr", "1e-2", "--system_prompt", "none",
            "--seed", "0", *extra]


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def test_collection_stops_at_the_layer_and_matches_transformers(model3):
    from transformers import AutoModelForCausalLM
    net = M.load_model(str(model3))
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))

    def boom(*a):
        raise AssertionError("layer 2 ran")
    handle = net.model.layers[2].register_forward_pre_hook(boom)
    got = S.collect_residuals(net, ids, [0, 1])
    handle.remove()
    ref = AutoModelForCausalLM.from_pretrained(model3, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        assert (got[layer] - hs[layer + 1]).abs().max() < 1e-4
    assert not net.residual_hooks          # collection leaves no hook behind


def test_sae_training_lowers_fvu_and_layers_train_independently(model3, arith_file, tmp_path):
    T.main(sae_args(model3, arith_file, tmp_path / "both", "--layers", "0,2"))
    rows = metrics(tmp_path / "both")
    for layer in (0, 2):
        first, last = rows[0][f"fvu/{layer}"], min(r[f"fvu/{layer}"] for r in rows[-5:])
        assert last < 0.3 * first, (layer, first, last)
        cfg = json.loads((tmp_path / "both" / f"layers.{layer}" / "cfg.json").read_text())
        assert cfg["layer"] == layer and cfg["num_latents"] == 4 * 64 and cfg["source_model"] == str(model3)
    # several layers from one pass = separate runs with the same seed
    T.main(sae_args(model3, arith_file, tmp_path / "only2", "--layers", "2"))
    a = load_file(str(tmp_path / "both" / "layers.2" / "sae.safetensors"))
    b = load_file(str(tmp_path / "only2" / "layers.2" / "sae.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # --init_from starts from the given weights: with lr 0 they come back unchanged, except b_dec, which is
    # set to the first batch's mean, and W_dec's rows, set to unit norm before the first forward, as sparsify's
    # trainer (and so Resa) does
    T.main(sae_args(model3, arith_file, tmp_path / "ft", "--layers", "2", "--init_from", str(tmp_path / "both"),
                    "--lr", "0", "--max_tokens", "256"))
    c = load_file(str(tmp_path / "ft" / "layers.2" / "sae.safetensors"))
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a if k not in ("b_dec", "W_dec"))
    assert (a["W_dec"].norm(dim=1) - 1).abs().max() > 1e-5                  # the last step left rows off unit norm
    assert torch.allclose(c["W_dec"], a["W_dec"] / a["W_dec"].norm(dim=1, keepdim=True), atol=1e-6)
    net = M.load_model(str(model3))
    first = T.trigger_chunks(T.build_parser().parse_args(sae_args(model3, arith_file, tmp_path / "z", "--layers", "2",
                                                                   "--max_tokens", "256")), M.load_tokenizer(str(model3)))[0]
    order = torch.randperm(first.shape[0], generator=torch.Generator().manual_seed(0))
    acts = S.collect_residuals(net, first[order[:4]], [2])[2].reshape(-1, 64)
    assert torch.allclose(c["b_dec"], acts.mean(0), atol=1e-5)
    assert json.loads((tmp_path / "ft" / "layers.2" / "cfg.json").read_text())["init_from"] == str(tmp_path / "both")
    # the start's multi_topk is trained on (its term in the loss), unless --multi_topk off; --k replaces its k,
    # as Resa's finetune.py (its own SaeConfig: k 32, multi_topk off, the file's weights); other sizes refused
    import shutil
    shutil.copytree(tmp_path / "both" / "layers.2", tmp_path / "mt" / "layers.2")
    cfg_file = tmp_path / "mt" / "layers.2" / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "multi_topk": True}))
    for extra, want in (([], {"k": 8, "multi_topk": True}), (["--multi_topk", "off", "--k", "3"], {"k": 3, "multi_topk": False})):
        out = tmp_path / f"mt_run{len(extra)}"
        T.main(sae_args(model3, arith_file, out, "--layers", "2", "--init_from", str(tmp_path / "mt"), "--max_tokens",
                        "256", *extra))
        run = json.loads((out / "run.json").read_text())
        assert {k: run["saes"]["2"][k] for k in want} == want
        assert ("multi_topk_fvu/2" in metrics(out)[0]) == want["multi_topk"]
    with pytest.raises(SystemExit, match="has 256 latents, not the 128"):
        T.main(sae_args(model3, arith_file, tmp_path / "mt_bad", "--layers", "2", "--init_from", str(tmp_path / "mt"),
                        "--expansion_factor", "2"))


def test_kl_loss_matches_float64_reference_and_is_zero_when_perfect(model3):
    net = M.load_model(str(model3))
    L.attach_lora(net, r=4, alpha=8, dropout=0.0)
    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(1))
    perfect = identity_sae(64)
    loss, mse = ST.kl_loss(net, ids, perfect, 1, "block", chunk_size=7)
    assert abs(loss.item()) < 1e-6 and mse < 1e-10                     # fresh adapter + perfect SAE
    torch.manual_seed(0)
    rough = S.SAE(64, 256, 8)
    with torch.no_grad():
        for m in L.lora_layers(net).values():
            m.lora_B.weight.normal_(0, 0.05)
    loss, _ = ST.kl_loss(net, ids, rough, 1, "pass", chunk_size=7)
    with torch.no_grad():
        with L.lora_disabled(net):
            teacher = net(ids).double()
        hook = S.insert_sae(net, rough, 1)
        student = net(ids).double()
        hook.remove()
    ref = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")
    assert ref > 1e-3 and abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())


@pytest.mark.parametrize("mode", ["block", "pass"])
def test_gradient_routing(model3, mode):
    net = M.load_model(str(model3))
    L.attach_lora(net, r=4, alpha=8, dropout=0.0)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    loss, _ = ST.kl_loss(net, ids, S.SAE(64, 256, 8), 1, mode)
    loss.backward()
    for name, m in L.lora_layers(net).items():
        layer = int(name.split(".")[2])
        has = m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
        assert has == (layer > 1 or mode == "pass"), (mode, name)


def test_tuned_adapter_is_modular(model3, arith_file, tmp_path):
    T.main(sae_args(model3, arith_file, tmp_path / "sae", "--layers", "1"))
    ST.main(["--model", str(model3), "--sae", str(tmp_path / "sae" / "layers.1"), "--dataset", str(arith_file),
             "--ctx_len", "64", "--lr", "1e-2", "--lora_r", "4", "--max_steps", "12", "--save_every", "6",
             "--system_prompt", "none", "--out_dir", str(tmp_path / "tuned")])
    rows = metrics(tmp_path / "tuned")
    assert len(rows) == 12 and all("kl" in r and "sae_mse" in r for r in rows)
    run = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert run["sae_layer"] == 1 and run["sae_source_model"] == str(model3) and run["sae_grad"] == "block"
    other = make_char_model(tmp_path / "other", seed=7, layers=3)     # same shape, other weights
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(3))
    for base in (model3, other):
        net = M.load_model(str(base))
        with torch.no_grad():
            plain = net(ids)
        L.load_adapter(net, tmp_path / "tuned" / "final")
        with torch.no_grad():
            tuned = net(ids)
            with L.lora_disabled(net):
                off = net(ids)
        assert (tuned - plain).abs().max() > 1e-4 and torch.equal(off, plain)


def test_sft_baseline_lowers_ce(model3, arith_file, tmp_path):
    ST.main(["--model", str(model3), "--sae", "none", "--loss", "ce", "--dataset", str(arith_file),
             "--ctx_len", "64", "--lr", "1e-2", "--lora_r", "4", "--max_steps", "30", "--batch_size", "4",
             "--system_prompt", "none", "--out_dir", str(tmp_path / "sft")])
    ce = [r["ce"] for r in metrics(tmp_path / "sft")]
    assert sum(ce[-5:]) / 5 < 0.7 * sum(ce[:5]) / 5


def test_sae_tune_two_processes_with_gloo(model3, arith_file, tmp_path):
    script = tmp_path / "entry.py"
    script.write_text("import sys\nimport sae_tune\nsae_tune.main(sys.argv[1:])\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--model", str(model3), "--sae", "none", "--dataset", str(arith_file), "--ctx_len", "64",
           "--lr", "1e-3", "--lora_r", "4", "--max_steps", "3", "--batch_size", "2", "--system_prompt", "none",
           "--device", "cpu",
           "--out_dir", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in metrics(tmp_path / "ddp")] == [1, 2, 3]


def test_bad_input(model3, arith_file, tmp_path):
    S.SAE(48, 96, 4, layer=1).save(tmp_path / "narrow" / "layers.1")
    S.SAE(64, 128, 4, layer=5).save(tmp_path / "deep" / "layers.5")
    (tmp_path / "empty").mkdir()
    tune = ["--model", str(model3), "--dataset", str(arith_file), "--out_dir", str(tmp_path / "x"), "--ctx_len", "64"]
    for sae, msg in ((tmp_path / "narrow" / "layers.1", "d_in=48"), (tmp_path / "deep" / "layers.5", "does not exist"),
                     (tmp_path / "empty", "no cfg.json")):
        with pytest.raises(SystemExit, match=msg):
            ST.main(tune + ["--sae", str(sae)])
    with pytest.raises(SystemExit, match="does not exist"):
        T.main(sae_args(model3, arith_file, tmp_path / "y", "--layers", "3"))
    with pytest.raises(SystemExit, match="d_in"):
        T.main(sae_args(model3, arith_file, tmp_path / "y", "--layers", "1", "--init_from", str(tmp_path / "narrow")))
    nofields = tmp_path / "nofields.jsonl"
    nofields.write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    with pytest.raises(ValueError, match="no usable question field"):
        ST.main(["--model", str(model3), "--dataset", str(nofields), "--out_dir", str(tmp_path / "z"), "--sae", "none"])
    with pytest.raises(ValueError, match="no usable question field"):
        T.main(sae_args(model3, nofields, tmp_path / "z2", "--layers", "1"))
    assert not (tmp_path / "x" / "metrics.jsonl").exists() and not (tmp_path / "y" / "metrics.jsonl").exists()


def test_sae_tune_resume_after_a_crash_trims_the_log_and_matches(model3, arith_file, tmp_path, monkeypatch):
    # a run that dies at step 6 (after its step-3 checkpoint and 5 logged steps), resumed, must log steps
    # 1..8 once each and end where an uninterrupted run ends; a changed lr is refused on resume
    T.main(sae_args(model3, arith_file, tmp_path / "sae", "--layers", "1"))
    args = ["--model", str(model3), "--sae", str(tmp_path / "sae" / "layers.1"), "--dataset", str(arith_file),
            "--ctx_len", "64", "--lr", "1e-2", "--lora_r", "4", "--max_steps", "8", "--save_every", "3",
            "--system_prompt", "none", "--lora_dropout", "0"]
    ST.main([*args, "--out_dir", str(tmp_path / "full")])
    real, calls = ST.kl_loss, []

    def dies_at_step_6(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(ST, "kl_loss", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        ST.main([*args, "--out_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(ST, "kl_loss", real)
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5]
    with pytest.raises(SystemExit, match="--lr was 0.01, now 0.02"):
        ST.main([*args, "--out_dir", str(tmp_path / "cut"), "--resume", "--lr", "2e-2"])
    saved = resume_refuses_every_change_but(tmp_path / "cut", model3, {"save_every", "resume", "overwrite", "device",
                                                                       "gpu_hour_usd", "out_dir"}, ST.RESUME_MAY_CHANGE)
    assert {"lr", "epochs", "max_steps", "seed", "sae", "perturb", "batch_size"} <= set(saved)
    with pytest.raises(SystemExit, match="--resume to continue it"):       # no silent second run into it
        ST.main([*args, "--out_dir", str(tmp_path / "cut")])
    broken = tmp_path / "broken"                            # a truncated optimizer file: named, nothing written
    shutil.copytree(tmp_path / "cut", broken)
    opt_file = broken / "resume" / "optim-000003.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:100])
    before = (broken / "run.json").read_text()
    with pytest.raises(SystemExit, match="optim-000003.safetensors is missing or corrupt"):
        ST.main([*args, "--out_dir", str(broken), "--resume"])
    assert (broken / "run.json").read_text() == before
    ST.main([*args, "--out_dir", str(tmp_path / "cut"), "--resume"])
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["kl"] for r in a] == pytest.approx([r["kl"] for r in b], rel=1e-5)
    wa = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["finished"] and run["resumed_at_step"] == 3


def test_pack_chunks_marks_exactly_the_assistant_tokens():
    from toy.chars import build_char_tokenizer
    import data as D
    tok = build_char_tokenizer()
    ids, mask = D.pack_chunks(tok, [("ab", "XY"), ("cd", "Z")], ctx_len=64)      # one short chunk
    text = [tok.convert_ids_to_tokens(int(i)) for i in ids[0]]
    assert "".join(t for t, m in zip(text, mask[0]) if m) == "XYZ"
    assert "".join(t for t, m in zip(text, mask[0]) if not m) == tok.eos_token + "ab" + tok.eos_token + "cd"
    ids, mask = D.pack_chunks(tok, [("ab", "XY")] * 10, ctx_len=8)             # 50 tokens -> 6 full chunks
    assert ids.shape == (6, 8) and mask.sum().item() == sum(1 for i in range(48) if i % 5 in (3, 4))


def test_sft_loss_is_the_mean_assistant_token_nll(model3):
    net = M.load_model(str(model3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 16), generator=g)
    amask = torch.zeros(2, 16, dtype=torch.bool)
    amask[0, 5:9], amask[1, 10:16] = True, True
    loss = ST.ce_loss(net, ids, amask)
    with torch.no_grad():
        lp = torch.log_softmax(net(ids).double(), -1)                           # float64 reference
    nll = [-lp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 16) if amask[b, t]]
    assert loss.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5)


def test_train_sae_with_signum_lowers_fvu_and_saves_the_average(model3, arith_file, tmp_path):
    T.main(sae_args(model3, arith_file, tmp_path / "sig", "--layers", "1", "--optimizer", "signum", "--lr", "3e-3"))
    rows = metrics(tmp_path / "sig")
    assert rows[-1]["fvu/1"] < 0.5 * rows[0]["fvu/1"]
    run = json.loads((tmp_path / "sig" / "run.json").read_text())     # the dead window scales with a short run
    assert run["dead_tokens"] == run["chunks"] * run["ctx_len"] // 10 and "dead_fraction/1" in rows[-1]
    sae = S.load_sae(str(tmp_path / "sig" / "layers.1"))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents), atol=0.05)   # x: near unit rows


def test_init_from_eleutherais_mlp_folders_loads_with_a_warning(model3, arith_file, tmp_path, capsys):
    # EleutherAI's R1-Distill SAEs sit in layers.N.mlp folders (trained on MLP outputs): Resa starts from them
    S.SAE(64, 256, 8).save(tmp_path / "eleuther" / "layers.1.mlp")
    S.SAE(64, 256, 8).save(tmp_path / "eleuther" / "layers.0.mlp")
    T.main(sae_args(model3, arith_file, tmp_path / "ft", "--layers", "1", "--init_from", str(tmp_path / "eleuther"),
                    "--max_tokens", "256"))
    assert "layers.1.mlp was trained on the output of layer 1's MLP" in capsys.readouterr().out
    assert json.loads((tmp_path / "ft" / "layers.1" / "cfg.json").read_text())["num_latents"] == 256
    with pytest.raises(SystemExit, match="no SAE for layer 2"):
        T.main(sae_args(model3, arith_file, tmp_path / "ft2", "--layers", "2", "--init_from", str(tmp_path / "eleuther")))


def test_resa_sft_text_rows_and_full_sequence_loss(model3, arith_file, tmp_path):
    import data as D
    tok = M.load_tokenizer(str(model3))
    prefix, reply = D.resa_sft_text(tok, "2+3", "5")
    assert reply.startswith("think: \n5\n answer: 5") and "2+3" in prefix
    ids, amask, valid = D.pad_rows(tok, [(prefix, reply), ("ab", "c")], ctx_len=64)
    assert ids.shape[0] == 2 and valid[1].sum() == 3 and not valid[1, 3:].any() and amask[1].tolist()[:3] == [
        False, False, True]
    ids, amask, valid = D.pad_rows(tok, [(prefix, reply)], ctx_len=5)               # cut at ctx_len
    assert ids.shape == (1, 5) and valid.all()
    ST.main(["--model", str(model3), "--sae", "none", "--loss", "ce", "--dataset", str(arith_file), "--text_format",
             "resa_sft", "--no_packing", "--loss_on", "all", "--ctx_len", "64", "--lr", "1e-2", "--lora_r", "4",
             "--batch_size", "4", "--max_steps", "6", "--lr_schedule", "linear", "--warmup_ratio", "0.34",
             "--out_dir", str(tmp_path / "sft")])
    rows = metrics(tmp_path / "sft")
    assert [r["lr"] for r in rows[:4]] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 1e-2])   # warm-up: ceil(0.34 x 6) = 3
    assert rows[-1]["lr"] == pytest.approx(1e-2 * 1 / 3) and rows[-1]["ce"] < rows[1]["ce"]
    with pytest.raises(SystemExit, match="for the SFT baselines"):
        ST.main(["--model", str(model3), "--sae", str(tmp_path / "x"), "--no_packing", "--dataset", str(arith_file)])
    # SFT rows without a token to train on (short chunks of the prompt only) are left out and counted
    short = ["--model", str(model3), "--sae", "none", "--loss", "ce", "--dataset", str(arith_file), "--ctx_len", "8",
             "--system_prompt", "resa", "--device", "cpu"]
    ids, lmask, stats, *_ = ST.setup(ST.build_parser().parse_args(short), torch.device("cpu"))
    assert stats["rows_without_loss_tokens"] > 0 and lmask[:, 1:].any(1).all()
    # --mask_pad_labels (Resa's SFTTrainer collator): a tokenizer whose pad is its EOS, as R1-Distill's, never
    # trains on the reply's closing EOS; without the flag it does
    tok.pad_token = tok.eos_token
    tok.save_pretrained(str(tmp_path / "tok_pad_eos"))
    sft = ["--model", str(model3), "--tokenizer", str(tmp_path / "tok_pad_eos"), "--sae", "none", "--loss", "ce",
           "--dataset", str(arith_file), "--text_format", "resa_sft", "--no_packing", "--loss_on", "all",
           "--ctx_len", "64", "--device", "cpu"]
    for flag in (False, True):
        ids, lmask, stats, *_ = ST.setup(ST.build_parser().parse_args(sft + ["--mask_pad_labels"] * flag),
                                         torch.device("cpu"))
        eos_targets = int((lmask & (ids == tok.eos_token_id)).sum())
        assert (eos_targets == 0) == flag and (stats.get("pad_labels_masked", 0) == ids.shape[0]) == flag


def test_teacher_adapter_upper_bound_and_evaluation_with_an_sae(model3, arith_file, tmp_path):
    # the upper-bound row: KL to the target + a source adapter, no SAE; the adapter it learns moves the target
    # toward the source. And evaluate.py --sae: the model with an SAE in place of its residual stream
    import evaluate as E
    net = M.load_model(str(model3))
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, 0, 0.3)
    g = torch.Generator().manual_seed(0)
    L.save_adapter(net, tmp_path / "source")
    ST.main(["--model", str(model3), "--sae", "none", "--teacher_adapter", str(tmp_path / "source"), "--dataset",
             str(arith_file), "--ctx_len", "64", "--lr", "1e-2", "--lora_r", "4", "--max_steps", "15",
             "--system_prompt", "none", "--lora_dropout", "0", "--out_dir", str(tmp_path / "ub")])
    rows = metrics(tmp_path / "ub")
    assert "kl" in rows[0] and rows[-1]["kl"] < 0.5 * rows[0]["kl"]           # the student approaches the source
    ids = torch.randint(3, 90, (2, 16), generator=g)
    with torch.no_grad():
        teacher = net(ids)                                                 # base + source adapter
        student = M.load_model(str(model3))
        L.load_adapter(student, tmp_path / "ub" / "final")
        base = M.load_model(str(model3))
        kl = lambda a, b: F.kl_div(F.log_softmax(b(ids), -1), F.log_softmax(a, -1), log_target=True,
                                   reduction="batchmean").item()
        assert kl(teacher, student) < 0.5 * kl(teacher, base)
    blank = S.SAE(64, 128, 4, layer=1)                      # reconstructs 0: the stream after layer 1 is wiped
    with torch.no_grad():
        blank.W_dec.zero_()
        blank.b_dec.zero_()
    blank.save(tmp_path / "sae" / "layers.1")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"problem": f"{a}+1", "answer": str(a + 1)}) + "\n" for a in range(3)))
    common = ["--model", str(model3), "--data", str(small), "--max_new_tokens", "8", "--temperature", "0",
              "--template", "none", "--device", "cpu"]
    E.main([*common, "--out_dir", str(tmp_path / "plain")])
    E.main([*common, "--sae", str(tmp_path / "sae" / "layers.1"), "--out_dir", str(tmp_path / "with_sae")])
    a = [json.loads(x)["completion"] for x in open(tmp_path / "plain" / "samples.jsonl")]
    b = [json.loads(x)["completion"] for x in open(tmp_path / "with_sae" / "samples.jsonl")]
    assert a != b                                           # the SAE was in place while generating
    with pytest.raises(SystemExit, match="does not fit"):
        S.SAE(32, 64, 4, layer=1).save(tmp_path / "narrow" / "layers.1")
        E.main([*common, "--sae", str(tmp_path / "narrow" / "layers.1"), "--out_dir", str(tmp_path / "x")])


def test_trace_free_text_in_the_models_own_chat_format(model3, arith_file, tmp_path):
    import data as D
    tok = M.load_tokenizer(str(model3))
    ex = D.load_examples(str(arith_file))[0][:2]
    (prefix, reply), _ = D.text_pieces(tok, ex, "chat", "")
    assert prefix == D.format_prompt(tok, ex[0].question, "")                 # exactly the inference prompt
    assert reply == f"{ex[0].answer}\n</think>\n<answer>{ex[0].answer}</answer>"
    assert D.text_pieces(tok, ex, "resa", "S")[0] == D.trace_free_text(ex[0].question, ex[0].answer, "S")
    T.main(sae_args(model3, arith_file, tmp_path / "sae", "--layers", "1", "--text_format", "chat",
                    "--max_tokens", "256"))
    ST.main(["--model", str(model3), "--sae", str(tmp_path / "sae" / "layers.1"), "--dataset", str(arith_file),
             "--text_format", "chat", "--ctx_len", "64", "--lora_r", "4", "--max_steps", "2", "--system_prompt",
             "none", "--out_dir", str(tmp_path / "tuned")])
    assert len(metrics(tmp_path / "tuned")) == 2


def test_plain_text_corpus_trains_an_sae_on_its_text_as_is(model3, tmp_path, capsys):
    # --text_format plain (Resa's SAE pre-training on a general corpus): the text column chunked as is, empty
    # records counted and skipped, a missing column named with the fields there are
    import data as D
    corpus = tmp_path / "corpus.jsonl"
    docs = [f"Q: {a}+{a}\nA: <think>\n{a}+{a}={2 * a}\n</think>" for a in range(40)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs) + json.dumps({"text": ""}) + "\n")
    tok = M.load_tokenizer(str(model3))
    args = T.build_parser().parse_args(sae_args(model3, corpus, tmp_path / "sae", "--layers", "1", "--text_format",
                                                "plain", "--max_tokens", "0"))
    ids, held, stats = T.trigger_chunks(args, tok)
    assert stats["examples"] == 40 and stats["skipped"] == 1 and "skipped 1 of 41" in capsys.readouterr().out
    want = D.pack_chunks(tok, [("", t) for t in docs], 64)[0]
    assert torch.equal(torch.cat([ids, held]), want)          # no text beyond the pass: its last chunks held out
    assert len(held) == stats["held_out_chunks"] == min(8, len(want) // 10)
    T.main(sae_args(model3, corpus, tmp_path / "sae", "--layers", "1", "--text_format", "plain"))
    assert S.load_sae(str(tmp_path / "sae" / "layers.1")).meta["trigger_dataset"] == str(corpus)
    with pytest.raises(ValueError, match="no text field 'body'.*'text'"):
        T.main(sae_args(model3, corpus, tmp_path / "sae2", "--layers", "1", "--text_format", "plain",
                        "--question_field", "body"))


def test_perturbation_controls_match_the_saes_fvu_and_shape(model3, arith_file, tmp_path):
    # Resa's controls: an untrained SAE of the same shape, and Gaussian noise with the trained SAE's FVU
    T.main(sae_args(model3, arith_file, tmp_path / "sae", "--layers", "1"))
    sae = S.load_sae(str(tmp_path / "sae" / "layers.1"))
    net = M.load_model(str(model3))
    ids = torch.randint(3, 90, (6, 32), generator=torch.Generator().manual_seed(0))
    xs = [S.collect_residuals(net, ids[i:i + 1], [1])[1][0].float() for i in range(6)]
    x = torch.cat(xs).double()
    with torch.no_grad():       # float64 recomputation of the FVU
        want = ((x - sae.reconstruct(x.float()).double()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert S.perturbation_fvu(sae, xs) == pytest.approx(float(want), rel=1e-6)
    noise = S.noise_matching(sae, xs)
    torch.manual_seed(0)
    draws = [S.perturbation_fvu(noise, xs) for _ in range(20)]
    assert sum(draws) / 20 == pytest.approx(float(want), rel=0.03)           # the SAE's FVU, in expectation
    rnd = S.random_like(sae, xs, seed=5)
    assert (rnd.d_in, rnd.num_latents, rnd.k, rnd.layer) == (sae.d_in, sae.num_latents, sae.k, sae.layer)
    assert torch.allclose(rnd.W_dec.norm(dim=1), torch.ones(rnd.num_latents), atol=1e-5)
    assert torch.allclose(rnd.b_dec.double(), x.mean(0), atol=1e-5)
    assert torch.equal(rnd.encoder.weight, S.random_like(sae, xs, seed=5).encoder.weight)      # seeded
    assert not torch.allclose(rnd.encoder.weight, sae.encoder.weight)

    tune = ["--model", str(model3), "--sae", str(tmp_path / "sae" / "layers.1"), "--dataset", str(arith_file),
            "--ctx_len", "64", "--lr", "1e-2", "--lora_r", "4", "--max_steps", "4", "--save_every", "100",
            "--system_prompt", "none"]
    records = {}
    for arm in ("sae", "random_sae", "noise"):
        ST.main([*tune, "--perturb", arm, "--out_dir", str(tmp_path / f"tuned_{arm}")])
        records[arm] = json.loads((tmp_path / f"tuned_{arm}" / "run.json").read_text())["data"]["perturbation"]
        assert len(metrics(tmp_path / f"tuned_{arm}")) == 4 and all(r["kl"] > 0 for r in metrics(tmp_path / f"tuned_{arm}"))
    assert records["sae"]["fvu"] == pytest.approx(records["sae"]["sae_fvu"])
    assert records["noise"]["fvu"] == pytest.approx(records["sae"]["sae_fvu"], rel=0.1)
    assert records["random_sae"]["fvu"] > 2 * records["sae"]["fvu"]             # untrained: a worse reconstruction
    with pytest.raises(SystemExit, match="shaped after an SAE"):
        ST.main([*tune[:3], "none", *tune[4:], "--perturb", "noise", "--out_dir", str(tmp_path / "bad")])


def test_held_out_metrics_match_a_float64_recomputation(model3, arith_file, tmp_path):
    # FVU, KL per token and CE recovered on held-out chunks (the SAE's fitness for SAE-Tuning, SAELens' figures)
    T.main(sae_args(model3, arith_file, tmp_path / "sae", "--layers", "1", "--eval_chunks", "3"))
    run = json.loads((tmp_path / "sae" / "run.json").read_text())
    got = run["held_out"]["1"]
    assert run["data"]["held_out_chunks"] == 3
    args = T.build_parser().parse_args(sae_args(model3, arith_file, tmp_path / "z", "--layers", "1", "--eval_chunks", "3"))
    train_ids, held, _ = T.trigger_chunks(args, M.load_tokenizer(str(model3)))
    assert held.shape[0] == 3 and not any(torch.equal(h, t) for h in held for t in train_ids)
    net = M.load_model(str(model3), dtype=torch.float64)
    sae = S.load_sae(str(tmp_path / "sae" / "layers.1")).double()
    with torch.no_grad():
        x = S.collect_residuals(net, held, [1])[1].reshape(-1, 64)
        fvu = ((x - sae.reconstruct(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        lp = torch.log_softmax(net(held), -1)                                      # [B, T, V]

        def with_hook(fn):
            net.set_residual_hook(1, fn)
            try:
                return torch.log_softmax(net(held), -1)
            finally:
                net.set_residual_hook(1, None)
        lp_sae, lp_zero = with_hook(sae.reconstruct), with_hook(torch.zeros_like)
    ce = lambda l: -l[:, :-1].gather(-1, held[:, 1:, None]).mean().item()          # noqa: E731
    kl = (lp.exp() * (lp - lp_sae)).sum(-1).mean().item()
    assert got["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert got["kl_per_token"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert got["ce_clean"] == pytest.approx(ce(lp), rel=1e-5)
    assert got["ce_with_sae"] == pytest.approx(ce(lp_sae), rel=1e-5)
    assert got["ce_zero_ablated"] == pytest.approx(ce(lp_zero), rel=1e-5)
    want = (ce(lp_zero) - ce(lp_sae)) / (ce(lp_zero) - ce(lp))
    assert got["ce_recovered"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    with pytest.raises(SystemExit, match="hold out fewer"):
        T.main(sae_args(model3, arith_file, tmp_path / "sae3", "--layers", "1", "--eval_chunks", "100000"))


def test_sae_tune_batches_cover_each_epoch_once_split_across_ranks():
    n, per_step, world = 10, 4, 2
    steps_per_epoch = math.ceil(n / per_step)
    orders = []
    for epoch in range(3):
        got = []
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            parts = [ST.batch_rows(step, n, per_step, steps_per_epoch, 7, r, world)[1].tolist() for r in range(world)]
            assert not set(parts[0]) & set(parts[1])                          # ranks never share a chunk
            if k < steps_per_epoch - 1:
                assert sum(map(len, parts)) == per_step
                got += parts[0] + parts[1]
            else:                                                              # the short last step
                got += [x for x in parts[0] + parts[1] if x not in got]
        assert sorted(got) == list(range(n))
        orders.append(got)
        want = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert [x for x in want if x in got] == want and set(got) == set(want)
    assert len({tuple(o) for o in orders}) == 3                                  # reshuffled per epoch
    in_order = [ST.batch_rows(k, n, per_step, steps_per_epoch, 7, 0, 1, shuffle=False)[1].tolist() for k in range(2)]
    assert in_order == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_the_dead_latent_fraction_logged_counts_every_token(model3, arith_file, tmp_path, monkeypatch):
    # replay every step's selected latents through a fresh tracker: the logged dead fraction must match
    outs, real = [], S.train_step

    def keep(*a, **k):
        o = real(*a, **k)
        outs.append((o.indices.detach().clone(), o.acts.detach().clone()))
        return o
    monkeypatch.setattr(S, "train_step", keep)
    T.main(sae_args(model3, arith_file, tmp_path / "sae", "--layers", "1", "--expansion_factor", "16", "--k", "2",
                    "--dead_tokens", "300", "--eval_chunks", "0"))
    tracker = S.DeadLatentTracker(16 * 64, 300)
    logged = [r["dead_fraction/1"] for r in metrics(tmp_path / "sae")]
    replay = []
    for idx, acts in outs:
        tracker.update(idx, acts)
        replay.append(tracker.dead_fraction())
    assert logged == pytest.approx(replay) and max(logged) > 0.1                # some latents die in this run
