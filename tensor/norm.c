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

LN_KERNELS(double)

/* The float kernels: the same arithmetic as LN_KERNELS(float) would do, element for element
 * and lane for lane (so the same bits), with LANES elements a step as one vector of floats
 * and one of doubles; the compiler left the macro's lane loops scalar. Vectors go through
 * pointers: passed by value, their ABI would depend on -march. */
typedef float ln_f32x8 __attribute__((vector_size(LANES * sizeof(float))));
typedef double ln_f64x8 __attribute__((vector_size(LANES * sizeof(double))));

/* *out = the LANES floats at p, widened to double */
static inline void ln_widen(ln_f64x8 *out, const float *p) {
    ln_f32x8 v;
    memcpy(&v, p, sizeof v);
    *out = __builtin_convertvector(v, ln_f64x8);
}

/* acc's lanes added in lane order, as LANE_SUM ends. */
static inline double ln_lanes(const ln_f64x8 *acc) {
    double s = 0;
    for (int l = 0; l < LANES; l++) s += (*acc)[l];
    return s;
}

static void ln_row_float(int64_t d, const float *x, const float *w, const float *b, double eps,
                         float *y, float *mean, float *rstd) {
    int64_t full = d / LANES * LANES;
    double s = 0;
    if (mean) {
        ln_f64x8 acc = {0}, xd;
        for (int64_t j = 0; j < full; j += LANES) {
            ln_widen(&xd, x + j);
            acc += xd;
        }
        for (int64_t k = full; k < d; k++) acc[k - full] += (double)x[k];
        s = ln_lanes(&acc);
    }
    float mu = (float)(s / (double)d);
    ln_f64x8 acc = {0}, t;
    for (int64_t j = 0; j < full; j += LANES) {
        ln_widen(&t, x + j);
        t -= (double)mu;
        acc += t * t;
    }
    for (int64_t k = full; k < d; k++) {
        double u = (double)x[k] - (double)mu;
        acc[k - full] += u * u;
    }
    float rs = (float)(1.0 / sqrt(ln_lanes(&acc) / (double)d + eps));
    int64_t j = 0;
    for (; j < full; j += LANES) {
        ln_f32x8 h, wj, bj;
        memcpy(&h, x + j, sizeof h);
        h = (h - mu) * rs;
        if (w) {
            memcpy(&wj, w + j, sizeof wj);
            h = h * wj;
        }
        if (b) {
            memcpy(&bj, b + j, sizeof bj);
            h = h + bj;
        }
        memcpy(y + j, &h, sizeof h);
    }
    for (; j < d; j++) {
        float h = (x[j] - mu) * rs;
        if (w) h = h * w[j];
        if (b) h = h + b[j];
        y[j] = h;
    }
    if (mean) *mean = mu;
    *rstd = rs;
}

static void ln_row_backward_float(int64_t d, const float *x, const float *g, const float *w,
                                  float mu, float rs, bool center, float *gx, double *pw,
                                  double *pb) {
    int64_t full = d / LANES * LANES;
    ln_f64x8 acc_a = {0}, acc_c = {0};
    for (int64_t j = 0; j < full; j += LANES) {
        ln_f32x8 gh, xh, wj;
        memcpy(&gh, g + j, sizeof gh);
        if (w) {
            memcpy(&wj, w + j, sizeof wj);
            gh = gh * wj;
        }
        memcpy(&xh, x + j, sizeof xh);
        xh = (xh - mu) * rs;
        ln_f64x8 ghd = __builtin_convertvector(gh, ln_f64x8);
        if (center) acc_a += ghd;
        acc_c += ghd * __builtin_convertvector(xh, ln_f64x8);
    }
    for (int64_t k = full; k < d; k++) {
        double ghd = (double)(w ? g[k] * w[k] : g[k]);
        if (center) acc_a[k - full] += ghd;
        acc_c[k - full] += ghd * (double)((x[k] - mu) * rs);
    }
    double a = center ? ln_lanes(&acc_a) : 0, c = ln_lanes(&acc_c);
    float ma = (float)(a / (double)d), mc = (float)(c / (double)d);
    int64_t j = 0;
    for (; j < full; j += LANES) {
        ln_f32x8 gj, xh, wj;
        memcpy(&gj, g + j, sizeof gj);
        memcpy(&xh, x + j, sizeof xh);
        xh = (xh - mu) * rs;
        if (gx) {
            ln_f32x8 gh = gj;
            if (w) {
                memcpy(&wj, w + j, sizeof wj);
                gh = gh * wj;
            }
            ln_f32x8 r = rs * (gh - ma - xh * mc);
            memcpy(gx + j, &r, sizeof r);
        }
        if (pw) {
            ln_f64x8 p;
            memcpy(&p, pw + j, sizeof p);
            p += __builtin_convertvector(gj * xh, ln_f64x8);
            memcpy(pw + j, &p, sizeof p);
        }
        if (pb) {
            ln_f64x8 p;
            memcpy(&p, pb + j, sizeof p);
            p += __builtin_convertvector(gj, ln_f64x8);
            memcpy(pb + j, &p, sizeof p);
        }
    }
    for (; j < d; j++) {
        float xh = (x[j] - mu) * rs, gh = w ? g[j] * w[j] : g[j];
        if (gx) gx[j] = rs * (gh - ma - xh * mc);
        if (pw) pw[j] += (double)(g[j] * xh);
        if (pb) pb[j] += (double)g[j];
    }
}

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
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
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
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
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
