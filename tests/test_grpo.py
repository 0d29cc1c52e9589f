"""grpo_lora.py: rewards, the loss against an independent float64 computation, the schedule, learning,
resume after SIGKILL, multi-process training and bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common as C
import grpo_lora as G
import lora as L
import model as M
from conftest import randomize_B, resume_refuses_every_change_but

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- rewards

def test_format_and_tag_count():
    good = "reasoning\n</think>\n<answer>3</answer>"
    assert G.reward_format([good, "no tags", "a\n</think>\nb\n</think>\n", "x</think>"], "3") == [1, 0, 0, 0]
    assert G.reward_tag_count(["<think>\nx\n</think>\n", "x\n</think>\n", "<think>\n<think>\n", ""], "") == \
        [1.0, 0.5, 0.0, 0.0]


def test_accuracy_reward_and_unparseable_gold():
    out = G.reward_accuracy(["so \\boxed{12}", "so \\boxed{13}", "twelve"], "12")
    assert out == [1.0, 0.0, 0.0]
    assert G.reward_accuracy(["\\boxed{1}"], "}{") == [None]


def test_length_reward():
    comps = ["\\boxed{5}", "x" * 20 + "\\boxed{5}", "x" * 40 + "\\boxed{4}", "x" * 10 + "\\boxed{4}"]
    out = G.reward_length(comps, "5")
    lens = [len(c) for c in comps]
    lo, hi = min(lens), max(lens)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lens]
    assert out == pytest.approx([lam[0], lam[1], min(0, lam[2]), min(0, lam[3])])
    assert G.reward_length(["\\boxed{5}", "\\boxed{6}"], "5") == [0.0, 0.0]   # equal lengths
    assert G.reward_length(["\\boxed{5}", "x\\boxed{5}"], "}{") == [None, None]


def tina_length_correct(content, sol):
    """Tina's correctness inside len_reward / cosine_scaled_reward (tina/post_train_hf/rewards.py), transcribed;
    sol as its wrap_in_math left it ($...$), None where Tina scored an unparseable gold as correct."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
    gold = parse(f"${sol}$", extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
    if len(gold) == 0:
        return None
    answer = parse(content, extraction_config=[LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, equations=True,
                                                 boxed=True, units=True),
        boxed_match_priority=0, try_extract_without_anchor=False)], extraction_mode="first_match")
    return float(verify(answer, gold))


