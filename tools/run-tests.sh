#!/bin/sh
# Runs every test suite of a build directory and ends with one line "N passed, N failed",
# counting the individual cmocka tests. A suite that crashes before reporting counts as one
# failure; a suite that skips itself (exit status 77) counts as neither. Exits non-zero when
# anything failed.
build=${1:-build}
log="$build/meson-logs/testlog.txt"
meson test -C "$build" --print-errorlogs --num-processes 2 >"$build/test-summary.txt" 2>&1
status=$?
grep -E '^ *[0-9]+/[0-9]+ ' "$build/test-summary.txt"
# A suite that skips itself says why in one line (dist_mpi without MPI, say).
grep -h 'SKIPPED: ' "$log" 2>/dev/null | sort -u
awk '
    /^==+ [0-9]+\/[0-9]+ =+$/ { if (name != "") finish(); name = $0; p = 0; f = 0; rc = "" }
    /^result:/ { rc = ($0 ~ /exit status 0$/) ? "0" : ($0 ~ /exit status 77$/) ? "skip" : "1" }
    /\[  PASSED  \] [0-9]+ test/ { p += $4 }
    /\[  FAILED  \] [0-9]+ test/ { f += $4 }
    function finish() {
        if (rc == "skip") return
        if (rc != "0" && f == 0) f = 1
        if (rc == "0" && p == 0 && f == 0) p = 1
        P += p; F += f
    }
    END { if (name != "") finish(); printf "%d passed, %d failed\n", P, F }
' "$log" >"$build/test-count.txt"
cat "$build/test-count.txt"
if [ $status -ne 0 ] || grep -qv ' 0 failed' "$build/test-count.txt"; then
    exit 1
fi
exit 0
