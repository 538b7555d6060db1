#!/usr/bin/env bash
# Runs N processes of p2p_jax.main on this machine's CPU, coordinated over
# localhost, as the N hosts of a pod would run: the way to try the multi-host
# path (per-host input split, cross-process collectives, Orbax's multi-process
# checkpoints) without a pod.
#
#   launch/local.sh N [FLAGS OF p2p_jax.main ...]
#   launch/local.sh 2 --config=configs/default.py:smoke --workdir=/tmp/p2p_local
#
# Each process sees DEVICES_PER_PROCESS simulated CPU devices, so the global
# batch must split over N x DEVICES_PER_PROCESS devices. The script waits for
# all processes and exits with the first failure's status; when one process
# fails, the others (which would wait for it forever) are stopped.
#
# Environment:
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 2)
#   PORT                 coordinator port on localhost (default: a free one)
#   PYTHON               interpreter (default python3)
#   ENTRY_POINT          what PYTHON runs (default "-m p2p_jax.main"); it must
#                        accept --distributed, --coordinator_address,
#                        --num_processes and --process_id
#   LOG_DIR              if set, process i writes to LOG_DIR/process_i.log
#                        instead of this terminal
#   DRY_RUN=1            print the N commands instead of running them
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift
devices=${DEVICES_PER_PROCESS:-2}
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "DEVICES_PER_PROCESS=$devices is not a positive integer." >&2
  exit 2
}
python=${PYTHON:-python3}
read -r -a entry_point <<< "${ENTRY_POINT:--m p2p_jax.main}"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

port=${PORT:-}
if [[ -z "$port" ]]; then
  # Port 0 asks the kernel for a free port; it stays free for the moment it takes
  # process 0 to bind it.
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0))
print(s.getsockname()[1])')
fi

# Any device count already in XLA_FLAGS (e.g. a test runner's) would fight ours.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<< "${XLA_FLAGS:-}")
xla_flags="$xla_flags --xla_force_host_platform_device_count=$devices"

set_argv() {   # argv: the command of process $1, the user's flags ($2...) passed through
  local id=$1
  shift
  argv=("$python" "${entry_point[@]}" "$@" --distributed "--coordinator_address=localhost:$port"
        "--num_processes=$num_processes" "--process_id=$id")
}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "# $num_processes processes x $devices CPU devices, coordinator localhost:$port"
  for ((i = 0; i < num_processes; i++)); do
    set_argv "$i" "$@"
    command=$(printf ' %q' "${argv[@]}")
    echo "JAX_PLATFORMS=cpu XLA_FLAGS='${xla_flags# }'$command"
  done
  exit 0
fi

pids=()
stop_all() {   # SIGTERM: a process saves a checkpoint and exits; 10 s later, SIGKILL
  local pid tenths alive
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((tenths = 0; tenths < 100; tenths++)); do
    alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
  wait || true
}
trap 'stop_all; exit 130' INT TERM

[[ -n "${LOG_DIR:-}" ]] && mkdir -p "$LOG_DIR"
for ((i = 0; i < num_processes; i++)); do
  set_argv "$i" "$@"
  if [[ -n "${LOG_DIR:-}" ]]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" \
      "${argv[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" \
      "${argv[@]}" &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`, which older bash (macOS) lacks.
running=("${!pids[@]}")
while ((${#running[@]})); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    status=0
    wait "${pids[i]}" || status=$?
    if ((status != 0)); then
      echo "launch/local.sh: process $i exited with status $status; stopping the others." >&2
      stop_all   # they would wait for it forever
      exit "$status"
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]})) && sleep 0.2
done
exit 0
