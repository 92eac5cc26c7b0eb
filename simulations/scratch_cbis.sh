#!/usr/bin/env bash
# Study: the from-scratch DP baseline of configs/experiment/scratch_cbis.yaml on the CBIS-DDSM patches.
# 1. The ε grid × seeds, central (num_clients=1) and 3 hospitals, batch 74 in both (q ≈ 0.067
#    centrally, 0.2 at each hospital), each with its non-private twin → OUT/central/, OUT/federated/.
# 2. Ablations, central at ε = ABLATION_EPSILON: the recipe with one technique changed
#    → OUT/ablation/<name>/.
# 3. One report over every run → OUT/report/ (the techniques of a row in its `training` column).
# Usage: bash simulations/scratch_cbis.sh [OUT] [extra Hydra overrides, e.g. rounds=2]
#   Parts: FEDERATIONS (default "central federated"), ABLATIONS (default: all below; "" = none),
#   EPSILONS (default 1,6,12,20,60), SEEDS (default 0,1,2), ABLATION_EPSILON (default 6).
set -euo pipefail
cd "$(dirname "$0")/.."
# Osuala et al. 2024 (Swin-T, ImageNet-pretrained frozen backbone, δ = 1e-4, mean of 3 seeds) on this exact split
REFERENCE=simulations/reference/osuala2024_cbis.csv
source simulations/_sweep.sh
OUT=${1:-studies/scratch_cbis}
shift || true
declare -A SETTING=([central]="num_clients=1" [federated]="num_clients=3")
declare -A ABLATION=(
  [clip1_lr02]="privacy.max_grad_norm=1 training.lr=0.2"  # the notes' clipping norm and learning rate
  [clip_schedule]="privacy.final_max_grad_norm=2"  # C decays geometrically 10 → 2 over the run
  [stem2_64px]="data.image_size=64 +model.kwargs.stem_stride=2"  # 64 px pixels in the stem, blocks at 32 px
  [augmult4]="training.augmentations=4"
  [no_ema]="evaluation.ema=null"
  [constant_lr]="training.lr_schedule=constant"
  [half_width_64px]="data.image_size=64 +model.kwargs.widths=[16,32,64]"  # 64 px at twice the 32 px cost
  [vit_hybrid]="model=vit_hybrid_tiny training.optimizer=adamw training.lr=0.02"  # the project default model and its DP optimizer
  [synthetic_pretrain]="synthetic=pretrain synthetic.samples_per_class=500 synthetic.train_epochs=20 synthetic.train_lr=0.05"  # SGD: the recipe's optimizer
)
for federation in ${FEDERATIONS-central federated}; do
  # shellcheck disable=SC2086  # the setting is a list of overrides
  sweep scratch_cbis "$OUT/$federation" "${EPSILONS:-1,6,12,20,60}" "${SEEDS:-0,1,2}" ${SETTING[$federation]} "$@"
done
for name in ${ABLATIONS-clip1_lr02 clip_schedule stem2_64px augmult4 no_ema constant_lr half_width_64px vit_hybrid synthetic_pretrain}; do
  # shellcheck disable=SC2086
  python -m fedpriv.simulate -m +experiment=scratch_cbis "privacy.target_epsilon=${ABLATION_EPSILON:-6}" "seed=${SEEDS:-0,1,2}" \
    ${SETTING[central]} ${ABLATION[$name]} "hydra.sweep.dir=$OUT/ablation/$name" "$@"
done
python -m fedpriv.report "$OUT" --out "$OUT/report" --reference "$REFERENCE"
