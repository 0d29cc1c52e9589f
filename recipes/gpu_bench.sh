#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU (a few minutes on an H100/H200, by estimate): the CUDA-only
# tests (tests/test_gpu.py: CUDA-graph decode, bf16 kernels), then every benchmark of bench.py.
# The GPU image has torch, transformers, safetensors, peft, pytest and tqdm. The sae baseline also needs
# eai-sparsify and what its coder imports; download the wheels into .whl/ here and carry .whl:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl eai-sparsify==1.3.3 simple-parsing docstring-parser natsort
# Results: $OUT/gpu_tests.log, $OUT/bench.json, $OUT/bench.log, $OUT/bench.profile.txt (top kernels of each
# benchmark, for the next round of tuning); OUT defaults to out/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
SECONDS=0
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: rc $tests_rc in ${SECONDS}s"
SECONDS=0
python3 bench.py --hf_static --profile --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench: rc $bench_rc in ${SECONDS}s"
exit $(( tests_rc || bench_rc ))
