#!/usr/bin/env bash
# Emotion-Qwen on a Cloud TPU pod slice: install on every worker, then train with the same flags everywhere.
#
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--repo URL] [--branch main] \
#       -- --config=configs/emotion_qwen.py:7b --config.workdir=gs://bucket/run --config.init_from=...
#
# jax.distributed initialises from the TPU environment (--config.distributed.auto=True is added).
set -euo pipefail
DRY=0; TPU=""; ZONE=""; PROJECT=""; REPO="${EMOQWEN_REPO:-https://github.com/emoqwen/emoqwen_jax.git}"; BRANCH=main
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --branch) BRANCH="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$TPU" ] || [ -z "$ZONE" ]; then echo "--tpu and --zone are required" >&2; exit 2; fi
PROJ=(); [ -n "$PROJECT" ] && PROJ=(--project "$PROJECT")
TRAIN_FLAGS=$(printf '%q ' "$@")
INSTALL="set -e; (test -d emoqwen_jax || git clone -b ${BRANCH} ${REPO} emoqwen_jax); cd emoqwen_jax && git pull -q; \
python3 -m pip install -q -U 'jax[tpu]==0.10.2' && python3 -m pip install -q -e ."
TRAIN="cd emoqwen_jax && emoqwen-train ${TRAIN_FLAGS} --config.distributed.auto=True"
run() {
  if [ "$DRY" -eq 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$INSTALL"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$TRAIN"
