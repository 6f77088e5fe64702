# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared by the docker/ scripts (sourced, not run): names, the label, --dry-run.
# Override the names with ADASERVE_IMAGE / ADASERVE_CONTAINER.

IMAGE="${ADASERVE_IMAGE:-adaserve:latest}"
CONTAINER="${ADASERVE_CONTAINER:-adaserve}"
# Every image and container these scripts create carries this label; cleanup_containers.sh
# removes only what carries it.
LABEL="org.adaserve.artifact=true"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
ARGS=()

# parse_args "$@": --dry-run prints the docker commands instead of running them; -h/--help
# prints the script's header; everything else is passed on to docker (ARGS).
parse_args() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            --dry-run) DRY_RUN=1 ;;
            -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
            *) ARGS+=("$arg") ;;
        esac
    done
    if ((!DRY_RUN)) && ! command -v docker >/dev/null; then
        echo "$0: docker not found (install Docker with the NVIDIA container runtime)" >&2
        exit 127
    fi
}

# run CMD...: run it, or with --dry-run print it (shell-quoted, one line).
run() {
    if ((DRY_RUN)); then
        local quoted
        printf -v quoted '%q ' "$@"
        echo "${quoted% }"
    else
        "$@"
    fi
}
