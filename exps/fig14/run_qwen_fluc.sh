#!/usr/bin/env bash
# Figure 14, Qwen2.5-32B: the fluctuating 6-minute trace.
# Variables as in the artifact's README (see `adaserve exp --help`); all logic is in `adaserve exp`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${ADASERVE_BIN:-.venv/bin/adaserve}"
command -v "$bin" >/dev/null || { echo "$0: $bin not found: run \`make venv\` first" >&2; exit 127; }
exec "$bin" exp fig14 qwen "$@"
