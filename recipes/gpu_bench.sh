#!/usr/bin/env bash
# Every GPU check in one run (about 20 minutes on an H100): the CUDA-only tests, every benchmark of bench.py
# (each with its baseline, top kernels profiled), the toy pipeline on the GPU, each stage script run as a user
# would on random weights of the R1-Distill-Qwen-1.5B shape for a few steps, and the decode step compiled in
# max-autotune mode against the default. A failing or slow part is cut off at its time limit and the rest goes
# on; everything lands in $OUT/gpu_bench.json.
# GPU_BENCH_PARTS=tests,bench (any of tests, bench, toy, grpo_lora, grpo_vllm, train_sae, sae_tune, evaluate,
# autotune)
# runs a subset when device time is short; GPU_BENCH_SECONDS caps the toy's part (it gets what is left).
# Measured in round 4 (H100): tests 140 s, bench 291 s (both compilations included; the Triton attention path
# added since: expect ~190 s and ~340 s), the toy one stage after another > 333 s (now side by side: ~4 min
# expected); autotune not run yet (minutes). With a 15-minute device budget and 10 minutes per call:
#   GPU_BENCH_PARTS=tests,bench OUT=$OUT bash recipes/gpu_bench.sh
#   GPU_BENCH_PARTS=toy GPU_BENCH_SECONDS=330 OUT=$OUT bash recipes/gpu_bench.sh
# and the stages and autotune in a round of their own (GPU_BENCH_PARTS=autotune,grpo_lora,evaluate, ~9 min).
#
# The GPU image has torch, transformers, safetensors, peft, pytest and tqdm. What else the run needs travels
# with it: wheels in .whl/ (sparsify for the sae baseline, math-verify for the rewards and grading) and data in
# .gpudata/ (the stages' train and eval files). Prepare both once, here, then carry .whl and .gpudata:
#   printf '/.whl/\n/.gpudata/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl eai-sparsify==1.3.3 simple-parsing docstring-parser natsort \
#     math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2
#   mkdir -p .gpudata && cp ../shared/data/train/gsm8k_train.jsonl ../shared/data/eval/math500.jsonl .gpudata/
# Results ($OUT defaults to out/gpu): gpu_bench.json (versions, test counts, every benchmark, each stage's
# s/step, tokens/s and peak GiB, the toy table and its seconds), gpu_tests.log, bench.log,
# bench.profile.txt, stages.log (every stage's output, one after another) and logs.tar.gz (run.json and
# metrics of every stage, the toy's results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
DATA=${DATA:-.gpudata}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d)                      # the stages' output folders
if [ ! -d "$DATA" ]; then           # not carried: take the files from ../shared/data when it is beside us
  DATA=$W/data
  mkdir -p "$DATA"
  cp ../shared/data/train/gsm8k_train.jsonl ../shared/data/eval/math500.jsonl "$DATA"/ ||
    echo "no data for the stage runs: carry .gpudata (see the header)"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + ${GPU_BENCH_SECONDS:-1200}))  # the toy pipeline gets what is left of this (600 s at most)
: > "$W/parts.txt"

PARTS=${GPU_BENCH_PARTS:-tests,bench,toy,grpo_lora,grpo_vllm,train_sae,sae_tune,evaluate,autotune}   # a subset when device time is short

part() {   # part NAME LIMIT_SECONDS LOG cmd... : run with a time limit, append its output to LOG, note rc + seconds
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  case ",$PARTS," in *",$name,"*) ;; *) echo "$name: skipped (GPU_BENCH_PARTS)"; return ;; esac
  echo "=== $name: $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "$name $rc $((SECONDS - t0))" >> "$W/parts.txt"
  echo "$name: rc $rc in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/gpu.txt" 2>/dev/null || echo "no nvidia-smi" > "$W/gpu.txt"
python3 -c "import torch, transformers, peft; print(f'torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}')" >> "$W/gpu.txt"
cat "$W/gpu.txt"

