"""
recipes/resa_controls.py -- Resa's controlled experiment in one command: every SAE and every SAE-Tuning arm for
the same target, text, steps, lr and seed, then one evaluation of them all and a verdict table.

    bash recipes/resa_controls.sh --dry_run                       # every arm's command, nothing run
    TINA_ADAPTER=path/to/tina_still bash recipes/resa_controls.sh # GPU: the full experiment (docs/recipes.md)
    python recipes/resa_controls.py --tina_adapter A --protocol papers   # one sample per problem, as the papers

The arms (Resa's recipe scripts run with these changes; the settings of recipes/resa_common.sh apply to all):
  a  resa          Resa: the SAE from the source (resa_train_sae.sh, its finetuned route), then resa_sae_tune.sh
  b  target_sae    the same SAE training on the target itself (no adapter), then the same SAE-Tuning
  c  random_sae    an untrained SAE of (a)'s shape and k (sae_tune.py --perturb random_sae)
  d  noise         Gaussian noise with (a)'s FVU on the text, at the same layer (--perturb noise)
  e  other_seed    the source's SAE trained from scratch with another seed (resa_train_sae_scratch.sh --seed 43:
                   on the finetuned route a seed changes nothing, the start is a file and the order fixed)
  f1 matched_sft   SFT on the same text and steps, no SAE (resa_matched_sft_control.sh)
  f2 resa_sft      Resa's own SFT baseline (resa_sft_baseline.sh)
  g  upper_bound   KL to the source's own logits on the same text, no SAE (--sae none --teacher_adapter)
plus the base and the source (the Tina adapter) themselves. Every arm's adapter at --checkpoint (default
final; the same for all) is evaluated by resa_eval.sh's settings, one evaluate.py run per number of samples
(--protocol sober: 16 on AIME24/25 and AMC23, 4 on MATH-500/Minerva/OlympiadBench, 8 on GPQA; papers: 1), with
vLLM where it is installed. The verdict (verdict.md + verdict.json + verdict.png under --out) gives each arm's
pass@1 with its 95% interval and, paired over problems, its difference to the base and to arm (b), with the
number of comparisons made (no correction applied: read an interval that barely excludes 0 with that number in
mind), and each arm's pass@k curve for k = 1..n (the figure: one panel of curves per benchmark, and the paired
differences to the base with their intervals; matplotlib, skipped with a note where it is not installed).
--select_on val.jsonl replaces --checkpoint: each arm's saved checkpoints are scored on that held-out file first
(a select_<arm> stage, resa_eval.sh's settings, into <arm>/selection), and the arm is evaluated at its best (a tie:
the earliest); a file that shares a question with a test benchmark is refused before anything runs.
--sae_args / --tune_args / --eval_args append flags to every stage of that kind (the tests' tiny sizes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E   # noqa: E402
import plot as P       # noqa: E402

ARMS = {  # name: (label, SAE stage or None, tuning stage)
    "resa": ("a: Resa, the source's SAE", "source", "tune"),
    "target_sae": ("b: an SAE trained on the target itself", "target", "tune"),
    "random_sae": ("c: an untrained SAE of (a)'s shape", None, "random"),
    "noise": ("d: Gaussian noise with (a)'s FVU", None, "noise"),
    "other_seed": ("e: the source's SAE, from scratch, another seed", "other_seed", "tune"),
    "matched_sft": ("f1: SFT on the same text and steps, no SAE", None, "sft"),
    "resa_sft": ("f2: Resa's SFT baseline", None, "resa_sft"),
    "upper_bound": ("g: KL to the source's logits, no SAE", None, "upper"),
}


def plan(args) -> list[tuple[str, list[str], dict]]:
    """Every stage in order: (name, command, environment overrides)."""
    out, layer, tina = Path(args.out), os.environ.get("RESA_LAYER", "12"), args.tina_adapter
    sae_x, tune_x = shlex.split(args.sae_args), shlex.split(args.tune_args)
    sae_of = {"source": out / "resa", "target": out / "target_sae", "other_seed": out / "other_seed"}
    a_sae = str(sae_of["source"] / "sae" / f"layers.{layer}")
    steps = [
        ("sae_source", ["bash", "recipes/resa_train_sae.sh", *sae_x], {"RESA_OUT": str(sae_of["source"]), "TINA_ADAPTER": tina}),
        ("sae_target", ["bash", "recipes/resa_train_sae.sh", *sae_x], {"RESA_OUT": str(sae_of["target"]), "TINA_ADAPTER": "none"}),
        ("sae_other_seed", ["bash", "recipes/resa_train_sae_scratch.sh", "--seed", "43", *sae_x,
                            "--out_dir", str(sae_of["other_seed"] / "sae")], {"RESA_OUT": str(sae_of["other_seed"]),
                                                                             "TINA_ADAPTER": tina})]
    for name, (_, sae, kind) in ARMS.items():
        env = {"RESA_OUT": str(out / name)}
        if kind == "tune":
            cmd = ["bash", "recipes/resa_sae_tune.sh", *tune_x]
            env["RESA_SAE"] = str(sae_of[sae] / "sae" / f"layers.{layer}")
        elif kind in ("random", "noise"):
            cmd = ["bash", "recipes/resa_sae_tune.sh", "--perturb", "random_sae" if kind == "random" else "noise", *tune_x]
            env["RESA_SAE"] = a_sae
        elif kind == "sft":
            cmd = ["bash", "recipes/resa_matched_sft_control.sh", *tune_x, "--out_dir", str(out / name / "tuned")]
        elif kind == "resa_sft":
            cmd = ["bash", "recipes/resa_sft_baseline.sh", *tune_x, "--out_dir", str(out / name / "tuned")]
        else:
            cmd = ["bash", "recipes/resa_sae_tune.sh", "--sae", "none", "--teacher_adapter", tina, *tune_x]
        steps.append((f"tune_{name}", cmd, env))
    backend = args.backend if args.backend != "auto" else (
        "vllm" if importlib.util.find_spec("vllm") is not None else "hf")
    if args.select_on:          # each arm's checkpoint picked on held-out problems (its own run), before any test
        for name in ARMS:
            steps.append((f"select_{name}", ["bash", "recipes/resa_eval.sh", "--benchmarks", "", "--data", args.select_on,
                                             "--backend", backend, *shlex.split(args.eval_args)],
                          {"RESA_OUT": str(out / name / "selection"), "RESA_ADAPTER": CHECKPOINTS.format(arm=name)}))
    adapters = [tina, *(chosen(args, name) for name in ARMS)]
    by_n: dict[int, list[str]] = {}
    for b in args.benchmarks:
        by_n.setdefault(E.n_for(args.protocol, b), []).append(b)
    for n, benches in sorted(by_n.items()):
        steps.append((f"eval_n{n}", ["bash", "recipes/resa_eval.sh", "--benchmarks", ",".join(benches), "--n", str(n),
                                     "--backend", backend, *shlex.split(args.eval_args)],
                      {"RESA_OUT": str(out / f"eval_n{n}"), "RESA_ADAPTER": ",".join(adapters)}))
    return steps


CHECKPOINTS = "<every checkpoint of {arm}>"     # filled in when the selection stage starts (the arm is trained then)


def checkpoints(out: Path, arm: str) -> list[str]:
    """An arm's saved adapters, in step order, final last."""
    tuned = out / arm / "tuned"
    return [str(d) for d in sorted(tuned.glob("step_*"))] + ([str(tuned / "final")] if (tuned / "final").is_dir() else [])


