"""
evaluate.py -- the papers' math benchmarks: pass@1 over n samples, unbiased pass@k, 95% intervals,
per-sample records, and sweeps over several adapters (checkpoints).

Usage
  CPU, a local file and a tiny model:
    python evaluate.py --model toy/out/base --data toy/out/test.jsonl --n 4 --max_new_tokens 128 --device cpu
  GPU, the papers' setting (local copies of the test sets with --data_dir, else from the hub):
    python evaluate.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter out/tina_open_rs2/final \
        --benchmarks aime24,aime25,amc23,math_500,minerva,gpqa_diamond --n 16 --max_new_tokens 32768
  A checkpoint sweep: --adapter out/run/step_000050,out/run/step_000100,... (one row each; "base" = none)
  Checkpoint selection on held-out problems: add --select_on val.jsonl: every adapter is scored on that file
  first (into --out_dir/selection), and the benchmarks are evaluated for the best one alone (plus base if listed)

Prompting follows lighteval / open-r1 (the papers used lighteval + vLLM): the math template asking for
\\boxed{} (GPQA: four seeded-shuffled choices and 'Answer: $LETTER'), in the tokenizer's chat template,
no system prompt by default. Sampling: temperature 0.6, top_p 0.95. Scoring: data.grade(mode="eval"),
lighteval's lenient extractive match; GPQA by the letter after the word answer or in a box (--scorer lighteval:
lighteval's own letter patterns). pass@1 = mean correctness over the n samples of a
problem, averaged over problems; pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k); the interval
is mean +/- 1.96 standard errors over problems. Problems whose gold answer cannot be parsed are counted
in `unparseable_gold` and left out of every score (never scored correct).

Outputs in --out_dir: results.json ({adapter: {benchmark: {...}}}), samples.jsonl (one row per sample:
the exact prompt text, completion, extracted answer, correct, tokens, finished), results.md (the table,
also printed), results.png (per benchmark: each adapter's pass@k curve for k = 1..n and its pass@1 with the
interval; plot.py's eval_figure, skipped without matplotlib). Re-running into the same folder skips samples already recorded: each batch of samples
is seeded from (seed, benchmark, batch index), so a resumed run gives the same numbers as one run.

--scorer lighteval grades as the papers' lighteval did (data.grade_lighteval: MATH-500 and Minerva against the
`solution` column with a LaTeX-only gold, AIME/AMC with an expression-only gold, any_match extraction, an
unextractable gold compared as a raw string); recorded samples are regraded, not resampled, when only the
scorer changes. --max_model_len 32768 counts the prompt inside the budget, as lighteval's vLLM run did.

Simplifications versus lighteval: math-verify's extraction stands in for lighteval's own copy of it (the same
code, moved into math-verify: on the local sets' 1,477 reference solutions it grades as lighteval ed084813 on
all but 20 OlympiadBench ones with math-verify 0.9.0, on all with 0.5.2; docs/stages.md); the interval is a
normal approximation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

import common as C
import data as D
import lora as L
import model as M
import plot as P
import sae as S
import sampling as SM


# samples per problem: the papers' protocol (one) and the sober one (open-r1's multi-sample practice: enough samples
# that a one-problem difference on AIME is not read as a gain); recipes/resa_controls.py evaluates with either
N_PRESETS = {"papers": {}, "sober": {"aime24": 16, "aime25": 16, "amc23": 16, "math_500": 4, "minerva": 4,
                                     "olympiadbench": 4, "gpqa_diamond": 8}}


def n_for(protocol: str, benchmark: str) -> int:
    return N_PRESETS[protocol].get(benchmark, 1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of P(at least one of k samples is correct) from c correct out of n."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize(rows: list[dict], n: int, ks: list[int]) -> dict:
    """rows: every sample of one (adapter, benchmark). -> pass@1, pass@k, interval, counts."""
    by_problem: dict[int, list] = {}
    for r in rows:
        by_problem.setdefault(r["index"], []).append(r["correct"])
    scored = {i: c for i, c in by_problem.items() if all(x is not None for x in c)}
    per = [sum(c) / len(c) for c in scored.values()]
    P = len(per)
    mean = sum(per) / P if P else 0.0
    se = math.sqrt(sum((x - mean) ** 2 for x in per) / (P - 1) / P) if P > 1 else 0.0
    out = {"pass@1": mean, "interval95": [max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)],
           "problems": P, "unparseable_gold": len(by_problem) - P, "n": n,
           "mean_tokens": sum(r["tokens"] for r in rows) / max(1, len(rows)),
           "truncated": sum(not r["finished"] for r in rows) / max(1, len(rows))}
    for k in ks:
        if k > 1:
            out[f"pass@{k}"] = sum(pass_at_k(len(c), int(sum(c)), k) for c in scored.values()) / max(1, P)
    return out


def pass_at_k_curve(rows: list[dict], n: int) -> list[float]:
    """[pass@1, pass@2, ..., pass@n] (the unbiased estimator, averaged over the problems scored) from every sample
    of one adapter and one benchmark: the curve that shows whether a gain at k = 1 holds at larger k."""
    s = summarize(rows, n, list(range(2, n + 1)))
    return [s["pass@1"], *(s[f"pass@{k}"] for k in range(2, n + 1))]


def per_problem(rows: list[dict]) -> dict[int, float]:
    """pass@1 of each problem (the mean correctness of its samples) from sample records of one adapter and one
    benchmark; problems with an unparseable gold (correct None) are left out."""
    acc: dict[int, list] = {}
    for r in rows:
        if r["correct"] is not None:
            acc.setdefault(r["index"], []).append(r["correct"])
    return {i: sum(v) / len(v) for i, v in acc.items()}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float]:
    """Mean of a - b over the problems both scored, and its 95% interval (normal approximation over problems:
    mean +/- 1.96 standard errors of the per-problem differences). The comparison two adapters need: the same
    problems, so the problems' own spread cancels."""
    d = [a[i] - b[i] for i in a if i in b]
    if not d:
        raise ValueError("no problem was scored for both")
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else 0.0
    return m, m - 1.96 * se, m + 1.96 * se


