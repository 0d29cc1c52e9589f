"""evaluate.py: benchmark loading, pass@k, greedy equality with transformers, outputs, resume, bad input."""
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

import data as D
import evaluate as E
import lora as L
import model as M
import sampling as SM
from conftest import make_char_model, randomize_B

EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
needs_data = pytest.mark.skipif(not EVAL.exists(), reason="../shared/data is not beside the checkout")


@needs_data
@pytest.mark.parametrize("bench", ["aime24", "aime25", "amc23", "math_500", "minerva", "olympiadbench", "gsm8k"])
def test_local_copies_load_through_the_benchmark_loader(bench):
    ex, st = D.load_benchmark(bench, str(EVAL))
    assert st["examples"] == st["records"] and len(ex) >= 30
    assert all(e.question and e.answer for e in ex)
    assert not any(e.question.endswith("\\boxed{}.") for e in ex)       # AIME25's own instruction is stripped
    unparsed = [e.answer for e in ex if not D.gold_parses(e.answer, "eval")]
    assert len(unparsed) <= 4, unparsed                                   # reported: 4 Minerva, 3 OlympiadBench
    with pytest.raises(ValueError, match="unknown benchmark"):
        D.load_benchmark("aime2024", str(EVAL))


def test_gpqa_choices_are_shuffled_and_graded_by_letter(tmp_path):
    rows = [{"Question": f"Q{i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
             "Incorrect Answer 3": "w3"} for i in range(8)]
    d = tmp_path / "gpqa"
    d.mkdir()
    spec = D.BENCHMARKS["gpqa_diamond"]
    D.BENCHMARKS["gpqa_diamond"] = D.DatasetSpec(spec.hub, question="Question", answer="Correct Answer", note="g.jsonl")
    try:
        (d / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ex, _ = D.load_benchmark("gpqa_diamond", str(d), seed=0)
    finally:
        D.BENCHMARKS["gpqa_diamond"] = spec
    assert len({e.answer for e in ex}) > 1
    for e in ex:
        assert f"{e.answer}) right" in e.question
        assert E.grade_sample("gpqa_diamond", f"... Answer: {e.answer}", e)[1] == 1.0
        wrong = "ABCD".replace(e.answer, "")[0]
        assert E.grade_sample("gpqa_diamond", f"Answer: {wrong}", e)[1] == 0.0


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (6, 1, 3), (4, 0, 2), (4, 4, 3), (7, 3, 5),
                                   (5, 2, 3), (6, 3, 3), (4, 2, 2), (8, 1, 7)])        # n - c == k: the boundary
def test_pass_at_k_equals_enumeration(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert E.pass_at_k(n, c, k) == pytest.approx(brute)


def test_summary_leaves_unparseable_gold_out():
    rows = [{"index": 0, "correct": 1.0, "tokens": 5, "finished": True},
            {"index": 0, "correct": 0.0, "tokens": 5, "finished": False},
            {"index": 1, "correct": None, "tokens": 5, "finished": True},
            {"index": 1, "correct": None, "tokens": 5, "finished": True}]
    s = E.summarize(rows, 2, [2])
    assert s["pass@1"] == 0.5 and s["problems"] == 1 and s["unparseable_gold"] == 1 and s["pass@2"] == 1.0
    assert s["truncated"] == 0.25


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    p = tmp_path_factory.mktemp("evaldata") / "sums.jsonl"
    rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9)]]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def eval_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out_dir", str(out), "--max_new_tokens", "12",
            "--device", "cpu", "--template", "none", *extra]


def test_greedy_matches_transformers_and_outputs(char_model_dir, small_set, tmp_path):
    from transformers import AutoModelForCausalLM
    E.main(eval_args(char_model_dir, small_set, tmp_path / "e", "--temperature", "0", "--batch_size", "3"))
    rows = [json.loads(line) for line in open(tmp_path / "e" / "samples.jsonl")]
    assert len(rows) == 5
    for key in ("benchmark", "index", "question", "prompt", "gold", "completion", "extracted", "correct", "tokens",
                "finished"):
        assert key in rows[0]
    tok = M.load_tokenizer(str(char_model_dir))
    hf = AutoModelForCausalLM.from_pretrained(char_model_dir, dtype=torch.float32).eval()
    for r in rows:
        ids = torch.tensor([tok(r["prompt"], add_special_tokens=False).input_ids])
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == r["completion"]
    res = json.loads((tmp_path / "e" / "results.json").read_text())["results"]["base"]["sums"]
    for key in ("pass@1", "interval95", "problems", "unparseable_gold", "n"):
        assert key in res
    assert res["problems"] == 5 and (tmp_path / "e" / "results.md").exists()


