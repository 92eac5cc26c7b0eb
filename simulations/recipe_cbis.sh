#!/usr/bin/env bash
# Study: see configs/experiment/recipe_cbis.yaml. The ε grid × seeds for the central baseline
# (num_clients=1, batch 221: q = 0.2) and 3 hospitals (batch 74: q ≈ 0.2 each), the
# non-private reference for both, then one report over all runs (OUT/report/).
# Usage: bash simulations/recipe_cbis.sh [OUT] [extra Hydra overrides, e.g. rounds=2]
#   FEDERATIONS="central" (default "central federated") runs a part of the study.
set -euo pipefail
cd "$(dirname "$0")/.."
source simulations/_sweep.sh
OUT=${1:-studies/recipe_cbis}
shift || true
declare -A SETTING=([central]="num_clients=1 training.batch_size=221" [federated]="num_clients=3 training.batch_size=74")
for federation in ${FEDERATIONS:-central federated}; do
  # shellcheck disable=SC2086  # the setting is a list of overrides
  sweep recipe_cbis "$OUT/$federation" "${EPSILONS:-1,6,12,20,60}" "${SEEDS:-0,1,2}" ${SETTING[$federation]} "$@"
done
python -m fedpriv.report "$OUT" --out "$OUT/report"
