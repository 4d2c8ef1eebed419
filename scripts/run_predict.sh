#!/usr/bin/env bash
# Run greedy prediction from a predict YAML on as many local ranks as its parallel_config needs
# (data_parallel * model_parallel * pipeline_stage with use_parallel: True, else 1), through
# scripts/msrun_launcher.sh.
#   scripts/run_predict.sh YAML [--prompt-ids 0,17,234] [--max-new-tokens 20]
# Logs go to output/msrun_log (rank 0's result: worker_0.log, also printed at the end).
# Set MASTER_PORT to run two jobs side by side.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: $0 PREDICT_YAML [--prompt-ids IDS] [--max-new-tokens N]" >&2
  exit 2
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
YAML="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
if [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x "$REPO_ROOT/.venv/bin/python" ]; then PY="$REPO_ROOT/.venv/bin/python"
else PY=python; fi
WORKERS="$(PYTHONPATH="$REPO_ROOT" "$PY" -c '
import sys
from deepseek_ms.yaml_config import load_yaml_config
rc = load_yaml_config(sys.argv[1])
print(rc.parallel.world_size if rc.use_parallel else 1)' "$YAML")"
LOG_DIR="output/msrun_log"
"$REPO_ROOT/scripts/msrun_launcher.sh" "$REPO_ROOT/scripts/predict.py --config $YAML $*" \
  "$WORKERS" "$WORKERS" 127.0.0.1 "${MASTER_PORT:-8118}" 0 "$LOG_DIR" True 300
grep -h "PREDICT" "$LOG_DIR/worker_0.log"
