#!/usr/bin/env bash
# The test suite, on CPU: real TRL/PEFT training and real vLLM on a tiny model, a real S3
# server (moto) over HTTP, real `kubectl kustomize` output checked against Kubernetes schemas.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q --durations=15 "${@:-tests}"
