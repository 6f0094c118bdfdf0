#!/usr/bin/env bash
# N training processes on this machine (CPU, gloo collectives over 127.0.0.1) — a multi-host rehearsal.
#
#   launch/local_multiprocess.sh [--dry-run] [--num_processes 2] [--devices_per_process 4] [--port 12355] \
#       [--log_dir DIR] -- --config=configs/emotion_qwen.py:demo --config.workdir=runs/mh \
#       --config.mesh.fsdp=8 --config.mesh.data=1 [more --config.* flags]
#
# Each process runs `python -m emoqwen_jax.cli.train` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID and --config.distributed.local_device_count. Process i writes DIR/process_<i>.log and its pid
# to DIR/process_<i>.pid (DIR defaults to $TMPDIR or /tmp); process 0 also prints to the terminal.
# SIGTERM/SIGINT to this script is passed to every process (they agree on a step, save it and exit 0).
# The exit status is the first non-zero status of the processes, else 0.
set -euo pipefail
DRY=0; N=2; DEV=2; PORT=12355; LOGDIR="${TMPDIR:-/tmp}"; PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --num_processes) N="$2"; shift 2 ;;
    --devices_per_process) DEV="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --log_dir) LOGDIR="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
[ "$DRY" -eq 1 ] || mkdir -p "$LOGDIR"
pids=()
forward() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap forward TERM INT
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i"
       "$PYTHON" -m emoqwen_jax.cli.train "$@" --config.distributed.local_device_count="$DEV")
  if [ "$DRY" -eq 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  if [ "$i" -eq 0 ]; then
    "${cmd[@]}" > >(tee "${LOGDIR}/process_${i}.log") 2>&1 &
  else
    "${cmd[@]}" > "${LOGDIR}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
  echo "$!" > "${LOGDIR}/process_${i}.pid"
done
[ "$DRY" -eq 1 ] && exit 0
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (status > 128) when a forwarded signal interrupts it: wait again for the real exit.
  while true; do
    set +e; wait "$pid"; rc=$?; set -e
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
done
exit "$status"
