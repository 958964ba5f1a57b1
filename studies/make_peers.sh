#!/usr/bin/env bash
# Remakes the peers' own setting (README, "DLG's LeNet on MNIST and CIFAR-100"): DLG's
# LeNet (studies/dlg_lenet.py: sigmoid, bias, weights uniform(-0.5, 0.5)) on the 20 test
# images of MNIST and of CIFAR-100 that foolbox ships, with R-GAP, the hybrid and
# hybrid_free (at the CIFAR-10 study's budget, N0 2500 and N 500) and DLG and iDLG at
# their paper's 300 L-BFGS steps, each the best of 4 starts.
# Long on 2 cores (about an hour): run it again with the same OUTPUT_DIR to resume.
# Usage: bash studies/make_peers.sh OUTPUT_DIR [mnist|cifar100]...
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder, kept between calls so that a stopped run resumes}
shift
datasets=("$@")
[ ${#datasets[@]} -gt 0 ] || datasets=(mnist cifar100)
for d in "${datasets[@]}"; do
    where=$(where_to_run "$out/$d")  # a folder a stopped call left is resumed
    # shellcheck disable=SC2086
    "$PYTHON" hybrid.py --model "studies/dlg_lenet.py:lenet_$d" --init uniform:0.5 --source "$d-test" \
        --index 0-19 --attacks rgap hybrid hybrid_free dlg idlg --restarts 4 --hybrid-iters-first 2500 \
        --hybrid-iters 500 --jobs auto $where
    run=$(last_run "$out/$d")
    cp "$run/results.json" "assets/peers_$d.json"
    cp "$run/summary.md" "assets/peers_$d.md"
done
"$PYTHON" -m studies.peers_table assets/peers_mnist.json assets/peers_cifar100.json > assets/peers_table.md
