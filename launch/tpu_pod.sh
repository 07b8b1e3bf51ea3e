#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: ship this working tree to every worker, install jax[tpu] + ediffi_jax in a venv
# there, and start `ediffi-train --config.distributed.initialize=True` on all workers at once. JAX reads the pod's
# topology (coordinator, process count, process id) from the TPU VM metadata, so no coordinator flags are needed.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]         setup, then train
#   launch/tpu_pod.sh setup TPU_NAME ZONE                                      ship the tree + install (re-run after edits)
#   launch/tpu_pod.sh train TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]   start or resume the run on every worker
#   launch/tpu_pod.sh expert-tree TPU_NAME ZONE CONFIG ROOT_DIR [--config.x=y ...]   the same with ediffi-expert-tree
#   launch/tpu_pod.sh logs TPU_NAME ZONE [WORKER]                              follow one worker's log (default 0)
#   launch/tpu_pod.sh stop TPU_NAME ZONE                                       SIGTERM the run: checkpoint, then exit
#
# How the code gets there: `setup` packs the files git sees in this checkout (tracked + untracked, not ignored: no
# .venv, caches or workdirs; uncommitted edits included), copies the tarball to every worker with
# `gcloud compute tpus tpu-vm scp --worker=all`, unpacks it into ~/$REMOTE_DIR (keeping its .venv and logs) and
# installs with uv: a Python $REMOTE_PYTHON venv (uv fetches that Python if the image lacks it), then
# `jax[tpu]==$JAX_VERSION` and `-e .`. The run starts detached (nohup + setsid: a dropped ssh does not kill it), logs
# to ~/$REMOTE_DIR/logs/train-$(hostname).log on each worker, and its pid goes to logs/train.pid for `stop`.
#
# Environment:
#   DRY_RUN=1          print the commands instead of running them
#   FOREGROUND=1       stream every worker's output through ssh instead of detaching (Ctrl-C stops watching only
#                      with detached runs; here it ends the ssh sessions)
#   JAX_VERSION        default: the jax== pin in setup.py
#   REMOTE_DIR         default ediffi_jax (relative to the worker's home)
#   REMOTE_PYTHON      default 3.11
#   PIP_EXTRA_ARGS     extra words for `uv pip install`, e.g. "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
#   FORWARD_ENV        names of local environment variables to set on the workers, e.g. "LIBTPU_INIT_ARGS XLA_FLAGS"
#   GCLOUD_FLAGS       extra gcloud flags, e.g. "--project my-proj --internal-ip"
# Internal (set by launch/multislice.sh): EDIFFI_TPU_API=queued-resources targets every node of a queued resource;
# EDIFFI_LAUNCHER names the script to suggest in hints.
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
       $0 {train|expert-tree} TPU_NAME ZONE CONFIG WORKDIR|ROOT_DIR [--config.x=y ...]
       $0 {setup|stop} TPU_NAME ZONE
       $0 logs TPU_NAME ZONE [WORKER]
EOF
  exit 2
}

case "${1:-}" in
  setup | train | expert-tree | logs | stop) CMD="$1"; shift ;;
  *) CMD=all ;;
