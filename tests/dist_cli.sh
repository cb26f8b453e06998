#!/bin/sh
# qkv-classify under mpirun, as a user runs it: with --micro-batches 4 the checkpoint is the
# same file at 1, 2 and 4 ranks (threaded ranks too) and without mpirun; a run stopped after an
# epoch at 4 ranks and resumed at 2 ends in that same file; settings the ranks cannot agree on
# are refused at start; a killed rank ends the job, and the last checkpoint stays loadable.
# Usage: dist_cli.sh QKV_CLASSIFY MPIRUN (MPIRUN "" when qkv was built without MPI: skipped)
set -u
bin=$1
mpirun=${2:-}
if [ -z "$mpirun" ]; then
    echo "SKIP: qkv was built without MPI (meson feature mpi): no mpirun test"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
check() { # description, then a shell condition
    what=$1
    shift
    if eval "$@"; then
        echo "ok: $what"
    else
        echo "FAILED: $what"
        failures=$((failures + 1))
    fi
}

# Open MPI as the README runs it: root allowed, more ranks than cores, ranks that wait for
# each other sleeping rather than spinning (2 cores), no single-copy transport (containers
# forbid it), threaded ranks not pinned to one core.
root=""
[ "$(id -u)" -eq 0 ] && root=--allow-run-as-root
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_WAIT_POLICY=passive
mpi() { # ranks, then the command; at most 60 s
    n=$1
    shift
    timeout 60 "$mpirun" $root --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 \
        -x OMP_WAIT_POLICY -x OMPI_MCA_btl_vader_single_copy_mechanism -x ASAN_OPTIONS \
        -x LSAN_OPTIONS -np "$n" "$@"
}

# Two classes a model separates from single words; 90 examples: the last global batch of
# 16 is partial (10), and splits into micro-batches of 2 and 3.
i=0
while [ $i -lt 45 ]; do
    echo "good	a great fine lovely film number $i" >>"$work/train.tsv"
    echo "bad	an awful dull boring film number $i" >>"$work/train.tsv"
    i=$((i + 1))
done
printf 'good\tgreat lovely\nbad\tawful boring\ngood\tfine great film\nbad\tdull awful film\n' \
    >"$work/test.tsv"
train="$bin train --train $work/train.tsv --test $work/test.tsv --dim 16 --heads 2 --ffn 32"
train="$train --batch 16 --lr 1e-2 --dropout 0.1 --seed 3 --threads 1"

$train --epochs 2 --micro-batches 4 --save "$work/local.safetensors" >"$work/local.out" 2>&1
check "one process without mpirun, --micro-batches 4: exits 0" '[ $? -eq 0 ]'
for n in 1 2 4; do
    mpi $n $train --epochs 2 --micro-batches 4 --save "$work/np$n.safetensors" \
        >"$work/np$n.out" 2>&1
    check "-np $n: exits 0" '[ $? -eq 0 ]'
    check "-np $n: the model is byte-identical to the run without mpirun" \
        'cmp -s "$work/local.safetensors" "$work/np$n.safetensors"'
    check "-np $n: rank 0 alone reports (one final line)" \
        '[ "$(grep -c "^test_acc=" "$work/np$n.out")" -eq 1 ]'
done
# Under mpirun stdout is a pseudo-terminal: rank 0 draws its progress line there.
results() { grep -o 'train_loss=[0-9.]* test_acc=[0-9.]*$\|^test_acc=.*' "$1"; }
check "the reports agree" '[ "$(results "$work/np4.out")" = "$(results "$work/local.out")" ]'
mpi 2 $train --epochs 2 --micro-batches 4 --threads 2 --save "$work/np2t2.safetensors" \
    >"$work/np2t2.out" 2>&1
check "-np 2 with 2 threads a rank: byte-identical" \
    'cmp -s "$work/local.safetensors" "$work/np2t2.safetensors"'
# Without the flag a single process trains as it always did: another M, another model.
$train --epochs 2 --save "$work/plain.safetensors" >/dev/null 2>&1
check "without --micro-batches the single-process loop is kept (a different model)" \
    '! cmp -s "$work/local.safetensors" "$work/plain.safetensors"'

# Stop after one epoch at 4 ranks, resume at 2: the same bits as the run that did not stop.
mpi 4 $train --epochs 1 --micro-batches 4 --save "$work/epoch1.safetensors" >/dev/null 2>&1
mpi 2 $train --epochs 2 --micro-batches 4 --load "$work/epoch1.safetensors" \
    --save "$work/resumed.safetensors" >"$work/resumed.out" 2>&1
check "resumed 4 -> 2 ranks: exits 0" '[ $? -eq 0 ]'
check "resumed 4 -> 2 ranks: byte-identical to the run that did not stop" \
    'cmp -s "$work/local.safetensors" "$work/resumed.safetensors"'
check "resumed: trains epoch 2 alone" \
    '[ "$(grep -o "epoch [0-9]* train_loss" "$work/resumed.out")" = "epoch 2 train_loss" ]'

expect_refusal() { # description, expected message fragment, then the command
    label=$1 message=$2
    shift 2
    "$@" >"$work/bad.out" 2>&1 </dev/null
    status=$?
    check "$label: exits non-zero" '[ $status -ne 0 ] && [ $status -ne 124 ]'
    check "$label: says \"$message\"" 'grep -qF -- "$message" "$work/bad.out"'
}
expect_refusal "4 ranks for 2 micro-batches" "4 ranks cannot share 2 micro-batches" \
    mpi 4 $train --epochs 1 --micro-batches 2
expect_refusal "a resume with another micro-batch count" \
    "the run was trained with --micro-batches 4, not 8" \
    mpi 2 $train --epochs 2 --micro-batches 8 --load "$work/epoch1.safetensors"
expect_refusal "--micro-batches 3" "qkv-classify: --micro-batches is a power of two, not 3" \
    $train --micro-batches 3

# A rank killed mid-run: mpirun ends the job with a message (no hang), and the checkpoint of
# the last finished epoch loads.
mpi 2 $train --epochs 1000 --micro-batches 4 --save "$work/killed.safetensors" \
    >"$work/killed.out" 2>&1 &
job=$!
waited=0
while [ ! -f "$work/killed.safetensors" ] && [ $waited -lt 300 ]; do
    sleep 0.1
    waited=$((waited + 1))
done
ranks() { # the qkv-classify processes under pid $1
    for child in $(ps -o pid= --ppid "$1"); do
        [ "$(cat "/proc/$child/comm" 2>/dev/null)" = qkv-classify ] && echo "$child"
        ranks "$child"
    done
}
victim=$(ranks $job | sort -n | tail -1) # the last rank started
[ -n "$victim" ] && kill -9 "$victim"
wait $job
status=$?
check "a killed rank: the job ends with an error, not a timeout" \
    '[ $status -ne 0 ] && [ $status -ne 124 ]'
check "a killed rank: mpirun says so" \
    'grep -q "signal 9\|exited on signal\|killed" "$work/killed.out"'
check "a killed rank: the last checkpoint loads" \
    '"$bin" eval --load "$work/killed.safetensors" --test "$work/test.tsv" >/dev/null 2>&1'

echo "$failures failures"
[ $failures -eq 0 ]
