#!/usr/bin/env bash
# N ediffi-train processes on this machine, each with DEVICES_PER_PROCESS fake CPU devices, joined through
# jax.distributed on localhost: a multi-host run without a pod (the tests use it).
#
#   launch/local_multiprocess.sh N DEVICES_PER_PROCESS -- <ediffi-train args>
#   launch/local_multiprocess.sh 2 4 -- --config configs/tiny.py --workdir /tmp/mp --config.train.num_steps=20
#
# PORT: the coordinator's port (default: a free one). PYTHON: the interpreter (default: the checkout's .venv).
# LOG_DIR: when set, process i writes LOG_DIR/process_i.log; otherwise all output goes to this terminal.
# Waits for every process; exits with the first non-zero status (the other processes are stopped then).
set -euo pipefail
usage() { echo "usage: $0 N DEVICES_PER_PROCESS -- <ediffi-train args>" >&2; exit 2; }
[[ $# -ge 3 && $3 == "--" ]] || usage
N=$1 DEVICES=$2
shift 3
[[ $N =~ ^[1-9][0-9]*$ && $DEVICES =~ ^[1-9][0-9]*$ ]] || usage
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
PORT=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

# Fake devices, and a CPU thread pool larger than the device count (see ENVIRONMENT.md, "the 2-core deadlock").
flags=()
for f in ${XLA_FLAGS:-}; do [[ $f == --xla_force_host_platform_device_count=* ]] || flags+=("$f"); done
export XLA_FLAGS="${flags[*]:+${flags[*]} }--xla_force_host_platform_device_count=$DEVICES"
export NPROC=16 JAX_PLATFORMS=cpu
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < N; i++)); do
  cmd=("$PY" -m ediffi_jax.cli.train "$@" --config.distributed.initialize=True
       "--config.distributed.coordinator_address=localhost:$PORT" "--config.distributed.num_processes=$N"
       "--config.distributed.process_id=$i")
  if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
done

status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  # wait -n -p (bash >= 5.1) names the process that ended; on failure stop the rest, which would hang.
  rc=0
  wait -n -p done_pid "${remaining[@]}" || rc=$?
  next=()
  for p in "${remaining[@]}"; do [[ $p == "$done_pid" ]] || next+=("$p"); done
  remaining=("${next[@]+"${next[@]}"}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "$0: process with pid $done_pid exited with status $rc; stopping the others" >&2
    for p in "${remaining[@]+"${remaining[@]}"}"; do kill "$p" 2>/dev/null || true; done
  fi
done
exit "$status"