def grade_sample(benchmark: str, completion: str, example: D.Example, scorer: str = "ours"):
    """-> (extracted answer, 1.0 / 0.0, or None for a gold ours cannot parse). --scorer lighteval: the papers'
    lighteval grading (data.grade_lighteval: its gold columns, any_match, raw-string gold, never None)."""
    if benchmark == "gpqa_diamond":
        letter = D.extract_letter_lighteval(completion) if scorer == "lighteval" else D.extract_letter(completion)
        return letter, float(letter == example.answer)
    if scorer == "lighteval":
        return D.grade_lighteval(completion, *D.lighteval_gold_text(benchmark, example))
    return D.extract_answer(completion, "eval"), D.grade(completion, example.answer, mode="eval")


def new_token_budget(net, prompt_len: int, args) -> int:
    """--max_new_tokens, capped so that prompt + completion stay within the model's trained context (Tina's
    evaluation capped Qwen2.5-Math-1.5B, 4,096 positions, the same way); said once per run."""
    limit = min(net.cfg.max_position_embeddings, args.max_model_len or math.inf)
    cap = limit - prompt_len
    why = (f"--max_model_len {args.max_model_len} counts the prompt" if limit == args.max_model_len else
           f"the model was trained on {net.cfg.max_position_embeddings} positions")
    if args.max_new_tokens > cap and why not in _CAPPED:
        print(f"note: --max_new_tokens {args.max_new_tokens} capped at {cap} for prompts of {prompt_len} tokens: {why}")
        _CAPPED.add(why)
    return max(1, int(min(args.max_new_tokens, cap)))


_CAPPED: set[str] = set()    # the note above is printed once per process and reason


def generate_hf(net, tok, prompts: list[str], args, seed: int, eos_ids):
    """-> list of (completion text, tokens, finished) for the prompt texts, one batch."""
    ids, mask = SM.encode_prompts(tok, prompts, net.device)
    gen = torch.Generator(device=net.device).manual_seed(seed)
    with L.lora_merged(net):
        out = SM.generate(net, ids, mask, max_new_tokens=new_token_budget(net, ids.shape[1], args),
                          temperature=args.temperature,
                          top_p=args.top_p, eos_ids=eos_ids, pad_id=tok.pad_token_id, generator=gen)
    return [(tok.decode(t[:n].tolist(), skip_special_tokens=True), n, bool(f))
            for t, n, f in zip(out.tokens, out.lengths.tolist(), out.finished.tolist())]


