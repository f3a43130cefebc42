#!/usr/bin/env bash
# Run WamGLM-JAX on every worker of a Cloud TPU VM pod slice (one process per TPU host).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra wamglm_jax.main flags ...]
# Example (v4-64 = 8 hosts x 4 chips; FSDP over all 32 chips):
#   PROJECT=my-project launch/tpu_pod.sh wamglm-v4-64 us-central2-b \
#       configs/presets.py:pod7b gs://my-bucket/runs/pod7b \
#       --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1
#
# Steps (each on all workers at once, `gcloud compute tpus tpu-vm ssh --worker=all`):
#   1. SYNC=1 (default): copy this checkout to ~/wamglm on every worker (tpu-vm scp --worker=all).
#   2. SETUP=1 (default): pip install -r requirements.txt and the TPU jaxlib
#      (jax[tpu] at the pinned jax version).
#   3. python -m wamglm_jax.main --config=CONFIG --workdir=WORKDIR "$@" on every worker.
#      No --coordinator_address/--num_processes/--process_id: WAMGLM_DISTRIBUTED=auto makes
#      wamglm_jax.parallel.multihost call jax.distributed.initialize() with no arguments, and
#      JAX reads the worker list and this worker's index from the TPU VM metadata.
#
# WORKDIR must be visible to every worker (a gs:// bucket): Orbax writes checkpoints from all
# hosts, and config.json / reports are written by process 0. Each worker reads its own data
# shard (grain ShardByJaxProcess), so data paths must exist on every worker (or be gs://).
# Environment: PROJECT (gcloud --project, optional), REMOTE_DIR (default ~/wamglm),
# SYNC=0 / SETUP=0 to skip steps, DRY_RUN=1 to print the gcloud commands instead of running.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REMOTE_DIR=${REMOTE_DIR:-wamglm}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==\(.*\)$/\1/p' "$REPO_ROOT/requirements.txt")
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && COMMON+=(--project="$PROJECT")

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

EXTRA=""
for a in "$@"; do EXTRA+=" $(printf '%q' "$a")"; done

if [[ "${SYNC:-1}" == 1 ]]; then
  tarball=$(mktemp /tmp/wamglm.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  run tar -C "$REPO_ROOT" --exclude=.git -czf "$tarball" .
  run "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:wamglm.tar.gz" --worker=all "${COMMON[@]}"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${COMMON[@]}" --command \
    "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf ~/wamglm.tar.gz"
fi
if [[ "${SETUP:-1}" == 1 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${COMMON[@]}" --command \
    "cd $REMOTE_DIR && pip install -q -r requirements.txt && pip install -q 'jax[tpu]==$JAX_VERSION'"
fi
run "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${COMMON[@]}" --command \
  "cd $REMOTE_DIR && WAMGLM_DISTRIBUTED=auto python -m wamglm_jax.main \
--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$EXTRA"
