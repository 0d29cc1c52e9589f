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

Prompting follows lighteval / open-r1 (the papers used lighteval + vLLM): the math template asking for
\\boxed{} (GPQA: four seeded-shuffled choices and 'Answer: $LETTER'), in the tokenizer's chat template,
no system prompt by default. Sampling: temperature 0.6, top_p 0.95. Scoring: data.grade(mode="eval"),
lighteval's lenient extractive match; GPQA by letter. pass@1 = mean correctness over the n samples of a
problem, averaged over problems; pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k); the interval
is mean +/- 1.96 standard errors over problems. Problems whose gold answer cannot be parsed are counted
in `unparseable_gold` and left out of every score (never scored correct).

Outputs in --out_dir: results.json ({adapter: {benchmark: {...}}}), samples.jsonl (one row per sample:
the exact prompt text, completion, extracted answer, correct, tokens, finished), results.md (the table,
also printed). Re-running into the same folder skips samples already recorded: each batch of samples
is seeded from (seed, benchmark, batch index), so a resumed run gives the same numbers as one run.

Simplifications versus lighteval: one answer-extraction implementation (math-verify) for every math
benchmark; the interval is a normal approximation.
"""
from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import torch

import data as D
import lora as L
import model as M


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


def grade_sample(benchmark: str, completion: str, gold: str):
    if benchmark == "gpqa_diamond":
        letter = D.extract_letter(completion)
        return letter, float(letter == gold)
    return D.extract_answer(completion, "eval"), D.grade(completion, gold, mode="eval")


def generate_hf(net, tok, prompts: list[str], args, seed: int, eos_ids):
    """-> list of (completion text, tokens, finished) for the prompt texts, one batch."""
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    T = max(len(e) for e in enc)
    ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, T - len(e):], mask[i, T - len(e):] = torch.tensor(e), 1
    gen = torch.Generator(device=net.device).manual_seed(seed)
    with L.lora_merged(net):
        out = M.generate(net, ids.to(net.device), mask.to(net.device), max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, eos_ids=eos_ids, pad_id=tok.pad_token_id,
                         generator=gen)
    res = []
    for t, n, f in zip(out.tokens, out.lengths.tolist(), out.finished.tolist()):
        res.append((tok.decode(t[:n].tolist(), skip_special_tokens=True), n, bool(f)))
    return res


class VLLMBackend:
    """The same prompts through vLLM, the adapter as a LoRARequest. Not exercised by the test suite: vLLM
    does not install on the machines this project is tested on."""

    def __init__(self, args, max_rank: int):
        try:
            from vllm import LLM
        except ImportError:
            raise SystemExit("--backend vllm needs vLLM (pip install vllm, GPU only); or use --backend hf") from None
        self.llm = LLM(model=str(M.resolve_model_dir(args.model)), enable_lora=max_rank > 0,
                       max_lora_rank=max(max_rank, 8), seed=args.seed, dtype="bfloat16",
                       max_model_len=args.max_new_tokens + 2048)

    def __call__(self, prompts, args, seed, adapter: str | None, adapter_id: int):
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        sp = SamplingParams(temperature=args.temperature, top_p=args.top_p if args.temperature > 0 else 1.0,
                            max_tokens=args.max_new_tokens, seed=seed)
        req = LoRARequest(f"adapter{adapter_id}", adapter_id, adapter) if adapter else None
        outs = self.llm.generate(prompts, sp, lora_request=req, use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outs]


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
    if args.k and max(args.k) > args.n:
        raise SystemExit(f"--n {args.n} is smaller than the largest k in --k ({max(args.k)}): pass@k needs n >= k")
    for a in args.adapter:
        if a != "base" and not Path(a).is_dir():
            raise SystemExit(f"--adapter {a}: no such folder")


def evaluate(args) -> dict:
    check_args(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = M.pick_device(args.device)
    dtype = M.pick_dtype(args.dtype, device)
    sets, stats = load_sets(args)
    tok = M.load_tokenizer(args.tokenizer or args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net = M.load_model(args.model, device, dtype, seed=args.seed)
    eos_ids = M.eos_token_ids(tok, args.model, net.cfg)
    adapters = args.adapter or ["base"]
    for a in adapters:                      # every adapter must fit before any generation starts
        if a != "base":
            try:
                L.load_adapter(net, a)
            except ValueError as e:
                raise SystemExit(f"--adapter {a}: {e}") from None
            L.unload_lora(net)
    system_prompt = D.SYSTEM_PROMPTS.get(args.system_prompt, args.system_prompt)
    backend = None
    if args.backend == "vllm":
        ranks = [json.loads((Path(a) / "adapter_config.json").read_text())["r"] for a in adapters if a != "base"]
        backend = VLLMBackend(args, max(ranks, default=0))

    samples_path = out_dir / "samples.jsonl"
    done = {}
    if samples_path.exists():                # resume: keep what a previous run recorded
        for line in open(samples_path):
            if line.strip():
                r = json.loads(line)
                done[(r["adapter"], r["benchmark"], r["index"], r["sample"])] = r
    from tqdm import tqdm
    total = len(adapters) * sum(len(v) for v in sets.values()) * args.n
    bar = tqdm(total=total, initial=len(done), desc="eval", dynamic_ncols=True)
    results = {}
    with open(samples_path, "a") as fout:
        for ai, adapter in enumerate(adapters):
            if adapter != "base" and backend is None:
                L.load_adapter(net, adapter)
            results[adapter] = {}
            for bench, examples in sets.items():
                template = args.template if args.template != "auto" else ("gpqa" if bench == "gpqa_diamond" else "math")
                prompts = [D.format_prompt(tok, D.apply_template(template, e.question), system_prompt) for e in examples]
                jobs = [(i, j) for i in range(len(examples)) for j in range(args.n)]   # fixed order and batches
                for b in range(0, len(jobs), args.batch_size):
                    batch = jobs[b:b + args.batch_size]
                    if all((adapter, bench, examples[i].index, j) in done for i, j in batch):
                        continue
                    seed = zlib.crc32(f"{args.seed}/{bench}/{b}".encode())
                    texts = [prompts[i] for i, _ in batch]
                    if backend is not None:
                        gens = backend(texts, args, seed, None if adapter == "base" else adapter, ai + 1)
                    else:
                        gens = generate_hf(net, tok, texts, args, seed, eos_ids)
                    for (i, j), (text, ntok, finished) in zip(batch, gens):
                        key = (adapter, bench, examples[i].index, j)
                        if key in done:
                            continue
                        ex = examples[i]
                        extracted, correct = grade_sample(bench, text, ex.answer)
                        row = {"adapter": adapter, "benchmark": bench, "index": ex.index, "sample": j,
                               "question": ex.question, "prompt": prompts[i], "gold": ex.answer, "completion": text,
                               "extracted": extracted, "correct": correct, "tokens": ntok, "finished": finished}
                        done[key] = row
                        fout.write(json.dumps(row) + "\n")
                        bar.update(1)
                    fout.flush()
                rows = [done[(adapter, bench, e.index, j)] for e in examples for j in range(args.n)]
                results[adapter][bench] = summarize(rows, args.n, args.k)
            if adapter != "base" and backend is None:
                L.unload_lora(net)
    bar.close()
    report = {"results": results, "data": stats, "args": {k: v for k, v in vars(args).items()}}
    M.atomic_write(out_dir / "results.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    table = markdown_table(results, args.k)
    M.atomic_write(out_dir / "results.md", lambda p: Path(p).write_text(table + "\n"))
    print(table)
    return results


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = M.add_run_args(p, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "out/eval")
    g.add_argument("--adapter", type=M.csv_list(), default=[],
                   help="comma-separated adapter folders (a sweep: one row each); 'base' = no adapter")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder when --model has none")
    g = p.add_argument_group("data")
    g.add_argument("--benchmarks", type=M.csv_list(), default=[], help=f"comma-separated from {', '.join(D.BENCHMARKS)}")
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
    g.add_argument("--k", type=M.csv_list(int), default=[], help="also report pass@k for these k (<= n)")
    g.add_argument("--temperature", type=float, default=0.6, help="(%(default)s; 0 = greedy)")
    g.add_argument("--top_p", type=float, default=0.95, help="(%(default)s)")
    g.add_argument("--max_new_tokens", type=int, default=32768, help="(%(default)s)")
    g.add_argument("--batch_size", type=int, default=16, help="sequences generated together (%(default)s)")
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="built-in sampler or vLLM")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return evaluate(args)


if __name__ == "__main__":
    main()
