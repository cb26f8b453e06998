/*
 * Helpers shared by the suites that compare against reference fixtures: building a tensor from
 * an fx_tensor, and asserting that a result has the reference's dtype, shape and values.
 * Include after <cmocka.h> and a generated *_fixtures.h.
 */
#ifndef QKV_TEST_HARNESS_H
#define QKV_TEST_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

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

#endif
