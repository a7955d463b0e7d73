#!/usr/bin/env bash
# The embedded pipeline: tiny Llama built here, synthetic GSM8K-format problems, CPU, a few minutes.
#   scripts/demo.sh [extra flags for `python -m app pipeline`]
# Artifacts land in ./artifacts/runs/demo/<phase>/; the run report in ./artifacts/runs/demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m app pipeline "$@"