def test_summary_interval_is_mean_plus_minus_1_96_standard_errors():
    import statistics
    per = {0: [1, 1], 1: [1, 0], 2: [0, 0], 3: [0, 1], 4: [1, 1], 5: [0, 0]}
    rows = [{"index": i, "correct": c, "tokens": 3, "finished": True} for i, cs in per.items() for c in cs]
    rows.append({"index": 9, "correct": None, "tokens": 1, "finished": False})    # unparseable gold: left out
    out = E.summarize(rows, 2, [2])
    means = [sum(c) / 2 for c in per.values()]
    m, se = statistics.mean(means), statistics.stdev(means) / len(means) ** 0.5
    assert out["pass@1"] == pytest.approx(m) and out["problems"] == 6 and out["unparseable_gold"] == 1
    assert out["interval95"] == pytest.approx([m - 1.96 * se, m + 1.96 * se])
    assert out["pass@2"] == pytest.approx(sum(1 - (c.count(0) == 2) for c in per.values()) / 6)


def test_resume_gives_the_same_results(char_model_dir, small_set, tmp_path):
    common = ["--temperature", "1.0", "--n", "4", "--k", "2,4", "--batch_size", "6", "--seed", "3"]
    E.main(eval_args(char_model_dir, small_set, tmp_path / "one", *common))
    lines = open(tmp_path / "one" / "samples.jsonl").readlines()
    (tmp_path / "cut").mkdir()
    # a run killed while writing its 10th sample: 9 whole lines and half of the next
    (tmp_path / "cut" / "samples.jsonl").write_text("".join(lines[:9]) + lines[9][:40])
    shutil.copy(tmp_path / "one" / "samples_settings.json", tmp_path / "cut")
    E.main(eval_args(char_model_dir, small_set, tmp_path / "cut", *common))
    a = json.loads((tmp_path / "one" / "results.json").read_text())["results"]
    b = json.loads((tmp_path / "cut" / "results.json").read_text())["results"]
    assert a == b
    key = lambda r: (r["index"], r["sample"])
    ra = sorted(map(json.loads, open(tmp_path / "one" / "samples.jsonl")), key=key)
    rb = sorted(map(json.loads, open(tmp_path / "cut" / "samples.jsonl")), key=key)
    assert [r["completion"] for r in ra] == [r["completion"] for r in rb] and len(rb) == 20


def test_rerun_with_other_settings_is_refused_or_overwritten(char_model_dir, small_set, tmp_path):
    common = ["--temperature", "1.0", "--n", "2", "--batch_size", "6", "--seed", "3"]
    E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common))
    first = (tmp_path / "ev" / "samples.jsonl").read_text()
    for change in (["--temperature", "0.5"], ["--max_new_tokens", "7"], ["--seed", "4"], ["--n", "3"]):
        with pytest.raises(SystemExit, match="other settings"):
            E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common, *change))
    other = tmp_path / "other" / small_set.name             # another file of the same name
    other.parent.mkdir()
    other.write_text("".join(small_set.read_text().splitlines(keepends=True)[::-1]))
    with pytest.raises(SystemExit, match="questions"):
        E.main(eval_args(char_model_dir, other, tmp_path / "ev", *common))
    assert (tmp_path / "ev" / "samples.jsonl").read_text() == first      # nothing reused or appended
    E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common[:-2], "--seed", "4", "--overwrite"))
    rows = [json.loads(x) for x in open(tmp_path / "ev" / "samples.jsonl")]
    assert len(rows) == 2 * 5 and (tmp_path / "ev" / "samples.jsonl").read_text() != first
    assert json.loads((tmp_path / "ev" / "run.json").read_text())["finished"] is True
    # --scorer changes only the grades: the recorded samples are reused and regraded, nothing resampled
    before = (tmp_path / "ev" / "samples.jsonl").read_text()
    res = E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common[:-2], "--seed", "4", "--scorer",
                           "lighteval"))
    assert (tmp_path / "ev" / "samples.jsonl").read_text() == before
    import data as D
    want = [D.grade_lighteval(r["completion"], r["gold"], "expr")[1] for r in rows]    # a local file: answer, expr
    got = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]["base"][small_set.stem]
    assert got["pass@1"] == pytest.approx(sum(want) / len(want)) and got["unparseable_gold"] == 0
    # --max_model_len caps prompt + completion (lighteval's max_model_length): a different sample setting
    with pytest.raises(SystemExit, match="max_model_len"):
        E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common[:-2], "--seed", "4", "--max_model_len",
                         "40"))
    E.main(eval_args(char_model_dir, small_set, tmp_path / "ml", *common, "--max_model_len", "40"))
    assert all(len(r["prompt"]) + r["tokens"] <= 40 for r in map(json.loads, open(tmp_path / "ml" / "samples.jsonl")))


