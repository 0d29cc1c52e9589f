"""
recipes/lighteval_reference.py -- evaluate.py --scorer lighteval against lighteval itself. Run it in an
environment that has lighteval at the commit Tina and Resa pinned (ed084813; it needs its own math parser
versions, so not in nanoreason's environment; recipes/grading_report.sh builds one). It reads a grades file of
recipes/grading_report.py, grades every (answer, gold, target) pair that `--scorer lighteval` graded with
lighteval's own multilingual_extractive_match_metric, configured as the papers' scripts/eval/
run_eval_custom_tasks.py (latex_gold_metric / expr_gold_metric: fallback first_match, precision 5,
predictions by expression then boxed-first LaTeX), and prints how often the two agree, per set.

    python recipes/lighteval_reference.py --grades out/grading/mv_pinned.json --out out/grading/lighteval.json

Imports nothing of nanoreason's: the two graders never share a process.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def metrics():
    """lighteval's metric objects exactly as the papers' custom tasks built them: by gold target, and GPQA's."""
    from lighteval.metrics.dynamic_metrics import (ExprExtractionConfig, IndicesExtractionConfig, LatexExtractionConfig,
                                                   multilingual_extractive_match_metric)
    from lighteval.utils.language import Language
    pred = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
    out = {kind: multilingual_extractive_match_metric(language=Language.ENGLISH, fallback_mode="first_match",
                                                      precision=5, gold_extraction_target=(cfg,),
                                                      pred_extraction_target=pred, aggregation_function=max)
           for kind, cfg in (("latex", LatexExtractionConfig()), ("expr", ExprExtractionConfig()))}
    letters = [IndicesExtractionConfig(prefix_for_extraction="NativeLetters")]
    out["gpqa"] = multilingual_extractive_match_metric(language=Language.ENGLISH, gold_extraction_target=letters,
                                                       pred_extraction_target=letters, precision=5)
    return out


def letter(metric, completion: str) -> str:
    """The letter lighteval's GPQA metric (the papers' gpqa_metric) reads: the one it scores correct, or ''."""
    from lighteval.tasks.requests import Doc
    right = [c for i, c in enumerate("ABCD") if metric.sample_level_fn(
        golds=[c], predictions=[completion], formatted_doc=Doc(query="", choices=list("ABCD"), gold_index=i))]
    return right[0] if len(right) == 1 else ""


def grade(metric, answer: str, gold: str) -> float:
    from lighteval.tasks.requests import Doc
    doc = Doc(query="", choices=[gold], gold_index=0)
    return float(metric.sample_level_fn(golds=[gold], predictions=[answer], formatted_doc=doc))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grades", required=True, help="a grades file of recipes/grading_report.py")
    p.add_argument("--out", default="out/grading/lighteval.json", help="lighteval's grades and the disagreements")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)               # lighteval warns once per unextracted answer
    g = json.loads(Path(args.grades).read_text())
    m = metrics()
    groups = {name: (row["lighteval_inputs"], row["solution"]["lighteval"])
              for name, row in g["sets"].items() if "lighteval_inputs" in row}
    if g["samples"].get("lighteval_inputs"):
        groups["samples"] = (g["samples"]["lighteval_inputs"], g["samples"]["lighteval"])
    out, lines = {}, ["| graded | pairs | right (lighteval itself / --scorer lighteval) | disagree |", "|---|---|---|---|"]
    for name, (inputs, ours) in groups.items():
        theirs = [grade(m[kind], answer, gold) for answer, gold, kind in inputs]
        diff = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
        out[name] = {"lighteval": theirs, "disagree": [{"index": i, "answer": inputs[i][0][-300:], "gold": inputs[i][1],
                                                        "lighteval": theirs[i], "ours": ours[i]} for i in diff]}
        lines.append(f"| {name} | {len(inputs)} | {sum(theirs):.0f} / {sum(ours):.0f} | {len(diff)} |")
    if g.get("letters"):
        probes, ours = g["letters"]["probes"], g["letters"]["lighteval"]
        theirs = [letter(m["gpqa"], t) for t in probes]
        diff = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
        out["letters"] = {"lighteval": theirs, "disagree": [{"probe": probes[i], "lighteval": theirs[i],
                                                              "ours": ours[i]} for i in diff]}
        lines.append(f"| GPQA letter probes | {len(probes)} | {sum(map(bool, theirs))} / {sum(map(bool, ours))} "
                     f"read | {len(diff)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\n".join(lines) + f"\n\nreference answers: each set's solutions; math-verify {g['math_verify']} in ours")


if __name__ == "__main__":
    main()
