#!/usr/bin/env bash
# Figure 10, Qwen2.5-32B: urgent share PROP_MIN, PROP_MAX, PROP_STEP (default 0.1, 0.9, 0.1) at RPS 4.0.
# Variables as in the artifact's README (see `adaserve exp --help`); all logic is in `adaserve exp`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${ADASERVE_BIN:-.venv/bin/adaserve}"
command -v "$bin" >/dev/null || { echo "$0: $bin not found: run \`make venv\` first" >&2; exit 127; }
exec "$bin" exp fig10 qwen "$@"
