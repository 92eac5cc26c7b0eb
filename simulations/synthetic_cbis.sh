#!/usr/bin/env bash
# Study: the paper's three settings (configs/experiment/synthetic_cbis.yaml) over the ε grid,
# federated (3 hospitals) and central (1), with a non-private real-data reference.
# Writes OUT/{federated,central}/{dp,none}/… run folders and OUT/{federated,central}/report/
# (report.md: one row per synthetic setting × ε, mean ± std over seeds; AUROC-vs-ε plot).
# Usage: bash simulations/synthetic_cbis.sh [OUT] [extra Hydra overrides, e.g. rounds=2]
# Grid: EPSILONS (default 1,6,12,20,60), SEEDS (0,1,2), SETTINGS (none,augment,pretrain).
set -euo pipefail
cd "$(dirname "$0")/.."
# Osuala et al. 2024 (Swin-T, ImageNet-pretrained frozen backbone, δ = 1e-4, mean of 3 seeds) on this exact split
REFERENCE=simulations/reference/osuala2024_cbis.csv
OUT=${1:-studies/synthetic_cbis}
shift || true
for setup in "federated num_clients=3 training.batch_size=74" "central num_clients=1 training.batch_size=220"; do
  read -r name clients batch <<<"$setup"
  python -m fedpriv.simulate -m +experiment=synthetic_cbis "$clients" "$batch" \
    "synthetic=${SETTINGS:-none,augment,pretrain}" "privacy.target_epsilon=${EPSILONS:-1,6,12,20,60}" \
    "seed=${SEEDS:-0,1,2}" "hydra.sweep.dir=$OUT/$name/dp" "$@"
  python -m fedpriv.simulate -m +experiment=synthetic_cbis "$clients" "$batch" privacy=none \
    "seed=${SEEDS:-0,1,2}" "hydra.sweep.dir=$OUT/$name/none" "$@"
  python -m fedpriv.report "$OUT/$name/dp" "$OUT/$name/none" --out "$OUT/$name/report" --reference "$REFERENCE"
done
