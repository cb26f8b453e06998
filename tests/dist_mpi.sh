#!/bin/sh
# dist/ across ranks: runs tests/dist_check.c under mpirun at 1, 2 and 4 ranks, with 1 and 2
# threads each, and compares the trained weights byte for byte with a one-process run of the
# same micro-batch count. Arguments: the dist_check program, and "mpi" or "nompi" (how qkv
# was built). Without MPI (or without mpirun) it prints one line and skips itself (77).
# Ends with "N passed, N failed" as cmocka does, so tools/run-tests.sh counts each check.
check=$1
[ "$2" = mpi ] || { echo "dist_mpi: SKIPPED: qkv was built without MPI (meson -Dmpi)"; exit 77; }
command -v mpirun >/dev/null 2>&1 ||
    { echo "dist_mpi: SKIPPED: no mpirun (Debian: openmpi-bin)"; exit 77; }

# Open MPI refuses root unless told; containers lack the single-copy mechanism; ranks that
# share 2 cores must wait passively (MPI and OpenMP), or 4 ranks x 2 threads crawl.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_WAIT_POLICY=passive
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "[       OK ] $1"; }
bad() { failed=$((failed + 1)); echo "[  FAILED  ] $1"; cat "$dir/log"; }

# run RANKS THREADS ARGS...: dist_check under mpirun, bounded so that nothing hangs.
run() {
    n=$1 t=$2
    shift 2
    QKV_THREADS=$t OMP_NUM_THREADS=$t timeout 120 mpirun -np "$n" --bind-to none \
        "$check" "$@" >"$dir/log" 2>&1
}

for n in 1 2 4; do
    name="collectives at $n ranks"
    if run $n 1 collectives; then ok "$name"; else bad "$name"; fi
done

# The reference: one process, one thread, M = 4, 5 steps (the third batch is partial).
run 1 1 train 4 5 "$dir/ref" || bad "one-process training"
for nt in "1 2" "2 1" "2 2" "4 1" "4 2"; do
    set -- $nt
    name="5 steps at $1 ranks x $2 threads equal 1 process to the bit"
    if run "$1" "$2" train 4 5 "$dir/w" && cmp -s "$dir/ref" "$dir/w"; then ok "$name"
    else bad "$name"; fi
done

name="the TCP transport (--mca btl self,tcp) gives the same bits"
if OMPI_MCA_btl=self,tcp run 2 1 train 4 5 "$dir/w" && cmp -s "$dir/ref" "$dir/w"; then
    ok "$name"; else bad "$name"; fi

name="3 steps at 4 ranks, resumed at 2 ranks to 5 steps, equal 5 steps straight"
if run 4 1 train 4 3 "$dir/w3" --save "$dir/ckpt" 3 &&
    run 2 1 train 4 5 "$dir/w" --resume "$dir/ckpt" && cmp -s "$dir/ref" "$dir/w"; then
    ok "$name"; else bad "$name"; fi

# A rank that leaves in step 3 ends the job (mpirun's abort, within the timeout, not a hang);
# the checkpoint of step 2 is whole, and resuming from it continues to the bit.
name="a rank leaving mid-step ends the job; the last checkpoint resumes to the bit"
rm -f "$dir/ckpt"
run 2 1 train 4 5 "$dir/w" --save "$dir/ckpt" 2 --die 3
status=$?
if [ $status -ne 0 ] && [ $status -ne 124 ] && grep -q "rank 1 leaves" "$dir/log" &&
    grep -qi "mpirun\|exited\|abort" "$dir/log" &&
    run 1 1 train 4 5 "$dir/w" --resume "$dir/ckpt" && cmp -s "$dir/ref" "$dir/w"; then
    ok "$name"; else bad "$name (mpirun exit status $status)"; fi

name="a rank killed mid-step (SIGKILL) ends the job; its checkpoint loads"
rm -f "$dir/ckpt"
run 2 1 train 4 5 "$dir/w" --save "$dir/ckpt" 2 --kill 3
status=$?
if [ $status -ne 0 ] && [ $status -ne 124 ] && grep -qi "signal\|killed" "$dir/log" &&
    run 1 1 train 4 5 "$dir/w" --resume "$dir/ckpt" && cmp -s "$dir/ref" "$dir/w"; then
    ok "$name"; else bad "$name (mpirun exit status $status)"; fi

name="3 ranks are refused at start for M = 4"
if ! run 3 1 train 4 5 "$dir/w" &&
    [ "$(grep -c '3 ranks cannot share 4 micro-batches; the rank count must be a power of two' \
        "$dir/log")" = 3 ]; then ok "$name"; else bad "$name"; fi

for what in params shapes micro; do
    name="a $what mismatch is refused on every rank"
    if run 2 1 mismatch $what &&
        [ "$(grep -c '^rank [01]: qkv_dist_trainer_new: .*rank 1' "$dir/log")" = 2 ]
    then ok "$name"; else bad "$name"; fi
done

# Plain mode at 2 ranks sums two gradients, which any order does alike: it must give the
# bits of the deterministic mode with M = 2.
name="plain mode at 2 ranks equals M = 2 in one process"
if run 1 1 train 2 5 "$dir/ref2" && run 2 1 train 2 5 "$dir/w" --plain &&
    cmp -s "$dir/ref2" "$dir/w"; then ok "$name"; else bad "$name"; fi

echo "[  PASSED  ] $passed test(s)."
[ $failed -eq 0 ] || echo "[  FAILED  ] $failed test(s)."
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
