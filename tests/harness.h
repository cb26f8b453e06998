/*
 * What the test suites share, in one place: a scope per test that must leave no tensor alive
 * behind it (cmocka setup and teardown), the sweep that fails every allocation of an operation
 * in turn, and the checks of results against reference fixtures (fx_*). Include after
 * <cmocka.h> (and after a generated *_fixtures.h, in the suites that have one).
 */
#ifndef QKV_TEST_HARNESS_H
#define QKV_TEST_HARNESS_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

/* ---- A scope per test -------------------------------------------------------------------- */

static uint64_t harness_live_at_start;

/* cmocka setup: no error recorded, a scope open, and the live tensors counted. */
static inline int open_scope(void **state) {
    (void)state;
    qkv_clear_error();
    harness_live_at_start = qkv_memory_stats_get().live_tensors;
    qkv_scope_begin();
    return 0;
}

/* cmocka teardown: ends the test's scope; fails the test when its scopes do not balance or
 * anything it made outlives the scope. */
static inline int close_scope(void **state) {
    (void)state;
    qkv_scope_end();
    qkv_clear_error();
    if (qkv_scope_depth() != 0) fail_msg("%d scopes left open", qkv_scope_depth());
    uint64_t live = qkv_memory_stats_get().live_tensors;
    if (live != harness_live_at_start)
        fail_msg("%lld tensors outlive the test", (long long)(live - harness_live_at_start));
    return 0;
}

/* cmocka setup for suites whose tests open their own scopes. */
static inline int clear_error(void **state) {
    (void)state;
    qkv_clear_error();
    return 0;
}

/* ---- Allocation failures ----------------------------------------------------------------- */

/* Fails the 1st, 2nd, ... allocation of `call` (an expression giving true on success) in turn:
 * each run must give false with an out-of-memory error and give back every byte and tensor it
 * took, until `call` runs with no failure left to inject, when it must succeed with no error.
 * The _in_a_scope form runs each call in a scope of its own, for a call whose results are left
 * to the innermost scope; the other runs it as it is, so that what it returns with no scope
 * open is its caller's (and a tensor it forgets to release counts as a leak). */
#define assert_every_allocation_failure_is_clean(call) ALLOCATION_SWEEP(call, false)
#define assert_every_allocation_failure_is_clean_in_a_scope(call) ALLOCATION_SWEEP(call, true)
#define ALLOCATION_SWEEP(call, scope)                                                         \
    do {                                                                                      \
        allocation_sweep sweep_ = {.in_scope = (scope)};                                      \
        while (allocation_sweep_arm(&sweep_)) allocation_sweep_check(&sweep_, (call));       \
    } while (0)

/* The same loop written out, for a test that wants the number of failures injected:
 *     allocation_sweep s = {0};
 *     while (allocation_sweep_arm(&s)) allocation_sweep_check(&s, op());
 * leaves s.failures. */
typedef struct allocation_sweep {
    bool in_scope;     /* run each call in a scope of its own */
    uint64_t n;        /* the allocation made to fail */
    uint64_t failures; /* runs that failed as they should */
    size_t in_use;
    uint64_t live;
    bool done;
} allocation_sweep;

/* What a failed allocation reports (an op may put its name and a path in front). */
#define HARNESS_OOM "qkv: out of memory allocating "

/* Arms the next run: the (n+1)th allocation will fail. False once a run has succeeded. */
static inline bool allocation_sweep_arm(allocation_sweep *s) {
    if (s->done) return false;
    s->n++;
    s->in_use = qkv_memory_stats_get().bytes_in_use;
    s->live = qkv_memory_stats_get().live_tensors;
    qkv_clear_error();
    qkv_debug_fail_alloc_at(s->n);
    if (s->in_scope) qkv_scope_begin();
    return true;
}