def test_length_and_cosine_rewards_grade_as_tinas():
    cases = [("so \\boxed{1} or \\boxed{2}", "2"), ("\\boxed{1}, \\boxed{2}", "1,2"), ("the answer is $x = 3$", "3"),
             ("\\boxed{3}", "x=3"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{10\\%}", "10"), ("\\boxed{(1,2]}", "(1,2]"),
             ("\\boxed{2 \\text{ cm}}", "2"), ("no answer", "7"), ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}")]
    got = [G.correct(c, g, "reward_length") for c, g in cases]
    assert got == [tina_length_correct(c, g) for c, g in cases]
    assert 0.0 in got and 1.0 in got
    comps = [c for c, _ in cases[:4]]
    lens = [len(c) for c in comps]
    lam = [0.5 - (n - min(lens)) / (max(lens) - min(lens)) for n in lens]
    ok = [tina_length_correct(c, "3") for c in comps]
    assert G.reward_length(comps, "3") == pytest.approx([x if o else min(0.0, x) for x, o in zip(lam, ok)])


def test_cosine_reward_on_an_unparseable_gold_is_none():
    assert G.reward_cosine(["so \\boxed{1}", "x" * 50], "}{") == [None, None]      # never scored as correct


def test_cosine_reward():
    c0, w0 = "\\boxed{7}", "\\boxed{8}"
    out = G.reward_cosine([c0, "y" * 491 + c0, w0, "y" * 991 + w0], "7")
    cos = lambda n: math.cos(math.pi * n / 1000)
    expect = [0.5 + 0.25 * (1 + cos(9)), 0.5 + 0.25 * (1 + cos(500)), -0.5 + 0.25 * (1 + cos(9)),
              -0.5 + 0.25 * (1 + cos(1000))]
    assert out == pytest.approx(expect)
    assert out[0] > 0.99 and out[1] == pytest.approx(0.75) and out[3] == pytest.approx(-0.5)


def test_repetition_reward():
    assert G.reward_repetition(["a b c d e", "a b a b a b", "a b", ""], "") == pytest.approx([0.0, -0.5, 0.0, 0.0])


def test_score_nansum_and_weights():
    total, per = G.score(["\\boxed{1}\n</think>\n", "none"], "}{", ["format", "accuracy"], [1.0, 2.0])
    assert torch.isnan(per[1]).all()
    assert total.tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- loss against float64

def reference_loss(logp, old, ref, rewards, mask, G_, beta, eps, loss_type, scale, Lmax, sampler=None, cap=None):
    """Independent float64 loop over sequences and tokens (sampler, cap: TRL's truncated IS weight per token)."""
    N, C = len(logp), len(logp[0])
    adv = []
    for i in range(N):
        grp = rewards[(i // G_) * G_:(i // G_ + 1) * G_]
        mu = sum(grp) / G_
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (G_ - 1))
        adv.append((rewards[i] - mu) / (sd + 1e-4) if scale else rewards[i] - mu)
    seq_means, total, count = [], 0.0, 0
    for i in range(N):
        s, n = 0.0, 0
        for t in range(C):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            obj = min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1 if beta else 0.0
            w = min(math.exp(old[i][t] - sampler[i][t]), cap) if sampler is not None else 1.0
            s += -(obj - beta * kl) * w
            n += 1
        seq_means.append(s / n)
        total += s
        count += n
    return {"grpo": sum(seq_means) / N, "dr_grpo": total / (N * Lmax), "dapo": total / count,
            "bnpo": total / count}[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_float64_reference(loss_type, scale, beta):
    g = torch.Generator().manual_seed(0)
    N, C, G_ = 6, 7, 3
    logp = -torch.rand(N, C, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(N, C, generator=g, dtype=torch.float64) * 0.3   # ratios beyond the clip range
    ref = logp + torch.randn(N, C, generator=g, dtype=torch.float64) * 0.2
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.5, 3.0], dtype=torch.float64)
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.tensor([[t < n for t in range(C)] for n in lengths])
    adv = G.group_advantages(rewards, G_, scale)
    got, kl, clip = G.grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=0.2, loss_type=loss_type,
                                max_completion_len=10)
    want = reference_loss(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask.tolist(), G_, beta, 0.2,
                          loss_type, scale, 10)
    assert abs(got.item() - want) < 1e-10
    # TRL's clip ratios: low = ratio < 1 - eps where A < 0, high = ratio > 1 + eps where A > 0, over masked tokens
    r, a, m = (logp - old).exp().tolist(), adv.tolist(), mask.tolist()
    toks = [(r[i][t], a[i]) for i in range(N) for t in range(C) if m[i][t]]
    low = sum(x < 0.8 and y < 0 for x, y in toks) / len(toks)
    high = sum(x > 1.2 and y > 0 for x, y in toks) / len(toks)
    assert (clip["low"].item(), clip["high"].item()) == pytest.approx((low, high), abs=1e-12)
    assert clip["region"].item() == pytest.approx(low + high, abs=1e-12) and low > 0 and high > 0


def test_truncated_importance_sampling_matches_float64_reference():
    # --vllm_is_correction: every token's loss (KL included) times min(exp(old - sampler), cap), as TRL
    g = torch.Generator().manual_seed(1)
    N, C, G_ = 6, 7, 3
    logp = -torch.rand(N, C, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(N, C, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(N, C, generator=g, dtype=torch.float64) * 0.2
    sampler = old + torch.randn(N, C, generator=g, dtype=torch.float64) * 0.8     # some weights above the cap
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.5, 3.0], dtype=torch.float64)
    mask = torch.tensor([[t < n for t in range(C)] for n in [7, 3, 5, 1, 6, 4]])
    adv = G.group_advantages(rewards, G_, True)
    w = torch.exp(old - sampler).clamp(max=2.0)
    assert (torch.exp(old - sampler) > 2.0).any()
    for lt in ("grpo", "dr_grpo", "dapo"):
        got, _, _ = G.grpo_loss(logp, old, ref, adv, mask, beta=0.04, epsilon=0.2, loss_type=lt, max_completion_len=10,
                                is_weight=w)
        want = reference_loss(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask.tolist(), G_, 0.04, 0.2,
                              lt, True, 10, sampler=sampler.tolist(), cap=2.0)
        assert abs(got.item() - want) < 1e-10, lt
    with pytest.raises(SystemExit, match="needs --rollout vllm"):
        G.main(["--model", "random:tiny-qwen2", "--dataset", "d.jsonl", "--vllm_is_correction"])


def test_advantages_are_per_group_and_gradient_sign():
    adv = G.group_advantages(torch.tensor([1.0, 0.0, 5.0, 5.0]), 2, True)
    assert adv[2] == 0 and adv[3] == 0 and adv[0] > 0 > adv[1]
    # with ratio 1 the gradient pushes up log-probs of positive-advantage tokens
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _, _ = G.grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), beta=0.0,
                             epsilon=0.2, loss_type="grpo", max_completion_len=3)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()


