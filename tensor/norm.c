/*
 * Layer norm's kernels over rows of d contiguous values: the forward, which keeps each row's
 * mean and 1/std for the backward, and the backward from them. Without a mean (NULL) they are
 * RMS norm's: rows are not centred and 1/std is 1/sqrt(mean(x^2) + eps). One pass computes
 * what the composition of reductions and broadcasts took about a dozen passes for.
 *
 * Threads split rows. Row sums run in LANES fixed interleaved partial sums (element j goes to
 * lane j % LANES) added in lane order, and the parameter gradients are summed over fixed
 * blocks of rows and then over the blocks in order, so every result is the same for any
 * thread count.
 */
#include <math.h>
#include <string.h>

#include "tensor/tensor_internal.h"

#define LANES 8
#define ROW_BLOCK 32

/* sum of f(j) for j < d, in LANES interleaved partial sums, in double. */
#define LANE_SUM(result, d, EXPR)                                                              \
    do {                                                                                       \
        double acc_[LANES] = {0};                                                              \
        int64_t j = 0;                                                                         \
        for (; j + LANES <= (d); j += LANES)                                                   \
            for (int l_ = 0; l_ < LANES; l_++) {                                               \
                int64_t k = j + l_;                                                            \
                acc_[l_] += (EXPR);                                                            \
            }                                                                                  \
        for (int l_ = 0; j + l_ < (d); l_++) {                                                 \
            int64_t k = j + l_;                                                                \
            acc_[l_] += (EXPR);                                                                \
        }                                                                                      \
        double s_ = 0;                                                                         \
        for (int l_ = 0; l_ < LANES; l_++) s_ += acc_[l_];                                     \
        (result) = s_;                                                                         \
    } while (0)

#define LN_KERNELS(T)                                                                          \
    static void ln_row_##T(int64_t d, const T *x, const T *w, const T *b, double eps, T *y,   \
                           T *mean, T *rstd) {                                                 \
        double s = 0, v;                                                                       \
        if (mean) LANE_SUM(s, d, (double)x[k]);                                                \
        T mu = (T)(s / (double)d);                                                             \
        LANE_SUM(v, d, ((double)x[k] - (double)mu) * ((double)x[k] - (double)mu));            \
        T rs = (T)(1.0 / sqrt(v / (double)d + eps));                                           \
        for (int64_t k = 0; k < d; k++) {                                                      \
            T h = (x[k] - mu) * rs;                                                            \
            if (w) h = h * w[k];                                                               \
            if (b) h = h + b[k];                                                               \
            y[k] = h;                                                                          \
        }                                                                                      \
        if (mean) *mean = mu;                                                                  \
        *rstd = rs;                                                                            \
    }                                                                                          \
                                                                                               \
    /* gx = rstd (gh - mean(gh) - xh mean(gh xh)) with xh = (x - mean) rstd, gh = g w; the  \
     * row's g xh and g go to the parameter gradients' partial sums pw and pb. Not centred    \
     * (RMS norm): mean 0 and no mean(gh) term. */                                             \
    static void ln_row_backward_##T(int64_t d, const T *x, const T *g, const T *w, T mu,      \
                                    T rs, bool center, T *gx, double *pw, double *pb) {        \
        double a = 0, c;                                                                       \
        if (center) LANE_SUM(a, d, (double)(w ? g[k] * w[k] : g[k]));                          \
        LANE_SUM(c, d, (double)(w ? g[k] * w[k] : g[k]) * (double)((x[k] - mu) * rs));         \
        T ma = (T)(a / (double)d), mc = (T)(c / (double)d);                                    \
        for (int64_t k = 0; k < d; k++) {                                                      \
            T xh = (x[k] - mu) * rs, gh = w ? g[k] * w[k] : g[k];                              \
            if (gx) gx[k] = rs * (gh - ma - xh * mc);                                          \
            if (pw) pw[k] += (double)(g[k] * xh);                                              \
            if (pb) pb[k] += (double)g[k];                                                     \
        }                                                                                      \
    }