/* Checks the run just made, whose result was ok. */
static inline void allocation_sweep_check(allocation_sweep *s, bool ok) {
    if (s->in_scope) qkv_scope_end();
    uint64_t count = qkv_debug_alloc_count();
    qkv_debug_fail_alloc_at(0);
    qkv_memory_stats now = qkv_memory_stats_get();
    if (now.live_tensors != s->live || now.bytes_in_use != s->in_use)
        fail_msg("allocation %llu failing leaks %lld tensors, %lld bytes",
                 (unsigned long long)s->n, (long long)(now.live_tensors - s->live),
                 (long long)(now.bytes_in_use - s->in_use));
    const char *err = qkv_error();
    if (count < s->n) { /* nothing was left to fail: this is a clean run */
        if (!ok || err) fail_msg("the run with no failure failed: %s", err ? err : "no error");
        s->done = true;
        return;
    }
    if (ok) fail_msg("allocation %llu failed but the run succeeded", (unsigned long long)s->n);
    if (!err || !strstr(err, HARNESS_OOM))
        fail_msg("allocation %llu: expected out of memory, got %s", (unsigned long long)s->n,
                 err ? err : "no error");
    s->failures++;
}

/* ---- Reference fixtures ------------------------------------------------------------------ */
/* For the suites that include a generated *_fixtures.h (which defines fx_tensor) first. */

#ifdef QKV_FX_TENSOR_DEFINED

/* A tensor of the given dtype holding the reference's values, owned by the current scope. */
static inline qkv_tensor *fx_make(const fx_tensor *f, qkv_dtype dtype) {
    qkv_tensor *t = qkv_from_array(QKV_F64, f->ndim, f->shape, f->data);
    return dtype == QKV_F64 ? t : qkv_to_dtype(t, dtype);
}

/* Tolerances by dtype: a few float32 ulps, or a few float64 ulps. */
static inline double fx_rtol(qkv_dtype dtype) {
    return dtype == QKV_F32 ? 2e-6 : dtype == QKV_F64 ? 1e-13 : 0;
}

static inline double fx_atol(qkv_dtype dtype) {
    return dtype == QKV_F32 ? 1e-43 : dtype == QKV_F64 ? 1e-300 : 0;
}

/* NaN matches NaN; infinities match exactly; finite values within atol + rtol * |expected|. */
static inline bool fx_close(double got, double want, double rtol, double atol) {
    if (isnan(want)) return isnan(got);
    if (isinf(want)) return got == want;
    return fabs(got - want) <= atol + rtol * fabs(want);
}

static inline void fx_assert_shape(const qkv_tensor *t, int ndim, const int64_t *shape,
                                   const char *what) {
    bool same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char s[128];
        print_error("%s: shape %s, expected %d dims\n", what, qkv_shape_str(t, s, sizeof s),
                    ndim);
        fail();
    }
}

/* Asserts dtype, shape and every value of t against want, with explicit tolerances. */
static inline void fx_assert_close(const qkv_tensor *t, qkv_dtype dtype, const fx_tensor *want,
                                   double rtol, double atol, const char *what) {
    if (!t) {
        print_error("%s: NULL result: %s\n", what, qkv_error() ? qkv_error() : "(no error)");
        fail();
    }
    if (t->dtype != dtype) {
        print_error("%s: dtype %s, expected %s\n", what, qkv_dtype_name(t->dtype),
                    qkv_dtype_name(dtype));
        fail();
    }
    fx_assert_shape(t, want->ndim, want->shape, what);
    double *got = malloc(sizeof(double) * (size_t)(t->numel ? t->numel : 1));
    assert_non_null(got);
    assert_true(qkv_copy_out(t, QKV_F64, got));
    for (int64_t i = 0; i < t->numel; i++) {
        if (!fx_close(got[i], want->data[i], rtol, atol)) {
            print_error("%s: element %lld is %.17g, expected %.17g\n", what, (long long)i,
                        got[i], want->data[i]);
            free(got);
            fail();
        }
    }
    free(got);
}

/* The same with the dtype's default tolerances. */
static inline void fx_assert_tensor(const qkv_tensor *t, qkv_dtype dtype, const fx_tensor *want,
                                    const char *what) {
    fx_assert_close(t, dtype, want, fx_rtol(dtype), fx_atol(dtype), what);
}

#endif /* QKV_FX_TENSOR_DEFINED */

#endif
