"""Values that would run but mean nothing, refused before any work with one line naming the flag; and the
warnings a user should see (an adapter on another base model, records skipped for missing fields)."""
import json

import pytest
import torch

import evaluate as E
import grpo_lora as G
import lora as L
import model as M
import sae as S
import sae_tune as ST
import sampling as SM
import train_sae as T

BASE = ["--model", "random:tiny-qwen2", "--dataset", "d.jsonl", "--out_dir", "never"]


@pytest.mark.parametrize("extra, flag", [
    (["--lora_r", "0"], "--lora_r 0"), (["--save_every", "0"], "--save_every 0"),
    (["--max_completion_len", "0"], "--max_completion_len 0"), (["--lr=-1e-6"], "--lr -1e-06"),
    (["--temperature", "0"], "--temperature 0.0"), (["--temperature", "-0.7"], "--temperature -0.7"),
    (["--top_p", "0"], "--top_p 0.0"), (["--lora_dropout", "1.5"], "--lora_dropout 1.5"),
    (["--grad_accum", "0"], "--grad_accum 0"), (["--logprob_temperature", "0"], "--logprob_temperature 0.0"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0"), (["--warmup_ratio", "1"], "--warmup_ratio 1.0"),
])
def test_grpo_refuses(extra, flag):
    with pytest.raises(SystemExit, match=flag.replace("+", r"\+")):
        G.main(BASE + extra)


@pytest.mark.parametrize("extra, flag", [
    (["--epochs", "0"], "--epochs 0"), (["--batch_size", "0"], "--batch_size 0"), (["--kl_chunk", "0"], "--kl_chunk 0"),
    (["--lora_r", "0"], "--lora_r 0"), (["--lr", "-1"], "--lr -1.0"), (["--max_steps", "-2"], "--max_steps -2"),
    (["--ctx_len", "1"], "--ctx_len 1"),
])
def test_sae_tune_refuses(extra, flag):
    with pytest.raises(SystemExit, match=flag):
        ST.main(BASE + extra)


@pytest.mark.parametrize("extra, flag", [
    (["--num_latents", "0"], "--num_latents 0"), (["--k", "0"], "--k 0"), (["--batch_size", "0"], "--batch_size 0"),
    (["--expansion_factor", "0"], "--expansion_factor 0"), (["--lr", "-1"], "--lr -1.0"),
    (["--num_latents", "64", "--expansion_factor", "2"], "not both"), (["--ctx_len", "1"], "--ctx_len 1"),
])
def test_train_sae_refuses(extra, flag):
    with pytest.raises(SystemExit, match=flag):
        T.main(BASE + extra)


@pytest.mark.parametrize("extra, flag", [
    (["--n", "0"], "--n"), (["--n", "-3"], "--n"), (["--temperature", "-1"], "--temperature -1.0"),
    (["--top_p", "1.5"], "--top_p 1.5"), (["--batch_size", "0"], "--batch_size"),
    (["--limit", "0"], "--limit 0"), (["--limit", "-1"], "--limit -1"), (["--n", "4", "--k", "0,-1"], "--k 0,-1"),
    (["--data", "x/aime24.jsonl", "--benchmarks", "aime24"], "share the name .aime24."),
    (["--backend", "vllm", "--temperature", "0.005"], "random:"),
])
def test_evaluate_refuses(extra, flag):
    with pytest.raises(SystemExit, match=flag):
        E.main(["--model", "random:tiny-qwen2", "--data", "d.jsonl", "--out_dir", "never", *extra])


def test_range_checks_at_their_boundaries():
    import argparse
    import common as C
    ok = lambda **kw: C.check_ranges(argparse.Namespace(v=kw.pop("v")), **kw)   # noqa: E731
    for v in (1e-12, 1, 7.5):
        ok(v=v, positive=("v",))
    for v in (0, 0.0, -1e-12):
        with pytest.raises(SystemExit, match=f"--v {v}: must be > 0"):
            ok(v=v, positive=("v",))
    for v in (0, 0.0, 3):
        ok(v=v, nonnegative=("v",))
    with pytest.raises(SystemExit, match="must be >= 0"):
        ok(v=-1e-12, nonnegative=("v",))
    for v in (0, 0.0, 0.5, 0.999):
        ok(v=v, fractions=("v",))
    for v in (1, 1.0, -0.01, 1.5):
        with pytest.raises(SystemExit, match=r"must be in \[0, 1\)"):
            ok(v=v, fractions=("v",))
    ok(v=None, positive=("v",), nonnegative=("v",), fractions=("v",))          # unset flags are skipped


def test_evaluate_names_an_adapter_folder_without_its_config(tmp_path):
    (tmp_path / "ad").mkdir()
    with pytest.raises(SystemExit, match="not an adapter folder"):
        E.main(["--model", "random:tiny-qwen2", "--data", "d.jsonl", "--adapter", str(tmp_path / "ad")])


def test_negative_temperature_is_refused_by_the_sampler():
    net = M.load_model("random:tiny-qwen2")
    ids = torch.randint(3, 100, (2, 5))
    with pytest.raises(ValueError, match="inverted"):
        SM.generate(net, ids, max_new_tokens=2, temperature=-0.5)
    with pytest.raises(ValueError, match="inverted"):
        SM.sample_next(torch.randn(2, 10), temperature=-1.0)


def test_sae_layer_flag_that_contradicts_the_sae_is_refused(tmp_path):
    S.SAE(64, 128, 4, layer=1).save(tmp_path / "sae" / "layers.1")
    args = ST.build_parser().parse_args(["--sae", str(tmp_path / "sae" / "layers.1"), "--layer", "2"])
    with pytest.raises(SystemExit, match="--layer 2, but .* layer 1"):
        ST.load_sae_arg(args)
    args = ST.build_parser().parse_args(["--sae", str(tmp_path / "sae" / "layers.1"), "--layer", "1"])
    assert ST.load_sae_arg(args)[1] == 1


def test_sae_root_folder_error_names_its_hookpoints(tmp_path):
    S.SAE(64, 128, 4, layer=1).save(tmp_path / "root" / "layers.1")
    S.SAE(64, 128, 4, layer=3).save(tmp_path / "root" / "layers.3")
    with pytest.raises(FileNotFoundError, match=r"\['layers.1', 'layers.3'\]"):
        S.SAE.load(tmp_path / "root")


def test_adapter_on_another_base_model_warns(tmp_path, capsys):
    net = M.load_model("random:tiny-qwen2")
    L.attach_lora(net, 4, 8)
    L.save_adapter(net, tmp_path / "ad", base_model="someone/other-model")
    L.load_adapter(M.load_model("random:tiny-qwen2"), tmp_path / "ad")
    assert "was trained on someone/other-model" in capsys.readouterr().out
    L.save_adapter(net, tmp_path / "same", base_model="random:tiny-qwen2")
    L.load_adapter(M.load_model("random:tiny-qwen2"), tmp_path / "same")
    assert "warning" not in capsys.readouterr().out


def test_skipped_records_are_counted_on_screen(tmp_path, capsys):
    import data as D
    f = tmp_path / "some.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in
                         [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": ""}, {"question": "", "answer": "3"}]))
    ex, stats = D.load_examples(str(f))
    assert len(ex) == 1 and stats["skipped"] == 2
    assert "skipped 2 of 3 records" in capsys.readouterr().out


def test_expected_errors_print_one_line_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    from toy.chars import build_char_tokenizer
    root = Path(__file__).resolve().parents[1]
    build_char_tokenizer(tmp_path / "tok")
    r = subprocess.run([sys.executable, "sae_tune.py", "--model", "random:tiny-qwen2", "--tokenizer", str(tmp_path / "tok"),
                        "--dataset", "nothere.jsonl",
                        "--sae", "none", "--out_dir", str(tmp_path / "x")], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown dataset 'nothere.jsonl'")


def test_cost_meter_counts_the_whole_process_across_resumes(tmp_path):
    import common as C
    import time
    log = C.RunLog(tmp_path / "r", {}, "x", n_gpus=1, gpu_hour_usd=3600.0)
    assert not (tmp_path / "r" / "run.json").exists()                  # nothing written before write_run
    log.write_run()
    first = json.loads((tmp_path / "r" / "run.json").read_text())
    assert first["wall_seconds"] >= time.time() - C.PROCESS_START - 1     # from process start, not from here
    (tmp_path / "r" / "run.json").write_text(json.dumps({**first, "wall_seconds": 1000.0}))   # an earlier run's time
    again = C.RunLog(tmp_path / "r", {}, "x", n_gpus=1, gpu_hour_usd=3600.0, resume=True)
    again.resume(0)
    again.write_run()
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["wall_seconds"] >= 1000.0 and run["dollars"] == pytest.approx(run["wall_seconds"], rel=1e-3)


def test_non_text_fields_are_skipped_not_parsed(tmp_path, capsys):
    # True would reach math-verify as E*r*t*u (and \\boxed{urTe} score 1.0); a dict question its Python repr
    import data as D
    f = tmp_path / "odd.jsonl"
    rows = [{"problem": "1+1", "answer": True}, {"problem": {"text": "2+2"}, "answer": "4"}, {"problem": "3+3", "answer": 6},
            {"problem": "4+4", "answer": {"value": False}}, {"problem": "5+5", "answer": ["10"]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex, stats = D.load_examples(str(f))
    assert [(e.question, e.answer) for e in ex] == [("3+3", "6"), ("5+5", "10")] and stats["skipped"] == 3


def test_nan_weights_are_refused_at_load(tmp_path):
    net = M.load_model("random:tiny-qwen2")
    with torch.no_grad():
        net.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    M.save_model(net, tmp_path / "m")
    with pytest.raises(ValueError, match="up_proj.weight holds NaN or inf"):
        M.load_model(str(tmp_path / "m"))
    net = M.load_model("random:tiny-qwen2")
    L.attach_lora(net, 4, 8, 0.0)
    with torch.no_grad():
        next(iter(L.lora_layers(net).values())).lora_B.weight[0, 0] = float("inf")
    L.save_adapter(net, tmp_path / "a", base_model="random:tiny-qwen2")
    with pytest.raises(ValueError, match="NaN or inf values: the adapter is corrupt"):
        L.read_adapter(tmp_path / "a")
    sae = S.SAE(8, 16, 2)
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    sae.save(tmp_path / "s")
    with pytest.raises(ValueError, match="b_dec hold NaN"):
        S.SAE.load(tmp_path / "s")


def test_adapter_tensors_outside_target_modules_are_left_out_as_peft_does(tmp_path, capsys):
    net = M.load_model("random:tiny-qwen2")
    L.attach_lora(net, 4, 8, 0.0, ["q_proj", "v_proj"])
    L.save_adapter(net, tmp_path / "a", base_model="random:tiny-qwen2")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "target_modules": ["q_proj"]}))
    _, weights = L.read_adapter(tmp_path / "a")
    assert weights and all(n.endswith("q_proj") for n in weights)
    assert "target_modules ['q_proj'] does not name" in capsys.readouterr().out


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    # transformers gives a 1-token tokenizer: the stages trained on EOS only and reported success
    M.save_model(M.load_model("random:tiny-qwen2"), tmp_path / "m")
    with pytest.raises(SystemExit, match="cannot encode text.*--tokenizer"):
        M.load_tokenizer(str(tmp_path / "m"))


def test_init_from_an_sae_of_another_layer_is_refused(tmp_path):
    sae = S.SAE(8, 16, 2, layer=2)
    sae.save(tmp_path / "layers.2")
    with pytest.raises(SystemExit, match="trained at layer 2"):
        T.load_start(str(tmp_path / "layers.2"), 4)
    assert T.load_start(str(tmp_path), 2).layer == 2


def test_loud_one_line_errors_for_common_mistakes(tmp_path):
    import common as C
    import data as D
    with pytest.raises(SystemExit, match="no CUDA device"):
        if torch.cuda.is_available():
            raise SystemExit("no CUDA device (skipped on a GPU machine)")
        C.pick_device("cuda")
    arr = tmp_path / "arr.jsonl"
    arr.write_text(json.dumps([{"problem": "1", "answer": "1"}]) + "\n")
    with pytest.raises(ValueError, match="arr.jsonl:1 is a JSON list, not one record per line"):
        D.load_examples(str(arr))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"problem": "x", "answer": "1"}).encode() + b"\n" + b'{"problem": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="latin.jsonl:2 is not UTF-8"):
        D.load_examples(str(latin))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        M.load_model(str(tmp_path / "m"))
    sae = S.SAE(8, 16, 2)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["d_in"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no d_in"):
        S.SAE.load(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no local folder .* a typo in the path"):
        M.resolve_model_dir("ourmodels/typo")              # one slash: tried as a hub id, offline in the tests
