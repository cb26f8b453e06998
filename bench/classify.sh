#!/bin/sh
# make bench-classify: the example classifier and its PyTorch twin (bench/classify_torch.py)
# trained with the same hyperparameters on the same data, one after the other at the same
# thread count, then the naive Bayes baseline. Prints each one's test accuracy and training
# time, and the ratio of the times. EPOCHS (default 8) and THREADS (default 2) may be set.
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