def test_lr_schedule_matches_transformers():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=math.ceil(0.1 * 37),
                                                      num_training_steps=37, min_lr_rate=0.1)
    for s in range(37):
        assert G.lr_factor(s, 37, 0.1, 0.1) == pytest.approx(ref.get_last_lr()[0]), s
        opt.step()
        ref.step()


# ---------------------------------------------------------------- training runs

def run_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--out_dir", str(out), "--rewards", "not_newline",
            "--reward_weights", "1", "--num_generations", "8", "--prompts_per_step", "4", "--grad_accum", "2",
            "--max_prompt_len", "64", "--max_completion_len", "4", "--lr", "1e-2", "--lora_r", "8", "--lora_alpha", "16",
            "--warmup_ratio", "0", "--system_prompt", "none", "--seed", "0", *extra]


# an easy reward for a random model: do not open with the newline it prefers (chance: a few percent)
EASY_REWARD = ("import grpo_lora as G; G.REWARDS['not_newline'] = "
               "lambda cs, gold: [float(c[:1] not in (chr(10), '')) for c in cs]")


@pytest.fixture
def easy_reward(monkeypatch):
    monkeypatch.setitem(G.REWARDS, "not_newline", lambda cs, gold: [float(c[:1] not in ("\n", "")) for c in cs])


def read_metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def test_grpo_learns_an_easy_reward(char_model_dir, arith_file, tmp_path, easy_reward):
    G.main(run_args(char_model_dir, arith_file, tmp_path / "run", "--max_steps", "30", "--stop_step", "30",
                    "--save_every", "15"))
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 30 and rows[0]["reward"] < 0.3
    assert sum(r["reward"] for r in rows[-5:]) / 5 > 0.8
    for name in ("step_000015", "step_000030", "final"):
        assert (tmp_path / "run" / name / "adapter_model.safetensors").exists()
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and max(r["kl"] for r in rows[10:]) > 1e-3   # LoRA moved
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["last_step"] == 30 and run["trainable_params"] > 0
    assert (tmp_path / "run" / "samples.jsonl").exists()
    # the saved adapter is an ordinary PEFT adapter that reproduces the policy
    import lora as L
    net = M.load_model(str(char_model_dir))
    L.load_adapter(net, tmp_path / "run" / "final")
    assert L.lora_layers(net)["model.layers.0.self_attn.q_proj"].lora_B.weight.abs().sum() > 0


