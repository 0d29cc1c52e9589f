#!/usr/bin/env bash
# Every GPU measurement of bench.py in one run (for a session lent a GPU; about 5 minutes on an H100/H200).
# The GPU image has torch, transformers, safetensors, peft and tqdm. The sae baseline also needs
# eai-sparsify and its imports: download their wheels into .whl/ here (see the device tool's README:
# eai-sparsify simple-parsing docstring-parser natsort einops accelerate), carry .whl, and this script
# installs them. Results: $OUT/bench.json and $OUT/bench.log (OUT defaults to out/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python bench.py --hf_static --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
