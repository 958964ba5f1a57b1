#!/usr/bin/env bash
# Remakes the README's default-run figure: `python hybrid.py` as it runs with no flags (the
# paper's settings, cnn4_c2, all five attacks). Offline, without CIFAR-10's training set, it
# attacks CIFAR-10 test image 3 (foolbox ships it), and says so. About 5 minutes on 2 cores.
# Usage: bash studies/make_default_run.sh OUTPUT_DIR
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder}
"$PYTHON" hybrid.py --output "$out"
run=$(last_run "$out")
cp "$run/comparison.png" assets/default_run.png
cp "$run/results.json" assets/default_run.json
