#!/bin/sh
# Runs the fast test suites under valgrind memcheck: an invalid read or write, a jump on an
# uninitialised value, a bad free or a definitely lost block fails the suite. It has a build
# of its own, without -march=native (valgrind does not decode AVX-512) and with the kernels on
# one OpenMP thread (memcheck runs threads one at a time anyway). test_memory and the large
# numeric suites are left out: under memcheck they take minutes and add no new code paths.
# Ends with one line "N passed, N failed" counting the cmocka tests, also written to
# build-valgrind/test-count.txt; a suite with a memcheck report counts as one failure at least.
set -e
build=build-valgrind
suites="errors tensor views elementwise reduce autograd gradcheck index matmul data nn optim
    checkpoint dist"
sh tools/install-deps.sh valgrind
if [ ! -f "$build/build.ninja" ]; then
    # Without MPI: memcheck reports Open MPI's own start-up as errors (test_dist runs in its
    # world of one process either way).
    meson setup "$build" -Dnative=false -Dbuildtype=debugoptimized -Dwerror=true \
        -Dmpi=disabled >/dev/null
fi
targets=""
for s in $suites; do targets="$targets tests/test_$s"; done
# shellcheck disable=SC2086
if ! ninja -C "$build" $targets >"$build/valgrind-build.log" 2>&1; then
    cat "$build/valgrind-build.log"
    echo "0 passed, 1 failed" | tee "$build/test-count.txt"
    exit 1
fi
passed=0
failed=0
for s in $suites; do
    log="$build/valgrind-$s.log"
    status=0
    OMP_NUM_THREADS=1 CMOCKA_MESSAGE_OUTPUT=stdout valgrind -q --error-exitcode=99 \
        --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite \
        "$build/tests/test_$s" >"$log" 2>&1 || status=$?
    p=$(sed -n 's/.*\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    f=$(sed -n 's/.*\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    p=${p:-0}
    f=${f:-0}
    if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    if [ "$status" -ne 0 ]; then
        echo "valgrind $s: FAILED (exit status $status)"
        tail -40 "$log"
    else
        echo "valgrind $s: $p passed"
    fi
    passed=$((passed + p))
    failed=$((failed + f))
done
echo "$passed passed, $failed failed" | tee "$build/test-count.txt"
[ "$failed" -eq 0 ]