def launch(args, env_extra=None):
    code = f"{EASY_REWARD}; import sys; G.main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_matches_uninterrupted(char_model_dir, arith_file, tmp_path):
    common = ["--max_steps", "12", "--stop_step", "12", "--save_every", "4", "--lora_dropout", "0.1",
              "--beta", "0.04"]
    full = launch(run_args(char_model_dir, arith_file, tmp_path / "full", *common))
    assert full.wait(timeout=300) == 0, full.stderr.read()
    # second run: killed with SIGKILL once the step-4 state is on disk, then resumed
    killed = launch(run_args(char_model_dir, arith_file, tmp_path / "cut", *common))
    state = tmp_path / "cut" / "resume" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 4):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = json.loads(state.read_text())["step"]
    assert saved < 12, "the run finished before it could be killed"
    resumed = launch(run_args(char_model_dir, arith_file, tmp_path / "cut", *common, "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 13))
    samples = lambda d: [r["step"] for r in map(json.loads, open(d / "samples.jsonl"))]
    assert samples(tmp_path / "cut") == samples(tmp_path / "full")     # no step logged twice
    skip = ("seconds", "tokens_per_s")
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith(skip):
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_processes_with_gloo(char_model_dir, arith_file, tmp_path):
    out = tmp_path / "ddp"
    code = f"{EASY_REWARD}; import sys; G.main(sys.argv[1:])"
    script = tmp_path / "entry.py"
    script.write_text(code + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *run_args(char_model_dir, arith_file, out, "--max_steps", "3", "--stop_step", "3",
                                  "--prompts_per_step", "4", "--grad_accum", "2", "--device", "cpu")]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_two_process_resume_matches_the_uninterrupted_run(char_model_dir, arith_file, tmp_path):
    # each rank has its own RNG stream (dropout, sampling) and resumes from its own saved state
    script = tmp_path / "entry.py"
    script.write_text(f"{EASY_REWARD}; import sys; G.main(sys.argv[1:])\n")

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *run_args(char_model_dir, arith_file, out, "--prompts_per_step", "4", "--grad_accum", "2", "--device",
                         "cpu", "--save_every", "2", "--lora_dropout", "0.1", "--max_steps", "4", *extra)]
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    torchrun(tmp_path / "full", "--stop_step", "4")
    torchrun(tmp_path / "cut", "--stop_step", "2")
    torchrun(tmp_path / "cut", "--stop_step", "4", "--resume")
    from safetensors.torch import load_file
    state = load_file(str(next((tmp_path / "cut" / "resume").glob("optim-*.safetensors"))))
    assert not torch.equal(state["rng/torch_cpu/rank0"], state["rng/torch_cpu/rank1"])    # two streams
    wa = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ma, mb = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["reward"] for r in ma] == [r["reward"] for r in mb] and len(ma) == 4


def on_two_gloo_ranks(tmp_path, body: str) -> str:
    """Run body (Python, with torch, dist, this repo on the path and r = the rank) on two gloo processes under
    torchrun; -> their stdout (a failure on either rank fails the test)."""
    script = tmp_path / "two_ranks.py"
    script.write_text("import os, sys, json, types, torch, torch.distributed as dist\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\n"
                      "dist.init_process_group('gloo')\nr = dist.get_rank()\n" + body +
                      "\ndist.barrier()\ndist.destroy_process_group()\n")   # (both ranks done before teardown)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_all_reduce_keeps_ranks_identical(tmp_path):
    # the gradient averaging used by multi-process training, checked across two gloo processes
    on_two_gloo_ranks(tmp_path, (
        "import common as C\n"
        "ts = [torch.full((3,), float(r + 1)), torch.full((2, 2), 10.0 * (r + 1))]\n"
        "C.all_reduce_mean(ts, 2)\n"
        "assert torch.allclose(ts[0], torch.full((3,), 1.5)) and torch.allclose(ts[1], torch.full((2, 2), 15.0))\n"))


def test_step_metrics_across_two_processes_take_the_longest_completion_and_average_the_rest(tmp_path):
    # grpo_lora.step_metrics under gloo: completion_len_max is the max over ranks (rank 1's 7), and so every *_max
    # (a *_min the min), every other metric the mean of the ranks' values, reward_none the total count
    on_two_gloo_ranks(tmp_path, (
        "import grpo_lora as G\n"
        "mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]] if r == 0 else\n"
        "                    [[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]])\n"
        "ro = types.SimpleNamespace(completion_mask=mask, finished=torch.tensor([True, r == 0]))\n"
        "rewards = torch.tensor([1.0, 0.0]) if r == 0 else torch.tensor([1.0, 1.0])\n"
        "per = [torch.tensor([1.0, float('nan')]) if r == 0 else torch.tensor([1.0, 1.0])]\n"
        "batch = types.SimpleNamespace(ro=ro, rewards=rewards, per_reward=per)\n"
        "args = types.SimpleNamespace(num_generations=2, rewards=['accuracy'])\n"
        "stats = {'loss': float(r), 'sampler_logp_gap_max': 0.5 - r / 4, 'sampler_is_ratio_min': 0.9 + r / 20}\n"
        "row = G.step_metrics(batch, stats, args, 2, torch.device('cpu'))\n"
        f"open({str(tmp_path)!r} + f'/row{{r}}.json', 'w').write(json.dumps(row))\n"))   # one file per rank
    rows = [json.loads((tmp_path / f"row{r}.json").read_text()) for r in (0, 1)]      # (printed lines interleave)
    assert len(rows) == 2 and rows[0] == rows[1]                     # every rank logs the same row
    row = rows[0]
    assert row["completion_len_max"] == 7.0                          # the longest on any rank, not (3 + 7) / 2
    assert row["completion_len_mean"] == pytest.approx(((3 + 1) / 2 + (7 + 2) / 2) / 2)
    assert row["reward"] == pytest.approx((0.5 + 1.0) / 2) and row["loss"] == pytest.approx(0.5)
    assert row["truncated"] == pytest.approx((0.0 + 0.5) / 2)
    assert row["reward_none/accuracy"] == pytest.approx(1.0)          # one unparseable gold in all
    # the sampler-trainer gap's largest and the importance ratio's smallest over both ranks' tokens
    assert (row["sampler_logp_gap_max"], row["sampler_is_ratio_min"]) == (0.5, 0.9)