esac
API="${EDIFFI_TPU_API:-tpu-vm}"
case "$CMD" in
  setup | stop) [[ $# -eq 2 ]] || usage ;;
  logs) [[ $# -ge 2 && $# -le $([[ $API == queued-resources ]] && echo 4 || echo 3) ]] || usage ;;
  *) [[ $# -ge 4 ]] || usage ;;
esac
TPU_NAME="$1" ZONE="$2"
shift 2

HERE="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-ediffi_jax}"
REMOTE_PYTHON="${REMOTE_PYTHON:-3.11}"
JAX_VERSION="${JAX_VERSION:-$(sed -n 's/.*"jax==\([^"]*\)".*/\1/p' "$HERE/setup.py")}"
REMOTE_TARBALL=ediffi_jax.tar.gz
MARK=.ediffi-launch
read -r -a GFLAGS <<<"${GCLOUD_FLAGS:-}"
read -r -a PIP_EXTRA <<<"${PIP_EXTRA_ARGS:-}"
read -r -a FORWARD <<<"${FORWARD_ENV:-}"

# q WORD: WORD quoted for a POSIX shell (left bare when it holds only safe characters).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# qargs WORD...: the words quoted and joined by spaces, one shell command line.
qargs() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "$(qargs "$@")"
  else
    "$@"
  fi
}

# gcloud targets: every worker (of every node, for a queued resource), or one of them.
if [[ $API == queued-resources ]]; then
  GROUP=(gcloud compute tpus queued-resources)
  ALL=(--node=all --worker=all)
else
  GROUP=(gcloud compute tpus tpu-vm)
  ALL=(--worker=all)
fi
ssh_cmd() {  # ssh_cmd TARGET_FLAGS... -- COMMAND
  local flags=()
  while [[ $1 != -- ]]; do flags+=("$1"); shift; done
  run "${GROUP[@]}" ssh "$TPU_NAME" --zone "$ZONE" "${flags[@]}" ${GFLAGS[@]+"${GFLAGS[@]}"} --command "$2"
}

setup() {
  git -C "$HERE" rev-parse --git-dir >/dev/null 2>&1 || {
    echo "$0 setup: $HERE is not a git checkout; setup ships the files git sees there" >&2
    exit 1
  }
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/ediffi_jax.XXXXXX"
    echo "git -C $(q "$HERE") ls-files -z -co --exclude-standard | tar -C $(q "$HERE") --null -T - -czf $(q "$TARBALL")"
  else
    TARBALL="$(mktemp "${TMPDIR:-/tmp}/ediffi_jax.XXXXXX")"
    trap 'rm -f "$TARBALL"' EXIT
    git -C "$HERE" ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
      if [[ -e "$HERE/$f" ]]; then printf '%s\0' "$f"; fi  # skip files deleted from the working tree
    done | tar -C "$HERE" --null -T - -czf "$TARBALL"
    echo "setup: $(du -h "$TARBALL" | cut -f1) of $HERE → $TPU_NAME:~/$REMOTE_DIR on every worker"
  fi
  run "${GROUP[@]}" scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --zone "$ZONE" "${ALL[@]}" ${GFLAGS[@]+"${GFLAGS[@]}"}
  local d uv_install
  d="$(q "$REMOTE_DIR")"  # d, uv_install, prog: already quoted for the remote shell
  uv_install="$(qargs uv pip install -q --python .venv/bin/python "jax[tpu]==$JAX_VERSION" -e . \
    ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"})"
  # The old tree is replaced (its .venv and logs kept), but only in a directory an earlier setup made ($MARK).
  ssh_cmd "${ALL[@]}" -- "set -euo pipefail;\
 if [ -e $d ] && [ ! -e $d/$MARK ]; then echo \"\$(hostname): REMOTE_DIR exists but no setup made it; pick another REMOTE_DIR\" >&2; exit 1; fi;\
 mkdir -p $d; find $d -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +; touch $d/$MARK;\
 tar -xzf $REMOTE_TARBALL -C $d; rm -f $REMOTE_TARBALL; cd $d; export PATH=\"\$HOME/.local/bin:\$PATH\";\
 command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh;\
 [ -x .venv/bin/python ] || uv venv -q --python $(q "$REMOTE_PYTHON") .venv;\
 $uv_install;\
 echo \"\$(hostname): \$(.venv/bin/python -c 'import jax, ediffi_jax; print(\"jax\", jax.__version__)') in \$PWD\""
}

# launch MODULE DIR_FLAG CONFIG DIR [--config.x=y ...]: the entry point on every worker, multi-host.
launch() {
  local module="$1" dir_flag="$2" config="$3" dir="$4"
  shift 4
  config="${config#"$HERE"/}"  # a config inside this checkout, named as the workers see it (relative to REMOTE_DIR)
  local fwd=() name
  for name in ${FORWARD[@]+"${FORWARD[@]}"}; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "FORWARD_ENV: bad name '$name'" >&2; exit 2; }
    if [[ -n ${!name+x} ]]; then fwd+=("$name=${!name}"); fi
  done
  local prog d log start
  prog="$(qargs ${fwd[@]+env "${fwd[@]}"} .venv/bin/python -m "$module" --config "$config" "$dir_flag" "$dir" \
    --config.distributed.initialize=True "$@")"
  d="$(q "$REMOTE_DIR")"
  log="logs/train-\$(hostname).log"
  if [[ ${FOREGROUND:-0} == 1 ]]; then
    start="$prog 2>&1 | tee -a $log"
  else
    start="nohup setsid $prog >>$log 2>&1 </dev/null & echo \$! >logs/train.pid;\
 echo \"\$(hostname): started pid \$!, log \$PWD/$log\""
  fi
  local target=("${ALL[@]}")
  # Foreground runs block until every process has joined jax.distributed: no worker may wait for a free ssh slot.
  if [[ $API == queued-resources && ${FOREGROUND:-0} == 1 ]]; then target+=(--batch-size=all); fi
  ssh_cmd "${target[@]}" -- "set -euo pipefail; cd $d; mkdir -p logs;\
 if [ -f logs/train.pid ] && kill -0 \"\$(cat logs/train.pid)\" 2>/dev/null; then\
 echo \"\$(hostname): a run is going (pid \$(cat logs/train.pid)); stop it first\" >&2; exit 1; fi;\
 echo \"== \$(date -u +%FT%TZ)\" $(qargs "$module" "$dir") >>$log; $start"
  if [[ ${FOREGROUND:-0} != 1 && ${DRY_RUN:-0} != 1 ]]; then
    local me="${EDIFFI_LAUNCHER:-$0}"
    echo "follow: $me logs $TPU_NAME $ZONE    stop (checkpoints first): $me stop $TPU_NAME $ZONE"
  fi
}

case "$CMD" in
  setup) setup ;;
  train) launch ediffi_jax.cli.train --workdir "$@" ;;
  expert-tree) launch ediffi_jax.cli.expert_tree --root_dir "$@" ;;
  all) setup; launch ediffi_jax.cli.train --workdir "$@" ;;
  logs)
    if [[ $API == queued-resources ]]; then one=(--node="${1:-0}" --worker="${2:-0}"); else one=(--worker="${1:-0}"); fi
    ssh_cmd "${one[@]}" -- "tail -n 200 -F $(q "$REMOTE_DIR")/logs/train-\$(hostname).log"
    ;;
  stop)
    ssh_cmd "${ALL[@]}" -- "cd $(q "$REMOTE_DIR") && if [ -f logs/train.pid ] && kill -0 \"\$(cat logs/train.pid)\" 2>/dev/null;\
 then kill -TERM \"\$(cat logs/train.pid)\" && echo \"\$(hostname): SIGTERM sent (checkpoint, then exit)\";\
 else echo \"\$(hostname): no run going\"; fi"
    ;;
esac
