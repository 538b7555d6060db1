#!/usr/bin/env bash
# Creates a Cloud TPU pod slice, installs p2p_jax on every worker and runs it there.
#
#   launch/tpu_pod.sh create             queue the slice (a queued resource)
#   launch/tpu_pod.sh status             the queued resource's state (ACTIVE when ready)
#   launch/tpu_pod.sh setup              copy this checkout (or clone REPO_URL) to every
#                                        worker and install the requirements with jax[tpu]
#   launch/tpu_pod.sh train [FLAGS...]   start training on every worker, in the background
#   launch/tpu_pod.sh eval [FLAGS...]    evaluate the latest checkpoint, on every worker
#   launch/tpu_pod.sh logs [train|eval]  follow a worker's log (WORKER, default 0)
#   launch/tpu_pod.sh stop               SIGTERM the run on every worker: it saves and exits
#   launch/tpu_pod.sh ssh [ARGS...]      ssh into a worker (WORKER, default 0; or --worker=all)
#   launch/tpu_pod.sh delete [ARGS...]   delete the slice and its queued resource
#
# FLAGS are passed to `python -m p2p_jax.main`, e.g. --config.batch_size=64.
# Every worker runs the same command with --distributed: JAX finds the other
# workers itself. The workers share no disk, so WORKDIR must be a gs:// bucket.
#
# Environment (defaults in brackets):
#   TPU_NAME [p2p-jax]  ZONE [us-central2-b]  PROJECT [gcloud's configured project]
#   ACCELERATOR_TYPE [v4-32]: e.g. v5litepod-64 for a v5e-64, v5p-32, v6e-64
#   RUNTIME_VERSION [the JAX image for ACCELERATOR_TYPE: tpu-ubuntu2204-base for v4,
#     v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e]
#   SPOT=1 | RESERVED=1 [neither: on-demand]   QUEUED_RESOURCE [TPU_NAME]
#   REPO_URL [empty: copy this checkout]  REPO_REF [the default branch]
#   CONFIG [configs/edges2shoes.py]  WORKDIR [required by train and eval: gs://BUCKET/...]
#   PYTHON_VERSION [3.11]  JAX_VERSION [0.10.2]  WORKER [0]
#   DRY_RUN=1: print every command instead of running it
set -euo pipefail

usage() {   # $1: exit status (default 2, a usage error)
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

TPU_NAME=${TPU_NAME:-p2p-jax}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
case "$ACCELERATOR_TYPE" in
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$default_runtime}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
CONFIG=${CONFIG:-configs/edges2shoes.py}
WORKDIR=${WORKDIR:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}
WORKER=${WORKER:-0}

# On every worker, relative to the home directory.
code_dir=p2p_jax
venv=p2p_jax_venv
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

fail() {   # usage errors: a message and exit status 2
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

show() {   # prints a command as one could paste it into a shell
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {   # runs a command, or only prints it under DRY_RUN=1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

gcloud_tpu() {   # gcloud compute tpus SUBCOMMAND... with the zone and project
  run gcloud compute tpus "$@" "--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"}
}

on_workers() {   # $1: which workers (all, 0, ...); $2: the shell command they run
  gcloud_tpu tpu-vm ssh "$TPU_NAME" "--worker=$1" "--command=$2"
}

create() {
  [[ "$SPOT" == 1 && "$RESERVED" == 1 ]] && fail "SPOT=1 and RESERVED=1 exclude each other."
  local capacity=()
  [[ "$SPOT" == 1 ]] && capacity=(--spot)
  [[ "$RESERVED" == 1 ]] && capacity=(--reserved)
  gcloud_tpu queued-resources create "$QUEUED_RESOURCE" "--node-id=$TPU_NAME" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} "$@"
}

setup() {
  if [[ -n "$REPO_URL" ]]; then
    local clone="git clone ${REPO_REF:+--branch $(printf %q "$REPO_REF") }"
    clone+="$(printf %q "$REPO_URL") $code_dir"
    on_workers all "if [ -d $code_dir/.git ]; then git -C $code_dir pull --ff-only; else $clone; fi"
  else
    local archive="${TMPDIR:-/tmp}/${TPU_NAME}_p2p_jax.tar.gz"
    run tar -czf "$archive" -C "$root" --exclude=.git --exclude=runs --exclude=.venv \
      --exclude=.pytest_cache --exclude=__pycache__ .
    gcloud_tpu tpu-vm scp "$archive" "$TPU_NAME:p2p_jax.tar.gz" --worker=all
    on_workers all "rm -rf $code_dir && mkdir -p $code_dir && tar -xzf p2p_jax.tar.gz -C $code_dir"
  fi
  # The images' system Python is older than JAX supports: uv provides PYTHON_VERSION.
  on_workers all "set -e; python3 -m pip install --user --quiet uv; \
~/.local/bin/uv venv --allow-existing --python $PYTHON_VERSION $venv; \
~/.local/bin/uv pip install --python $venv/bin/python -r $code_dir/requirements.txt \
'jax[tpu]==$JAX_VERSION'"
}

start() {   # $1: train or eval; then the flags for p2p_jax.main
  local mode=$1
  shift
  [[ -n "$WORKDIR" ]] || fail "$mode needs WORKDIR=gs://BUCKET/PATH (checkpoints, logs, config)."
  [[ "$WORKDIR" == gs://* ]] || fail "WORKDIR=$WORKDIR is not a gs:// path: the workers share \
no disk, and every one of them reads and writes the checkpoints."
  local flags
  flags=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$mode" --distributed "$@")
  # Detached, so that a dropped ssh connection does not end a days-long run.
  on_workers all "cd ~/$code_dir || exit 1; nohup ~/$venv/bin/python -m p2p_jax.main$flags \
> ~/p2p_jax_$mode.log 2>&1 < /dev/null & echo \$! > ~/p2p_jax_$mode.pid; \
echo \"started: ~/p2p_jax_$mode.log\""
}

[[ $# -ge 1 ]] || usage
subcommand=$1
shift
case "$subcommand" in
  create) create "$@" ;;
  status) gcloud_tpu queued-resources describe "$QUEUED_RESOURCE" "$@" ;;
  setup) setup ;;
  train | eval) start "$subcommand" "$@" ;;
  logs)
    mode=${1:-train}
    [[ "$mode" == train || "$mode" == eval ]] || fail "logs takes train or eval, not '$mode'."
    on_workers "$WORKER" "tail -n 200 -F ~/p2p_jax_$mode.log"
    ;;
  stop) on_workers all "kill -TERM \$(cat ~/p2p_jax_train.pid) 2> /dev/null || true" ;;
  ssh) gcloud_tpu tpu-vm ssh "$TPU_NAME" "--worker=$WORKER" "$@" ;;
  delete) gcloud_tpu queued-resources delete "$QUEUED_RESOURCE" --force "$@" ;;
  -h | --help | help) usage 0 ;;
  *)
    echo "launch/tpu_pod.sh: unknown subcommand '$subcommand'." >&2
    usage
    ;;
esac
