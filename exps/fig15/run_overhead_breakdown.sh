#!/usr/bin/env bash
# Figure 15: overhead breakdown of AdaServe; LLAMA_OVERHEAD=ON and/or QWEN_OVERHEAD=ON.
# Variables as in the artifact's README (see `adaserve exp --help`); all logic is in `adaserve exp`.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${ADASERVE_BIN:-.venv/bin/adaserve}" exp fig15
