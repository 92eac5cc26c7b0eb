#!/usr/bin/env bash
# Study: synthetic data on top of the CBIS recipe (configs/experiment/synthetic_cbis.yaml: the
# recipe plus a DP generator, its ε inside every reported ε), over the ε grid, with 3 hospitals
# and centrally (1), with a non-private reference (non-private generator and classifier). The
# same recipe without synthetic data is simulations/priors_cbis.sh; the federated GAN instead
# of the default generator: add synthetic.generator=gan synthetic.federated=true.
# Writes OUT/{federated,central}/{dp,none}/… run folders and OUT/{federated,central}/report/.
# Usage: bash simulations/synthetic_cbis.sh [OUT] [extra Hydra overrides, e.g. rounds=2]
# Grid: EPSILONS (default 1,6,12,20,60), SEEDS (0,1,2), SETTINGS (pretrain,augment),
# FEDERATIONS (federated central).
set -euo pipefail
cd "$(dirname "$0")/.."
# Osuala et al. 2024 (Swin-T, ImageNet-pretrained frozen backbone, δ = 1e-4, mean of 3 seeds) on this exact split
REFERENCE=simulations/reference/osuala2024_cbis.csv
OUT=${1:-studies/synthetic_cbis}
shift || true
for name in ${FEDERATIONS:-federated central}; do
  clients=$([ "$name" = federated ] && echo num_clients=3 || echo num_clients=1)
  python -m fedpriv.simulate -m +experiment=synthetic_cbis "$clients" "synthetic=${SETTINGS:-pretrain,augment}" \
    "privacy.target_epsilon=${EPSILONS:-1,6,12,20,60}" "seed=${SEEDS:-0,1,2}" "hydra.sweep.dir=$OUT/$name/dp" "$@"
  python -m fedpriv.simulate -m +experiment=synthetic_cbis "$clients" privacy=none synthetic.dp=false \
    "seed=${SEEDS:-0,1,2}" "hydra.sweep.dir=$OUT/$name/none" "$@"
  python -m fedpriv.report "$OUT/$name/dp" "$OUT/$name/none" --out "$OUT/$name/report" --reference "$REFERENCE"
done