def generate_vllm(engine: SM.VLLMEngine, net, tok, prompts: list[str], args, seeds: list[int], eos_ids, adapter):
    """The same prompts as token ids through vLLM, one seed per sample, each with the hf path's token budget
    (new_token_budget: within the model's context and --max_model_len). -> (text, tokens, finished) each."""
    ids = SM.prompt_token_ids(tok, prompts)
    vllm_cap = engine.settings["max_model_len"]
    caps = [max(1, min(new_token_budget(net, len(p), args), vllm_cap - len(p))) for p in ids]
    outs = engine.generate(ids, seeds, temperature=args.temperature, top_p=args.top_p, max_tokens=caps,
                           stop_ids=eos_ids, adapter=None if adapter == "base" else (adapter, 0))
    return [(tok.decode(t, skip_special_tokens=True), len(t), f) for t, f in outs]


def load_sets(args) -> dict[str, list[D.Example]]:
    sets, stats = {}, {}
    if args.data:
        ex, st = D.load_examples(args.data, args.question_field, args.answer_field, limit=args.limit)
        sets[Path(args.data).stem], stats[Path(args.data).stem] = ex, st
    for b in args.benchmarks:
        sets[b], stats[b] = D.load_benchmark(b, args.data_dir, limit=args.limit, seed=args.seed)
    if not sets:
        raise SystemExit("nothing to evaluate: give --benchmarks and/or --data")
    return sets, stats


