#!/usr/bin/env bash
# Train an eDiff-I ensemble of expert denoisers node by node (root on all σ, then each child from its parent on
# its σ interval), resuming whatever already finished, and assemble ROOT_DIR/ensemble.
#
#   launch/train_expert_tree.sh CONFIG ROOT_DIR [LAYOUT] [CHILD_STEPS] [--config.x=y ...]
#   launch/train_expert_tree.sh configs/tiny.py /runs/experts 3-paper 2000
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG ROOT_DIR [LAYOUT] [CHILD_STEPS] [--config.x=y ...]" >&2
  exit 2
fi
CONFIG=$1 ROOT_DIR=$2 LAYOUT=${3:-3-paper} CHILD_STEPS=${4:-}
shift $(( $# < 4 ? $# : 4 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
args=(--config "$CONFIG" --root_dir "$ROOT_DIR" "--config.expert.layout=$LAYOUT")
[[ -n "$CHILD_STEPS" ]] && args+=(--child_steps "$CHILD_STEPS")
exec "$PY" -m ediffi_jax.cli.expert_tree "${args[@]}" "$@"
