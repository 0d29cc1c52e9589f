"""
toy/sae_curve.py -- how much of the source's skill survives its SAE, against how well the SAE reconstructs the
source's own answers: SAE variants trained on the toy's GRPO model (the source), each inserted into it.

    python toy/pipeline.py --out out/toy       # first: the data, the models and the pipeline's SAEs
    python toy/sae_curve.py --toy out/toy      # then: about 5 minutes on 2 CPU cores -> out/toy/sae_curve.md, .json

For each variant: train_sae.py on the source (as a user would), evaluate.py of the source with that SAE in its
residual stream (held-out pass@1, the pipeline's sampling settings), and the SAE's FVU on the residual stream
over the source's own sampled answers (toy/pipeline.py's fvu_on_completions); beside it, train_sae.py's own
held-out figures on chunks of its training text it never trained on (FVU, KL per token between the source with
and without the SAE, and the share of CE loss recovered against zero-ablating the layer). The variants span Resa's two ways
of making an SAE: from scratch on the trace-free trigger text, and pre-trained on general text then fine-tuned
on the trigger text; and the pipeline's way, on the toy's general text (corpus.jsonl) alone, at several sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from toy.pipeline import ENV, fvu_on_completions, run  # noqa: E402

TRIGGER = ["--dataset", "{data}/train.jsonl", "--text_format", "resa"]
CORPUS = ["--dataset", "{data}/corpus.jsonl", "--text_format", "plain"]
VARIANTS = [   # name, what it is, train_sae.py flags (None: the pipeline's own SAE, already trained)
    ("trigger_x8_k16", "from scratch on the trace-free trigger text (Resa's first way)",
     [*TRIGGER, "--expansion_factor", "8", "--k", "16"]),
    ("trigger_x32_k64", "from scratch on the trigger text, wider", [*TRIGGER, "--expansion_factor", "32", "--k", "64"]),
    ("pretrained_finetuned", "the control's SAE (general text, on the base) fine-tuned on the trigger text "
     "(Resa's second way)", [*TRIGGER, "--init_from", "{toy}/sae_control"]),
    ("corpus_x8_k16_400k", "general text (corpus.jsonl), 0.4M tokens",
     [*CORPUS, "--expansion_factor", "8", "--k", "16", "--max_tokens", "400000"]),
    ("pipeline", "general text, 1M tokens (the pipeline's SAE)", None),
    ("corpus_x16_k32_2M", "general text, 2M tokens, wider",
     [*CORPUS, "--expansion_factor", "16", "--k", "32", "--max_tokens", "2000000"]),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", default="out/toy", help="a finished toy/pipeline.py output folder (%(default)s)")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = p.parse_args(argv)
    toy = (ROOT / args.toy).resolve()
    rep = json.loads((toy / "results.json").read_text())
    if rep.get("quick"):
        raise SystemExit(f"{toy} is a --quick run: run the full pipeline first")
    ENV.setdefault("OMP_NUM_THREADS", "1")                  # small, launch-bound stages (see toy/pipeline.py)
    base, data, logs = str(toy / "base"), str(toy / "data"), toy / "logs"
    source = str(sorted((toy / "grpo").glob("step_*"))[-1])
    cfg = json.loads((toy / "eval" / "sae_inserted" / "samples_settings.json").read_text())
    source_pass = next(r for r in rep["rows"] if r["row"].startswith("GRPO-LoRA"))["pass@1"]
    py, rows = sys.executable, []
    wanted = set(args.only.split(",")) if args.only else None
    for name, what, flags in VARIANTS:
        if wanted and name not in wanted:
            continue
        out = toy / "sae_curve" / name
        if flags is None:
            sae_dir, run_dir = toy / "sae" / "layers.2", toy / "sae"
        else:
            flags = [f.format(toy=toy, data=data) for f in flags]
            run([py, "train_sae.py", "--model", base, "--adapter", source, "--out_dir", str(out), "--layers", "2",
                 "--ctx_len", "256", "--lr", "3e-3", "--batch_size", "8", "--device", "cpu", "--dtype", "fp32",
                 "--seed", "0", "--system_prompt", "none", "--overwrite", *flags], logs / f"curve_{name}.log")
            sae_dir, run_dir = out / "layers.2", out
        ev = out / "eval"
        run([py, "evaluate.py", "--model", base, "--adapter", source, "--data", f"{data}/test.jsonl", "--limit",
             str(rep["rows"][1]["problems"]), "--n", str(rep["rows"][1]["n"]),
             "--temperature", str(cfg["temperature"]), "--top_p", str(cfg["top_p"]), "--max_new_tokens",
             str(cfg["max_new_tokens"]), "--batch_size", "256", "--template", "none", "--system_prompt", "none",
             "--device", "cpu", "--dtype", "fp32", "--seed", str(cfg["seed"]), "--sae", str(sae_dir), "--out_dir",
             str(ev), "--overwrite"], logs / f"curve_{name}_eval.log")
        res = json.loads((ev / "results.json").read_text())["results"][source]["test"]
        fvu = fvu_on_completions(base, source, toy / "eval" / "grpo", [sae_dir])[0]
        cfg_sae = json.loads((sae_dir / "cfg.json").read_text())
        held = json.loads((run_dir / "run.json").read_text())["held_out"]["2"]
        rows.append({"variant": name, "what": what, "num_latents": cfg_sae["num_latents"], "k": cfg_sae["k"],
                     "fvu_source_answers": fvu, "pass@1": res["pass@1"], "interval95": res["interval95"],
                     "kept": res["pass@1"] / source_pass, "held_out_fvu": held["fvu"],
                     "held_out_kl_per_token": held["kl_per_token"], "held_out_ce_recovered": held["ce_recovered"]})
        print(f"      {name}: FVU on the source's answers {fvu:.4f}, pass@1 with the SAE {100 * res['pass@1']:.1f}% "
              f"({100 * rows[-1]['kept']:.0f}% of the source's {100 * source_pass:.1f}%)", flush=True)
    rows.sort(key=lambda r: -r["fvu_source_answers"])
    md = markdown(rows, source_pass)
    (toy / "sae_curve.json").write_text(json.dumps({"source_pass@1": source_pass, "rows": rows}, indent=2))
    (toy / "sae_curve.md").write_text(md + "\n")
    print(md)


def markdown(rows: list[dict], source_pass: float) -> str:
    """The curve's table (docs/toy.md shows it; tests/test_toy.py checks it is this of the committed JSON)."""
    lines = ["| SAE on the source (layer 2) | latents, k | FVU on the source's own answers | held-out FVU / KL per "
             "token / CE recovered (its own text) | source's pass@1 with it [95% CI] | share of the source's pass@1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["interval95"]
        lines.append(f"| {r['what']} | {r['num_latents']:,}, {r['k']} | {r['fvu_source_answers']:.4f} | "
                     f"{r['held_out_fvu']:.4f} / {r['held_out_kl_per_token']:.4f} / "
                     f"{100 * r['held_out_ce_recovered']:.1f}% | "
                     f"{100 * r['pass@1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {100 * r['kept']:.0f}% |")
    return "\n".join(lines) + f"\n\nThe source alone: {100 * source_pass:.1f}%."


if __name__ == "__main__":
    main()
