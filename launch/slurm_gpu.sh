#!/usr/bin/env bash
#SBATCH --job-name=ediffi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Train on a SLURM GPU cluster: `srun` starts one ediffi-train process per node, each driving all of its node's GPUs,
# with --config.distributed.initialize=True. `jax.distributed.initialize()` reads the coordinator (the first node of
# SLURM_STEP_NODELIST), the process count (SLURM_NTASKS) and this process's id (SLURM_PROCID) from SLURM's
# environment. JAX would also restrict each process to GPU SLURM_LOCALID (one process per GPU, its default): with one
# process per node we export JAX_LOCAL_DEVICE_IDS=0,...,G-1 so that every process keeps its node's G GPUs.
#
#   sbatch launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]            from the repo root (its .venv is used)
#   sbatch --nodes=4 --gpus-per-node=4 --partition=p launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]
#   launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]                   outside a job: submits itself with sbatch
#
# 300 s before the time limit SLURM sends SIGTERM to the training processes: they save a checkpoint and exit.
# Submitting the same command again resumes from it; a preempted job is requeued and resumes by itself.
#
# Environment:
#   DRY_RUN=1            print the commands instead of running them
#   SBATCH_FLAGS         extra sbatch flags when the script submits itself, e.g. "--nodes=4 --account=a"
#                        (sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT, ... work as usual)
#   PYTHON               default: the repo's .venv/bin/python
#   EDIFFI_REPO          the repo checkout (default: the submit directory); set by the self-submission
#   LOG_DIR              one log per node, LOG_DIR/train-JOBID-NODE.log (default: logs)
#   JAX_LOCAL_DEVICE_IDS default: 0,...,G-1 with G the GPUs per node
set -euo pipefail

usage() {
  echo "usage: [sbatch [SBATCH_FLAGS]] $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage

q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local out="" a
    for a in "$@"; do out+="${out:+ }$(q "$a")"; done
    printf '%s\n' "$out"
  else
    "$@"
  fi
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Not in a job: submit this script, remembering where the checkout is (sbatch runs a copy from its spool dir).
  read -r -a SB_FLAGS <<<"${SBATCH_FLAGS:-}"
  HERE="$(cd "$(dirname "$0")/.." && pwd)"
  run env "EDIFFI_REPO=$HERE" sbatch ${SB_FLAGS[@]+"${SB_FLAGS[@]}"} "$HERE/launch/slurm_gpu.sh" "$@"
  exit 0
fi

CONFIG="$1" WORKDIR="$2"
shift 2
REPO="${EDIFFI_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
LOG_DIR="${LOG_DIR:-logs}"
GPUS="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
GPUS="${GPUS##*:}"  # SLURM_GPUS_PER_NODE may read "a100:8"
if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
  if [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 "$((GPUS - 1))")"
  else
    echo "$0: cannot tell the GPUs per node (SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE unset); set JAX_LOCAL_DEVICE_IDS" >&2
    exit 2
  fi
fi
echo "job ${SLURM_JOB_ID}: ${SLURM_JOB_NUM_NODES:-?} nodes × GPUs ${JAX_LOCAL_DEVICE_IDS}, logs ${LOG_DIR}/train-${SLURM_JOB_ID}-<node>.log"
run mkdir -p "$LOG_DIR"
# One task per node, unbound from CPU subsets (its input pipeline wants the node's cores); one rank dying ends all.
run srun --ntasks-per-node=1 --cpu-bind=none --kill-on-bad-exit=1 --open-mode=append --output "$LOG_DIR/train-%j-%t.log" \
  env "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS" \
  "$PY" -m ediffi_jax.cli.train --config "$CONFIG" --workdir "$WORKDIR" --config.distributed.initialize=True "$@"
