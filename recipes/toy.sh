#!/usr/bin/env bash
# The embedded default: the whole Tina -> Resa pipeline on the toy world, on a CPU, with the real stage scripts
# (21 minutes measured on 2 cores). Writes out/toy/results.md, results.json and results.png.
#   bash recipes/toy.sh            the full run
#   bash recipes/toy.sh --quick    tiny sizes: checks that every stage connects (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
python toy/pipeline.py "$@"
