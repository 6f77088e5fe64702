#!/usr/bin/env bash
# Figure 14, Llama-3.1-70B: the fluctuating 6-minute trace.
# Variables as in the artifact's README (see `adaserve exp --help`); all logic is in `adaserve exp`.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${ADASERVE_BIN:-.venv/bin/adaserve}" exp fig14 llama