# ---------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_work(char_model_dir, arith_file, tmp_path, easy_reward):
    base = run_args(char_model_dir, arith_file, tmp_path / "bad", "--max_steps", "2")
    cases = [
        (["--rewards", "accuracy,nope", "--reward_weights", "1,1"], "unknown reward"),
        (["--rewards", "accuracy,format", "--reward_weights", "1"], "reward_weights"),
        (["--num_generations", "1"], "at least 2"),
        (["--prompts_per_step", "3", "--grad_accum", "2"], "multiple of --grad_accum"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            G.main(base + extra)
    nofields = tmp_path / "nofields.jsonl"
    nofields.write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    with pytest.raises(ValueError, match="no usable question field"):
        G.main(run_args(char_model_dir, nofields, tmp_path / "bad2", "--max_steps", "1"))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_resume_with_wrong_adapter_shape(char_model_dir, arith_file, tmp_path, easy_reward):
    out = tmp_path / "r"
    G.main(run_args(char_model_dir, arith_file, out, "--max_steps", "2", "--stop_step", "2", "--save_every", "2"))
    with pytest.raises(SystemExit, match="--lora_r was 8, now 4"):     # refused before any shape is read
        G.main(run_args(char_model_dir, arith_file, out, "--max_steps", "2", "--resume", "--lora_r", "4"))
    # --max_steps sets the warm-up and the cosine: a resumed run keeps its schedule (--stop_step may move)
    with pytest.raises(SystemExit, match="--max_steps was 2, now 4"):
        G.main(run_args(char_model_dir, arith_file, out, "--max_steps", "4", "--stop_step", "4", "--resume"))
    # every flag that changes what is computed is refused on resume; only these may change (none alters the math)
    free = {"stop_step", "save_every", "log_every", "resume", "overwrite", "wandb", "device", "gpu_hour_usd",
            "model_dir", "rollout", "out_dir"}
    saved = resume_refuses_every_change_but(out, char_model_dir, free, G.RESUME_MAY_CHANGE)
    assert {"beta", "lr", "temperature", "num_generations", "loss_type", "seed"} <= set(saved)
    import shutil
    shutil.copytree(out, tmp_path / "r2")                          # (intact, for the data check below)
    # a resume adapter missing LoRA tensors would restart those layers from scratch: refused
    from safetensors.torch import load_file, save_file
    state = json.loads((out / "resume" / "state.json").read_text())
    f = out / "resume" / state["adapter"] / "adapter_model.safetensors"
    w = load_file(str(f))
    save_file({k: v for k, v in w.items() if "layers.1." not in k}, str(f))
    with pytest.raises(SystemExit, match="lacks 14 of this run's LoRA tensors"):
        G.main(run_args(char_model_dir, arith_file, out, "--max_steps", "2", "--stop_step", "2", "--resume"))
    # the training data edited between a run and its resume: refused (the data's checksum is part of the run)
    edited = tmp_path / "edited.jsonl"
    edited.write_text(arith_file.read_text().replace('"answer": "1', '"answer": "2', 1))
    ok = run_args(char_model_dir, arith_file, tmp_path / "r2", "--max_steps", "2", "--stop_step", "2", "--resume")
    with pytest.raises(SystemExit, match="the training data changed"):
        G.main([str(edited) if a == str(arith_file) else a for a in map(str, ok)])
    # with reused batches (--num_iterations 2) a checkpoint must fall between batches
    with pytest.raises(SystemExit, match="multiple of --num_iterations"):
        G.main(run_args(char_model_dir, arith_file, tmp_path / "it", "--num_iterations", "2", "--save_every", "3"))


def test_gradient_checkpointing_flag():
    parse = G.build_parser().parse_args
    base = ["--model", "m", "--dataset", "d"]

    def on(extra):
        a = parse(base + extra)
        return C.use_checkpointing(a.gradient_checkpointing, a.max_prompt_len + a.max_completion_len)
    assert on([])                                                   # 512 + 3584 tokens: long rows
    assert not on(["--max_completion_len", "96"])
    assert on(["--max_completion_len", "96", "--gradient_checkpointing"])
    assert not on(["--gradient_checkpointing", "off"])


# ---------------------------------------------------------------- the update against a direct computation

def test_update_matches_a_direct_computation(char_model_dir):
    # G.update (chunked log-probs at --logprob_temperature, the reference with LoRA off, old log-probs of an
    # earlier policy, grad_accum micro-batches) against the objective written out on full logits, per token
    from types import SimpleNamespace
    import lora as L
    net = M.load_model(str(char_model_dir))
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, 0, 0.05)
    g = torch.Generator().manual_seed(0)
    params = L.lora_parameters(net)
    P, Gn, Tp, Cn, T = 2, 3, 5, 6, 0.7
    N = P * Gn
    pids = torch.randint(3, 60, (N, Tp), generator=g)
    pmask = torch.ones(N, Tp, dtype=torch.long)
    pmask[0, :2] = 0                                               # left padding
    cids = torch.randint(3, 60, (N, Cn), generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 6, 4])
    cmask = (torch.arange(Cn)[None] < lengths[:, None]).long()
    cids = cids.masked_fill(~cmask.bool(), 0)
    adv = torch.randn(N, generator=g)
    ids, mask = torch.cat([pids, cids], 1), torch.cat([pmask, cmask], 1)

    def direct_logprobs():                                         # full logits, no chunks
        logits = net(ids, mask)[:, Tp - 1:-1].float() / T
        return torch.log_softmax(logits, -1).gather(-1, cids[..., None]).squeeze(-1)
    with torch.no_grad():
        old = direct_logprobs() + 0.1 * torch.randn(N, Cn, generator=g)      # an earlier policy's log-probs
    ro = G.Rollouts(pids, pmask, cids, cmask, [""] * N, torch.ones(N, dtype=torch.bool))
    args = SimpleNamespace(num_generations=Gn, prompts_per_step=P, grad_accum=2, logprob_temperature=T, beta=0.04,
                           epsilon=0.2, loss_type="grpo", max_completion_len=Cn, max_grad_norm=1e9)
    slices = G.micro_slices(P, Gn, args)
    batch = G.Batch([None] * P, [], ro, adv, adv[None], adv, [old[sl] for sl in slices], 0.0, 0.0)
    net.train()
    G.update(net, batch, args, params, world=1)
    ours = [p.grad.clone() for p in params]
    net.zero_grad(set_to_none=True)

    logp = direct_logprobs()
    with torch.no_grad(), L.lora_disabled(net):
        ref = direct_logprobs()
    ratio = torch.exp(logp - old)
    A = adv[:, None]
    tok = -torch.minimum(ratio * A, ratio.clamp(0.8, 1.2) * A) + 0.04 * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = cmask.float()
    ((tok * m).sum(1) / m.sum(1)).mean().backward()
    assert (ratio.detach() - 1).abs().max() > 0.05                # the old log-probs matter here
    for a, b in zip(ours, (p.grad for p in params)):
        assert (a - b).norm() < 1e-5 * b.norm() and torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def grad_batch(char_model_dir, P=4, Gn=2, seed=0):
    """A net with a trained-looking adapter and a P x Gn batch of rollouts of varied lengths (shared by the
    loss-normalisation tests, in this process and in torchrun's)."""
    import lora as L
    net = M.load_model(str(char_model_dir))
    torch.manual_seed(seed)
    L.attach_lora(net, 4, 8, 0.0)
    randomize_B(net, seed, 0.05)
    g = torch.Generator().manual_seed(seed)
    N, Tp, Cn = P * Gn, 4, 7
    pids, pmask = torch.randint(3, 60, (N, Tp), generator=g), torch.ones(N, Tp, dtype=torch.long)
    lengths = torch.tensor([7, 1, 2, 3, 7, 6, 1, 2][:N])          # micro-batches with very different token counts
    cmask = (torch.arange(Cn)[None] < lengths[:, None]).long()
    cids = torch.randint(3, 60, (N, Cn), generator=g).masked_fill(~cmask.bool(), 0)
    adv = torch.randn(N, generator=g)
    ro = G.Rollouts(pids, pmask, cids, cmask, [""] * N, torch.ones(N, dtype=torch.bool))
    return net, ro, adv