def test_adapter_sweep_and_bad_input(small_set, tmp_path):
    flat = make_char_model(tmp_path / "flat", seed=3, embed_scale=1.0)   # not peaked: greedy output can move
    net = M.load_model(str(flat))
    L.attach_lora(net, r=4, alpha=8)
    randomize_B(net, 0, 0.5)
    L.save_adapter(net, tmp_path / "ad")
    E.main(eval_args(flat, small_set, tmp_path / "sweep", "--adapter", f"base,{tmp_path / 'ad'}",
                     "--temperature", "0"))
    res = json.loads((tmp_path / "sweep" / "results.json").read_text())["results"]
    assert set(res) == {"base", str(tmp_path / "ad")}
    rows = [json.loads(line) for line in open(tmp_path / "sweep" / "samples.jsonl")]
    by = {a: [r["completion"] for r in rows if r["adapter"] == a] for a in res}
    assert by["base"] != by[str(tmp_path / "ad")]                          # the adapter was applied
    E.main(eval_args(flat, small_set, tmp_path / "last", "--adapter", f"{tmp_path / 'ad'},base", "--temperature", "0"))
    last = [json.loads(line) for line in open(tmp_path / "last" / "samples.jsonl")]
    assert [r["completion"] for r in last if r["adapter"] == "base"] == by["base"]     # the adapter was removed
    other = make_char_model(tmp_path / "wide", seed=1, layers=3)            # 3 layers: the adapter targets 2
    wrong = M.load_model(str(other))
    L.attach_lora(wrong, r=4, alpha=8)
    L.save_adapter(wrong, tmp_path / "ad3")
    with pytest.raises(SystemExit, match="not a Linear layer"):
        E.main(eval_args(flat, small_set, tmp_path / "bad", "--adapter", str(tmp_path / "ad3")))
    with pytest.raises(SystemExit, match="unknown benchmark"):
        E.main(eval_args(flat, small_set, tmp_path / "bad", "--benchmarks", "aime2024"))
    with pytest.raises(SystemExit, match="pass@k needs n >= k"):
        E.main(eval_args(flat, small_set, tmp_path / "bad", "--n", "2", "--k", "4"))
    assert not (tmp_path / "bad" / "samples.jsonl").exists()


