"""data.py: loading, prompts and math-verify grading, checked on the public test sets in ../shared/data."""
import json
from pathlib import Path

import pytest

import data as D

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL = SHARED / "eval"
needs_data = pytest.mark.skipif(not EVAL.exists(), reason="../shared/data is not beside the checkout")


@needs_data
def test_math500_solutions_grade_correct_against_their_answers():
    rows = [json.loads(line) for line in open(EVAL / "math500.jsonl")]
    counts = {}
    for mode in ("eval", "reward"):
        counts[mode] = sum(D.grade(r["solution"], r["answer"], mode) == 1.0 for r in rows)
    # lighteval-style matching accepts nearly all; Tina's strict reward refuses e.g. \frac43 on purpose
    assert counts["eval"] >= 495, counts
    assert 480 <= counts["reward"] < counts["eval"], counts
    assert D.grade("so \\boxed{\\frac43}", "\\frac43", "reward") == 0.0
    assert D.grade("so \\boxed{\\frac43}", "\\frac43", "eval") == 1.0
    # and wrong answers are not accepted: each solution against the next problem's answer
    false_pos = sum(D.grade(rows[i]["solution"], rows[i + 1]["answer"], "eval") == 1.0 for i in range(199))
    assert false_pos <= 4, false_pos


def test_answer_forms():
    assert D.grade("The answer is \\boxed{25}.", "025", "eval") == 1.0          # AIME leading zeros
    assert D.grade("The answer is \\boxed{25}.", "025", "reward") == 1.0
    assert D.grade("The answer is \\boxed{24}.", "025", "eval") == 0.0
    assert D.grade("so $\\boxed{36}$", "\\$36", "reward") == 1.0               # escaped dollar gold
    assert D.grade("so $\\boxed{36}$", "\\$36", "eval") == 1.0
    assert D.grade("\\boxed{27}", D.gold_text(27.0), "eval") == 1.0            # AMC stores floats
    assert D.grade("no final answer here", "7", "reward") == 0.0
    for garbage in ("}{", "\\frac{", "???", "\\text{}", "$$"):
        assert D.grade("\\boxed{1}", garbage, "reward") is None, garbage       # never scored correct
        assert D.grade("\\boxed{1}", garbage, "eval") is None, garbage
    # Tina's reward reads the first boxed answer; a completion without one scores 0 there
    assert D.grade("<think>\nx=3\n</think>\n<answer>\\boxed{3}</answer>", "3", "reward") == 1.0
    assert D.grade("the answer is 3", "3", "reward") == 0.0
    with pytest.raises(ValueError, match="mode"):
        D.grade("1", "1", "strict")


def test_gold_text_normalisation():
    assert D.gold_text("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    assert D.gold_text(["9.6\n"]) == "9.6"
    assert D.gold_text('{"answer": {"value": "\\\\frac{1}{2}"}, "type": "math"}') == "\\frac{1}{2}"
    long = "We compute the sum step by step and finally get $\\boxed{\\frac{a}{b}}$ as the answer."
    assert D.gold_text(long) == "\\frac{a}{b}"
    assert D.last_boxed("a \\boxed{1} b \\boxed{x^{2}} c") == "x^{2}"


@needs_data
@pytest.mark.parametrize("name,fields", [
    ("aime24.jsonl", ("problem", "answer")), ("aime25.jsonl", ("prompt", "answer")),
    ("amc23.jsonl", ("problem", "answer")), ("math500.jsonl", ("problem", "answer")),
    ("minerva.json", ("problem", "answer")), ("olympiadbench.jsonl", ("question", "final_answer")),
    ("gsm8k_test.jsonl", ("question", "answer")),
])
def test_local_eval_files_load_and_golds_parse(name, fields):
    ex, stats = D.load_examples(str(EVAL / name))
    assert (stats["question_field"], stats["answer_field"]) == fields
    assert stats["examples"] + stats["skipped"] == stats["records"] and stats["examples"] > 25
    unparsed = [e.answer for e in ex if not D.gold_parses(e.answer, "eval")]
    # every gold answer is parseable, or explicitly reported here (OlympiadBench has a few text answers)
    assert len(unparsed) <= 0.02 * len(ex), (name, unparsed[:5])


@needs_data
def test_training_file_and_bad_fields(tmp_path):
    ex, stats = D.load_examples(str(SHARED / "train" / "limr.jsonl"), limit=50)
    assert len(ex) == 50 and stats["question_field"] == "context"
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"q": "1+1?", "gold": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"fields \['q', 'gold'\]"):
        D.load_examples(str(p))
    ex, _ = D.load_examples(str(p), question_field="q", answer_field="gold")
    assert ex[0].question == "1+1?" and ex[0].answer == "2"
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_examples("no_such_set")


def test_format_prompt_with_and_without_chat_template():
    class Plain:
        chat_template = None
    assert D.format_prompt(Plain(), "2+2?", "Think.") == "Think.\n\nUser: 2+2?\nAssistant:"

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:<think>\n"
    assert D.format_prompt(Chat(), "2+2?", D.SYSTEM_PROMPTS["open_rs"]).startswith("system:\nA conversation")
    assert "\\boxed{{}}" in D.SYSTEM_PROMPTS["open_rs"]   # verbatim, doubled braces and all
