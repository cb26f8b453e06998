#!/bin/sh
# make bench: GEMM against OpenBLAS, then the enc2 model against PyTorch, at 1 and 2 threads,
# each pair run in the same session, with the ratio qkv/reference. Machines are noisy: read
# the ratios, and run it twice if a figure looks off.
build=${1:-build}
set -e
echo "== GEMM (bench/gemm.c): GFLOP/s, qkv vs OpenBLAS cblas_sgemm"
gemm_out=$("$build/bench/gemm")
echo "$gemm_out"
# The targets read as the worst ratio per group: N = 128 alone, the rest together.
if echo "$gemm_out" | grep -q '^OpenBLAS'; then
    echo "$gemm_out" | awk '$NF ~ /^[0-9.]+$/ && NF >= 5 {
            r = $NF; t = $(NF - 3); g = ($0 ~ /^square 128 /) ? "N=128" : "N>=256, enc2 shapes"
            k = g " at " t " thread(s)"
            if (!(k in worst) || r < worst[k]) worst[k] = r
        }
        END { for (k in worst) printf "worst qkv/OpenBLAS ratio, %s: %.2f\n", k, worst[k] }' |
        sort
fi
echo
echo "== enc2 training step and inference batch (bench/enc2.c vs bench/enc2_torch.py)"
# REPEAT=n runs each pair n times, alternating qkv and PyTorch, and shows the median of each
# figure: on a machine shared with other work one pair can land in a busy moment.
repeat=${REPEAT:-1}
echo "(median of $repeat alternating run(s) per thread count; set REPEAT to change)"
printf '%-8s %-22s %12s %12s %8s\n' threads figure qkv pytorch ratio
median() {
    sort -n | awk '{ v[NR] = $1 }
        END { print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
for t in 1 2; do
    qs="" ps=""
    i=0
    while [ "$i" -lt "$repeat" ]; do
        q=$("$build/bench/enc2" --threads "$t")
        p=$(OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t /usr/bin/python3 bench/enc2_torch.py \
            --threads "$t")
        qs=$(printf '%s\n%s' "$qs" "$q")
        ps=$(printf '%s\n%s' "$ps" "$p")
        i=$((i + 1))
    done
    for key in train_step_ms infer_batch_ms train_gflops peak_rss_mb; do
        qv=$(echo "$qs" | sed -n "s/^$key=//p" | median)
        pv=$(echo "$ps" | sed -n "s/^$key=//p" | median)
        printf '%-8s %-22s %12s %12s %8s\n' "$t" "$key" "$qv" "$pv" \
            "$(awk -v a="$qv" -v b="$pv" 'BEGIN { printf "%.2f", a / b }')"
    done
    for key in train_step_checked_ms steady_system_allocs_per_step allocator_requests_per_step \
        page_faults_per_step; do
        echo "$t        qkv $key=$(echo "$qs" | sed -n "s/^$key=//p" | median)"
    done
done
