#!/usr/bin/env bash
# Remakes the hybrid's convergence table (docs/study.md, "How many iterations the hybrid
# needs"): six models across the zoo x CIFAR-10 test images 0-3, the hybrid alone at
# 1/10, 1/4, 1/2 and all of the paper's iterations (N0 = 10000 at the image, N = 2000).
# Each budget's results.json is kept as assets/convergence/N0_<N0>.json and the table
# written to assets/convergence_table.md. About 40 minutes on 2 CPU cores.
# Usage: bash studies/make_convergence.sh [OUTPUT_DIR]   (run folders go there; default a temp dir)
source "$(dirname "$0")/preamble.sh"
out=${1:-$(mktemp -d)}
mkdir -p assets/convergence
models="cnn2_c2 cnn3_c1 cnn3_c11 cnn4_c1 cnn4_c2 lenet"
for budget in "200 1000" "500 2500" "1000 5000" "2000 10000"; do
    set -- $budget
    dir="$out/N0_$2"
    where=$(where_to_run "$dir")  # a folder a stopped call left is resumed
    # shellcheck disable=SC2086
    "$PYTHON" hybrid.py --model $models --source cifar10-test --index 0-3 --attacks hybrid \
        --hybrid-iters "$1" --hybrid-iters-first "$2" --jobs auto $where
    cp "$(last_run "$dir")results.json" "assets/convergence/N0_$2.json"
done
"$PYTHON" -m studies.convergence_table assets/convergence/N0_*.json > assets/convergence_table.md