def test_generation_stays_within_the_trained_context(char_model_dir, small_set, tmp_path, capsys):
    net = M.load_model(str(char_model_dir))                     # max_position_embeddings 512
    with pytest.raises(ValueError, match="past the model's trained context"):
        SM.generate(net, torch.randint(3, 60, (1, 500)), max_new_tokens=20)
    E.main(eval_args(char_model_dir, small_set, tmp_path / "cap", "--max_new_tokens", "600", "--temperature", "0",
                     "--n", "1"))
    assert "trained on 512 positions" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "cap" / "samples.jsonl")]
    assert all(len(r["prompt"]) + r["tokens"] <= 512 for r in rows)      # characters = tokens here
    # --max_model_len counts the prompt inside the budget, as lighteval's max_model_length (the eval recipes: 32768)
    E.main(eval_args(char_model_dir, small_set, tmp_path / "mml", "--max_new_tokens", "600", "--temperature", "0",
                     "--n", "1", "--max_model_len", "60"))
    assert "--max_model_len 60 counts the prompt" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "mml" / "samples.jsonl")]
    assert all(len(r["prompt"]) + r["tokens"] <= 60 for r in rows) and max(len(r["prompt"]) + r["tokens"] for r in rows) == 60
    # a prompt that leaves no room at all is skipped and counted; the others are evaluated
    long = tmp_path / "long.jsonl"
    long.write_text(small_set.read_text() + json.dumps({"problem": "9+" * 300 + "1", "answer": "2701"}) + "\n")
    E.main(eval_args(char_model_dir, long, tmp_path / "long", "--temperature", "0", "--n", "1"))
    rep = json.loads((tmp_path / "long" / "results.json").read_text())
    assert rep["data"]["long"]["prompt_too_long"] == 1 and rep["results"]["base"]["long"]["problems"] == 5


def test_lighteval_scorer_follows_the_papers_tasks():
    # run_eval_custom_tasks.py (Tina, Resa): MATH-500 and Minerva graded against the `solution` column with a
    # LaTeX gold target, AIME/AMC against `answer` with an expression target; the prediction with expression then
    # boxed-first LaTeX, any_match; a gold nothing is extracted from is compared as its raw string, not left out
    import data as D
    ex = D.Example("q", "\\frac{1}{2}", 0, {"solution": "Halve it: $\\boxed{\\frac{1}{2}}$", "answer": "\\frac{1}{2}"})
    assert D.lighteval_gold_text("math_500", ex) == ("Halve it: $\\boxed{\\frac{1}{2}}$", "latex")
    assert D.lighteval_gold_text("aime24", ex) == ("\\frac{1}{2}", "expr")
    assert E.grade_sample("math_500", "so $\\boxed{0.5}$", ex, "lighteval")[1] == 1.0
    assert E.grade_sample("math_500", "so $\\boxed{2}$", ex, "lighteval")[1] == 0.0
    # any_match: the first boxed fails to parse, a later one is tried (our first_match gives up)
    two = "\\boxed{\\frac{1}{} and \\boxed{\\frac{1}{2}}"
    assert E.grade_sample("math_500", two, ex, "lighteval")[1] == 1.0
    odd = D.Example("q", "}{", 1, {"answer": "}{"})
    assert E.grade_sample("aime24", "}{", odd, "ours")[1] is None          # ours: unparseable gold, left out
    assert E.grade_sample("aime24", "}{", odd, "lighteval")[1] in (0.0, 1.0)   # lighteval: scored, never None


def test_recorded_samples_are_not_reused_when_the_weights_at_a_path_changed(char_model_dir, small_set, tmp_path):
    net = M.load_model(str(char_model_dir))
    L.attach_lora(net, r=4, alpha=8)
    randomize_B(net, 0, 0.05)
    L.save_adapter(net, tmp_path / "ad", base_model=str(char_model_dir))
    common = ["--temperature", "1.0", "--n", "1", "--adapter", f"base,{tmp_path / 'ad'}"]
    E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common))
    E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common))              # same weights: reused
    randomize_B(net, 1, 0.05)
    L.save_adapter(net, tmp_path / "ad", base_model=str(char_model_dir))               # retrained in place
    with pytest.raises(SystemExit, match=f"the weights of {tmp_path / 'ad'}"):
        E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", *common))


