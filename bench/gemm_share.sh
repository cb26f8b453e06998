#!/bin/sh
# The share p of qkv-classify's F32 training time spent in GEMM (packing, micro-kernels and
# their drivers), from perf samples of a short run at one thread on the given data:
#   sh bench/gemm_share.sh BUILD TRAIN.tsv TEST.tsv [EPOCHS]
# Prints "gemm_share p=..." The example's --bf16 run should take at most
# (1 - p) + p / 1.7 + 0.05 of the F32 run's time (bench/classify.sh prints both).
set -e
build=$1
train=$2
test=$3
epochs=${4:-2}
command -v perf >/dev/null || { echo "gemm_share: perf is not installed"; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
OMP_WAIT_POLICY=passive perf record -q -F 999 -o "$out/perf.data" \
    "$build/examples/qkv-classify" train --train "$train" --test "$test" --epochs "$epochs" \
    --threads 1 >"$out/train.log" 2>&1
perf report -i "$out/perf.data" --no-children --sort symbol -g none --percent-limit 0 \
    2>/dev/null | awk '
    /%/ && $0 !~ /^#/ {
        share = $1; sub("%", "", share); total += share
        if ($0 ~ /tile_|pack_|gemm|run_tile|macro_kernel|block_(f32|f64|unpacked)/) gemm += share
    }
    END { printf "gemm_share p=%.3f (%.1f%% of %.1f%% sampled)\n", gemm / total, gemm, total }'
