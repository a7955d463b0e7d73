#!/usr/bin/env bash
# The proving ground for preference training, on one GPU (docs/PREFERENCES.md):
#
#   scripts/proving-ground.sh                 # pipeline (2 rounds), then the recipe sweep
#   scripts/proving-ground.sh pipeline        # only: base -> SFT -> DPO round 1 -> round 2, on the test split
#   scripts/proving-ground.sh sweep           # only: the recipes on round 1's SFT adapter and pairs
#   STORE=/data/pg RUN=pg2 scripts/proving-ground.sh
#   PIPELINE_BACKEND=vllm scripts/proving-ground.sh     # any flag, as PIPELINE_<FLAG>, for every phase that has it
#
# pipeline: `python -m app pipeline --preset small --rounds 2`: builds and pretrains the 30.9 M
#   model, SFT, rollouts, pairs, DPO (the preset's recipe: DPO + NLL weight 1), a second round
#   from that policy, and eval of base / SFT / DPO / DPO round 2 on 1,000 held-out test questions
#   with paired intervals (<store>/runs/<run>/eval/report.md).
# sweep: each recipe trains DPO from the same SFT adapter on the same pairs (the pipeline's,
#   copied into a run of its own: a local store is relocatable) and is scored on the VALIDATION
#   split (synthetic-hard-val:1000). The best on validation is then scored once on the test split.
#   The table is written to <store>/sweep.md.
set -euo pipefail
cd "$(dirname "$0")/.."

STORE=${STORE:-runs-small}
RUN=${RUN:-pg}
PY=${PY:-python}
STAGE=${1:-all}
VAL_DATA=${VAL_DATA:-synthetic-hard-val:1000}
app() { "$PY" -m app "$@"; }
banner() { printf '\n=== %s ===\n' "$*"; }

# name | dpo flags (@pipeline: the pipeline's own DPO, the preset's recipe) | preferences flags (empty: the
# pipeline's pairs). `reference` is the guide's plain DPO at its lr and beta, at its global batch of 32 pairs
# (2 x 2 accumulation x 8 GPUs) on one GPU.
RECIPES=(
  "reference|--dpo-recipe reference --dpo-batch-size 16 --dpo-grad-accum 2|"
  "dpo|--dpo-rpo-alpha 0|"
  "rpo|@pipeline|"
  "rpo-lr1e-5|--dpo-recipe rpo --dpo-learning-rate 1e-5|"
  "rpo-beta0.5|--dpo-recipe rpo --dpo-beta 0.5|"
  "rpo-gold|--dpo-recipe rpo|--gold-anchored"
  "rpo-direct|--dpo-recipe rpo|--pair-variants direct"
)

# A run that starts from the pipeline's run: the same base model and SFT adapter (and pairs).
seed_run() {
  local run=$1; shift
  mkdir -p "$STORE/runs/$run"
  for phase in "$@"; do  # (no base/ when --base-model names a directory or hub id: nothing was built)
    [ -e "$STORE/runs/$run/$phase" ] || [ ! -e "$STORE/runs/$RUN/$phase" ] ||
      cp -r "$STORE/runs/$RUN/$phase" "$STORE/runs/$run/$phase"
  done
}

accuracy_gain() {  # sft -> dpo difference on a run's eval, in points, and its paired interval
  "$PY" - "$STORE/runs/$1/eval/manifest.json" <<'EOF'
import json, sys
from app import artifacts
path, _ = artifacts.fetch(sys.argv[1].rsplit("/", 1)[0])
summary = json.loads((path / "summary.json").read_text())
(dataset,) = summary["paired"]
c = summary["paired"][dataset]["sft->dpo"]
print(f"{c['difference'] * 100:+.1f} {c['ci95'][0] * 100:+.1f} {c['ci95'][1] * 100:+.1f} {c['fixed']} {c['broken']} {c['mcnemar_p']}")
EOF
}

if [ "$STAGE" = all ] || [ "$STAGE" = pipeline ]; then
  banner "pipeline: preset small, 2 rounds (store $STORE, run $RUN)"
  app pipeline --preset small --store "$STORE" --run-id "$RUN" --rounds 2
fi

if [ "$STAGE" = all ] || [ "$STAGE" = sweep ]; then
  table="$STORE/sweep.md"
  printf '| recipe | val: SFT -> DPO | paired 95%% CI | fixed | broken | McNemar p |\n|---|---|---|---|---|---|\n' > "$table"
  best="" best_gain=-1000
  for entry in "${RECIPES[@]}"; do
    IFS='|' read -r name dpo_flags pref_flags <<< "$entry"
    run="$RUN-$name"
    banner "sweep: $name ($dpo_flags $pref_flags) on validation"
    if [ -n "$pref_flags" ]; then
      seed_run "$run" base sft rollouts
      # shellcheck disable=SC2086
      app preferences --preset small --store "$STORE" --run-id "$run" $pref_flags
    else
      seed_run "$run" base sft rollouts preferences
    fi
    if [ "$dpo_flags" = @pipeline ]; then
      seed_run "$run" dpo
    else
      # shellcheck disable=SC2086
      app dpo --preset small --store "$STORE" --run-id "$run" $dpo_flags
    fi
    app eval --preset small --store "$STORE" --run-id "$run" --models sft,dpo --eval-data "$VAL_DATA"
    read -r gain low high fixed broken p <<< "$(accuracy_gain "$run")"
    printf '| %s | %s pts | %s to %s pts | %s | %s | %s |\n' "$name" "$gain" "$low" "$high" "$fixed" "$broken" "$p" >> "$table"
    if "$PY" -c "import sys; sys.exit(0 if float('$gain') > float('$best_gain') else 1)"; then
      best=$name best_gain=$gain
    fi
  done
  banner "sweep: best on validation is $best ($best_gain pts); scoring it once on the test split"
  seed_run "$RUN-$best-test" base sft
  cp -r "$STORE/runs/$RUN-$best/dpo" "$STORE/runs/$RUN-$best-test/dpo"
  app eval --preset small --store "$STORE" --run-id "$RUN-$best-test" --models base,sft,dpo
  read -r gain low high fixed broken p <<< "$(accuracy_gain "$RUN-$best-test")"
  printf '\nBest on validation: %s. On the test split: SFT -> DPO %s pts, paired 95%% CI %s to %s pts (%s fixed, %s broken, McNemar p %s).\n' \
    "$best" "$gain" "$low" "$high" "$fixed" "$broken" "$p" >> "$table"
  banner "sweep table ($table)"
  cat "$table"
fi
