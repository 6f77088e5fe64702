#!/usr/bin/env bash
# Start the container in the background (it runs until cleanup_containers.sh removes it), with
# every GPU when the host has one. results/ and plots/ of this checkout are mounted into it, and
# MODELS_DIR (default ~/.cache/huggingface) as its Hugging Face cache, so weights are not copied.
# Usage: ./docker/start_container.sh [--dry-run] [docker run options]
#   GPUS=auto (default: --gpus all when nvidia-smi lists a GPU), all, or none
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"

gpus=()
case "${GPUS:-auto}" in
    all) gpus=(--gpus all) ;;
    none) ;;
    auto) if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
              gpus=(--gpus all)
          fi ;;
    *) echo "$0: GPUS=${GPUS}: expected auto, all or none" >&2; exit 2 ;;
esac
models_dir="${MODELS_DIR:-$HOME/.cache/huggingface}"
if ((!DRY_RUN)); then
    mkdir -p "$REPO/results" "$REPO/plots" "$models_dir"
fi

run docker run --detach --name "$CONTAINER" --label "$LABEL" ${gpus[@]+"${gpus[@]}"} \
    --ipc host \
    --volume "$REPO/results:/workspace/adaserve/results" \
    --volume "$REPO/plots:/workspace/adaserve/plots" \
    --volume "$models_dir:/root/.cache/huggingface" \
    ${ARGS[@]+"${ARGS[@]}"} "$IMAGE" sleep infinity
