/*
 * Rotary position embedding's kernels over rows of d contiguous values (d even, h = d / 2),
 * laid out by any strides, into contiguous rows:
 * y = x cos + rotate_half(x) sin with rotate_half([x1, x2]) = [-x2, x1], the tables [T, d]
 * read at row r's position r % T; and its gradient, g cos + [g2 s2, -g1 s1]. One pass each
 * way where the composition (two products, a negation, a concatenation, a sum) took five
 * forward and more back. Rows are independent, so threads split them.
 */
#include "tensor/tensor_internal.h"

/* A walk over x's rows, its last axis (stride 1) laid out by the other axes' strides, so
 * that a view (attention's heads split off a projection) is read in place: the row's offset
 * in elements and its index along each other axis, stepped without a division per row. */
typedef struct row_walk {
    int n;
    int64_t off, idx[QKV_MAX_DIMS];
    const int64_t *shape, *strides;
} row_walk;

static row_walk walk_from(const qkv_tensor *x, int64_t r) {
    row_walk w = {.n = x->ndim - 1, .shape = x->shape, .strides = x->strides};
    for (int i = w.n - 1; i >= 0; i--) {
        w.idx[i] = r % x->shape[i];
        w.off += w.idx[i] * x->strides[i];
        r /= x->shape[i];
    }
    return w;
}

static void walk_next(row_walk *w) {
    for (int i = w->n - 1; i >= 0; i--) {
        w->off += w->strides[i];
        if (++w->idx[i] < w->shape[i]) return;
        w->off -= w->idx[i] * w->strides[i];
        w->idx[i] = 0;
    }
}

#define ROPE_ROWS(T)                                                                           \
    static void rope_rows_##T(int64_t r0, int64_t r1, int64_t d, const qkv_tensor *xt,       \
                              const T *c, const T *s, bool grad, T *y) {                       \
        int64_t h = d / 2;                                                                     \
        const T *x = qkv_data(xt);                                                             \
        row_walk w = walk_from(xt, r0);                                                        \
        for (int64_t r = r0; r < r1; r++, walk_next(&w)) {                                     \
            int64_t t = w.idx[w.n - 1]; /* the position: the row's index along axis -2 */      \
            const T *xr = x + w.off, *cr = c + t * d, *sr = s + t * d;                         \
            T *yr = y + r * d;                                                                 \
            if (!grad) {                                                                       \
                for (int64_t j = 0; j < h; j++) yr[j] = xr[j] * cr[j] + -xr[j + h] * sr[j];    \
                for (int64_t j = h; j < d; j++) yr[j] = xr[j] * cr[j] + xr[j - h] * sr[j];     \
            } else {                                                                           \
                for (int64_t j = 0; j < h; j++)                                                \
                    yr[j] = xr[j] * cr[j] + xr[j + h] * sr[j + h];                             \
                for (int64_t j = h; j < d; j++)                                                \
                    yr[j] = xr[j] * cr[j] + -xr[j - h] * sr[j - h];                            \
            }                                                                                  \
        }                                                                                      \
    }

ROPE_ROWS(float)
ROPE_ROWS(double)

void qkv__rope_rows(const qkv_tensor *x, const void *cos, const void *sin, bool grad, void *y) {
    int64_t d = x->shape[x->ndim - 1], rows = x->numel / d;
    int threads = qkv__threads_for(rows * d * 2);
    int64_t pieces = qkv__pieces(rows, threads);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t t = 0; t < pieces; t++) {
        int64_t r0 = rows * t / pieces, r1 = rows * (t + 1) / pieces;
        if (x->dtype == QKV_F32) rope_rows_float(r0, r1, d, x, cos, sin, grad, y);
        else rope_rows_double(r0, r1, d, x, cos, sin, grad, y);
    }
}
