#!/usr/bin/env bash
# Remakes the batch study (docs/usage.md, "Batches"): DLG's LeNet (studies/dlg_lenet.py:
# sigmoid, bias, weights uniform(-0.5, 0.5)) on the 20 test images of MNIST and of CIFAR-100
# that foolbox ships, in 5 client batches of 4 (--batch 4: images 0-3, 4-7, ...), each sharing
# the gradient of its mean cross-entropy. DLG and iDLG at their paper's 300 L-BFGS steps, each
# the best of 4 starts; the labels counted from the gradient (leakage/labels.py).
# Long on 2 cores (about an hour): run it again with the same OUTPUT_DIR to resume.
# Usage: bash studies/make_client_batches.sh OUTPUT_DIR [mnist|cifar100]...
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder, kept between calls so that a stopped run resumes}
shift
datasets=("$@")
[ ${#datasets[@]} -gt 0 ] || datasets=(mnist cifar100)
for d in "${datasets[@]}"; do
    where=$(where_to_run "$out/$d")  # a folder a stopped call left is resumed
    # shellcheck disable=SC2086
    "$PYTHON" hybrid.py --model "studies/dlg_lenet.py:lenet_$d" --init uniform:0.5 --source "$d-test" \
        --index 0-19 --batch 4 --attacks dlg idlg --restarts 4 --jobs auto $where
    run=$(last_run "$out/$d")
    cp "$run/results.json" "assets/client_batches_$d.json"
    cp "$run/summary.md" "assets/client_batches_$d.md"
done
"$PYTHON" -m studies.client_batches_table assets/client_batches_mnist.json assets/client_batches_cifar100.json \
    > assets/client_batches_table.md
