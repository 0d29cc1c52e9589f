"""The toy world: data, tokenizer, and the pipeline end to end (tiny sizes in CI, full sizes marked slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data as D
import model as M
from toy.chars import build_char_tokenizer
from toy.world import completion, make_problem, write_sets

ROOT = Path(__file__).resolve().parents[1]


def test_world_is_deterministic_heldout_and_gradable(tmp_path):
    write_sets(tmp_path / "a", seed=3, n_train=200, n_test=50)
    write_sets(tmp_path / "b", seed=3, n_train=200, n_test=50)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    train = [json.loads(line) for line in open(tmp_path / "a" / "train.jsonl")]
    test = [json.loads(line) for line in open(tmp_path / "a" / "test.jsonl")]
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for r in train + test:
        assert eval(r["problem"]) == int(r["answer"]) and 0 <= int(r["answer"]) <= 20
    import random
    q, a, steps = make_problem(random.Random(0), 5)
    assert len(steps) == 4 and steps[-1].endswith(f"={a}")
    for worked in (True, False):
        text = completion(a, steps, worked)
        assert D.grade(text, str(a), "reward") == 1.0 and D.grade(text, str(a + 1), "reward") == 0.0
        assert text.count("</think>\n") == 1


def test_char_tokenizer_survives_a_qwen2_folder(tmp_path):
    # transformers picks the tokenizer class from config.json's model_type; ours must load back unchanged
    tok = build_char_tokenizer()
    net = M.load_model("random:tiny-qwen2")
    M.save_model(net, tmp_path, tokenizer=tok)
    back = M.load_tokenizer(str(tmp_path))
    text = "Q: 1+2\nA: <think>\n1+2=3\n</think>\n<answer>\\boxed{3}</answer>\n"
    assert back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert back.decode(back(text, add_special_tokens=False).input_ids) == text
    assert D.format_prompt(back, "1+2") == "Q: 1+2\nA: <think>\n"


def check_vs_control(toy: Path, rep: dict):
    """Each SAE-Tuning arm's vs_control, recomputed in float64 from the recorded samples: the per-problem pass@1
    differences to the control, their mean and mean +/- 1.96 standard errors (all zero in --quick, where nothing
    is solved: the full run's slow test is where this discriminates)."""
    samples = [json.loads(x) for x in open(toy / "eval" / "resa" / "samples.jsonl")]

    def pp(name):
        mine = [x for x in samples if Path(x["adapter"]).parent.name == name]
        return {i: torch.tensor([x["correct"] for x in mine if x["index"] == i], dtype=torch.float64).mean()
                for i in {x["index"] for x in mine}}
    control, checked = pp("control"), 0
    for row in rep["rows"]:
        if row["arm"] in ("random_sae", "noise", "other_seed", "upper_bound", "sft", "resa_s0"):
            mine = pp({"resa_s0": "sae_tuned_s0"}.get(row["arm"], row["arm"]))
            d = torch.stack([mine[i] - control[i] for i in sorted(control)])
            se = d.std(unbiased=True) / len(d) ** 0.5
            assert row["vs_control"] == pytest.approx(d.mean().item(), abs=1e-12), row["arm"]
            assert row["vs_control_interval95"] == pytest.approx([(d.mean() - 1.96 * se).item(),
                                                                  (d.mean() + 1.96 * se).item()], abs=1e-12)
            checked += 1
    assert checked == 6


def test_pipeline_quick_connects_every_stage(tmp_path):
    r = subprocess.run([sys.executable, "toy/pipeline.py", "--quick", "--out", str(tmp_path / "toy")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "toy" / "results.json").read_text())
    labels = [row["row"] for row in rep["rows"]]
    for want in ("base model", "GRPO-LoRA", "source with its SAE inserted", "base with that SAE inserted",
                 "SAE-Tuning (Resa), seed 0", "SAE-Tuning, mean of 1 seeds", "control: SAE-Tuning with an SAE trained",
                 "control: an untrained SAE", "control: Gaussian noise", "control: the source's SAE trained with another",
                 "upper bound:", "SFT-LoRA", "second base", "SAE-tuned adapter on the second base"):
        assert sum(label.startswith(want) for label in labels) == 1, want
    assert len(labels) == 14 and all(0 <= row["pass@1"] <= 1 and 0 <= row["reasons"] <= 1 for row in rep["rows"])
    assert set(rep["summary"]) >= {"sae_tuning_share_of_grpo_gain", "sae_tuning_score_over_grpo_score",
                                   "sae_tuning_minus_control", "source_with_sae_over_source", "random_sae_minus_control",
                                   "noise_minus_control", "other_seed_minus_control"}
    # every SAE-Tuning arm but the control is set against the control, paired over problems
    has = [r["arm"] for r in rep["rows"] if "vs_control" in r]
    assert has == ["resa_s0", "resa_mean", "random_sae", "noise", "other_seed", "upper_bound", "sft"]
    check_vs_control(tmp_path / "toy", rep)
    ev = rep["evidence"]
    assert all(0 <= ev[f"{k}_held_out_fvu"] and 0 <= ev[f"{k}_held_out_kl_per_token"]
               for k in ("sae", "control_sae", "seed_sae"))
    assert ev["random_sae_fvu"] > ev["noise_fvu"] >= 0           # the untrained SAE destroys far more than noise
    assert "| GRPO-LoRA (Tina): the source |" in (tmp_path / "toy" / "results.md").read_text()
    # the console: each stage says when it starts (naming its log) and ends, and the run where its results went
    started = [line for line in r.stdout.splitlines() if " started  (progress: " in line]
    ended = [line for line in r.stdout.splitlines() if " finished in " in line]
    assert len(started) == len(ended) == len(list((tmp_path / "toy" / "logs").glob("*.log"))) == 17
    assert all(line.split("(progress: ")[1].split(")")[0].endswith(".log") for line in started)
    assert f"results: {tmp_path / 'toy' / 'results.md'}" in r.stdout
    for d in ("base", "base2", "grpo/final", "sae_tuned_s0/final", "control/final", "random_sae/final", "noise/final",
              "other_seed/final", "sae_seed/layers.0", "upper_bound/final", "sft/final"):
        assert (tmp_path / "toy" / d).exists(), d
    # plot.py on the runs this made: one panel per metric group of each stage, several runs overlaid, an evaluation
    import plot as P
    toy = tmp_path / "toy"
    assert P.plot_metrics([toy / "grpo"], tmp_path / "g.png") == [t for t, _, _ in P.GROUPS["grpo_lora"]]
    assert P.plot_metrics([toy / "sae"], tmp_path / "s.png") == [t for t, _, _ in P.GROUPS["train_sae"]]
    assert P.plot_metrics([toy / "sae_tuned_s0", toy / "sft"], tmp_path / "t.png") == [
        t for t, _, _ in P.GROUPS["sae_tune"]]                        # KL and CE runs share the loss panel
    with pytest.raises(SystemExit, match="different stages"):
        P.plot_metrics([toy / "grpo", toy / "sae"], tmp_path / "x.png")
    r = subprocess.run([sys.executable, "plot.py", str(toy / "grpo")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == str(toy / "grpo" / "metrics.png"), r.stderr
    for png in (tmp_path / "g.png", tmp_path / "s.png", tmp_path / "t.png", toy / "grpo" / "metrics.png",
                toy / "eval" / "resa" / "results.png"):           # evaluate.py draws its own
        assert png.stat().st_size > 10_000, png


@pytest.mark.slow
def test_full_pipeline_meets_the_acceptance_bars(tmp_path):
    r = subprocess.run([sys.executable, "toy/pipeline.py", "--out", str(tmp_path / "toy")], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "toy" / "results.json").read_text())
    rows = rep["rows"]
    base, grpo, source_sae = rows[0], rows[1], rows[2]
    assert 0.15 <= base["pass@1"] <= 0.60
    assert grpo["vs_base"] >= 0.15 and grpo["vs_base_interval95"][0] > 0      # Tina's effect, clearly
    assert source_sae["row"].startswith("source with its SAE inserted")
    assert source_sae["pass@1"] >= 0.8 * grpo["pass@1"]                      # the SAE keeps the source's skill
    assert rep["summary"]["source_with_sae_over_source"] >= 0.8
    check_vs_control(tmp_path / "toy", rep)


def test_committed_toy_table_is_what_its_json_renders_and_its_summary_holds():
    # the README's toy table is the pipeline's markdown of the committed JSON, and the JSON's summary figures
    # follow from its rows (gain shares, score ratios, the seeds' mean row between the seeds and the control)
    import toy.pipeline as P
    rep = json.loads((ROOT / "assets" / "measurements" / "2026-12-01-toy-results.json").read_text())
    md = P.markdown(rep["rows"], rep["summary"], rep["evidence"], rep["total_seconds"], P.FULL)
    readme = (ROOT / "README.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rep["rows"]) and all(line in readme for line in table)
    rows = {r["row"]: r for r in rep["rows"]}
    grpo, base = rows["GRPO-LoRA (Tina): the source"], rows["base model (trained from scratch)"]
    seeds = [r for name, r in rows.items() if name.startswith("SAE-Tuning (Resa), seed")]
    mean = rows[f"SAE-Tuning, mean of {len(seeds)} seeds"]
    assert mean["pass@1"] == pytest.approx(sum(r["pass@1"] for r in seeds) / len(seeds), abs=1e-9)
    assert grpo["vs_base"] == pytest.approx(grpo["pass@1"] - base["pass@1"], abs=1e-9)
    s = rep["summary"]
    assert s["sae_tuning_share_of_grpo_gain"] == pytest.approx(mean["vs_base"] / grpo["vs_base"])
    assert s["sae_tuning_score_over_grpo_score"] == pytest.approx(mean["pass@1"] / grpo["pass@1"])
    up = rows["upper bound: KL to the source's own logits, same text, no SAE"]
    assert s["upper_bound_share_of_grpo_gain"] == pytest.approx(up["vs_base"] / grpo["vs_base"])
    assert s["source_with_sae_over_source"] == pytest.approx(
        rows["source with its SAE inserted, no training"]["pass@1"] / grpo["pass@1"])
    # the pipeline's own summary code gives the committed summary from the committed rows
    got = P.summary_of(rep["rows"])
    assert got.keys() == s.keys() and all(got[k] == pytest.approx(s[k]) for k in s)


def test_mean_interval_and_the_held_out_split_by_value(tmp_path):
    import statistics
    import toy.pipeline as P
    vals = [0.0, 0.25, 1.0, 0.5, 0.75, 0.25]
    m, lo, hi = P.mean_interval(vals)
    se = statistics.stdev(vals) / len(vals) ** 0.5
    assert (m, lo, hi) == pytest.approx((statistics.mean(vals), m - 1.96 * se, m + 1.96 * se))
    assert P.mean_interval([0.4]) == (0.4, 0.4, 0.4)
    # a small problem space (two terms: a few hundred questions), where a training set drawn without the
    # exclusion would repeat held-out questions
    write_sets(tmp_path / "w", seed=0, n_train=100, n_test=60, min_terms=2, max_terms=2)
    train = {json.loads(x)["problem"] for x in open(tmp_path / "w" / "train.jsonl")}
    test = {json.loads(x)["problem"] for x in open(tmp_path / "w" / "test.jsonl")}
    assert len(train) == 100 and len(test) == 60 and not train & test
    with pytest.raises(ValueError, match="distinct new problems"):                 # the space runs out: said
        write_sets(tmp_path / "x", seed=0, n_train=400, n_test=100, min_terms=2, max_terms=2)


def test_committed_sae_curve_table_is_what_its_json_renders():
    # docs/toy.md's SAE-curve table is toy/sae_curve.py's markdown of the committed JSON; the shares follow from it
    import toy.sae_curve as SC
    rep = json.loads((ROOT / "assets" / "measurements" / "2026-12-01-toy-sae-curve.json").read_text())
    md = SC.markdown(rep["rows"], rep["source_pass@1"])
    page = (ROOT / "docs" / "toy.md").read_text()
    assert all(line in page for line in md.splitlines() if line.strip())
    assert all(r["kept"] == pytest.approx(r["pass@1"] / rep["source_pass@1"]) for r in rep["rows"])
    toy = json.loads((ROOT / "assets" / "measurements" / "2026-12-01-toy-results.json").read_text())
    source = next(r for r in toy["rows"] if r["arm"] == "grpo")
    assert rep["source_pass@1"] == source["pass@1"]                  # the curve is of the table's own source