def step_grads(net, ro, adv, rows, loss_type, grad_accum, world, P=4, Gn=2):
    """The LoRA gradient update() leaves for this process's rows, with P prompts per step over `world`."""
    from types import SimpleNamespace
    import lora as L
    args = SimpleNamespace(num_generations=Gn, prompts_per_step=P, grad_accum=grad_accum, logprob_temperature=1.0,
                           beta=0.04, epsilon=0.2, loss_type=loss_type, max_completion_len=ro.completion_ids.shape[1],
                           max_grad_norm=1e9)
    sub = G.Rollouts(*(t[rows] for t in (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)),
                     [""] * len(range(*rows.indices(len(ro.texts)))), ro.finished[rows])
    n_prompts = len(sub.texts) // Gn
    batch = G.Batch([None] * n_prompts, [], sub, adv[rows], adv[None, rows], adv[rows], None, 0.0, 0.0)
    params = L.lora_parameters(net)
    net.zero_grad(set_to_none=True)
    G.update(net, batch, args, params, world=world)
    return torch.cat([p.grad.flatten() for p in params])


LOSS_INVARIANT = ("grpo", "dr_grpo", "dapo")


def test_loss_types_are_invariant_to_grad_accum_and_processes(char_model_dir, tmp_path):
    # the optimizer step's gradient must not depend on how the step is split: grad_accum 1, 2, 4 here, and
    # 2 processes (torchrun, gloo) with grad_accum 2, each rank holding half the prompts. bnpo (TRL's
    # per-micro-batch normalisation, the old "dapo") is the one that does depend on it.
    net, ro, adv = grad_batch(char_model_dir)
    net.eval()                                                     # (no dropout: the same function each call)
    full = {}
    for lt in (*LOSS_INVARIANT, "bnpo"):
        gs = [step_grads(net, ro, adv, slice(None), lt, ga, 1) for ga in (1, 2, 4)]
        full[lt] = gs[0]
        if lt == "bnpo":
            assert (gs[1] - gs[0]).norm() > 0.05 * gs[0].norm()  # micro-batch token counts differ: so does bnpo
        else:
            for g in gs[1:]:
                assert (g - gs[0]).norm() < 1e-5 * gs[0].norm(), lt
    script = tmp_path / "two.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from safetensors.torch import save_file\n"
        "import test_grpo as T\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        f"net, ro, adv = T.grad_batch({str(char_model_dir)!r})\n"
        "net.eval()\n"
        "rows = slice(4 * r, 4 * r + 4)                # rank r: prompts 2r, 2r + 1 (2 completions each)\n"
        "out = {lt: T.step_grads(net, ro, adv, rows, lt, 2, 2) for lt in T.LOSS_INVARIANT}\n"
        f"if r == 0: save_file(out, {str(tmp_path / 'grads.safetensors')!r})\n"
        "dist.destroy_process_group()\n")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file
    two = load_file(str(tmp_path / "grads.safetensors"))
    for lt in LOSS_INVARIANT:
        assert (two[lt] - full[lt]).norm() < 1e-5 * full[lt].norm(), lt


