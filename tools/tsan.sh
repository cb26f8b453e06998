#!/bin/sh
# Runs the suites that call qkv from several pthreads under ThreadSanitizer: any data race is
# a report, and a report fails the suite (halt_on_error, exit status 66). The build has no
# OpenMP: libgomp is not built with TSan, so its own synchronisation would show as races that
# are not there; the pthreads of the suites are what this checks (docs/threads.md). Ends with
# one line "N passed, N failed" counting the cmocka tests, also written to
# build-tsan/test-count.txt; a suite with a report counts as one failure at least. The
# threads suite runs twice, the second time in checked mode (QKV_DEBUG=1), whose live list and
# quarantine every thread shares.
set -e
build=build-tsan
suites="threads errors"
runs="threads errors threads:checked"
if [ ! -f "$build/build.ninja" ]; then
    # Without MPI too: Open MPI is not built with TSan either, and these suites do not use it.
    meson setup "$build" -Db_sanitize=thread -Dopenmp=disabled -Dbuildtype=debugoptimized \
        -Dwerror=true -Dmpi=disabled >/dev/null
fi
targets=""
for s in $suites; do targets="$targets tests/test_$s"; done
# shellcheck disable=SC2086
if ! ninja -C "$build" $targets >"$build/tsan-build.log" 2>&1; then
    cat "$build/tsan-build.log"
    echo "0 passed, 1 failed" | tee "$build/test-count.txt"
    exit 1
fi
passed=0
failed=0
for run in $runs; do
    s=${run%%:*}
    debug=0
    [ "$run" = "$s" ] || debug=1
    log="$build/tsan-$(echo "$run" | tr : -).log"
    status=0
    QKV_DEBUG=$debug CMOCKA_MESSAGE_OUTPUT=stdout \
        TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 $TSAN_OPTIONS" \
        "$build/tests/test_$s" >"$log" 2>&1 || status=$?
    p=$(sed -n 's/.*\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    f=$(sed -n 's/.*\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    p=${p:-0}
    f=${f:-0}
    if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    if [ "$status" -ne 0 ]; then
        echo "tsan $run: FAILED (exit status $status)"
        tail -60 "$log"
    else
        echo "tsan $run: OK"
    fi
    passed=$((passed + p))
    failed=$((failed + f))
done
echo "$passed passed, $failed failed" | tee "$build/test-count.txt"
[ "$failed" -eq 0 ]