def chosen(args, arm: str) -> str:
    """The adapter evaluated for an arm: --checkpoint, or with --select_on the best on the validation file (recorded
    by its selection stage in <arm>/selection/eval/results.json; base is never a candidate)."""
    out = Path(args.out)
    if not args.select_on:
        return str(out / arm / "tuned" / args.checkpoint)
    res = out / arm / "selection" / "eval" / "results.json"
    if not res.exists():
        return f"<the best of {arm}'s checkpoints on {args.select_on}>"
    scores = {a: r[Path(args.select_on).stem]["pass@1"] for a, r in json.loads(res.read_text())["results"].items()
              if a != "base"}
    return E.best_of(scores)                                          # a tie: the earliest checkpoint


def finished(name: str, cmd: list[str], env: dict) -> str | None:
    """A training stage whose run.json says finished is not run again (a rerun after a failure goes on from
    there); evaluations always run (evaluate.py reuses the samples it recorded with the same settings)."""
    if name.startswith(("eval_", "select_")):
        return None
    out = cmd[cmd.index("--out_dir") + 1] if "--out_dir" in cmd else str(Path(env["RESA_OUT"]) / (
        "sae" if name.startswith("sae_") else "tuned"))
    run = Path(out) / "run.json"
    return str(run) if run.exists() and json.loads(run.read_text()).get("finished") else None