def test_compare_gives_the_paired_difference_of_two_adapters(char_model_dir, small_set, tmp_path):
    net = M.load_model(str(char_model_dir))
    L.attach_lora(net, r=4, alpha=8)
    randomize_B(net, 2, 0.5)
    L.save_adapter(net, tmp_path / "ad", base_model=str(char_model_dir))
    ad = str(tmp_path / "ad")
    E.main(eval_args(char_model_dir, small_set, tmp_path / "ev", "--temperature", "1.0", "--n", "4", "--adapter",
                     f"base,{ad}", "--compare", f"base,{ad}", "--max_new_tokens", "4"))
    rep = json.loads((tmp_path / "ev" / "results.json").read_text())
    got = rep["compare"][f"{ad} - base"][small_set.stem]
    # float64 recomputation from the samples: per-problem pass@1, their differences, mean +/- 1.96 s.e.
    rows = [json.loads(x) for x in open(tmp_path / "ev" / "samples.jsonl")]
    def pp(a):
        return {i: torch.tensor([r["correct"] for r in rows if r["adapter"] == a and r["index"] == i],
                                dtype=torch.float64).mean() for i in {r["index"] for r in rows}}
    pa, pb = pp(ad), pp("base")
    d = torch.stack([pa[i] - pb[i] for i in sorted(pa)])
    se = d.std(unbiased=True) / len(d) ** 0.5
    assert got["difference"] == pytest.approx(d.mean().item(), abs=1e-12)
    assert got["low95"] == pytest.approx((d.mean() - 1.96 * se).item(), abs=1e-12)
    assert got["high95"] == pytest.approx((d.mean() + 1.96 * se).item(), abs=1e-12)
    assert "paired over problems" in (tmp_path / "ev" / "results.md").read_text()
    with pytest.raises(SystemExit, match="name two of the --adapter entries"):
        E.main(eval_args(char_model_dir, small_set, tmp_path / "ev2", "--compare", "base,nope"))


def test_summarize_every_figure_against_a_recomputation():
    # per-sample records -> pass@1 over problems, its interval, pass@k (against enumerating every k-subset), the
    # mean completion length and the truncated share over all samples, problems with an unparseable gold apart
    import itertools
    import random
    rng = random.Random(0)
    rows = []
    for i in range(7):
        for s in range(4):
            rows.append({"index": i, "sample": s, "correct": None if i == 6 else float(rng.random() < 0.4 + 0.05 * i),
                         "tokens": rng.randint(1, 50), "finished": rng.random() < 0.7})
    got = E.summarize(rows, 4, [1, 2, 4])
    per = [sum(r["correct"] for r in rows if r["index"] == i) / 4 for i in range(6)]
    mean = sum(per) / 6
    sd = (sum((x - mean) ** 2 for x in per) / 5) ** 0.5
    assert got["pass@1"] == pytest.approx(mean) and got["problems"] == 6 and got["unparseable_gold"] == 1
    assert got["interval95"] == pytest.approx([max(0, mean - 1.96 * sd / 6 ** 0.5), min(1, mean + 1.96 * sd / 6 ** 0.5)])
    assert got["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in rows) / len(rows))
    assert got["truncated"] == pytest.approx(sum(not r["finished"] for r in rows) / len(rows))
    for k in (2, 4):
        want = 0.0
        for i in range(6):
            c = [r["correct"] for r in rows if r["index"] == i]
            subsets = list(itertools.combinations(c, k))
            want += sum(any(x) for x in subsets) / len(subsets)
        assert got[f"pass@{k}"] == pytest.approx(want / 6)


def test_paired_difference_against_float64_on_problems_that_differ():
    a = {0: 1.0, 1: 0.25, 2: 0.5, 3: 0.0, 4: 0.75, 9: 1.0}
    b = {0: 0.5, 1: 0.5, 2: 0.0, 3: 0.0, 4: 0.25, 7: 0.0}                 # 9 and 7: scored by one side only
    d = torch.tensor([a[i] - b[i] for i in range(5)], dtype=torch.float64)
    se = d.std(unbiased=True) / 5 ** 0.5
    got = E.paired_difference(a, b)
    assert got == pytest.approx((d.mean().item(), (d.mean() - 1.96 * se).item(), (d.mean() + 1.96 * se).item()),
                                abs=1e-12)
    assert E.paired_difference({1: 0.5}, {1: 0.25}) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="no problem was scored for both"):
        E.paired_difference({1: 0.5}, {2: 0.5})


