#!/usr/bin/env bash
# Emotion-Qwen on a Cloud TPU pod slice: the same training command on every worker, in the background.
#
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project P] --repo URL [--branch main] COMMAND \
#       [-- --config=configs/emotion_qwen.py:7b --config.workdir=gs://bucket/run --config.init_from=gs://…]
#
# COMMAND:
#   install   on every worker: uv, a Python 3.11 venv (TPU VM images ship 3.10; our pins need >= 3.11), the repo
#             at --branch, `pip install -e .[tpu,gcs]` into the venv
#   start     on every worker: `python -m emoqwen_jax.cli.train FLAGS --config.distributed.auto=True
#             --config.train.watch_maintenance_events=True` (a maintenance notice saves like SIGTERM) under nohup,
#             log in ~/emoqwen/train.log (one per worker), pid in ~/emoqwen/train.pid, JAX's compilation cache in
#             <workdir>/jax_cache (shared: workers and restarts reuse compiled programs)
#   train     install, then start (the default)
#   status    on every worker: running or not, and the last log lines
#   logs      the log of --worker N (default 0; `all` for every worker); --follow keeps tailing
#   stop      SIGTERM to the training process on every worker: all hosts agree on a step, save it, exit 0;
#             `start` again resumes from that checkpoint
# --dry-run prints the exact gcloud commands and runs nothing. --workdir must be shared (gs://…): every worker
# writes its part of each checkpoint there.
set -euo pipefail
DRY=0; TPU=""; ZONE=""; PROJECT=""; REPO=""; BRANCH=main; WORKER=0; FOLLOW=0; CMD=""; PYVER=3.11
HOME_DIR='$HOME/emoqwen'  # expanded on the worker
usage() { sed -n '2,22p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --branch) BRANCH="$2"; shift 2 ;;
    --python) PYVER="$2"; shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    install|start|train|status|logs|stop) CMD="$1"; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
CMD="${CMD:-train}"
if [ -z "$TPU" ] || [ -z "$ZONE" ]; then echo "--tpu and --zone are required" >&2; exit 2; fi
if { [ "$CMD" = install ] || [ "$CMD" = train ]; } && [ -z "$REPO" ]; then
  echo "--repo is required for $CMD: the git URL of your emoqwen_jax clone (e.g. https://github.com/you/emoqwen_jax.git)" >&2
  exit 2
fi
WORKDIR=""
for flag in "$@"; do
  case "$flag" in --config.workdir=*) WORKDIR="${flag#--config.workdir=}" ;; esac
done
if { [ "$CMD" = start ] || [ "$CMD" = train ]; } && [ -z "$WORKDIR" ]; then
  echo "--config.workdir=gs://BUCKET/RUN is required after -- (shared by every worker)" >&2; exit 2
fi
PROJ=(); [ -n "$PROJECT" ] && PROJ=(--project "$PROJECT")
ssh_on() {  # ssh_on WORKERS COMMAND
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker="$1" --command "$2")
  if [ "$DRY" -eq 1 ]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}
VENV="${HOME_DIR}/venv"
INSTALL="set -e; mkdir -p ${HOME_DIR}; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; \
(test -d ${HOME_DIR}/repo || git clone $(printf '%q' "$REPO") ${HOME_DIR}/repo); \
cd ${HOME_DIR}/repo && git fetch -q origin && git checkout -q $(printf '%q' "$BRANCH") && git pull -q --ff-only; \
uv venv --allow-existing --python ${PYVER} ${VENV}; \
uv pip install --python ${VENV}/bin/python -e '.[tpu,gcs]'; \
${VENV}/bin/python -c 'import jax, sys; print(sys.version.split()[0], jax.__version__)'"
TRAIN_FLAGS=$(printf '%q ' "$@")
START="set -e; cd ${HOME_DIR}/repo; \
if test -f ${HOME_DIR}/train.pid && kill -0 \$(cat ${HOME_DIR}/train.pid) 2>/dev/null; then echo already running; exit 1; fi; \
JAX_COMPILATION_CACHE_DIR=$(printf '%q' "${WORKDIR%/}/jax_cache") nohup ${VENV}/bin/python -m emoqwen_jax.cli.train \
${TRAIN_FLAGS}--config.distributed.auto=True --config.train.watch_maintenance_events=True >> ${HOME_DIR}/train.log 2>&1 < /dev/null & \
echo \$! > ${HOME_DIR}/train.pid; echo started \$(hostname) pid \$(cat ${HOME_DIR}/train.pid)"
STATUS="if test -f ${HOME_DIR}/train.pid && kill -0 \$(cat ${HOME_DIR}/train.pid) 2>/dev/null; \
then echo \$(hostname) running; else echo \$(hostname) not running; fi; tail -n 3 ${HOME_DIR}/train.log 2>/dev/null || true"
STOP="test -f ${HOME_DIR}/train.pid && kill -TERM \$(cat ${HOME_DIR}/train.pid) 2>/dev/null && echo \$(hostname) SIGTERM sent || echo \$(hostname) not running"
if [ "$FOLLOW" -eq 1 ]; then LOGS="tail -n 200 -F ${HOME_DIR}/train.log"; else LOGS="tail -n 200 ${HOME_DIR}/train.log"; fi
case "$CMD" in
  install) ssh_on all "$INSTALL" ;;
  start) ssh_on all "$START" ;;
  train) ssh_on all "$INSTALL"; ssh_on all "$START" ;;
  status) ssh_on all "$STATUS" ;;
  logs) ssh_on "$WORKER" "$LOGS" ;;
  stop) ssh_on all "$STOP" ;;
esac