def test_the_sampler_trainer_gap_of_our_own_sampler_is_rounding(char_model_dir, arith_file, tmp_path, easy_reward):
    # the sampler's log-prob of each token it drew (merged weights, the decode loop) against the trainer's
    # (unmerged LoRA, the chunked log-probs), float32 on the CPU, no dropout: the two computations only
    out = tmp_path / "gap"
    G.main(run_args(char_model_dir, arith_file, out, "--max_steps", "3", "--stop_step", "3", "--lora_dropout", "0",
                    "--device", "cpu", "--logprob_temperature", "0.7"))
    rows = read_metrics(out)
    assert all(0 <= r["sampler_logp_gap_mean"] <= r["sampler_logp_gap_max"] < 1e-4 for r in rows), rows


def test_update_logs_the_sampler_trainer_gap_and_the_importance_ratio_spread(char_model_dir):
    # sampler log-probs = the trainer's + known offsets: the logged gap is their |mean| and |max| over completion
    # tokens, the importance ratio exp(trainer - sampler) its min / mean / max, recomputed in float64
    from types import SimpleNamespace
    import lora as L
    net, ro, adv = grad_batch(char_model_dir)
    net.eval()
    ids, mask = torch.cat([ro.prompt_ids, ro.completion_ids], 1), torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    Tp, m = ro.prompt_ids.shape[1], ro.completion_mask.bool()
    with torch.no_grad():
        logp = torch.log_softmax(net(ids, mask)[:, Tp - 1:-1].double(), -1).gather(
            -1, ro.completion_ids[..., None]).squeeze(-1)
    off = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3
    ro.sampler_logp = (logp - off).float()                 # the sampler saw each token off[t] less likely
    args = SimpleNamespace(num_generations=2, prompts_per_step=4, grad_accum=2, logprob_temperature=1.0, beta=0.0,
                           epsilon=0.2, loss_type="grpo", max_completion_len=ro.completion_ids.shape[1],
                           max_grad_norm=1e9, vllm_is_correction=False)
    batch = G.Batch([None] * 4, [], ro, adv, adv[None], adv, None, 0.0, 0.0)
    stats = G.update(net, batch, args, L.lora_parameters(net), world=1)
    o, r = off[m], off[m].exp()
    want = {"sampler_logp_gap_mean": o.abs().mean(), "sampler_logp_gap_max": o.abs().max(),
            "sampler_is_ratio_min": r.min(), "sampler_is_ratio_mean": r.mean(), "sampler_is_ratio_max": r.max()}
    for k, v in want.items():
        assert stats[k] == pytest.approx(v.item(), rel=1e-4, abs=1e-5), k
    assert stats["sampler_is_ratio_max"] > 1.3 > 0.7 > stats["sampler_is_ratio_min"]   # a spread worth logging


