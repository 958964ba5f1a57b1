#!/usr/bin/env bash
# Remakes the baselines on CIFAR-10 (docs/study.md, "DLG and iDLG on CIFAR-10"): DLG and
# iDLG at the paper's settings, each the best of 4 starts (--restarts 4), on the six models
# of the convergence table x CIFAR-10 test images 0-9, the published initialisation. The
# same (model, image) pairs as the random-weight study, so the two read side by side.
# Long on 2 cores (about an hour): run it again with the same OUTPUT_DIR to resume.
# Usage: bash studies/make_baselines_cifar.sh OUTPUT_DIR
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder, kept between calls so that a stopped run resumes}
models="cnn2_c2 cnn3_c1 cnn3_c11 cnn4_c1 cnn4_c2 lenet"
where=$(where_to_run "$out")  # a folder a stopped call left is resumed
# shellcheck disable=SC2086
"$PYTHON" hybrid.py --model $models --source cifar10-test --index 0-9 --attacks dlg idlg \
    --restarts 4 --jobs auto $where
run=$(last_run "$out")
cp "$run/results.json" assets/baselines_cifar.json
cp "$run/summary.md" assets/baselines_cifar.md
