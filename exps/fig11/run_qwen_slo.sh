#!/usr/bin/env bash
# Figure 11, Qwen2.5-32B: urgent SLO scale SLO_SCALE_MIN, SLO_SCALE_MAX, SLO_SCALE_STEP (default 0.6, 1.6, 0.2), OUTPUT_LENGTH (256).
# Variables as in the artifact's README (see `adaserve exp --help`); all logic is in `adaserve exp`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${ADASERVE_BIN:-.venv/bin/adaserve}"
command -v "$bin" >/dev/null || { echo "$0: $bin not found: run \`make venv\` first" >&2; exit 127; }
exec "$bin" exp fig11 qwen "$@"
