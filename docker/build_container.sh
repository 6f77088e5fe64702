#!/usr/bin/env bash
# Build the image (docker/Dockerfile: a CUDA PyTorch base with this package installed).
# Usage: ./docker/build_container.sh [--dry-run] [docker build options, e.g. --build-arg K=V]
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"

run docker build --file "$REPO/docker/Dockerfile" --tag "$IMAGE" --label "$LABEL" \
    ${ARGS[@]+"${ARGS[@]}"} "$REPO"
