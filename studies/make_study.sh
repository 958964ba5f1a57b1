#!/usr/bin/env bash
# Remakes the study of the README's "Does the security index predict leakage?": all 35
# models against the five bundled photographs, R-GAP and the hybrid (at a tenth of the
# paper's hybrid iterations), once on the published initialisation and once after 500
# SGD steps of training. About 30 + 40 minutes on 2 CPU cores.
# Usage: bash studies/make_study.sh
source "$(dirname "$0")/preamble.sh"
study="--model all --source samples --index 0-4 --attacks rgap hybrid --hybrid-iters 200 --hybrid-iters-first 1000 --jobs auto"
for weights in random trained; do
    out=$(mktemp -d)
    extra=$([ "$weights" = trained ] && echo "--train-steps 500" || true)
    # shellcheck disable=SC2086
    "$PYTHON" hybrid.py $study $extra --output "$out"
    run=$(ls -d "$out"/*/)
    cp "$run/index_vs_quality.png" "assets/study_${weights}.png"
    cp "$run/results.json" "assets/study_${weights}.json"
    cp "$run/summary.md" "assets/study_${weights}.md"
done
