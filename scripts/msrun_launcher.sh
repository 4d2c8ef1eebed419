#!/usr/bin/env bash
# Launch a deepseek-ms script on several ranks with MindSpore's msrun.
#
# Same positional arguments, in the same order, as mindformers' scripts/msrun_launcher.sh:
#   msrun_launcher.sh "SCRIPT [ARGS...]" [WORKER_NUM] [LOCAL_WORKER] [MASTER_ADDR] [MASTER_PORT]
#                     [NODE_RANK] [LOG_DIR] [JOIN] [CLUSTER_TIMEOUT]
# Defaults: 8 workers, all local, 127.0.0.1:8118, node 0, ./output/msrun_log, join True, 7200 s.
# With only the command and WORKER_NUM, every worker is local (single node).
#
# msrun starts each worker as `python` from PATH, so the project's Python must come first:
# the active virtualenv ($VIRTUAL_ENV), else the repository's .venv, else whatever `python` is.
#
# Examples
#   scripts/msrun_launcher.sh "scripts/predict.py --config yaml/predict_deepseek_v3_tiny_tp2.yaml" 2
#   scripts/msrun_launcher.sh "deepseek-ms bench comm" 2
#   # two nodes with 8 ranks each; run on node 0 and node 1 with NODE_RANK 0 and 1:
#   scripts/msrun_launcher.sh "scripts/predict.py --config my.yaml" 16 8 10.0.0.1 8118 0 output/msrun_log False 300
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 1
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="$1"
WORKER_NUM="${2:-8}"
if [ $# -le 2 ]; then
  LOCAL_WORKER="$WORKER_NUM"
else
  LOCAL_WORKER="${3:-8}"
fi
MASTER_ADDR="${4:-127.0.0.1}"
MASTER_PORT="${5:-8118}"
NODE_RANK="${6:-0}"
LOG_DIR="${7:-output/msrun_log}"
JOIN="${8:-True}"
CLUSTER_TIMEOUT="${9:-7200}"

for n in "$WORKER_NUM" "$LOCAL_WORKER" "$MASTER_PORT" "$NODE_RANK"; do
  case "$n" in ''|*[!0-9]*) echo "msrun_launcher.sh: '$n' is not a non-negative integer" >&2; exit 2;; esac
done
if [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  echo "msrun_launcher.sh: LOCAL_WORKER ($LOCAL_WORKER) exceeds WORKER_NUM ($WORKER_NUM)" >&2
  exit 2
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
  export PATH="$VIRTUAL_ENV/bin:$PATH"
elif [ -x "$REPO_ROOT/.venv/bin/python" ]; then
  export PATH="$REPO_ROOT/.venv/bin:$PATH"
fi
command -v msrun >/dev/null || { echo "msrun_launcher.sh: msrun not found (is mindspore installed in $(command -v python)?)" >&2; exit 2; }
# the package itself, also when it is not installed into the environment
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# msrun runs `python SCRIPT`: the `deepseek-ms` command becomes a script path
case "$COMMAND" in
  deepseek-ms|deepseek-ms\ *)
    COMMAND="$REPO_ROOT/scripts/cli.py${COMMAND#deepseek-ms}";;
esac

mkdir -p "$LOG_DIR"
# shellcheck disable=SC2086  # COMMAND is a script and its arguments, split on purpose
exec msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN" \
  --cluster_time_out="$CLUSTER_TIMEOUT" $COMMAND