def check_args(args):
    unknown = [b for b in args.benchmarks if b not in D.BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; choose from {', '.join(D.BENCHMARKS)}")
    if args.backend == "vllm" and args.model.startswith("random:"):
        raise SystemExit("--backend vllm needs a model folder or hub id that vLLM can load, not random:")
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--n, --batch_size and --max_new_tokens must be at least 1")
    if args.temperature < 0:
        raise SystemExit(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.backend == "vllm" and 0 < args.temperature < 0.01:
        raise SystemExit(f"--temperature {args.temperature}: vLLM raises temperatures below 0.01 to 0.01; use 0 "
                         "(greedy) or at least 0.01")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.compare is not None and (len(args.compare) != 2 or not set(args.compare) <= set(args.adapter or ["base"])):
        raise SystemExit(f"--compare {','.join(args.compare)}: name two of the --adapter entries "
                         f"({','.join(args.adapter or ['base'])})")
    if args.select_on and not Path(args.select_on).is_file():
        raise SystemExit(f"--select_on {args.select_on}: no such file (a local .jsonl/.json/.parquet of held-out "
                         "question/answer problems, none of them in the test sets)")
    if args.select_on and args.compare:
        raise SystemExit("--compare with --select_on: run the selection first, then compare base with the selected "
                         "adapter in a second run (same --out_dir: its samples are reused)")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit {args.limit}: must be at least 1 (leave it out to evaluate every problem)")
    if any(k < 1 for k in args.k):
        raise SystemExit(f"--k {','.join(map(str, args.k))}: every k must be at least 1")
    if args.data and Path(args.data).stem in args.benchmarks:     # results are keyed by set name
        raise SystemExit(f"--data {args.data} and --benchmarks {Path(args.data).stem} would share the name "
                         f"{Path(args.data).stem!r}: rename the file")
    if args.k and max(args.k) > args.n:
        raise SystemExit(f"--n {args.n} is smaller than the largest k in --k ({max(args.k)}): pass@k needs n >= k")
    for a in [] if args.dry_run else args.adapter:       # a dry run describes a run whose adapters may not exist yet
        if a != "base" and not (Path(a) / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {a}: not an adapter folder (needs adapter_config.json and "
                             "adapter_model.safetensors)")


def file_fingerprint(path: Path, whole_below: int = 1 << 28) -> str:
    """A content hash of a weight file: all of it up to 256 MiB (adapters, SAEs), else its size and its first and
    last 16 MiB (a base model's shards: a retrained or replaced checkpoint changes them)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= whole_below:
            h.update(f.read())
        else:
            h.update(str(size).encode() + f.read(1 << 24))
            f.seek(-(1 << 24), 2)
            h.update(f.read())
    return h.hexdigest()[:16]


def weights_identity(args) -> dict:
    """What the samples were drawn from, by content: each adapter's, the SAE's and the model's weight files."""
    def of(folder, pattern="*.safetensors"):
        files = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
        return {f.name: file_fingerprint(f) for f in files}
    out = {a: of(a) for a in args.adapter if a != "base"}
    if args.sae:
        out["sae"] = of(args.sae)
    if not args.model.startswith("random:"):
        out["model"] = of(M.resolve_model_dir(args.model))
    return out


def sample_settings(args, sets) -> dict:
    """Everything that determines the recorded samples: a re-run may reuse them only if all of it matches
    (the settings that shape the batches, --n among them, and the weights by content, not by path)."""
    keys = ("model", "tokenizer", "dtype", "template", "system_prompt", "temperature", "top_p", "max_new_tokens",
            "batch_size", "seed", "backend", "sae", "max_model_len", "n")
    return {**{k: getattr(args, k) for k in keys}, "weights": weights_identity(args),
            "questions": {b: zlib.crc32(json.dumps([[e.index, e.question, e.answer] for e in ex]).encode())
                          for b, ex in sets.items()}}


def recorded_samples(out_dir: Path, settings: dict, overwrite: bool) -> dict:
    """Samples a previous run recorded with the same settings, by (adapter, benchmark, index, sample)."""
    files = [out_dir / n for n in ("samples.jsonl", "samples_settings.json", "results.json", "results.md", "results.png")]
    if overwrite:
        for f in files:
            f.unlink(missing_ok=True)
    path = out_dir / "samples.jsonl"
    if path.exists():
        old = C.read_json(out_dir / "samples_settings.json") if files[1].exists() else {}
        changed = sorted(k for k in set(old) | set(settings) if k != "weights" and old.get(k) != settings.get(k))
        ow, nw = old.get("weights", {}), settings["weights"]          # an adapter added to a sweep is fine
        changed += [f"the weights of {k}" for k in sorted(set(ow) & set(nw)) if ow[k] != nw[k]]
        if changed:
            raise SystemExit(f"--out_dir {out_dir} holds samples made with other settings ({', '.join(changed)}): "
                             "pass --overwrite to sample anew, or choose another --out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    C.atomic_write(files[1], lambda p: Path(p).write_text(json.dumps(settings, indent=2)))
    rows = C.read_jsonl(path)
    if rows:      # rewrite without an incomplete last line, so appending continues a valid file
        C.atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return {(r["adapter"], r["benchmark"], r["index"], r["sample"]): r for r in rows}


def prepare(args):
    """Sets, tokenizer, model, EOS ids; every adapter is loaded once to check it fits before any sampling."""
    device = C.pick_device(args.device)
    sets, stats = load_sets(args)
    tok = M.load_tokenizer(args.tokenizer or args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = C.pick_dtype(args.dtype, device)
    if args.backend == "vllm":    # vLLM holds the weights: ours only on the meta device, for the config and checks
        if args.model.startswith("random:"):
            raise SystemExit("--backend vllm needs a model folder or hub id that vLLM can load, not random:")
        net = M.load_model(args.model, "meta", dtype)
    else:
        net = M.load_model(args.model, device, dtype, seed=args.seed)
    for a in args.adapter:
        if a != "base":
            try:
                L.load_adapter(net, a)
            except ValueError as e:
                raise SystemExit(f"--adapter {a}: {e}") from None
            L.unload_lora(net)
    if args.sae:                  # Resa's diagnostics: the model with an SAE in place of its residual stream
        if args.backend == "vllm":
            raise SystemExit("--sae needs --backend hf (vLLM cannot insert an SAE)")
        try:
            sae = S.load_sae(args.sae)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--sae {args.sae}: {e}") from None
        if sae.layer is None or not 0 <= sae.layer < net.cfg.num_hidden_layers or sae.d_in != net.cfg.hidden_size:
            raise SystemExit(f"--sae {args.sae} (layer {sae.layer}, d_in {sae.d_in}) does not fit this model "
                             f"({net.cfg.num_hidden_layers} layers, hidden size {net.cfg.hidden_size})")
        S.insert_sae(net, sae.to(device=net.device, dtype=torch.float32), sae.layer)
    engine = None
    if args.backend == "vllm":
        ranks = [C.read_json(Path(a) / "adapter_config.json")["r"] for a in args.adapter if a != "base"]
        engine = SM.VLLMEngine(M.resolve_model_dir(args.model), max_lora_rank=max(ranks, default=0), seed=args.seed,
                               max_model_len=min(args.max_model_len or args.max_new_tokens + 2048,
                                                 net.cfg.max_position_embeddings), dtype=dtype)
    return sets, stats, tok, net, M.eos_token_ids(tok, args.model, net.cfg), engine


def template_for(args, bench: str) -> str:
    return args.template if args.template != "auto" else ("gpqa" if bench == "gpqa_diamond" else "math")


def sample_row(adapter, bench, ex, j, prompt, gen, scorer: str = "ours") -> dict:
    """One sample's record: the exact prompt, the completion, what was extracted and whether it is right."""
    text, ntok, finished = gen
    extracted, correct = grade_sample(bench, text, ex, scorer)
    return {"adapter": adapter, "benchmark": bench, "index": ex.index, "sample": j, "question": ex.question,
            "prompt": prompt, "gold": ex.answer, "completion": text, "extracted": extracted, "correct": correct,
            "tokens": ntok, "finished": finished, "scorer": scorer}


def regraded(row: dict, bench: str, ex: D.Example, scorer: str) -> dict:
    """A recorded sample graded by `scorer` (samples are reused across scorers; only the grade changes)."""
    if row.get("scorer", "ours") == scorer:
        return row
    extracted, correct = grade_sample(bench, row["completion"], ex, scorer)
    return {**row, "extracted": extracted, "correct": correct, "scorer": scorer}


def markdown_table(results: dict, ks: list[int]) -> str:
    benches = list(next(iter(results.values())).keys())
    head = "| adapter | " + " | ".join(benches) + " |"
    lines = [head, "|" + "---|" * (len(benches) + 1)]
    for adapter, res in results.items():
        cells = []
        for b in benches:
            r = res[b]
            lo, hi = r["interval95"]
            extra = "".join(f", p@{k} {100 * r[f'pass@{k}']:.1f}" for k in ks if k > 1)
            cells.append(f"{100 * r['pass@1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]{extra}")
        lines.append(f"| {adapter} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\npass@1 in % with its 95% interval over problems (n = {next(iter(next(iter(results.values())).values()))['n']} samples each)."


def refuse_shared_questions(path: str, val: list[D.Example], sets: dict[str, list[D.Example]]):
    """A validation file (path, its examples val) may share no question (compared whitespace-normalised) with the
    test sets: selecting on such a file would be selecting on the test."""
    norm = lambda q: " ".join(q.split())                                   # noqa: E731
    mine = {norm(e.question) for e in val}
    shared = {b: mine & {norm(e.question) for e in ex} for b, ex in sets.items()}
    shared = {b: q for b, q in shared.items() if q}
    if shared:
        raise SystemExit(f"--select_on {path}: {len(set().union(*shared.values()))} of its {len(val)} questions are "
                         f"also in the test sets ({', '.join(shared)}); selecting on them would be selecting on the test")


def best_of(scores: dict[str, float]) -> str:
    """The key with the highest score; on a tie the first (the earliest checkpoint of a sweep)."""
    return max(scores, key=scores.get)


def select_checkpoint(args) -> dict:
    """--select_on: score every --adapter on the validation file (a run of its own in out_dir/selection, the same
    sampling settings, every problem of the file) and pick the best pass@1 (a tie: the first listed). Refuses a
    validation file that shares a question with the test sets. -> {validation, scores, selected}."""
    val, _ = D.load_examples(args.select_on, args.question_field, args.answer_field)
    refuse_shared_questions(args.select_on, val, load_sets(args)[0])
    sel = argparse.Namespace(**{**vars(args), "data": args.select_on, "benchmarks": [], "limit": None,
                                "select_on": None, "compare": None, "k": [],
                                "out_dir": str(Path(args.out_dir) / "selection")})
    print(f"checkpoint selection: {len(args.adapter or ['base'])} adapters on {args.select_on} ({len(val)} problems)")
    res = evaluate(sel)
    name = Path(args.select_on).stem
    scores = {a: r[name]["pass@1"] for a, r in res.items()}
    return {"validation": args.select_on, "problems": len(val), "scores": scores, "selected": best_of(scores)}


def evaluate(args) -> dict:
    check_args(args)
    if args.dry_run:
        return C.print_config({**vars(args), "adapters": args.adapter or ["base"], "world_size": 1,
                               "token_budget": "prompt + completion <= --max_model_len (the prompt counted)"
                               if args.max_model_len else "--max_new_tokens completion tokens (the prompt not counted)"})
    selection = None
    if args.select_on:            # pick on the validation file, then evaluate the test sets for that one alone
        selection = select_checkpoint(args)
        keep = [selection["selected"], *(["base"] if "base" in args.adapter and selection["selected"] != "base" else [])]
        args = argparse.Namespace(**{**vars(args), "adapter": keep})
        print(f"selected on {args.select_on}: {selection['selected']} (pass@1 "
              f"{100 * selection['scores'][selection['selected']]:.1f}%); the test sets for {', '.join(keep)}")
    out_dir = Path(args.out_dir)
    sets, stats, tok, net, eos_ids, engine = prepare(args)
    system_prompt = D.SYSTEM_PROMPTS.get(args.system_prompt, args.system_prompt)
    limit = min(net.cfg.max_position_embeddings, args.max_model_len or math.inf) - 1   # room for one new token
    prompts_of = {}                               # each set's prompt texts, formatted once, for every adapter
    for bench, examples in sets.items():          # a prompt that leaves no room is skipped and counted, not fatal
        prompts = [D.format_prompt(tok, D.apply_template(template_for(args, bench), e.question), system_prompt)
                   for e in examples]
        lens = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
        kept = [e for e, n in zip(examples, lens) if n <= limit]
        prompts_of[bench] = [p for p, n in zip(prompts, lens) if n <= limit]
        stats[bench]["prompt_too_long"] = len(examples) - len(kept)
        if len(kept) < len(examples):
            print(f"{bench}: skipped {len(examples) - len(kept)} of {len(examples)} problems whose prompt leaves no "
                  f"room to answer within {limit + 1} tokens (the model's context or --max_model_len)")
        sets[bench] = kept
    log = C.RunLog(out_dir, vars(args), "evaluate", n_gpus=int(net.device.type == "cuda"),   # lock, ownership
                   gpu_hour_usd=args.gpu_hour_usd, resume=True)
    done = recorded_samples(out_dir, sample_settings(args, sets), args.overwrite)
    log.write_run(data=stats, **({"vllm": engine.settings} if engine is not None else {}))
    adapters = args.adapter or ["base"]
    total = len(adapters) * sum(len(v) for v in sets.values()) * args.n
    bar = tqdm(total=total, initial=len(done), desc="eval", dynamic_ncols=True)
    results = {}
    for adapter in adapters:
        if adapter != "base" and engine is None:
            L.load_adapter(net, adapter)
        results[adapter] = {}
        for bench, examples in sets.items():
            prompts = prompts_of[bench]
            jobs = [(i, j) for i in range(len(examples)) for j in range(args.n)]     # fixed order and batches
            for b in range(0, len(jobs), args.batch_size):
                batch = jobs[b:b + args.batch_size]      # a batch is sampled whole (its seed fixes its samples)
                if all((adapter, bench, examples[i].index, j) in done for i, j in batch):
                    continue
                seed = zlib.crc32(f"{args.seed}/{bench}/{b}".encode())
                texts = [prompts[i] for i, _ in batch]
                if engine is not None:
                    seeds = [zlib.crc32(f"{args.seed}/{bench}/{examples[i].index}/{j}".encode()) for i, j in batch]
                    gens = generate_vllm(engine, net, tok, texts, args, seeds, eos_ids, adapter)
                else:
                    gens = generate_hf(net, tok, texts, args, seed, eos_ids)
                rows = [sample_row(adapter, bench, examples[i], j, prompts[i], g, args.scorer)
                        for (i, j), g in zip(batch, gens)
                        if (adapter, bench, examples[i].index, j) not in done]
                log.samples(rows)
                done.update({(r["adapter"], r["benchmark"], r["index"], r["sample"]): r for r in rows})
                bar.update(len(rows))
            rows = [regraded(done[(adapter, bench, e.index, j)], bench, e, args.scorer) for e in examples
                    for j in range(args.n)]
            results[adapter][bench] = summarize(rows, args.n, args.k)
        if adapter != "base" and engine is None:
            L.unload_lora(net)
    bar.close()
    if engine is not None:
        engine.close()
    report = {"results": results, "data": stats, "args": {k: v for k, v in vars(args).items()},
              **({"selection": selection} if selection else {})}
    if args.compare:                 # B - A per benchmark, paired over problems (the same problems and seeds)
        a, b = args.compare
        pp = lambda ad, bench: per_problem([done[(ad, bench, e.index, j)] for e in sets[bench]   # noqa: E731
                                            for j in range(args.n)])
        report["compare"] = {f"{b} - {a}": {bench: dict(zip(("difference", "low95", "high95"),
                                                            paired_difference(pp(b, bench), pp(a, bench))))
                                            for bench in sets}}
    C.atomic_write(out_dir / "results.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    table = markdown_table(results, args.k)
    for name, per in report.get("compare", {}).items():
        table += "\n\n" + f"{name}, paired over problems (points): " + "; ".join(
            f"{bench} {100 * c['difference']:+.1f} [{100 * c['low95']:+.1f}, {100 * c['high95']:+.1f}]"
            for bench, c in per.items())
    if selection:
        table += (f"\n\nCheckpoint selected on {selection['validation']} ({selection['problems']} problems, never on the "
                  f"test sets): {selection['selected']}, best of " + ", ".join(
                      f"{a} {100 * v:.1f}" for a, v in selection["scores"].items()) + " (pass@1, %).")
    C.atomic_write(out_dir / "results.md", lambda p: Path(p).write_text(table + "\n"))
    log.write_run(finished=True)
    print(table)
    if P.eval_figure(P.eval_rows(results, done.values()), out_dir / "results.png", f"evaluate.py: {args.model}"):
        print(f"results: {out_dir / 'results.md'}, results.json, samples.jsonl, results.png")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(usage='python evaluate.py --model MODEL [--adapter A,B,...] --benchmarks B1,B2 | --data FILE [flags]', description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = C.add_run_args(p, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "out/eval")
    g.add_argument("--adapter", type=C.csv_list(), default=[],
                   help="comma-separated adapter folders (a sweep: one row each); 'base' = no adapter")
    g.add_argument("--sae", default=None,
                   help="an SAE folder inserted, frozen, at its layer while generating (Resa's diagnostic: how much "
                   "of the model's skill survives its SAE); default none")
    g = p.add_argument_group("data")
    g.add_argument("--benchmarks", type=C.csv_list(), default=[], help=f"comma-separated from {', '.join(D.BENCHMARKS)}")
    g.add_argument("--data_dir", default=None, help="folder with local copies of the benchmarks (e.g. ../shared/data/eval)")
    g.add_argument("--data", default=None, help="any local .jsonl/.json/.parquet question/answer file")
    g.add_argument("--question_field", default=None, help="question column of --data")
    g.add_argument("--answer_field", default=None, help="answer column of --data")
    g.add_argument("--limit", type=int, default=None, help="first N problems of each set")
    g = p.add_argument_group("prompting and sampling")
    g.add_argument("--template", default="auto", choices=["auto", "math", "gpqa", "none"],
                   help="auto: lighteval's math template (GPQA: its multiple-choice template)")
    g.add_argument("--system_prompt", default="none", help="none (lighteval's default), open_r1, open_rs, resa, or text")
    g.add_argument("--n", type=int, default=1, help="samples per problem (%(default)s; AIME needs >= 16 for a stable number)")
    g.add_argument("--k", type=C.csv_list(int), default=[], help="also report pass@k for these k (<= n)")
    g.add_argument("--temperature", type=float, default=0.6, help="(%(default)s; 0 = greedy)")
    g.add_argument("--top_p", type=float, default=0.95, help="(%(default)s)")
    g.add_argument("--max_new_tokens", type=int, default=32768, help="(%(default)s)")
    g.add_argument("--max_model_len", type=int, default=None,
                   help="cap on prompt + completion tokens, as lighteval's max_model_length (the papers: 32768, the "
                   "prompt counted inside the budget); default: only --max_new_tokens and the model's context")
    g.add_argument("--batch_size", type=int, default=16, help="sequences generated together (%(default)s)")
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="built-in sampler or vLLM")
    g.add_argument("--compare", type=C.csv_list(), default=None, metavar="A,B",
                   help="also report B - A for two of the --adapter entries (or base), paired over the same problems "
                   "and samples, with its 95%% interval")
    g.add_argument("--select_on", default=None, metavar="FILE",
                   help="checkpoint selection on held-out problems: score every --adapter on this local question/answer "
                   "file first, then evaluate the benchmarks for the best one alone (plus base if listed); never "
                   "pick on the test sets (default: no selection, every adapter evaluated)")
    g.add_argument("--scorer", default="ours", choices=["ours", "lighteval"],
                   help="ours: math-verify on the answer column, a gold it cannot parse left out and counted (default); "
                   "lighteval: as the papers scored (MATH-500 / Minerva against the solution column, any_match, an "
                   "unextractable gold compared as a raw string), for numbers comparable with theirs")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return evaluate(args)


if __name__ == "__main__":
    C.cli(main)
