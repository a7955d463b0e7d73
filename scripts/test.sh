#!/usr/bin/env bash
# The test suite, on CPU: real TRL/PEFT training and real vLLM on a tiny model, a real S3
# server (moto) over HTTP, real `kubectl kustomize` output checked against Kubernetes schemas,
# real trackers (TensorBoard, MLflow) and a real browser (headless Chromium) for the run report.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Headless Chromium (Debian's package) for the run report's browser test; a no-op when present.
if ! command -v chromium >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing chromium for tests/test_report_browser.py"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null || echo "warning: chromium could not be installed; the browser test will be skipped"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q --durations=15 "${@:-tests}"
