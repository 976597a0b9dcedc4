#!/usr/bin/env bash
# Rebuild the embedded default ensemble (default.pt) and its test split (digits_test.npz).
#
#   bash drt_fast/assets/make_default.sh [WORKDIR]
#
# Runs from the repository root (or with drt-fast installed). Training takes about 20 s
# on 2 CPU cores. The commands below are the recipe recorded in default.json; the run that
# produced the shipped default.pt used OMP_NUM_THREADS=1 (CPU results can differ in the last
# bits with another thread count).
set -euo pipefail
WORK=${1:-assets-work}
ASSETS=$(cd "$(dirname "$0")" && pwd)
# The installed command: `python -m drt_fast` from the repository root would import the
# checkout, which has no compiled kernels after a plain `pip install .`.
if command -v drt-fast >/dev/null; then DRT=drt-fast; else DRT="python -m drt_fast"; fi
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. Gaussian data augmentation (Cohen), 3 members, sigma 0.25, 60 epochs.
$DRT train --dataset digits --arch digits_cnn --members 3 --sigma 0.25 --trainer gaussian \
    --epochs 60 --lr 0.05 --lr-schedule step --batch 64 --weight-decay 1e-4 --seed 0 \
    --out "$WORK/gaussian.pt" --log "$WORK/gaussian.jsonl" --quiet --overwrite
# 2. DRT fine-tuning of the three members jointly: CE + 0.5 GD - 2 CM on 4 noisy copies per input.
$DRT train --dataset digits --arch digits_cnn --members 3 --sigma 0.25 --trainer drt \
    --rho1 0.5 --rho2 2 --gd-norm l2 --m 4 --epochs 10 --lr 0.01 --lr-schedule step --batch 64 \
    --weight-decay 1e-4 --seed 1 --init "$WORK/gaussian.pt" \
    --out "$WORK/drt.pt" --log "$WORK/drt.jsonl" --quiet --overwrite

cp "$WORK/drt.pt" "$ASSETS/default.pt"
python - "$ASSETS/digits_test.npz" <<'PY'
import sys
import numpy as np
from drt_fast import data
test = data.load("digits", "test")
np.savez_compressed(sys.argv[1], x=test.x.numpy(), y=test.y.numpy(), idx=test.idx.numpy())
PY
echo "wrote $ASSETS/default.pt and $ASSETS/digits_test.npz (work files in $WORK)"
