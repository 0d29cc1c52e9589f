"""
toy/world.py -- the embedded toy world: a verifiable reasoning task where a scratchpad helps.

Task: a chain of single-digit additions and subtractions, e.g. "Q: 17+8-5+9-3". The answer is the result
(running totals stay within 0..20). Worked answers write each step inside <think>:

    Q: 17+8-5+9-3
    A: <think>
    17+8=25
    25-5=20
    20+9=29
    29-3=26
    </think>
    <answer>\\boxed{26}</answer>

Direct answers skip the scratchpad ("A: <think>\\n</think>\\n<answer>\\boxed{26}</answer>"). A tiny model
can learn each step, but not a long chain in one go, so direct answers are often wrong on long chains.
The base model is trained on a mix where only `worked_fraction` of the answers are worked: it *can*
reason but only sometimes chooses to -- the ability RL (and, if the Resa paper is right, SAE-Tuning)
should elicit. The prompt ends with "<think>\\n" (the chat template opens the think block, as
DeepSeek-R1-Distill's does), so the first completion token is the choice between reasoning and not.

Files (question/answer JSONL, the same form as the real datasets, so every stage loads them unchanged):
    out/train.jsonl  RL / SAE / SAE-Tuning prompts        out/test.jsonl  held-out problems
"""
from __future__ import annotations

import json
import random
from pathlib import Path


MAX_TOTAL = 20   # running totals stay within 0..MAX_TOTAL: few enough arithmetic facts for a tiny model


def make_problem(rng: random.Random, n_terms: int) -> tuple[str, int, list[str]]:
    """-> question text, answer, scratchpad lines."""
    total = rng.randint(1, 12)
    q, steps = str(total), []
    for _ in range(n_terms - 1):
        d = rng.randint(1, 9)
        op = rng.choice("+-")
        if op == "-" and total - d < 0 or op == "+" and total + d > MAX_TOTAL:
            op = "+" if op == "-" else "-"
        new = total + d if op == "+" else total - d
        steps.append(f"{total}{op}{d}={new}")
        q += f"{op}{d}"
        total = new
    return q, total, steps


def completion(answer: int, steps: list[str], worked: bool) -> str:
    """The assistant's text after the prompt's '<think>\\n' (without EOS)."""
    think = "".join(s + "\n" for s in steps) if worked else ""
    return f"{think}</think>\n<answer>\\boxed{{{answer}}}</answer>"


def problems(seed: int, count: int, min_terms: int, max_terms: int, exclude: set[str] = frozenset()):
    rng = random.Random(seed)
    out, seen, tries = [], set(exclude), 0
    while len(out) < count:
        tries += 1
        if tries > 1000 * count:
            raise ValueError(f"only {len(out)} distinct new problems with {min_terms}-{max_terms} terms (of {count} "
                             "asked for): ask for fewer, or allow more terms")
        q, a, steps = make_problem(rng, rng.randint(min_terms, max_terms))
        if q not in seen:
            seen.add(q)
            out.append((q, a, steps))
    return out


def write_sets(out_dir, seed: int = 0, n_train: int = 2000, n_test: int = 300, min_terms: int = 3,
               max_terms: int = 6, n_corpus: int = 0) -> dict:
    """Held-out test problems first, then training problems that never repeat a test question; and
    corpus.jsonl, n_corpus documents drawn as the base model's own training text (worked and direct
    answers, no held-out question): the toy's stand-in for the general corpus a real SAE is pre-trained on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = problems(seed + 1, n_test, min_terms, max_terms)
    train = problems(seed + 2, n_train, min_terms, max_terms, exclude={q for q, _, _ in test})
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as f:
            for q, a, _ in rows:
                f.write(json.dumps({"problem": q, "answer": str(a)}) + "\n")
    if not n_corpus:
        return {"train": len(train), "test": len(test)}
    corpus = random.Random(seed + 3)           # the toy's general text, as a real SAE's pre-training corpus
    exclude = {q for q, _, _ in test}
    with open(out / "corpus.jsonl", "w") as f:
        for _ in range(n_corpus):
            f.write(json.dumps({"text": pretraining_text(corpus, 0.35, 2, 6, exclude)}) + "\n")
    return {"train": len(train), "test": len(test), "corpus": n_corpus}


def pretraining_text(rng: random.Random, worked_fraction: float, min_terms: int = 2, max_terms: int = 6,
                     exclude: set[str] = frozenset()) -> str:
    """One base-model training document, exactly as the chat template renders it, with the reply."""
    while True:
        q, a, steps = make_problem(rng, rng.randint(min_terms, max_terms))
        if q not in exclude:
            break
    return f"Q: {q}\nA: <think>\n{completion(a, steps, rng.random() < worked_fraction)}"
