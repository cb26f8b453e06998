#!/bin/sh
# make bench-classify: the example classifier and its PyTorch twin (bench/classify_torch.py)
# trained with the same hyperparameters on the same data, one after the other at the same
# thread count, then the naive Bayes baseline. Prints each one's test accuracy and training
# time, and the ratio of the times. Then qkv's --bf16 run (autocast) against its F32 one:
# accuracies, the ratio of the times, and the bound on it, (1 - p) + p / 1.7 + 0.05, from the
# share p of the F32 run spent in GEMM (bench/gemm_share.sh, when perf is installed). EPOCHS
# (default 8) and THREADS (default 2) may be set.
build=${1:-build}
epochs=${EPOCHS:-8}
threads=${THREADS:-2}
train=data/generated/train.tsv
test=data/generated/test.tsv
set -e
[ -s "$train" ] || python3 data/make_dataset.py --out data/generated
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s.%N)
"$build/examples/qkv-classify" train --train "$train" --test "$test" --epochs "$epochs" \
    --threads "$threads" >"$out/qkv.txt"
end=$(date +%s.%N)
q_seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
start=$(date +%s.%N)
"$build/examples/qkv-classify" train --train "$train" --test "$test" --epochs "$epochs" \
    --threads "$threads" --bf16 >"$out/bf16.txt"
end=$(date +%s.%N)
b_seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
start=$(date +%s.%N)
# The reference runs at its best: no override holding OpenBLAS to older kernels.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS="$threads" \
    OMP_NUM_THREADS="$threads" /usr/bin/python3 bench/classify_torch.py \
    --epochs "$epochs" --threads "$threads" >"$out/torch.txt"
end=$(date +%s.%N)
p_seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
/usr/bin/python3 bench/naive_bayes.py >"$out/nb.txt"
q_acc=$(tail -1 "$out/qkv.txt" | sed 's/test_acc=//')
p_acc=$(tail -1 "$out/torch.txt" | sed 's/test_acc=//')
n_acc=$(tail -1 "$out/nb.txt" | sed 's/test_acc=//')
echo "== text classifier, $epochs epochs, $threads threads ($train)"
grep '^epoch' "$out/qkv.txt" | sed 's/^/qkv     /'
grep '^epoch' "$out/torch.txt" | sed 's/^/pytorch /'
printf '%-12s %9s %12s\n' model test_acc seconds
printf '%-12s %9s %12s\n' qkv "$q_acc" "$q_seconds"
printf '%-12s %9s %12s\n' pytorch "$p_acc" "$p_seconds"
printf '%-12s %9s %12s\n' naive_bayes "$n_acc" -
ratio=$(awk -v a="$q_seconds" -v b="$p_seconds" 'BEGIN { printf "%.2f", a / b }')
echo "time qkv/pytorch: $ratio"
b_acc=$(tail -1 "$out/bf16.txt" | sed 's/test_acc=//')
echo "== qkv --bf16 (autocast) against qkv F32, the same run"
printf '%-12s %9s %12s
' qkv_bf16 "$b_acc" "$b_seconds"
echo "test_acc difference: $(awk -v a="$b_acc" -v b="$q_acc" 'BEGIN { d = a - b
    printf "%.3f (within 0.005: %s)", d, (d <= 0.005 && d >= -0.005) ? "yes" : "no" }')"
b_ratio=$(awk -v a="$b_seconds" -v b="$q_seconds" 'BEGIN { printf "%.3f", a / b }')
if share=$(sh bench/gemm_share.sh "$build" "$train" "$test" 2 2>/dev/null); then
    p=$(echo "$share" | sed -n 's/^gemm_share p=\([0-9.]*\).*/\1/p')
    echo "$share"
    echo "time bf16/F32: $b_ratio, bound (1 - p) + p / 1.7 + 0.05 = $(awk -v p="$p" \
        -v r="$b_ratio" 'BEGIN { b = 1 - p + p / 1.7 + 0.05
        printf "%.3f (%s)", b, r <= b ? "within" : "NOT within" }')"
else
    echo "time bf16/F32: $b_ratio (install perf for the GEMM share p and the bound)"
fi
