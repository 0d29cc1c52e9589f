"""
recipes/grading_report.py -- how much the grader decides: on the local copies of the papers' benchmarks, the
grades of each set's reference solutions (the `solution` column where a set has one: AIME24, MATH-500, Minerva,
OlympiadBench) and of sampled answers (evaluate.py samples.jsonl files, --samples), under our scorer and under
lighteval's (evaluate.py --scorer), and whether each gold parses. Writes one JSON of every grade, so two runs
under two math-verify versions can be compared (recipes/grading_report.sh does both and the comparison).

    python recipes/grading_report.py --data_dir ../shared/data/eval --out out/grading/mv_now.json
    python recipes/grading_report.py --compare out/grading/mv_0.5.2.json out/grading/mv_now.json
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D          # noqa: E402
import evaluate as E      # noqa: E402

SETS = ("aime24", "aime25", "amc23", "math_500", "minerva", "olympiadbench")
# GPQA has no local copy: multiple-choice endings in the forms models write, graded for the letter each scorer
# reads (and lighteval itself, recipes/lighteval_reference.py)
LETTER_PROBES = ("Answer: C", "The answer is (B).", "so the answer is \\boxed{D}", "**Answer:** A", "I think A. Answer: B",
                 "Answer: $C$", "Final answer: D", "answer: b", "(A) is wrong, (C) is right", "The correct option is C.",
                 "Answer: C) 42", "Therefore, the final answer is: $\\boxed{B}$. I hope it is correct", "Answer:C",
                 "Answer: \\text{D}", "A", "B is the answer", "Answer: A or B", "The answer is: D", "Answer: (D)",
                 "nothing here", "Answer: E", "ANSWER: C", "Answer - B", "answer is \\(\\boxed{A}\\)",
                 "Hence $\\boxed{\\text{C}}$", "Answer: A\nWait, actually Answer: C", "My answer is B", "Option D", "[C]",
                 "\\boxed{(B)}", "**Final Answer**\n\\boxed{C}", "so it must be D.\n\n**Final Answer**\n\\[\n\\boxed{D}\n\\]",
                 "</think>\nThe answer is C.", "Between A and B, B fits.\n\nAnswer: B")


def grades(data_dir: str, samples: list[str], sets=SETS) -> dict:
    """{set: {"gold_parses": [...], "solution": {"ours": [...], "lighteval": [...]}, "lighteval_inputs": [[answer,
    gold, target], ...]}, "samples": {...}}: every grade, and what --scorer lighteval compared."""
    out = {"math_verify": version("math-verify"), "sets": {}}
    loaded = {name: D.load_benchmark(name, data_dir)[0] for name in sets}
    for name, examples in loaded.items():
        row = {"gold_parses": [D.gold_parses(e.answer, "eval") for e in examples]}
        with_solution = [e for e in examples if e.raw.get("solution")]
        if with_solution:
            sol = [D.gold_text(e.raw["solution"]) for e in with_solution]
            row["solution"] = {s: [E.grade_sample(name, t, e, s)[1] for t, e in zip(sol, with_solution)]
                               for s in ("ours", "lighteval")}
            # what --scorer lighteval compared, for lighteval itself to grade (recipes/lighteval_reference.py)
            row["lighteval_inputs"] = [[t, *D.lighteval_gold_text(name, e)] for t, e in zip(sol, with_solution)]
        out["sets"][name] = row
    by_bench = {name: {e.index: e for e in examples} for name, examples in loaded.items()}
    rows = [json.loads(line) for f in samples for line in open(f) if line.strip()]
    rows = [r for r in rows if r["benchmark"] in by_bench]
    out["samples"] = {s: [E.grade_sample(r["benchmark"], r["completion"], by_bench[r["benchmark"]][r["index"]], s)[1]
                          for r in rows] for s in ("ours", "lighteval")}
    out["letters"] = {"probes": list(LETTER_PROBES), "ours": [D.extract_letter(t) for t in LETTER_PROBES],
                      "lighteval": [D.extract_letter_lighteval(t) for t in LETTER_PROBES]}
    out["samples"]["lighteval_inputs"] = [[r["completion"], *D.lighteval_gold_text(r["benchmark"],
                                                                                   by_bench[r["benchmark"]][r["index"]])]
                                          for r in rows]
    return out


def differ(a: list, b: list) -> int:
    return sum(x != y for x, y in zip(a, b))


def table(g: dict, other: dict | None = None) -> str:
    """Markdown: per set, how many golds parse, and how many reference solutions each scorer marks right, how
    many change between the scorers (and, with `other`, between the two math-verify versions)."""
    head = "| set | golds that parse | solutions right (ours / lighteval) | changed between scorers |"
    lines = [head + (f" changed vs math-verify {other['math_verify']} (golds / ours / lighteval) |" if other else ""),
             "|---|---|---|---|" + ("---|" if other else "")]
    for name, r in g["sets"].items():
        gp, sol = r["gold_parses"], r.get("solution")
        cells = [name, f"{sum(gp)} / {len(gp)}"]
        cells += ([f"{sum(x or 0 for x in sol['ours']):.0f} / {sum(sol['lighteval']):.0f} of {len(sol['ours'])}",
                   str(differ(sol["ours"], sol["lighteval"]))] if sol else ["-", "-"])
        if other:
            o = other["sets"][name]
            osol = o.get("solution")
            cells.append(f"{differ(gp, o['gold_parses'])} / " + (f"{differ(sol['ours'], osol['ours'])} / "
                                                               f"{differ(sol['lighteval'], osol['lighteval'])}"
                                                               if sol else "- / -"))
        lines.append("| " + " | ".join(cells) + " |")
    lt = g.get("letters")
    if lt:
        lines.append(f"\nGPQA letters read from {len(lt['probes'])} probe endings: ours {sum(map(bool, lt['ours']))}, "
                     f"lighteval {sum(map(bool, lt['lighteval']))}, different: {differ(lt['ours'], lt['lighteval'])}")
    s = g["samples"]
    if s["ours"]:
        lines.append(f"\nsampled answers: {len(s['ours'])}, right: {sum(x or 0 for x in s['ours']):.0f} (ours) / "
                     f"{sum(s['lighteval']):.0f} (lighteval), changed between scorers: {differ(s['ours'], s['lighteval'])}")
    return "\n".join(lines) + f"\n\nmath-verify {g['math_verify']}" + (f" vs {other['math_verify']}" if other else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="../shared/data/eval", help="local copies of the benchmarks (%(default)s)")
    p.add_argument("--samples", default="", help="comma-separated evaluate.py samples.jsonl files to regrade")
    p.add_argument("--out", default="out/grading/grades.json", help="where the grades go (%(default)s)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two grade files: print B's table against A")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        print(table(b, a))
        return
    g = grades(args.data_dir, [f for f in args.samples.split(",") if f])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(g))
    print(table(g))


if __name__ == "__main__":
    main()
