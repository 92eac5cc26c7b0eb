#!/usr/bin/env bash
# Study: priors that cost no privacy on the CBIS-DDSM mass patches (configs/experiment/recipe_cbis.yaml, the shipped recipe).
# 1. The ε grid × seeds, centralized (num_clients=1) and 3 hospitals (num_clients=3), each with
#    its non-private twin → OUT/central/, OUT/federated/.
# 2. Ablations, centralized at ABLATION_EPSILONS: the recipe without its scattering features,
#    and that CNN-only recipe with one more choice changed → OUT/ablation/<name>/.
# 3. One report over every run, against the published rows → OUT/report/.
# The prior is computed once per seed (and per setting that shapes it) and cached in
# $FEDPRIV_CACHE/priors (default ~/.cache/fedpriv/priors): a sweep pays for it once.
# Usage: bash simulations/priors_cbis.sh [OUT] [extra Hydra overrides, e.g. data.root=/path/to/cbis-ddsm-masses]
#   Parts: FEDERATIONS (default "central federated"), ABLATIONS (default: all below; "" = none),
#   EPSILONS (default 1,6,12,20,60), SEEDS (default 0,1,2), ABLATION_EPSILONS (default 1,6).
set -euo pipefail
cd "$(dirname "$0")/.."
# Osuala et al. 2024 (Swin-T, ImageNet-pretrained frozen backbone, δ = 1e-4, mean of 3 seeds) on this exact split
REFERENCE=simulations/reference/osuala2024_cbis.csv
source simulations/_sweep.sh
OUT=${1:-studies/priors_cbis}
shift || true
# 3 hospitals: each takes 5 local steps a round (the centralized run takes 15), its momentum
# restarting every round, so the head's rate is 3× the centralized one
declare -A SETTING=([central]="num_clients=1" [federated]="num_clients=3 training.lr=0.3")
CNN_ONLY="model=cnn_small training.lr=0.5 data.augment=true rounds=10"  # the earlier recipe without scattering features (the head reads 128 features), as measured
declare -A ABLATION=(
  [no_scattering]="$CNN_ONLY"                                 # the prior's CNN features alone
  [prior_none]="$CNN_ONLY prior=none"                         # no prior: random initialization
  [prior_phantom]="$CNN_ONLY prior=phantom"                   # supervised on the procedural phantom
  [no_freeze]="$CNN_ONLY training.freeze=none privacy.max_grad_norm=10 training.lr=0.02"   # every layer trains from round 1 (the from-scratch recipe's C and lr)
  [transformer]="model=vit_hybrid_tiny training.lr=0.5 data.augment=true rounds=10 ~model.kwargs.stem_stride"  # the conv-stem ViT with its own prior and the CNN-only schedule
  [px32]="$CNN_ONLY data.image_size=32 model.kwargs.stem_stride=1"  # 32 px, stem at full resolution (the same cost)
)
for federation in ${FEDERATIONS-central federated}; do
  # shellcheck disable=SC2086  # the setting is a list of overrides
  sweep recipe_cbis "$OUT/$federation" "${EPSILONS:-1,6,12,20,60}" "${SEEDS:-0,1,2}" ${SETTING[$federation]} "$@"
done
for name in ${ABLATIONS-no_scattering prior_none prior_phantom no_freeze transformer px32}; do
  # shellcheck disable=SC2086
  python -m fedpriv.simulate -m +experiment=recipe_cbis "privacy.target_epsilon=${ABLATION_EPSILONS:-1,6}" "seed=${SEEDS:-0,1,2}" \
    ${SETTING[central]} ${ABLATION[$name]} "hydra.sweep.dir=$OUT/ablation/$name" "$@"
done
python -m fedpriv.report "$OUT" --out "$OUT/report" --reference "$REFERENCE"
