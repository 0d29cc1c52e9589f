#!/usr/bin/env bash
# How many grades the math-verify version and the scorer change, on the local eval sets (recipes/grading_report.py):
# once with the pinned math-verify (requirements.txt), once in a venv with 0.5.2 (what Tina and Resa pinned), then
# the comparison table. CPU only, a few minutes (most of it the venvs).
#   bash recipes/grading_report.sh [DATA_DIR]
# With LIGHTEVAL=1 it also grades the same pairs with lighteval itself at the papers' commit (ed084813, with its
# [math] extra's latex2sympy2_extended 1.0.6) in a third venv, and prints how often `--scorer lighteval` agrees
# (recipes/lighteval_reference.py); LIGHTEVAL_SRC=path/to/a/lighteval/checkout instead of the git URL.
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
if [ "${LIGHTEVAL:-0}" = 1 ]; then
  LE="$OUT/venv_lighteval"
  if [ ! -x "$LE/bin/python" ]; then    # (its own pins, numpy<2 and spacy 3.7.2, are relaxed: only its grading runs)
    python -m venv --system-site-packages "$LE"
    "$LE/bin/pip" install --quiet --no-deps "${LIGHTEVAL_SRC:-git+https://github.com/huggingface/lighteval.git@ed084813}"
    "$LE/bin/pip" install --quiet aenum==3.1.15 termcolor==2.3.0 nltk==3.9.1 sacrebleu rouge_score==0.1.2 pycountry \
      latex2sympy2_extended==1.0.6 colorlog pytablewriter spacy scikit-learn
  fi
  for mv in pinned 0.5.2; do
    echo "--scorer lighteval with math-verify $mv against lighteval itself:" | tee -a "$OUT/report.md"
    "$LE/bin/python" recipes/lighteval_reference.py --grades "$OUT/mv_$mv.json" --out "$OUT/lighteval_vs_mv_$mv.json" |
      tee -a "$OUT/report.md"
  done
fi
