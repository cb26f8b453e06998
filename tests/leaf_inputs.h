/* Leaves for gradient checks: F64 values drawn from the suite's generator `gen` (define
 * `static qkv_generator gen` before including this), laid out contiguous, transposed,
 * strided or expanded, so that each op is checked on every memory layout it can meet. */
#ifndef QKV_TESTS_LEAF_INPUTS_H
#define QKV_TESTS_LEAF_INPUTS_H

typedef enum values {
    ANY,        /* uniform in [-2, 2) */
    POSITIVE,   /* uniform in [0.5, 2) */
    NONZERO,    /* +-[0.2, 2): away from the kinks of abs and relu */
} values;

typedef enum layout {
    CONTIGUOUS,
    TRANSPOSED, /* a transposed view of its last two dims */
    STRIDED,    /* every other element of the last dim */
    EXPANDED,   /* the first dim broadcast from size 1 (stride 0) */
    N_LAYOUTS,
} layout;

static inline double sample(values v) {
    double u = qkv_generator_uniform(&gen);
    switch (v) {
    case POSITIVE: return 0.5 + 1.5 * u;
    case NONZERO: {
        double m = 0.2 + 1.8 * qkv_generator_uniform(&gen);
        return u < 0.5 ? -m : m;
    }
    default: return -2 + 4 * u;
    }
}

static inline qkv_tensor *filled(int ndim, const int64_t *shape, values v) {
    qkv_tensor *t = qkv_empty(QKV_F64, ndim, shape);
    assert_non_null(t);
    double *d = qkv_data(t);
    for (int64_t i = 0; i < t->numel; i++) d[i] = sample(v);
    return t;
}

/* A leaf of the given shape whose memory is laid out as asked; views are made without
 * recording and then marked as leaves, as a user would with a view of a weight. */
static inline qkv_tensor *input(int ndim, const int64_t *shape, values v, layout l) {
    int64_t base[QKV_MAX_DIMS];
    if (ndim > 0) memcpy(base, shape, (size_t)ndim * sizeof *shape);
    qkv_tensor *t = NULL;
    qkv_no_grad_begin();
    if (l == TRANSPOSED && ndim >= 2) {
        base[ndim - 1] = shape[ndim - 2];
        base[ndim - 2] = shape[ndim - 1];
        t = qkv_transpose(filled(ndim, base, v), -1, -2);
    } else if (l == STRIDED && ndim >= 1) {
        base[ndim - 1] = 2 * shape[ndim - 1] + 1;
        t = qkv_slice(filled(ndim, base, v), -1, 1, base[ndim - 1], 2);
    } else if (l == EXPANDED && ndim >= 1 && shape[0] > 1) {
        base[0] = 1;
        t = qkv_expand(filled(ndim, base, v), ndim, shape);
    } else {
        t = filled(ndim, shape, v);
    }
    qkv_no_grad_end();
    assert_non_null(t);
    assert_null(t->grad_fn);
    return qkv_requires_grad_(t, true);
}

#endif
