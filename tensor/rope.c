/*
 * Rotary position embedding's kernels over rows of d contiguous values (d even, h = d / 2):
 * y = x cos + rotate_half(x) sin with rotate_half([x1, x2]) = [-x2, x1], the tables [T, d]
 * read at row r's position r % T; and its gradient, g cos + [g2 s2, -g1 s1]. One pass each
 * way where the composition (two products, a negation, a concatenation, a sum) took five
 * forward and more back. Rows are independent, so threads split them.
 */
#include "tensor/tensor_internal.h"

#define ROPE_ROWS(T)                                                                           \
    static void rope_rows_##T(int64_t r0, int64_t r1, int64_t steps, int64_t d, const T *x,    \
                              const T *c, const T *s, bool grad, T *y) {                       \
        int64_t h = d / 2;                                                                     \
        for (int64_t r = r0; r < r1; r++) {                                                    \
            const T *xr = x + r * d, *cr = c + (r % steps) * d, *sr = s + (r % steps) * d;     \
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

void qkv__rope_rows(qkv_dtype dtype, int64_t rows, int64_t steps, int64_t d, const void *x,
                    const void *cos, const void *sin, bool grad, void *y) {
    int threads = qkv__threads_for(rows * d * 2);
    int64_t pieces = qkv__pieces(rows, threads);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
    for (int64_t t = 0; t < pieces; t++) {
        int64_t r0 = rows * t / pieces, r1 = rows * (t + 1) / pieces;
        if (dtype == QKV_F32) rope_rows_float(r0, r1, steps, d, x, cos, sin, grad, y);
        else rope_rows_double(r0, r1, steps, d, x, cos, sin, grad, y);
    }
}