def test_select_on_picks_on_the_validation_file_and_evaluates_the_test_sets_for_that_one_alone(
        char_model_dir, tmp_path, monkeypatch):
    # two adapters: ad1 is right on the test problems only, ad2 on the validation problems only (the sampler is
    # replaced by one that answers by the active adapter: selection, not generation, is under test here)
    ads = []
    for seed in (1, 2):
        net = M.load_model(str(char_model_dir))
        L.attach_lora(net, r=4, alpha=8)
        randomize_B(net, seed, 0.5)
        L.save_adapter(net, tmp_path / f"ad{seed}", base_model=str(char_model_dir))
        ads.append(str(tmp_path / f"ad{seed}"))
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    val.write_text("".join(json.dumps({"problem": f"1+{b}", "answer": str(1 + b)}) + "\n" for b in range(6)))
    test.write_text("".join(json.dumps({"problem": f"2+{b}", "answer": str(2 + b)}) + "\n" for b in range(4)))
    active = {"adapter": "base"}
    load, unload = L.load_adapter, L.unload_lora
    monkeypatch.setattr(L, "load_adapter", lambda net, path, *a, **k: (active.update(adapter=str(path)),
                                                                        load(net, path, *a, **k))[1])
    monkeypatch.setattr(L, "unload_lora", lambda net, *a, **k: (active.update(adapter="base"), unload(net, *a, **k))[1])
    right = {ads[1]: "1+", ads[0]: "2+"}

    def answers(net, tok, prompts, args, seed, eos_ids):
        out = []
        for p in prompts:
            q = p.split("Q: ")[-1].split("\n")[0]
            good = right.get(active["adapter"]) and q.startswith(right[active["adapter"]])
            out.append((f"\\boxed{{{eval(q) if good else -1}}}", 3, True))        # (text, tokens, finished)
        return out
    monkeypatch.setattr(E, "generate_hf", answers)
    out = tmp_path / "sel"
    E.main(eval_args(char_model_dir, test, out, "--adapter", f"base,{ads[1]},{ads[0]}", "--select_on", str(val)))
    rep = json.loads((out / "results.json").read_text())
    assert rep["selection"]["selected"] == ads[1]                   # best on validation, though worst on the test
    assert rep["selection"]["scores"] == {"base": 0.0, ads[0]: 0.0, ads[1]: 1.0}
    assert set(rep["results"]) == {"base", ads[1]}                  # the test sets: the selected one and base only
    assert rep["results"][ads[1]]["test"]["pass@1"] == 0.0
    tested = {json.loads(x)["adapter"] for x in open(out / "samples.jsonl")}
    assert tested == {"base", ads[1]}
    picked = json.loads((out / "selection" / "results.json").read_text())["results"]
    assert set(picked) == {"base", *ads} and picked[ads[1]]["val"]["problems"] == 6
    assert "Checkpoint selected on" in (out / "results.md").read_text()
    # a validation file that shares a question with the test sets is refused before anything is sampled
    leak = tmp_path / "leak.jsonl"
    leak.write_text(val.read_text() + json.dumps({"problem": "2+0", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match="1 of its 7 questions are also in the test sets"):
        E.main(eval_args(char_model_dir, test, tmp_path / "sel2", "--adapter", f"base,{ads[0]}", "--select_on", str(leak)))
    assert not (tmp_path / "sel2").exists()
    with pytest.raises(SystemExit, match="no such file"):
        E.main(eval_args(char_model_dir, test, tmp_path / "sel3", "--select_on", str(tmp_path / "nope.jsonl")))


def test_grading_report_records_every_grade_and_what_the_lighteval_scorer_compared(tmp_path):
    # recipes/grading_report.py: the reference solutions and sampled answers under both scorers, and the (answer,
    # gold, target) pairs that recipes/lighteval_reference.py hands to lighteval itself: they must be exactly
    # what --scorer lighteval graded (MATH-500 against its solution column, LaTeX target; AIME expression target)
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("grading_report", root / "recipes" / "grading_report.py")
    GR = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(GR)
    d = tmp_path / "eval"
    d.mkdir()
    (d / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "half of 1?", "answer": "\\frac{1}{2}", "solution": "Halve it: $\\boxed{\\frac{1}{2}}$"},
        {"problem": "2+2?", "answer": "4", "solution": "We get $2+2=5$, so $\\boxed{5}$"}]))
    (d / "aime24.jsonl").write_text(json.dumps({"problem": "7*3?", "answer": "21", "solution": "It is $\\boxed{021}$"})
                                    + "\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"benchmark": b, "index": i, "completion": c}) + "\n" for b, i, c in [
        ("math_500", 0, "so $\\boxed{0.5}$"), ("math_500", 1, "so $\\boxed{4}$"), ("aime24", 0, "it is 21")]))
    g = GR.grades(str(d), [str(samples)], sets=("math_500", "aime24"))
    m = g["sets"]["math_500"]
    assert m["solution"] == {"ours": [1.0, 0.0], "lighteval": [1.0, 1.0]}    # lighteval: graded against itself
    assert [x[1:] for x in m["lighteval_inputs"]] == [["Halve it: $\\boxed{\\frac{1}{2}}$", "latex"],
                                                      ["We get $2+2=5$, so $\\boxed{5}$", "latex"]]
    assert g["sets"]["aime24"]["lighteval_inputs"][0][1:] == ["21", "expr"]
    for name in ("math_500", "aime24"):
        row = g["sets"][name]
        assert [D.grade_lighteval(*x)[1] for x in row["lighteval_inputs"]] == row["solution"]["lighteval"]
    s = g["samples"]
    assert s["ours"] == [1.0, 1.0, 1.0] and s["lighteval"] == [1.0, 0.0, 1.0]   # (the solution column says 5)
    assert [D.grade_lighteval(*x)[1] for x in s["lighteval_inputs"]] == s["lighteval"]
    assert "| math_500 | 2 / 2 | 1 / 2 of 2 | 1 |" in GR.table(g)


