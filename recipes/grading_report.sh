#!/usr/bin/env bash
# How many grades the math-verify version and the scorer change, on the local eval sets (recipes/grading_report.py):
# once with the pinned math-verify (requirements.txt), once in a venv with 0.5.2 (what Tina and Resa pinned), then
# the comparison table. CPU only, a few minutes (most of it the venv).
#   bash recipes/grading_report.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/eval}
OUT=out/grading
mkdir -p "$OUT"
if [ ! -x "$OUT/venv_mv052/bin/python" ]; then
  python -m venv "$OUT/venv_mv052"
  "$OUT/venv_mv052/bin/pip" install --quiet torch==2.13.0 math-verify==0.5.2 tqdm safetensors
fi
python recipes/grading_report.py --data_dir "$DATA" --out "$OUT/mv_pinned.json"
"$OUT/venv_mv052/bin/python" recipes/grading_report.py --data_dir "$DATA" --out "$OUT/mv_0.5.2.json"
python recipes/grading_report.py --compare "$OUT/mv_0.5.2.json" "$OUT/mv_pinned.json" | tee "$OUT/report.md"
