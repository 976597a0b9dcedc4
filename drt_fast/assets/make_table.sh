#!/usr/bin/env bash
# Regenerate the digits table of docs/results-digits.md (README): certified accuracy and ACR
# of (a) one Gaussian member, (b) the Gaussian 3-ensemble, (c) the DRT 3-ensemble (WE, MME).
#
#   bash drt_fast/assets/make_table.sh [WORKDIR] [N] [SKIP]
#
# WORKDIR must hold gaussian.pt and drt.pt from make_default.sh (run it first; drt.pt is
# default.pt). Defaults: n = 10000 noise draws, every 2nd test input (225 of 450).
set -euo pipefail
WORK=${1:-assets-work}
N=${2:-10000}
SKIP=${3:-2}
# The installed command: `python -m drt_fast` from the repository root would import the
# checkout, which has no compiled kernels after a plain `pip install .`.
if command -v drt-fast >/dev/null; then DRT=drt-fast; else DRT="python -m drt_fast"; fi

# (a) member 0 of the Gaussian ensemble as a one-member checkpoint
python - "$WORK/gaussian.pt" "$WORK/gaussian_member0.pt" <<'PY'
import sys
from drt_fast import Ensemble
from drt_fast.checkpoint import load_checkpoint, save_ensemble
ens, meta = load_checkpoint(sys.argv[1])
save_ensemble(sys.argv[2], Ensemble([ens.members[0]]), arch=meta["arch"], dataset=meta["dataset"],
              num_classes=meta["num_classes"], input_shape=meta["input_shape"],
              normalization=meta["normalization"], sigma=meta["sigma"],
              train_config={**meta["train_config"], "note": "member 0 of " + sys.argv[1]})
PY

# (b') control: the Gaussian ensemble trained 10 more epochs exactly like the DRT fine-tuning
# (same init, m, lr, schedule, seed) but without GD and CM
OMP_NUM_THREADS=1 $DRT train --dataset digits --arch digits_cnn --members 3 --sigma 0.25 \
    --trainer gaussian --m 4 --epochs 10 --lr 0.01 --lr-schedule step --batch 64 \
    --weight-decay 1e-4 --seed 1 --init "$WORK/gaussian.pt" --out "$WORK/gaussian_cont.pt" --quiet --overwrite

run() {  # name model mode (a rerun replaces the table's own results files)
  rm -f "$WORK/$1.tsv" "$WORK/$1.tsv.json"
  $DRT certify --model "$2" --mode "$3" --n "$N" --n0 100 --alpha 0.001 --skip "$SKIP" \
      --batch 10000 --seed 0 --quiet --out "$WORK/$1.tsv"
}
# independent runs: in parallel, one thread each (small models use cores better that way)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=()
run a_gaussian_member "$WORK/gaussian_member0.pt" we & pids+=($!)
run b_gaussian_we "$WORK/gaussian.pt" we & pids+=($!)
run b_gaussian_mme "$WORK/gaussian.pt" mme & pids+=($!)
run b2_gaussian_cont_we "$WORK/gaussian_cont.pt" we & pids+=($!)
run c_drt_we "$WORK/drt.pt" we & pids+=($!)
run c_drt_mme "$WORK/drt.pt" mme & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done     # a failed run fails the script

python - "$WORK" "$N" "$SKIP" <<'PY'
import sys
from drt_fast.analyze import acr, certified_accuracy
from drt_fast.io import read_results
work, n, skip = sys.argv[1:]
radii = [0.0, 0.25, 0.5, 0.625, 0.75]
rows = [("(a) one Gaussian member", "a_gaussian_member"),
        ("(b) Gaussian 3-ensemble, WE", "b_gaussian_we"),
        ("(b) Gaussian 3-ensemble, MME", "b_gaussian_mme"),
        ("(b') Gaussian 3-ensemble + 10 Gaussian epochs, WE", "b2_gaussian_cont_we"),
        ("(c) DRT 3-ensemble, WE", "c_drt_we"),
        ("(c) DRT 3-ensemble, MME", "c_drt_mme")]
print(f"digits test split, every {skip}-th input, sigma = 0.25, n0 = 100, n = {n}, alpha = 0.001\n")
print("| model | " + " | ".join(f"r = {r:g}" for r in radii) + " | ACR |")
print("|---|" + "---|" * (len(radii) + 1))
for label, name in rows:
    res = read_results(f"{work}/{name}.tsv")
    cells = [f"{100 * certified_accuracy(res, r):.1f}" for r in radii]
    print(f"| {label} | " + " | ".join(cells) + f" | {acr(res):.3f} |")
PY