# 1. the CUDA-only tests
part tests 260 "$OUT/gpu_tests.log" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
tail -3 "$OUT/gpu_tests.log"

# 2. every benchmark with its baseline in the same run; top kernels of ours
# (TORCH_LOGS: every torch.compile recompilation and its reason goes into bench.log)
TORCH_LOGS=${TORCH_LOGS:-recompiles} part bench 400 "$OUT/bench.log" python3 bench.py --hf_static --profile --out "$OUT/bench.json" "$@"
grep -E "^(decode|decode_long|grpo|lora|sae|sae_tune|grpo_step) " "$OUT/bench.log"

# 3. the toy pipeline on the GPU, with what is left of the time (600 s at most)
left=$((DEADLINE - SECONDS))
left=$(( left > 600 ? 600 : left ))
part toy $(( left > 30 ? left : 30 )) "$OUT/toy.log" python3 toy/pipeline.py --device cuda --out "$W/toy"
grep -v "^===" "$OUT/toy.log" 2>/dev/null | head -40

# 4. each stage as a user runs it: random weights of the real shape, the toy's character tokenizer
R1=${GPU_BENCH_MODEL:-random:r1-distill-qwen-1.5b}     # (a CPU dry run of this script: random:tiny-qwen2,
LAYER=${GPU_BENCH_LAYER:-12}                            #  layer 1, bench args --smoke)
python3 -c "from toy.chars import build_char_tokenizer as b; b('$W/chartok')"
S="$OUT/stages.log"
: > "$S"
part grpo_lora 150 "$S" python3 grpo_lora.py --model $R1 --tokenizer "$W/chartok" --dataset "$DATA/gsm8k_train.jsonl" \
  --prompts_per_step 4 --grad_accum 4 --max_steps 2 --save_every 2 --out_dir "$W/grpo"   # round 1 shape
part train_sae 60 "$S" python3 train_sae.py --model $R1 --tokenizer "$W/chartok" --dataset "$DATA/gsm8k_train.jsonl" \
  --layers $LAYER --max_tokens 1000000 --out_dir "$W/sae"
part sae_tune 60 "$S" python3 sae_tune.py --model $R1 --tokenizer "$W/chartok" --dataset "$DATA/gsm8k_train.jsonl" \
  --sae "$W/sae/layers.$LAYER" --max_steps 20 --save_every 100000 --out_dir "$W/tune"
# GRPO with vLLM's rollouts, where the GPU image has vLLM (pip install vllm; too large to carry): the bf16
# sampler-trainer gap of vLLM against our trainer (grpo_lora above gives our own sampler's)
case ",$PARTS," in *",grpo_vllm,"*) vllm_part=1 ;; *) vllm_part=0 ;; esac
if [ $vllm_part = 1 ] && python3 -c "import vllm" 2>/dev/null; then     # vLLM loads folders: save the random weights
  python3 -c "import torch, model as M; from transformers import AutoTokenizer as T
M.save_model(M.load_model('$R1', 'cpu', torch.bfloat16, seed=0), '$W/r1', tokenizer=T.from_pretrained('$W/chartok'))"
  part grpo_vllm 240 "$S" python3 grpo_lora.py --model "$W/r1" --dataset "$DATA/gsm8k_train.jsonl" \
    --prompts_per_step 4 --grad_accum 4 --max_steps 2 --save_every 2 --rollout vllm --out_dir "$W/grpo_vllm"
else
  echo "grpo_vllm: skipped (vLLM is not installed in this image)"
fi
adapter="$W/tune/final"
[ -d "$adapter" ] || adapter=base                       # evaluation is measured even if SAE-Tuning failed
part evaluate 120 "$S" python3 evaluate.py --model $R1 --tokenizer "$W/chartok" --adapter "$adapter" \
  --data_dir "$DATA" --benchmarks math_500 --limit 32 --n 2 --max_new_tokens 3584 --batch_size 64 \
  --system_prompt none --out_dir "$W/eval"

