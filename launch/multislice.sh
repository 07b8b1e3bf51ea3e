#!/usr/bin/env bash
# Train on N TPU slices joined over the data-center network (Multislice): one queued resource created with
# `--node-count N_SLICES` (see launch/README.md). Every worker of every slice runs the same command, through
# `gcloud compute tpus queued-resources ssh/scp --node=all --worker=all`. The queued resource writes the MEGASCALE_*
# variables (coordinator, number of slices, slice id) into each worker's TPU metadata, where
# `jax.distributed.initialize()` reads them: ediffi-train needs only --config.distributed.initialize=True, and
# --config.mesh.dcn_data=N_SLICES (added here) lays the slices along the data axis, so that only the gradient
# all-reduce crosses DCN while fsdp/tensor stay on each slice's ICI. A later --config.mesh.dcn_data wins.
#
#   launch/multislice.sh QR_NAME ZONE N_SLICES CONFIG WORKDIR [--config.x=y ...]         setup, then train
#   launch/multislice.sh setup QR_NAME ZONE
#   launch/multislice.sh train QR_NAME ZONE N_SLICES CONFIG WORKDIR [--config.x=y ...]
#   launch/multislice.sh expert-tree QR_NAME ZONE N_SLICES CONFIG ROOT_DIR [--config.x=y ...]
#   launch/multislice.sh logs QR_NAME ZONE [NODE [WORKER]]
#   launch/multislice.sh stop QR_NAME ZONE
#
# Everything else (how the tree is shipped and installed, detached runs, per-worker logs, DRY_RUN=1, FOREGROUND=1
# and the other environment variables) is launch/tpu_pod.sh's, which this script runs.
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $0 QR_NAME ZONE N_SLICES CONFIG WORKDIR [--config.x=y ...]
       $0 {train|expert-tree} QR_NAME ZONE N_SLICES CONFIG WORKDIR|ROOT_DIR [--config.x=y ...]
       $0 {setup|stop} QR_NAME ZONE
       $0 logs QR_NAME ZONE [NODE [WORKER]]
EOF
  exit 2
}

CMD=()
case "${1:-}" in
  setup | train | expert-tree | logs | stop) CMD=("$1"); shift ;;
esac
case "${CMD[0]:-all}" in
  setup | stop) [[ $# -eq 2 ]] || usage; ARGS=("$@") ;;
  logs) [[ $# -ge 2 && $# -le 4 ]] || usage; ARGS=("$@") ;;
  *)
    [[ $# -ge 5 ]] || usage
    [[ $3 =~ ^[1-9][0-9]*$ ]] || { echo "$0: N_SLICES must be a positive integer, got '$3'" >&2; usage; }
    ARGS=("$1" "$2" "$4" "$5" "--config.mesh.dcn_data=$3" "${@:6}")
    ;;
esac
EDIFFI_TPU_API=queued-resources EDIFFI_LAUNCHER="$0" exec "$(dirname "$0")/tpu_pod.sh" ${CMD[@]+"${CMD[@]}"} "${ARGS[@]}"
