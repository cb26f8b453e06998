/*
 * The clock and the median the single-kernel benches (bench/dropout.c, bench/lm_ops.c) time
 * with. Header-only, static inline: each bench includes what it uses.
 */
#ifndef QKV_BENCH_TIMING_H
#define QKV_BENCH_TIMING_H

#include <stdlib.h>
#include <time.h>

/* Seconds on the monotonic clock. */
static inline double bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline int bench_by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of v[0:n] (the upper one for even n); sorts v. */
static inline double bench_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, bench_by_value);
    return v[n / 2];
}

#endif
