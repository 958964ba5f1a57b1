#!/usr/bin/env bash
# Remakes the CIFAR-10 study of the README's "Does the security index predict leakage?":
# all 35 models against CIFAR-10 test images, R-GAP, the hybrid and hybrid_free (ours) at
# 1/4 of the paper's hybrid iterations (N0 = 2500, N = 500: docs/study.md, "How many
# iterations the hybrid needs"): images 0-19 on the published initialisation, and 0-9
# after 500 SGD steps of training (offline: on crops of the other 19 test images).
# Long on 2 cores (hours): run it again with the same OUTPUT_DIR to resume where it stopped.
# Usage: bash studies/make_study_cifar.sh OUTPUT_DIR [random|trained]
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder, kept between calls so that a stopped run resumes}
budget="--source cifar10-test --hybrid-iters 500 --hybrid-iters-first 2500 --jobs auto"
for weights in ${2:-random trained}; do
    if [ "$weights" = random ]; then
        study="--model all --index 0-19 --attacks rgap hybrid hybrid_free"
    else
        study="--model all --index 0-9 --attacks rgap hybrid --train-steps 500"
    fi
    dir="$out/$weights"
    where=$(where_to_run "$dir")  # a folder a stopped call left is resumed
    # shellcheck disable=SC2086
    "$PYTHON" hybrid.py $study $budget $where
    run=$(last_run "$dir")
    cp "$run/index_vs_quality.png" "assets/study_cifar_${weights}.png"
    cp "$run/fraction_vs_quality.png" "assets/study_cifar_${weights}_fraction.png"
    cp "$run/results.json" "assets/study_cifar_${weights}.json"
    cp "$run/summary.md" "assets/study_cifar_${weights}.md"
done
