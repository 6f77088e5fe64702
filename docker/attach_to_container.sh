#!/usr/bin/env bash
# Open a shell in the running container (run it again for more terminals).
# Usage: ./docker/attach_to_container.sh [--dry-run] [command, default bash]
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"

if ((${#ARGS[@]} == 0)); then
    ARGS=(bash)
fi
run docker exec --interactive --tty "$CONTAINER" "${ARGS[@]}"
