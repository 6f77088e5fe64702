#!/usr/bin/env bash
# Stop and remove the containers and images these scripts created: only those carrying the
# label org.adaserve.artifact=true; nothing else on the machine is touched.
# Usage: ./docker/cleanup_containers.sh [--dry-run]
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"

# remove KIND: force-remove every labelled container (stopping it) or image. The listing is a
# read-only query, run under --dry-run too; where it cannot run, --dry-run prints it instead.
remove() {
    local kind=$1 out ids=()
    local query=(docker "$kind" ls --all --quiet --filter "label=$LABEL")
    if out=$("${query[@]}" 2>/dev/null); then
        mapfile -t ids < <(printf '%s\n' "$out" | sed '/^$/d' | sort -u)
    elif ((DRY_RUN)); then
        run "${query[@]}"
        echo "docker $kind rm --force <each id listed by the command above>"
        return
    else
        echo "$0: cannot list docker ${kind}s (is the docker daemon running?)" >&2
        exit 1
    fi
    if ((${#ids[@]})); then
        run docker "$kind" rm --force "${ids[@]}"
    fi
    if ((!DRY_RUN)); then
        echo "removed ${#ids[@]} ${kind}(s) labelled $LABEL"
    fi
}

remove container
remove image
