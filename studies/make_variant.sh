#!/usr/bin/env bash
# Remakes the table of the README's "A hybrid that keeps what the systems determine":
# hybrid_free (ours) against R-GAP and the paper's hybrid, on the zoo x CIFAR-10 test
# images 0-4 at the CIFAR-10 study's budget (N0 = 2500, N = 500). The default rule's
# numbers come from the CIFAR-10 study's first five images (studies/make_study_cifar.sh,
# whose results.json is given as STUDY_JSON); the other rule, free-here, is run here on
# the models where the two rules differ (a full-rank layer below a rank-deficient one).
# About 15 minutes on 2 CPU cores.
# Usage: bash studies/make_variant.sh STUDY_JSON OUTPUT_DIR
source "$(dirname "$0")/preamble.sh"
study=${1:?the results.json of the CIFAR-10 study}
out=${2:?an output folder, kept between calls so that a stopped run resumes}
need_results "$study"
models="cnn3_c1 cnn3_c6 cnn3_c7 cnn3_c8 cnn3_c11 cnn3_c12 cnn3_c13 cnn3_c5 cnn3_c14 cnn3_c15 cnn4_c1 cnn4_c2 cnn4_c3 cnn6d"
where=$(where_to_run "$out")  # a folder a stopped call left is resumed
# shellcheck disable=SC2086
"$PYTHON" hybrid.py --model $models --source cifar10-test --index 0-4 --attacks hybrid_free \
    --correct-where free-here --hybrid-iters 500 --hybrid-iters-first 2500 --jobs auto $where
run=$(last_run "$out")
cp "$run/results.json" assets/variant_free_here.json
"$PYTHON" -m studies.variant_table "$study" assets/variant_free_here.json --images 0-4 > assets/variant_table.md
