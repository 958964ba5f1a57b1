#!/usr/bin/env bash
# Remakes the held-out test of the README's "Do the indices predict leakage on
# architectures nobody chose?": 40 architectures drawn by `random:40` (seed 0) x CIFAR-10
# test images 0-4, random weights, R-GAP, the hybrid and hybrid_free at the CIFAR-10
# study's budget (N0 = 2500, N = 500). Both indices' formulas were fixed at commit 9de8d51,
# before this run. About 70 minutes on 2 CPU cores; run it again with the same OUTPUT_DIR
# to resume where it stopped.
# Usage: bash studies/make_heldout.sh OUTPUT_DIR
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder, kept between calls so that a stopped run resumes}
where=$(where_to_run "$out")  # a folder a stopped call left is resumed
# shellcheck disable=SC2086
"$PYTHON" hybrid.py --model random:40 --source cifar10-test --index 0-4 \
    --attacks rgap hybrid hybrid_free --hybrid-iters 500 --hybrid-iters-first 2500 --jobs auto $where
run=$(last_run "$out")
cp "$run/index_vs_quality.png" assets/heldout.png
cp "$run/fraction_vs_quality.png" assets/heldout_fraction.png
cp "$run/results.json" assets/heldout.json
cp "$run/summary.md" assets/heldout.md
