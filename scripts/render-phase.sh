#!/usr/bin/env bash
# One phase's Job for one run id, rendered from an overlay and ready to apply:
#
#   scripts/render-phase.sh h100 sft exp1 | kubectl apply -f -
#   kubectl -n gsm8k logs -f job/exp1-sft
#
# The Job is named <run-id>-<phase>, labelled with the run id (PIPELINE_RUN_ID follows the
# label) and not suspended. It does not check the store: a phase whose artifact is
# current skips itself. Needs kubectl and Python with PyYAML (the chain script's needs).
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 <overlay: h100|local|local-gpu|DIR> <phase: sft|rollouts|preferences|dpo|eval> <run-id>" >&2
    exit 2
fi
exec "${PYTHON:-python3}" "$(dirname "$0")/chain.py" --overlay "$1" --only "$2" --run-id "$3" --dry-run --no-skip