LN_KERNELS(float)
LN_KERNELS(double)

static void ln_rows(qkv_dtype dtype, int64_t r0, int64_t r1, int64_t d, const void *x,
                    const void *w, const void *b, double eps, void *y, void *mean, void *rstd) {
    for (int64_t r = r0; r < r1; r++) {
        if (dtype == QKV_F32)
            ln_row_float(d, (const float *)x + r * d, w, b, eps, (float *)y + r * d,
                         mean ? (float *)mean + r : NULL, (float *)rstd + r);
        else
            ln_row_double(d, (const double *)x + r * d, w, b, eps, (double *)y + r * d,
                          mean ? (double *)mean + r : NULL, (double *)rstd + r);
    }
}

void qkv__layer_norm_rows(qkv_dtype dtype, int64_t rows, int64_t d, const void *x,
                          const void *w, const void *b, double eps, void *y, void *mean,
                          void *rstd) {
    int threads = qkv__threads_for(rows * d * 4);
    int64_t pieces = qkv__pieces(rows, threads);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
    for (int64_t t = 0; t < pieces; t++)
        ln_rows(dtype, rows * t / pieces, rows * (t + 1) / pieces, d, x, w, b, eps, y, mean,
                rstd);
}

/* Sums the blocks' partial sums in block order into dst (dtype). */
static void sum_blocks(qkv_dtype dtype, int64_t blocks, int64_t d, const double *part,
                       void *dst) {
    for (int64_t k = 0; k < d; k++) {
        double s = 0;
        for (int64_t q = 0; q < blocks; q++) s += part[q * d + k];
        if (dtype == QKV_F32) ((float *)dst)[k] = (float)s;
        else ((double *)dst)[k] = s;
    }
}

bool qkv__layer_norm_backward_rows(qkv_dtype dtype, int64_t rows, int64_t d, const void *x,
                                   const void *g, const void *w, const void *mean,
                                   const void *rstd, void *gx, void *gw, void *gb) {
    int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    size_t part_bytes = (size_t)(blocks * d) * sizeof(double);
    double *pw = gw ? qkv__calloc(part_bytes) : NULL, *pb = gb ? qkv__calloc(part_bytes) : NULL;
    if ((gw && !pw) || (gb && !pb)) {
        qkv__free(pw, part_bytes);
        qkv__free(pb, part_bytes);
        return false;
    }
    size_t es = qkv_dtype_size(dtype);
    int threads = qkv__threads_for(rows * d * 6);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
    for (int64_t q = 0; q < blocks; q++) {
        int64_t r1 = (q + 1) * ROW_BLOCK < rows ? (q + 1) * ROW_BLOCK : rows;
        for (int64_t r = q * ROW_BLOCK; r < r1; r++) {
            bool center = mean != NULL;
            const char *xr = (const char *)x + r * d * (int64_t)es;
            const char *gr = (const char *)g + r * d * (int64_t)es;
            char *gxr = gx ? (char *)gx + r * d * (int64_t)es : NULL;
            double *pwq = pw ? pw + q * d : NULL, *pbq = pb ? pb + q * d : NULL;
            if (dtype == QKV_F32)
                ln_row_backward_float(d, (const float *)xr, (const float *)gr, w,
                                      center ? ((const float *)mean)[r] : 0,
                                      ((const float *)rstd)[r], center, (float *)gxr, pwq, pbq);
            else
                ln_row_backward_double(d, (const double *)xr, (const double *)gr, w,
                                       center ? ((const double *)mean)[r] : 0,
                                       ((const double *)rstd)[r], center, (double *)gxr, pwq,
                                       pbq);
        }
    }
    if (gw) sum_blocks(dtype, blocks, d, pw, gw);
    if (gb) sum_blocks(dtype, blocks, d, pb, gb);
    qkv__free(pw, part_bytes);
    qkv__free(pb, part_bytes);
    return true;
}
