#!/usr/bin/env bash
# N training processes on this machine (CPU, gloo collectives over 127.0.0.1) — a multi-host rehearsal.
#
#   launch/local_multiprocess.sh [--dry-run] [--num_processes 2] [--devices_per_process 2] [--port 12355] \
#       -- --config=configs/emotion_qwen.py:demo --config.workdir=runs/mh [more --config.* flags]
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and
# --config.distributed.local_device_count; process 0's output goes to the terminal, the others' to
# <workdir-or-/tmp>/process_<i>.log.
set -euo pipefail
DRY=0; N=2; DEV=2; PORT=12355
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --num_processes) N="$2"; shift 2 ;;
    --devices_per_process) DEV="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
LOGDIR="${TMPDIR:-/tmp}"
pids=()
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i"
       emoqwen-train "$@" --config.distributed.local_device_count="$DEV")
  if [ "$DRY" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  if [ "$i" -eq 0 ]; then "${cmd[@]}" & else "${cmd[@]}" > "${LOGDIR}/process_${i}.log" 2>&1 & fi
  pids+=($!)
done
[ "$DRY" -eq 1 ] && exit 0
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
