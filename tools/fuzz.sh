#!/bin/sh
# Builds the libFuzzer targets with clang under ASan+UBSan and runs each for a bounded time
# (FUZZ_SECONDS, default 60) from its committed seed corpus. Any crash, sanitizer report,
# leak, or memory use past 1 GiB fails the run.
set -e
seconds=${FUZZ_SECONDS:-60}
sh tools/install-deps.sh clang libclang-rt-14-dev
if [ ! -f build-fuzz/build.ninja ]; then
    # Without MPI, as the other sanitizer builds: no target reads MPI, and LeakSanitizer
    # would report Open MPI's own allocations.
    CC=clang meson setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined \
        -Dbuildtype=debugoptimized -Db_lundef=false -Dmpi=disabled >/dev/null
fi
ninja -C build-fuzz >/dev/null
status=0
for target in build-fuzz/tests/fuzz/fuzz_*; do
    [ -x "$target" ] && [ -f "$target" ] || continue
    name=$(basename "$target")
    seeds="tests/fuzz/corpus/${name#fuzz_}"
    work=$(mktemp -d)
    # UBSan stops at its first report, so that libFuzzer counts it as a failure.
    if UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$target" -max_total_time="$seconds" \
        -rss_limit_mb=1024 -malloc_limit_mb=1024 -max_len=65536 \
        -artifact_prefix=build-fuzz/ -print_final_stats=1 "$work" "$seeds" >"$work.log" 2>&1; then
        echo "$name: $(grep -o 'Done [0-9]* runs' "$work.log") in ${seconds}s, no failure"
    else
        echo "$name: FAILED"
        tail -40 "$work.log"
        status=1
    fi
    rm -rf "$work" "$work.log"
done
exit $status
