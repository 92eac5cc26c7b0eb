# Shared by the studies: run the DP ε grid and the non-private reference over seeds, then
# the report. Usage (from a study script): sweep EXPERIMENT OUT "EPSILONS" "SEEDS" [override ...]
# NON_PRIVATE_OVERRIDES: more overrides for the non-private reference alone (e.g. its optimizer).
sweep() {
  local experiment=$1 out=$2 epsilons=$3 seeds=$4
  shift 4
  python -m fedpriv.simulate -m "+experiment=$experiment" "privacy.target_epsilon=$epsilons" "seed=$seeds" \
    "hydra.sweep.dir=$out/dp" "$@"
  # shellcheck disable=SC2086  # a list of overrides
  python -m fedpriv.simulate -m "+experiment=$experiment" privacy=none "seed=$seeds" \
    "hydra.sweep.dir=$out/none" "$@" ${NON_PRIVATE_OVERRIDES:-}
  python -m fedpriv.report "$out/dp" "$out/none" --out "$out/report"
}
