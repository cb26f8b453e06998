#!/bin/sh
# make bench-dist: the enc2 training step (bench/enc2.c, global batch 32) data-parallel over
# MPI against one process on the same cores, and against PyTorch DDP (gloo) at 2 ranks
# (bench/enc2_ddp_torch.py), in one run:
#   qkv 1 process x 2 threads        the whole batch, threads share the cores
#   qkv 2 ranks x 1 thread, plain    16 samples a rank, bucketed MPI_Allreduce during backward
#   qkv 2 ranks x 1 thread, M = 8    8 micro-batches of 4, summed in the fixed tree
#   PyTorch DDP 2 ranks x 1 thread   16 samples a rank, gloo buckets during backward
# Ranks that share cores wait passively (mpi_yield_when_idle, OMP_WAIT_POLICY=passive).
# REPEAT=n alternates the four runs n times and shows the median of each figure. Machines are
# noisy: read the ratios, and run it twice if a figure looks off.
build=${1:-build}
repeat=${REPEAT:-1}
steps=${STEPS:-10}
set -e
enc2="$build/bench/enc2"
if ! command -v mpirun >/dev/null 2>&1; then
    echo "bench-dist: mpirun not found (install openmpi-bin libopenmpi-dev)" >&2
    exit 1
fi
# Open MPI refuses root unless told, and in containers its single-copy (CMA) transport is
# often not permitted: shared memory then copies through a buffer.
root=""
[ "$(id -u)" -eq 0 ] && root=--allow-run-as-root
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_WAIT_POLICY=passive
mpi="mpirun $root --oversubscribe --mca mpi_yield_when_idle 1 -x OMP_WAIT_POLICY"
mpi="$mpi -x OMPI_MCA_btl_vader_single_copy_mechanism -np 2"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

median() {
    sort -n | awk '{ v[NR] = $1 }
        END { if (NR) print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
value() { # file key: the median of key=value over the repeats in file
    sed -n "s/^$2=\([0-9.]*\).*/\1/p" "$1" | median
}
i=0
while [ "$i" -lt "$repeat" ]; do
    "$enc2" --threads 2 --steps "$steps" --train-only 1 >>"$out/one.txt"
    $mpi "$enc2" --threads 1 --steps "$steps" --train-only 1 --micro-batches 0 \
        >>"$out/plain.txt"
    $mpi "$enc2" --threads 1 --steps "$steps" --train-only 1 --micro-batches 8 \
        >>"$out/micro.txt"
    # The reference runs at its best: no override holding OpenBLAS to older kernels.
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /usr/bin/python3 bench/enc2_ddp_torch.py \
        --ranks 2 --threads 1 --steps "$steps" >>"$out/ddp.txt"
    i=$((i + 1))
done

if ! grep -q '^ranks=2$' "$out/plain.txt"; then
    echo "bench-dist: $enc2 ran as one process a rank: qkv was built without MPI" >&2
    exit 1
fi
one=$(value "$out/one.txt" train_step_ms)
plain=$(value "$out/plain.txt" train_step_ms)
micro=$(value "$out/micro.txt" train_step_ms)
ddp=$(value "$out/ddp.txt" train_step_ms)
echo "== enc2 training step, global batch 32 (median of $repeat run(s), $steps steps each)"
printf '%-38s %14s\n' configuration train_step_ms
printf '%-38s %14s\n' "qkv 1 process x 2 threads" "$one" "qkv 2 ranks x 1 thread, plain" \
    "$plain" "qkv 2 ranks x 1 thread, micro-batches 8" "$micro" \
    "PyTorch DDP (gloo) 2 ranks x 1 thread" "$ddp"
awk -v one="$one" -v plain="$plain" -v micro="$micro" -v ddp="$ddp" 'BEGIN {
    r = plain / one
    printf "qkv 2x1 plain / qkv 1x2:        %.2f (target <= 1.15: %s)\n", r,
        r <= 1.15 ? "met" : "NOT met"
    r = plain / ddp
    printf "qkv 2x1 plain / PyTorch DDP 2x1: %.2f (target <= 0.5: %s)\n", r,
        r <= 0.5 ? "met" : "NOT met"
    r = micro / plain
    printf "qkv 2x1 M=8 / qkv 2x1 plain:    %.2f (target <= 1.15: %s)\n", r,
        r <= 1.15 ? "met" : "NOT met" }'

echo "== communication (qkv ranks, per step)"
for mode in plain micro; do
    f="$out/$mode.txt"
    printf '%-6s gradient %s MB, sent per rank %s MB, alone %s ms, waited after backward %s ms,' \
        "$mode" "$(value "$f" grad_mb)" "$(value "$f" sent_mb_per_rank)" \
        "$(value "$f" comm_ms)" "$(value "$f" wait_ms)"
    awk -v c="$(value "$f" comm_ms)" -v w="$(value "$f" wait_ms)" 'BEGIN {
        h = c > 0 ? 1 - w / c : 0; if (h < 0) h = 0
        printf " hidden by the backward %.0f%%\n", 100 * h }'
done
printf 'PyTorch DDP: one blocking all-reduce of the gradients %s ms\n' \
    "$(value "$out/ddp.txt" comm_ms)"

echo "== the cost model of docs/distributed.md against these figures (bench/dist_model.py)"
f="$out/micro.txt"
/usr/bin/python3 bench/dist_model.py check --grad-mb "$(value "$f" grad_mb)" \
    --comm-ms "$(value "$f" comm_ms)" --step-ms "$(value "$f" train_step_ms)" \
    --wait-ms "$(value "$f" wait_ms)"
/usr/bin/python3 bench/dist_model.py table --compute-ms "$one"
