#!/usr/bin/env bash
# The study's speed, this checkout against an older commit, back to back on the same machine:
# the subset of issue #33 (cnn2_c2, cnn3_c1, cnn4_c2, cnn4_c3, cnn6d and lenet x CIFAR-10 test
# images 0-3; R-GAP, the hybrid and hybrid_free at N0 2500, N 500; --jobs 2), run first by
# OLD_COMMIT (checked out as a git worktree under OUT) and then by this checkout. Prints each
# side's wall time and pairs per hour, and the largest per-pair PSNR difference. Run it on an
# idle machine: nothing else may share the cores. Extra flags go to both runs (--quick for a
# smoke test of the script itself); MODELS and INDEX replace the subset's models and images.
# FLOOR=1 then runs OLD_COMMIT once more with AVX2's kernels in place of AVX-512's (torch's,
# oneDNN's, MKL's and OpenBLAS's, as on an older CPU) into OUT/runs/old_elsewhere: the old code's
# own reproducibility, which the table sets beside the new side's differences (--floor).
# Usage: [FLOOR=1] [MODELS="cnn2_c2"] [INDEX=0] bash studies/benchmark.sh OLD_COMMIT OUT [--quick] ...
source "$(dirname "$0")/preamble.sh"
old=${1:?the commit to compare with}
out=${2:?an output folder}
shift 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ ! -d "$out/code-$old" ]; then git worktree add --detach "$out/code-$old" "$old" > /dev/null 2>&1; fi
python_path=$(command -v "$PYTHON")
python_path=$(cd "$(dirname "$python_path")" && pwd)/$(basename "$python_path")
run() {  # run SIDE FOLDER: the subset in FOLDER's checkout into OUT/runs/SIDE, its wall seconds beside
    local side=$1 root=$2 start end
    shift 2
    rm -rf "${out:?}/runs/$side"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    (cd "$root" && "$python_path" hybrid.py --model ${MODELS:-cnn2_c2 cnn3_c1 cnn4_c2 cnn4_c3 cnn6d lenet} \
        --source cifar10-test --index "${INDEX:-0-3}" --attacks rgap hybrid hybrid_free --hybrid-iters 500 \
        --hybrid-iters-first 2500 --jobs 2 --output "$out/runs/$side" "$@" > "$out/$side.log" 2>&1)
    end=$(date +%s.%N)
    echo "$end - $start" | bc > "$out/$side.seconds"
}
run old "$out/code-$old" "$@"
run new "$(pwd)" "$@"
floor=()
if [ "${FLOOR:-}" = 1 ]; then
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell \
        run old_elsewhere "$out/code-$old" "$@"
    floor=(--floor "$out"/runs/old_elsewhere/*/results.json)
fi
"$PYTHON" -m studies.benchmark_table "$out"/runs/old/*/results.json "$(cat "$out/old.seconds")" \
    "$out"/runs/new/*/results.json "$(cat "$out/new.seconds")" "${floor[@]}"
