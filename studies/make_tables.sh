#!/usr/bin/env bash
# Remakes every committed table (and the figures drawn from committed runs, not copied from a
# run folder) from the committed results.json files: a few minutes, the noise's gain (it runs
# R-GAP) and the study figures last. tests/test_docs.py runs it into a temporary folder and compares.
# Usage: bash studies/make_tables.sh [OUTPUT_DIR]   (default assets: in place)
source "$(dirname "$0")/preamble.sh"
out=${1:-assets}
mkdir -p "$out"
table() { local name=$1; shift; "$PYTHON" -m "studies.$1" "${@:2}" > "$out/$name"; }
table study_table_cifar_random_vs_photographs.md study_table assets/study_cifar_random.json assets/study_random.json
table study_table_cifar_trained_vs_photographs.md study_table assets/study_cifar_trained.json assets/study_trained.json
table study_table_cifar_trained_vs_random.md study_table assets/study_cifar_trained.json \
    assets/study_cifar_random.json --names trained random --images 0-9
table study_table_baselines_cifar_vs_study.md study_table assets/baselines_cifar.json \
    assets/study_cifar_random.json --names baselines "the study" --images 0-9 \
    --models cnn2_c2 cnn3_c1 cnn3_c11 cnn4_c1 cnn4_c2 lenet
table heldout_table.md heldout_table assets/heldout.json assets/study_cifar_random.json --images 0-4
table variant_table.md variant_table assets/study_cifar_random.json assets/variant_free_here.json --images 0-4
table variant_table_heldout.md variant_table assets/heldout.json
table convergence_table.md convergence_table assets/convergence/N0_*.json
table defence_table.md defence_table assets/defences_*_results.json --figure "$out/defence_table.png"
table peers_table.md peers_table assets/peers_mnist.json assets/peers_cifar100.json
table claims.md claims
table client_batches_table.md client_batches_table assets/client_batches_mnist.json assets/client_batches_cifar100.json
table projected_study.md projected_study assets/projection_cifar.json
table projected_study_batched.md projected_study assets/projection_cifar_batched.json
table benchmark_table.md benchmark_table assets/benchmark/old.json "$(cat assets/benchmark/old.seconds)" \
    assets/benchmark/new.json "$(cat assets/benchmark/new.seconds)" --floor assets/benchmark/old_elsewhere.json
table batch_alone_table.md benchmark_table assets/batch_alone/batch1.json "$(cat assets/batch_alone/batch1.seconds)" \
    assets/batch_alone/batch5.json "$(cat assets/batch_alone/batch5.seconds)" --names batch-1 batch-5
if [ "${TABLES_ONLY:-}" != 1 ]; then
    table noise_gain.md noise_gain assets/defences_linear_results.json assets/defences_linear_bends_results.json
    "$PYTHON" -m studies.method "$out/method.png"
    for study in study_cifar_random study_cifar_trained heldout; do  # the study figures, from their runs
        "$PYTHON" -m studies.figures "assets/$study.json" "$out/$study.png" "$out/${study}_fraction.png"
    done
    "$PYTHON" -m studies.figures assets/study_random.json "$out/study_random.png"
    "$PYTHON" -m studies.figures assets/study_trained.json "$out/study_trained.png"
fi