def verdict(args) -> dict:
    """Each arm's pass@1 per benchmark, and paired over problems its difference to the base and to arm (b)."""
    out, tina = Path(args.out), args.tina_adapter
    names = {"base": "base", tina: "source (Tina)", **{chosen(args, n): n for n in ARMS}}
    rows, comparisons = [], 0
    for d in sorted(out.glob("eval_n*/eval")):
        res = json.loads((d / "results.json").read_text())["results"]
        by: dict[tuple, list] = {}
        for line in open(d / "samples.jsonl"):                  # grouped once: (adapter, benchmark) -> samples
            r = json.loads(line)
            by.setdefault((r["adapter"], r["benchmark"]), []).append(r)

        def mine(adapter, bench):
            return by.get((adapter, bench), [])

        def pp(adapter, bench):
            return E.per_problem(mine(adapter, bench))
        b_adapter = chosen(args, "target_sae")
        for adapter, name in names.items():
            for bench, r in res.get(adapter, {}).items():
                row = {"arm": name, "benchmark": bench, "n": r["n"], "problems": r["problems"],
                       "pass@1": r["pass@1"], "interval95": r["interval95"],
                       "pass_at_k": E.pass_at_k_curve(mine(adapter, bench), r["n"])}          # k = 1..n
                for ref, key in (("base", "vs_base"), (b_adapter, "vs_target_sae")):
                    if adapter not in (ref, "base") and ref in res:
                        m, lo, hi = E.paired_difference(pp(adapter, bench), pp(ref, bench))
                        row[key], row[key + "_interval95"] = m, [lo, hi]
                        comparisons += 1
                rows.append(row)
    report = {"rows": rows, "comparisons": comparisons, "protocol": args.protocol, "checkpoint": args.checkpoint,
              "select_on": args.select_on, "evaluated": {n: chosen(args, n) for n in ARMS}}
    (out / "verdict.json").write_text(json.dumps(report, indent=2))
    pct = lambda x: f"{100 * x:+.1f}"                                            # noqa: E731
    lines = ["| arm | benchmark | n | pass@1 (%) [95% CI] | vs base (points) [95% CI] | vs (b) (points) [95% CI] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda k: f"{pct(r[k])} [{pct(r[k + '_interval95'][0])}, {pct(r[k + '_interval95'][1])}]" if k in r else ""  # noqa: E731
        lo, hi = r["interval95"]
        lines.append(f"| {r['arm']} | {r['benchmark']} | {r['n']} | {100 * r['pass@1']:.1f} [{100 * lo:.1f}, "
                     f"{100 * hi:.1f}] | {cell('vs_base')} | {cell('vs_target_sae')} |")
    which = (f"each arm at its checkpoint best on {Path(args.select_on).name}" if args.select_on else
             f"every arm at its {args.checkpoint} checkpoint")
    lines.append(f"\n{comparisons} paired comparisons (normal 95% intervals over problems, no multiplicity correction); "
                 f"protocol {args.protocol}, {which}.")
    (out / "verdict.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    P.eval_figure(rows, out / "verdict.png", f"Resa's controls ({args.protocol} protocol, {which})")
    return report


def check_validation(args):
    """--select_on must be a question/answer file none of whose questions is in a test benchmark (read from the
    --data_dir in --eval_args, else the hub), or the selection would be on the test."""
    if not Path(args.select_on).is_file():
        raise SystemExit(f"--select_on {args.select_on}: no such file (a .jsonl/.json/.parquet of held-out problems)")
    val, _ = E.D.load_examples(args.select_on)
    flags = shlex.split(args.eval_args)
    data_dir = flags[flags.index("--data_dir") + 1] if "--data_dir" in flags else None
    E.refuse_shared_questions(args.select_on, val, {b: E.D.load_benchmark(b, data_dir)[0] for b in args.benchmarks})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tina_adapter", default=os.environ.get("TINA_ADAPTER"),
                   help="the source: a Tina checkpoint (default: $TINA_ADAPTER)")
    p.add_argument("--out", default=os.environ.get("RESA_OUT", "out/resa") + "_controls", help="(%(default)s)")
    p.add_argument("--protocol", default="sober", choices=sorted(E.N_PRESETS), help="samples per problem (%(default)s)")
    p.add_argument("--benchmarks", type=lambda s: s.split(","), default=["aime24", "aime25", "amc23", "math_500",
                                                                        "minerva", "gpqa_diamond"])
    p.add_argument("--checkpoint", default="final", help="every arm's adapter folder to evaluate (%(default)s)")
    p.add_argument("--select_on", default=None, metavar="FILE",
                   help="instead of --checkpoint: pick each arm's checkpoint by pass@1 on this held-out question/answer "
                   "file (one sample each, resa_eval.sh's settings), never on the test sets")
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"], help="auto: vLLM where installed")
    p.add_argument("--sae_args", default="", help="flags appended to every SAE training stage")
    p.add_argument("--tune_args", default="", help="flags appended to every SAE-Tuning / SFT stage")
    p.add_argument("--eval_args", default="", help="flags appended to every evaluation")
    p.add_argument("--dry_run", action="store_true", help="print every stage's command and environment, run nothing")
    args = p.parse_args(argv)
    if not args.tina_adapter:
        if not args.dry_run:
            raise SystemExit("set --tina_adapter (or TINA_ADAPTER) to the source: a Tina checkpoint folder")
        args.tina_adapter = "TINA_ADAPTER"
    unknown = [b for b in args.benchmarks if b not in E.D.BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; choose from {', '.join(E.D.BENCHMARKS)}")
    if args.select_on:
        args.select_on = str(Path(args.select_on).resolve())     # the stages run from the repository root
        if not args.dry_run:
            check_validation(args)
    steps = plan(args)
    if args.dry_run:
        for name, cmd, env in steps:
            print(f"{name}: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd))
        return steps
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, cmd, env in steps:
        done = finished(name, cmd, env)
        if done:
            print(f"=== {name}: done ({done})", flush=True)
            continue
        if name.startswith("select_"):
            env = {**env, "RESA_ADAPTER": ",".join(checkpoints(Path(args.out), name[len("select_"):]))}
        elif name.startswith("eval_"):          # each arm's adapter, now that its selection (if any) has run
            env = {**env, "RESA_ADAPTER": ",".join([args.tina_adapter, *(chosen(args, a) for a in ARMS)])}
        print(f"=== {name}: {shlex.join(cmd)}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env})
        if r.returncode:
            raise SystemExit(f"stage {name} failed (exit {r.returncode}); fix it and rerun: finished stages refuse to "
                             "overwrite their folders, so move them aside or delete the failed stage's folder first")
    return verdict(args)


if __name__ == "__main__":
    main()