def test_gpqa_letters_read_as_lighteval_itself_reads_them():
    # recipes/grading_report.py's probe endings; LIGHTEVAL: the letter lighteval ed084813's GPQA metric (the papers'
    # gpqa_metric in scripts/eval/run_eval_custom_tasks.py) scored correct for each, measured with lighteval itself
    # (recipes/lighteval_reference.py, 2026-12-01: 34 of 34 agree). --scorer lighteval must read the same letter;
    # ours reads the same wherever the letter is anchored (the word answer, a box) and nothing where it is not.
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("grading_report", root / "recipes" / "grading_report.py")
    GR = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(GR)
    assert list(LIGHTEVAL) == list(GR.LETTER_PROBES)
    for text, letter in LIGHTEVAL.items():
        assert D.extract_letter_lighteval(text) == letter, text
        assert D.extract_letter(text) == ("" if text in UNANCHORED else letter), text
    ex = D.Example("q", "C", 0)
    assert E.grade_sample("gpqa_diamond", "Option C", ex, "lighteval") == ("C", 1.0)
    assert E.grade_sample("gpqa_diamond", "Option C", ex, "ours") == ("", 0.0)
    assert E.grade_sample("gpqa_diamond", "Answer: E", ex, "lighteval")[0] == "A"     # lighteval's last resort


LIGHTEVAL = {
    "Answer: C": "C",
    "The answer is (B).": "B",
    "so the answer is \\boxed{D}": "D",
    "**Answer:** A": "A",
    "I think A. Answer: B": "B",
    "Answer: $C$": "C",
    "Final answer: D": "D",
    "answer: b": "",
    "(A) is wrong, (C) is right": "C",
    "The correct option is C.": "C",
    "Answer: C) 42": "C",
    "Therefore, the final answer is: $\\boxed{B}$. I hope it is correct": "B",
    "Answer:C": "C",
    "Answer: \\text{D}": "D",
    "A": "A",
    "B is the answer": "B",
    "Answer: A or B": "A",
    "The answer is: D": "D",
    "Answer: (D)": "D",
    "nothing here": "",
    "Answer: E": "A",
    "ANSWER: C": "C",
    "Answer - B": "B",
    "answer is \\(\\boxed{A}\\)": "A",
    "Hence $\\boxed{\\text{C}}$": "C",
    "Answer: A\nWait, actually Answer: C": "C",
    "My answer is B": "B",
    "Option D": "D",
    "[C]": "C",
    "\\boxed{(B)}": "B",
    "**Final Answer**\n\\boxed{C}": "C",
    "so it must be D.\n\n**Final Answer**\n\\[\n\\boxed{D}\n\\]": "D",
    "</think>\nThe answer is C.": "C",
    "Between A and B, B fits.\n\nAnswer: B": "B",
}
UNANCHORED = {"A", "B is the answer", "The correct option is C.", "Answer: E", "Option D", "[C]",
              "(A) is wrong, (C) is right"}