# 5. the decode step compiled in max-autotune mode against the default, both timed in this part (minutes)
part autotune 420 "$OUT/bench_autotune.log" python3 bench.py --only decode_autotune --out "$OUT/bench_autotune.json" "$@"
grep -E "^decode_autotune " "$OUT/bench_autotune.log" 2>/dev/null

# 6. one JSON with every figure
python3 - "$OUT" "$W" <<'EOF'
import json, re, sys
from pathlib import Path
out, w = Path(sys.argv[1]), Path(sys.argv[2])

def jl(p):
    return [json.loads(x) for x in open(p)] if p.exists() else []

def rj(p):
    return json.loads(p.read_text()) if p.exists() else {}

res = {"gpu": (w / "gpu.txt").read_text().strip().splitlines(),
       "parts": {n: {"rc": int(rc), "seconds": int(s)} for n, rc, s in
                 (l.split() for l in (w / "parts.txt").read_text().splitlines())}}
log = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else ""
m = re.findall(r"(\d+) (passed|failed|skipped|error)", log)
res["tests"] = {k: int(v) for v, k in m}
res["tests"]["failures"] = re.findall(r"^FAILED (\S+)", log, re.M)
res["bench"] = rj(out / "bench.json")
res["bench_autotune"] = rj(out / "bench_autotune.json")
stages = {}
for name, d in (("grpo_lora", "grpo"), ("grpo_vllm", "grpo_vllm")):
    g = jl(w / d / "metrics.jsonl")
    if not g:
        continue
    last = g[-1]
    stages[name] = {"steps": len(g), "s_per_step": last["seconds_rollout"] + last["seconds_reward"] + last["seconds_update"],
                    "rollout_s": last["seconds_rollout"], "reward_s": last["seconds_reward"],
                    "update_s": last["seconds_update"], "tokens_per_s": last["tokens_per_s"],
                    "completion_len_mean": last["completion_len_mean"],
                    # |sampler log-prob - trainer log-prob| over completion tokens, bf16 (mean of steps; max)
                    "sampler_logp_gap_mean": sum(r.get("sampler_logp_gap_mean", 0) for r in g) / len(g),
                    "sampler_logp_gap_max": max(r.get("sampler_logp_gap_max", 0) for r in g),
                    # the importance ratio exp(trainer - sampler) over completion tokens: its extremes over steps
                    "sampler_is_ratio_min": min(r.get("sampler_is_ratio_min", 1) for r in g),
                    "sampler_is_ratio_max": max(r.get("sampler_is_ratio_max", 1) for r in g),
                    "peak_gib": rj(w / d / "run.json").get("peak_gpu_gib"),
                    "wall_s": rj(w / d / "run.json").get("wall_seconds")}
for name, d in (("train_sae", "sae"), ("sae_tune", "tune")):
    rows, run = jl(w / d / "metrics.jsonl"), rj(w / d / "run.json")
    if rows:
        tps = [r.get("tokens_per_s") for r in rows if r.get("tokens_per_s")]
        stages[name] = {"steps": len(rows), "tokens_per_s": tps[-1] if tps else None,
                        "peak_gib": run.get("peak_gpu_gib"), "wall_s": run.get("wall_seconds"), "last": rows[-1]}
ev = rj(w / "eval" / "results.json")
if ev:
    stages["evaluate"] = {"results": ev.get("results"), "wall_s": res["parts"].get("evaluate", {}).get("seconds"),
                          "peak_gib": rj(w / "eval" / "run.json").get("peak_gpu_gib")}
res["stages"] = stages
res["toy"] = rj(w / "toy" / "results.json") or {"unfinished": True}
(out / "gpu_bench.json").write_text(json.dumps(res, indent=2))
print(json.dumps({k: res[k] for k in ("parts", "tests", "stages")}, indent=1)[:6000])
EOF
tar -czf "$OUT/logs.tar.gz" -C "$W" --exclude='*.safetensors' --exclude='resume' . 2>/dev/null
rc=0
while read -r name r s; do [ "$r" = 0 ] || rc=1; done < "$W/parts.txt"
exit $rc
