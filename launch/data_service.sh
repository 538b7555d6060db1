#!/usr/bin/env bash
# A tf.data service for a pod: decoding on CPU machines beside the accelerators.
#
#   launch/data_service.sh dispatcher          on this machine: a dispatcher on PORT and a
#                                              worker beside it (runs until stopped)
#   launch/data_service.sh workers HOST...     over ssh, a worker on each HOST for the
#                                              dispatcher at DISPATCHER, in the background
#   launch/data_service.sh stop HOST...        stop the workers started on each HOST
#   launch/data_service.sh flag                the flag that makes training read through it
#
# Then train as usual with that flag, e.g. with launch/tpu_pod.sh:
#   launch/tpu_pod.sh train --config.data.service_address=grpc://DISPATCHER
# Workers read the images by the paths the trainers see: put them on a disk every
# machine mounts at the same path, or in gs://. Use the folder source with JPEG,
# PNG or BMP files (remote workers cannot run the Python that the synthetic
# source and PIL-decoded files need). Each HOST needs this checkout and its
# requirements at CODE_DIR.
#
# Environment (defaults in brackets):
#   PORT [5050]  DISPATCHER [this machine's hostname:PORT]  WORKER_PORT [5051]
#   CODE_DIR [p2p_jax, under the remote home]  PYTHON [python3]  SSH [ssh]
#   DRY_RUN=1: print every command instead of running it
set -euo pipefail

usage() {   # $1: exit status (default 2, a usage error)
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

PORT=${PORT:-5050}
DISPATCHER=${DISPATCHER:-$(hostname):$PORT}
WORKER_PORT=${WORKER_PORT:-5051}
CODE_DIR=${CODE_DIR:-p2p_jax}
PYTHON=${PYTHON:-python3}
SSH=${SSH:-ssh}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case "$command" in
  dispatcher)
    [[ $# -eq 0 ]] || usage
    run "$PYTHON" -m p2p_jax.data_service --port="$PORT" ;;
  workers | stop)
    [[ $# -ge 1 ]] || { echo "$command needs at least one HOST" >&2; usage; }
    for host in "$@"; do
      if [[ "$command" == workers ]]; then
        run "$SSH" "$host" "cd $CODE_DIR && nohup $PYTHON -m p2p_jax.data_service\
 --dispatcher=$DISPATCHER --port=$WORKER_PORT > data_service.log 2>&1 &"
      else
        run "$SSH" "$host" "pkill -f 'p2p_jax.data_service --dispatcher=$DISPATCHER'"
      fi
    done ;;
  flag)
    [[ $# -eq 0 ]] || usage
    echo "--config.data.service_address=grpc://$DISPATCHER" ;;
  -h | --help) usage 0 ;;
  *) echo "unknown command: $command" >&2; usage ;;
esac
