#!/usr/bin/env bash
# Study: see configs/experiment/fairness_phantom.yaml. Writes run folders and OUT/report/
# (report.md, report.csv, AUROC / SPD / audit vs ε plots, correlations.json).
# Usage: bash simulations/fairness_phantom.sh [OUT] [extra Hydra overrides, e.g. rounds=2]
set -euo pipefail
cd "$(dirname "$0")/.."
source simulations/_sweep.sh
OUT=${1:-studies/fairness_phantom}
shift || true
sweep fairness_phantom "$OUT" "${EPSILONS:-1,2,4,8}" "${SEEDS:-0,1,2}" "$@"
