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
printf '%-8s %-22s %12s %12s %8s\n' threads figure qkv pytorch ratio
for t in 1 2; do
    q=$("$build/bench/enc2" --threads "$t")
    p=$(OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t /usr/bin/python3 bench/enc2_torch.py --threads "$t")
    for key in train_step_ms infer_batch_ms train_gflops peak_rss_mb; do
        qv=$(echo "$q" | sed -n "s/^$key=//p")
        pv=$(echo "$p" | sed -n "s/^$key=//p")
        printf '%-8s %-22s %12s %12s %8s\n' "$t" "$key" "$qv" "$pv" \
            "$(awk -v a="$qv" -v b="$pv" 'BEGIN { printf "%.2f", a / b }')"
    done
    echo "$q" | grep -E 'steady_system_allocs_per_step|allocator_requests|page_faults_per_step' |
        sed "s/^/$t        qkv /"
done
