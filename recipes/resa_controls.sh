#!/usr/bin/env bash
# Resa's controlled experiment (recipes/resa_controls.py): every SAE and SAE-Tuning arm, their evaluation and the
# verdict table. TINA_ADAPTER=path/to/tina_checkpoint bash recipes/resa_controls.sh [--dry_run] [--protocol papers]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python recipes/resa_controls.py "$@"