def test_rollout_completion_mask_ends_at_the_first_eos(char_model_dir):
    from types import SimpleNamespace
    net = M.load_model(str(char_model_dir))
    tok = M.load_tokenizer(str(char_model_dir))
    import lora as L
    L.attach_lora(net, 4, 8, 0.0)
    eos = [tok.eos_token_id] + list(range(3, 40))                 # many stop tokens: most rows end early
    args = SimpleNamespace(max_prompt_len=16, num_generations=4, max_completion_len=12, temperature=1.0, top_p=1.0)
    ro = G.rollout_hf(net, tok, ["1+1=", "22+3="], args, eos, torch.Generator().manual_seed(0))
    ends = 0
    for ids, m, fin in zip(ro.completion_ids.tolist(), ro.completion_mask.tolist(), ro.finished.tolist()):
        first = next((i for i, t in enumerate(ids) if t in eos), None)
        want = 12 if first is None else first + 1                  # up to and including the EOS, no pad after it
        assert sum(m) == want and m == [1] * want + [0] * (12 - want) and fin == (first is not None)
        assert all(t == tok.pad_token_id for t in ids[want:])
        ends += first is not None and first < 11
    assert ends >= 2


def test_prompt_stream_reshuffles_every_epoch_and_resumes_mid_epoch():
    # each epoch is the whole set once, in that epoch's own seeded order; a stream restored at (epoch, pos)
    # continues exactly where the first one was
    data = list(range(10))
    s = G.PromptStream(data, seed=3)
    seen = s.take(30)
    epochs = [seen[0:10], seen[10:20], seen[20:30]]
    assert all(sorted(e) == data for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3                                  # a fresh order each epoch
    for e, order in enumerate(epochs):
        assert order == torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist()
    a = G.PromptStream(data, seed=3)
    a.take(14)
    b = G.PromptStream(data, seed=3, epoch=a.epoch, pos=a.pos)
    assert a.take(9) == b.take(9)
    assert G.PromptStream(data, seed=4).take(10) != epochs[0]


def test_a_nan_loss_names_its_step_and_at_step_1_the_likely_cause(char_model_dir, arith_file, tmp_path, easy_reward,
                                                                  monkeypatch):
    real = G.grpo_loss
    monkeypatch.setattr(G, "grpo_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), *real(*a, **k)[1:]))
    with pytest.raises(SystemExit, match="step 1: loss is nan .*nothing has trained yet"):
        G.main(run_args(char_model_dir, arith_file, tmp_path / "n", "--max_steps", "2"))
    assert not (tmp_path / "n" / "final").exists()
