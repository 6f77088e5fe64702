#!/usr/bin/env bash
# Figures 8 and 9 (and 12), Qwen2.5-32B: RPS_MIN, RPS_MAX, RPS_STEP (default 2.4, 4.2, 0.2).
# Variables as in the artifact's README (see `adaserve exp --help`); all logic is in `adaserve exp`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${ADASERVE_BIN:-.venv/bin/adaserve}"
command -v "$bin" >/dev/null || { echo "$0: $bin not found: run \`make venv\` first" >&2; exit 127; }
exec "$bin" exp fig8,9 qwen "$@"
