#!/usr/bin/env bash
# Remakes the study of the README's "Defences": the paper's four models and two more
# (cnn3_c1, whose upper layer leaves 4533 unknowns free under a full-rank first one; lenet, full rank
# with leaky ReLUs and biases, whose inverse multiplies errors by 1/slope) x CIFAR-10 test
# images 0-4, random weights, under no defence, Gaussian noise, DP-SGD's clip-and-noise
# and pruning. R-GAP and the hybrid (at the CIFAR-10 study's budget, N0 = 2500, N = 500)
# over the whole grid on all six models; DLG and iDLG (the best of 4 starts each: L-BFGS is
# chaotic) and Cosine+TV (one start, the paper's: Adam on a cosine is not) over the grid on
# the paper's four models and images 0-2. Long on 2 cores (hours): run it again with the
# same OUTPUT_DIR to resume where it stopped.
# Usage: bash studies/make_defences.sh OUTPUT_DIR [linear|linear_bends|baselines|cosine ...]
source "$(dirname "$0")/preamble.sh"
out=${1:?an output folder, kept between calls so that a stopped run resumes}
grid="none noise:1e-4 noise:1e-3 noise:1e-2 noise:1e-1 prune:0.2 prune:0.5 prune:0.7 prune:0.9 prune:0.99 dp:1:0.1 dp:1:1"
# Points added where the linear attacks' curves bent between the grid's (lenet's below 1e-4; most
# between noise 1e-2 and 1e-1 and prune 0.9 and 0.99; every dp one below Z = 0.1): a part of their own
# for R-GAP and the hybrid, which ran the grid first; the baselines run both at once.
bends="noise:1e-6 noise:1e-5 noise:3e-2 prune:0.95 dp:1:0.01 dp:1:0.001"
paper="cnn2_c1 cnn2_c2 cnn4_c1 cnn4_c2"
linear="--model $paper cnn3_c1 lenet --index 0-4 --attacks rgap hybrid --hybrid-iters 500 --hybrid-iters-first 2500"
parts=("${@:2}")
[ ${#parts[@]} -gt 0 ] || parts=(linear linear_bends baselines cosine)
for part in "${parts[@]}"; do  # every part checked before the first, which runs for an hour, starts
    case "$part" in
        linear | linear_bends | baselines | cosine) ;;
        *) echo "make_defences.sh: unknown part '$part' (linear, linear_bends, baselines or cosine)" >&2; exit 2 ;;
    esac
done
for part in "${parts[@]}"; do
    case "$part" in
        linear) study="$linear"; defences="$grid" ;;
        linear_bends) study="$linear"; defences="$bends" ;;
        baselines) study="--model $paper --index 0-2 --attacks dlg idlg --restarts 4"; defences="$grid $bends" ;;
        cosine) study="--model $paper --index 0-2 --attacks cosine"; defences="$grid $bends" ;;
    esac
    dir="$out/$part"
    where=$(where_to_run "$dir")  # a folder a stopped call left is resumed
    # shellcheck disable=SC2086
    "$PYTHON" hybrid.py $study --source cifar10-test --defence $defences --jobs auto $where
    run=$(last_run "$dir")
    for f in defence_vs_quality.png pruned_index_vs_quality.png results.json summary.md; do
        [ -e "$run/$f" ] && cp "$run/$f" "assets/defences_${part}_$f"
    done
done
