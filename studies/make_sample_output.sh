#!/usr/bin/env bash
# Remakes assets/sample_output.png and assets/sample_output.json: the paper's comparison
# figure at the paper's settings, four models against two bundled photographs.
# About 20 minutes on 2 CPU cores.  Usage: bash studies/make_sample_output.sh
source "$(dirname "$0")/preamble.sh"
out=$(mktemp -d)
"$PYTHON" hybrid.py --model cnn2_c1 cnn2_c2 cnn4_c1 cnn4_c2 --source samples --index 3 0 \
    --output "$out"
run=$(ls -d "$out"/*/)
cp "$run/comparison.png" assets/sample_output.png
cp "$run/results.json" assets/sample_output.json
