# Shared by the studies: run the DP ε grid and the non-private reference over seeds, then
# the report. Usage (from a study script): sweep EXPERIMENT OUT "EPSILONS" "SEEDS" [override ...]
sweep() {
  local experiment=$1 out=$2 epsilons=$3 seeds=$4
  shift 4
  python -m fedpriv.simulate -m "+experiment=$experiment" "privacy.target_epsilon=$epsilons" "seed=$seeds" \
    "hydra.sweep.dir=$out/dp" "$@"
  python -m fedpriv.simulate -m "+experiment=$experiment" privacy=none "seed=$seeds" \
    "hydra.sweep.dir=$out/none" "$@"
  python -m fedpriv.report "$out/dp" "$out/none" --out "$out/report"
}
