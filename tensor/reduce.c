/*
 * Reductions over any set of axes, and softmax along one axis.
 * Every output element is reduced by one thread over its inputs in row-major order, so the
 * result does not depend on the thread count. Float inputs accumulate sums in double.
 */
/* Contract a*b + c into fused multiply-adds (as tensor/gemm.c does): exp's polynomial in
 * softmax is a chain of them, twice the instructions and latency without. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <math.h>
#include <string.h>

#include "tensor/tensor_internal.h"
#include "tensor/vmath.h"

typedef struct plan {
    qkv_reduce_op op;
    double correction;
    int nk, nr;                  /* kept and reduced dimensions, each coalesced */
    int64_t kshape[QKV_MAX_DIMS], kstride[QKV_MAX_DIMS];
    int64_t rshape[QKV_MAX_DIMS], rstride[QKV_MAX_DIMS];
    int64_t n_out, n_red;
} plan;

static int coalesce_dims(int n, int64_t *shape, int64_t *stride) {
    int out = 0;
    for (int i = 0; i < n; i++) {
        if (shape[i] == 1) continue;
        if (out > 0 && stride[out - 1] == stride[i] * shape[i]) {
            shape[out - 1] *= shape[i];
            stride[out - 1] = stride[i];
        } else {
            shape[out] = shape[i];
            stride[out] = stride[i];
            out++;
        }
    }
    if (out == 0) {
        shape[0] = 1;
        stride[0] = 0;
        out = 1;
    }
    return out;
}

static void make_plan(plan *p, const qkv_tensor *a, uint32_t mask) {
    p->nk = p->nr = 0;
    p->n_out = p->n_red = 1;
    for (int i = 0; i < a->ndim; i++) {
        if (mask & (1u << i)) {
            p->rshape[p->nr] = a->shape[i];
            p->rstride[p->nr++] = a->strides[i];
            p->n_red *= a->shape[i];
        } else {
            p->kshape[p->nk] = a->shape[i];
            p->kstride[p->nk++] = a->strides[i];
            p->n_out *= a->shape[i];
        }
    }
    p->nk = coalesce_dims(p->nk, p->kshape, p->kstride);
    p->nr = coalesce_dims(p->nr, p->rshape, p->rstride);
}

static int64_t kept_offset(const plan *p, int64_t o) {
    int64_t off = 0;
    for (int d = p->nk - 1; d >= 0; d--) {
        off += (o % p->kshape[d]) * p->kstride[d];
        o /= p->kshape[d];
    }
    return off;
}

/* Visits the reduced elements of one output in row-major order: BODY sees `x` and `k`. */
#define FOR_REDUCED(T, base, BODY)                                                              \
    do {                                                                                        \
        int64_t idx_[QKV_MAX_DIMS] = {0}, k = 0, off_ = 0;                                      \
        int in_ = p->nr - 1;                                                                    \
        int64_t cnt_ = p->rshape[in_], st_ = p->rstride[in_];                                   \
        int64_t outer_ = p->n_red / (cnt_ ? cnt_ : 1);                                          \
        if (cnt_ == 0) outer_ = 0;                                                              \
        for (int64_t o_ = 0; o_ < outer_; o_++) {                                               \
            const T *row_ = (base) + off_;                                                      \
            for (int64_t j_ = 0; j_ < cnt_; j_++, k++) {                                        \
                T x = row_[j_ * st_];                                                           \
                BODY;                                                                           \
            }                                                                                   \
            for (int d_ = in_ - 1; d_ >= 0; d_--) {                                             \
                off_ += p->rstride[d_];                                                         \
                if (++idx_[d_] < p->rshape[d_]) break;                                          \
                off_ -= idx_[d_] * p->rstride[d_];                                              \
                idx_[d_] = 0;                                                                   \
            }                                                                                   \
        }                                                                                       \
    } while (0)

#define REDUCE_FLOAT(T)                                                                         \
    static void reduce_one_##T(const plan *p, const T *base, void *out, int64_t o) {            \
        switch (p->op) {                                                                        \
        case QKV_RED_SUM:                                                                       \
        case QKV_RED_MEAN: {                                                                    \
            double s = 0;                                                                       \
            FOR_REDUCED(T, base, s += x);                                                       \
            if (p->op == QKV_RED_MEAN) s /= (double)p->n_red;                                   \
            ((T *)out)[o] = (T)s;                                                               \
            break;                                                                              \
        }                                                                                       \
        case QKV_RED_VAR: {                                                                     \
            double s = 0, q = 0;                                                                \
            FOR_REDUCED(T, base, s += x);                                                       \
            double mean = s / (double)p->n_red;                                                 \
            FOR_REDUCED(T, base, q += ((double)x - mean) * ((double)x - mean));                 \
            /* as torch: N - correction clamped at 0, so inf (or NaN for 0/0) past it */        \
            double dof = fmax((double)p->n_red - p->correction, 0);                             \
            ((T *)out)[o] = (T)(q / dof);                                                       \
            break;                                                                              \
        }                                                                                       \
        case QKV_RED_MAX:                                                                       \
        case QKV_RED_ARGMAX: {                                                                  \
            T best = -INFINITY;                                                                 \
            int64_t bi = 0;                                                                     \
            FOR_REDUCED(T, base, if (k == 0 || x > best || (x != x && best == best)) {          \
                best = x;                                                                       \
                bi = k;                                                                         \
            });                                                                                 \
            if (p->op == QKV_RED_MAX) ((T *)out)[o] = best;                                     \
            else ((int64_t *)out)[o] = bi;                                                      \
            break;                                                                              \
        }                                                                                       \
        case QKV_RED_MIN:                                                                       \
        case QKV_RED_ARGMIN: {                                                                  \
            T best = INFINITY;                                                                  \
            int64_t bi = 0;                                                                     \
            FOR_REDUCED(T, base, if (k == 0 || x < best || (x != x && best == best)) {          \
                best = x;                                                                       \
                bi = k;                                                                         \
            });                                                                                 \
            if (p->op == QKV_RED_MIN) ((T *)out)[o] = best;                                     \
            else ((int64_t *)out)[o] = bi;                                                      \
            break;                                                                              \
        }                                                                                       \
        }                                                                                       \
    }

REDUCE_FLOAT(float)
REDUCE_FLOAT(double)

#define REDUCE_INT(T)                                                                           \
    static void reduce_one_##T(const plan *p, const T *base, void *out, int64_t o) {            \
        int64_t best = 0, bi = 0, s = 0;                                                        \
        switch (p->op) {                                                                        \
        case QKV_RED_SUM:                                                                       \
            FOR_REDUCED(T, base, s = qkv__wrap_add(s, (int64_t)x));                             \
            ((int64_t *)out)[o] = s;                                                            \
            break;                                                                              \
        case QKV_RED_MAX:                                                                       \
        case QKV_RED_ARGMAX:                                                                    \
            FOR_REDUCED(T, base, if (k == 0 || (int64_t)x > best) { best = (int64_t)x; bi = k; }); \
            if (p->op == QKV_RED_MAX) ((T *)out)[o] = (T)best;                                  \
            else ((int64_t *)out)[o] = bi;                                                      \
            break;                                                                              \
        default:                                                                                \
            FOR_REDUCED(T, base, if (k == 0 || (int64_t)x < best) { best = (int64_t)x; bi = k; }); \
            if (p->op == QKV_RED_MIN) ((T *)out)[o] = (T)best;                                  \
            else ((int64_t *)out)[o] = bi;                                                      \
            break;                                                                              \
        }                                                                                       \
    }

REDUCE_INT(int64_t)
REDUCE_INT(bool)

/* Sum or mean of the kept elements b..e of one contiguous run starting at base: whole rows
 * are added in the same row-major order the general path uses, so the two give the same
 * bits. */
#define ROWS_SUM(T)                                                                             \
    static void rows_sum_##T(const plan *p, const T *base, T *out, int64_t b, int64_t e) {      \
        double acc[256];                                                                        \
        for (int64_t c0 = b; c0 < e; c0 += 256) {                                               \
            int64_t w = e - c0 < 256 ? e - c0 : 256;                                            \
            for (int64_t j = 0; j < w; j++) acc[j] = 0;                                         \
            int64_t idx[QKV_MAX_DIMS] = {0}, off = 0;                                           \
            for (int64_t r = 0; r < p->n_red; r++) {                                            \
                const T *row = base + off + c0;                                                 \
                for (int64_t j = 0; j < w; j++) acc[j] += row[j];                               \
                for (int d = p->nr - 1; d >= 0; d--) {                                          \
                    off += p->rstride[d];                                                       \
                    if (++idx[d] < p->rshape[d]) break;                                         \
                    off -= idx[d] * p->rstride[d];                                              \
                    idx[d] = 0;                                                                 \
                }                                                                               \
            }                                                                                   \
            double scale = p->op == QKV_RED_MEAN ? 1.0 / (double)p->n_red : 1.0;                \
            for (int64_t j = 0; j < w; j++) out[c0 + j] = (T)(acc[j] * scale);                  \
        }                                                                                       \
    }

ROWS_SUM(float)
ROWS_SUM(double)

/* The same over bf16 rows, each value widened as it is added and each sum rounded once: the
 * bits of summing an f32 copy and rounding its result, without the copy. */
static void rows_sum_bf16(const plan *p, const uint16_t *base, uint16_t *out, int64_t b,
                          int64_t e) {
    double acc[256];
    for (int64_t c0 = b; c0 < e; c0 += 256) {
        int64_t w = e - c0 < 256 ? e - c0 : 256;
        for (int64_t j = 0; j < w; j++) acc[j] = 0;
        int64_t idx[QKV_MAX_DIMS] = {0}, off = 0;
        for (int64_t r = 0; r < p->n_red; r++) {
            const uint16_t *row = base + off + c0;
            for (int64_t j = 0; j < w; j++) acc[j] += qkv__bf16_to_f32(row[j]);
            for (int d = p->nr - 1; d >= 0; d--) {
                off += p->rstride[d];
                if (++idx[d] < p->rshape[d]) break;
                off -= idx[d] * p->rstride[d];
                idx[d] = 0;
            }
        }
        double scale = p->op == QKV_RED_MEAN ? 1.0 / (double)p->n_red : 1.0;
        for (int64_t j = 0; j < w; j++) out[c0 + j] = qkv__f32_to_bf16((float)(acc[j] * scale));
    }
}

/* The innermost kept axis is a contiguous run of at least 16 (a bias gradient [4096, 256] ->
 * [256]; grouped attention's heads [B, kvH, group, S, Dh] -> [B, kvH, S, Dh]): each run is
 * summed as whole rows. */
static bool rows_path(const plan *p, qkv_dtype dt) {
    return (p->op == QKV_RED_SUM || p->op == QKV_RED_MEAN) && qkv__is_float(dt) &&
           p->kstride[p->nk - 1] == 1 && p->kshape[p->nk - 1] >= 16 && p->n_red > 1;
}

/* Outputs b..e of the rows path, one contiguous run of kept elements at a time. */
static void rows_sum_range(const plan *p, const qkv_tensor *a, void *out, int64_t b,
                           int64_t e) {
    int64_t w = p->kshape[p->nk - 1];
    const char *data = qkv_data(a);
    size_t es = qkv_dtype_size(a->dtype);
    while (b < e) {
        int64_t run = b - b % w, end = run + w < e ? run + w : e;
        const char *base = data + kept_offset(p, run) * (int64_t)es;
        if (a->dtype == QKV_F32)
            rows_sum_float(p, (const float *)base, (float *)out + run, b - run, end - run);
        else if (a->dtype == QKV_BF16)
            rows_sum_bf16(p, (const uint16_t *)base, (uint16_t *)out + run, b - run,
                          end - run);
        else
            rows_sum_double(p, (const double *)base, (double *)out + run, b - run, end - run);
        b = end;
    }
}

/* Sums, means and variances of contiguous float rows (the last axis: layer norm's statistics,
 * softmax's backward), eight lanes at a time, accumulating in double. */
typedef float qkv_f8 __attribute__((vector_size(32), aligned(4)));
typedef double qkv_d8 __attribute__((vector_size(64), aligned(8)));

static double row_sum(const float *x, int64_t n, double shift, bool square) {
    qkv_d8 acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        qkv_f8 v;
        memcpy(&v, x + i, sizeof v);
        qkv_d8 d = __builtin_convertvector(v, qkv_d8) - shift;
        acc += square ? d * d : d;
    }
    double s = 0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; i < n; i++) s += square ? ((double)x[i] - shift) * ((double)x[i] - shift) : x[i] - shift;
    return s;
}

static bool contiguous_rows(const plan *p, qkv_dtype dt) {
    return dt == QKV_F32 && p->nr == 1 && p->rstride[0] == 1 && p->n_red >= 16 &&
           (p->op == QKV_RED_SUM || p->op == QKV_RED_MEAN || p->op == QKV_RED_VAR);
}

static void reduce_rows(const plan *p, const float *data, float *out, int64_t b, int64_t e) {
    double n = (double)p->n_red;
    for (int64_t o = b; o < e; o++) {
        const float *x = data + kept_offset(p, o);
        double s = row_sum(x, p->n_red, 0, false);
        if (p->op == QKV_RED_SUM) out[o] = (float)s;
        else if (p->op == QKV_RED_MEAN) out[o] = (float)(s / n);
        else {
            double dof = fmax(n - p->correction, 0);
            out[o] = (float)(row_sum(x, p->n_red, s / n, true) / dof);
        }
    }
}

static void reduce_range(const plan *p, const qkv_tensor *a, void *out, int64_t b, int64_t e) {
    const char *data = qkv_data(a);
    if (contiguous_rows(p, a->dtype)) {
        reduce_rows(p, (const float *)data, out, b, e);
        return;
    }
    if (rows_path(p, a->dtype)) {
        rows_sum_range(p, a, out, b, e);
        return;
    }
    for (int64_t o = b; o < e; o++) {
        int64_t off = kept_offset(p, o);
        switch (a->dtype) {
        case QKV_F32: reduce_one_float(p, (const float *)data + off, out, o); break;
        case QKV_F64: reduce_one_double(p, (const double *)data + off, out, o); break;
        case QKV_I64: reduce_one_int64_t(p, (const int64_t *)data + off, out, o); break;
        case QKV_BOOL: reduce_one_bool(p, (const bool *)data + off, out, o); break;
        case QKV_BF16: break; /* qkv__reduce computes it in f32 */
        }
    }
}

/* Whether a bf16 reduction takes the rows path on its own data (a bias gradient under
 * autocast); any other runs on an f32 copy. */
static bool bf16_rows(qkv_reduce_op op, const qkv_tensor *a, uint32_t mask) {
    plan p = {.op = op};
    make_plan(&p, a, mask & (a->ndim ? (uint32_t)((1u << a->ndim) - 1) : 0));
    return rows_path(&p, a->dtype);
}

static const char *const reduce_names[] = {"sum", "mean", "var", "max", "min", "argmax",
                                           "argmin"};

qkv_tensor *qkv__reduce(qkv_reduce_op op, const qkv_tensor *a, uint32_t mask, bool keepdim,
                        double correction, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    if (a->dtype == QKV_BF16 && !bf16_rows(op, a, mask))
        return QKV__IN_F32(qkv__reduce(op, QKV__F32(a), mask, keepdim, correction, name));
    if (!qkv__is_float(a->dtype) && (op == QKV_RED_MEAN || op == QKV_RED_VAR)) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__reduce(op, qkv__to_dtype(a, QKV_F32), mask, keepdim,
                                               correction, name));
        qkv_scope_end();
        return out;
    }
    mask &= a->ndim ? (uint32_t)((1u << a->ndim) - 1) : 0;
    plan p;
    p.op = op;
    p.correction = correction;
    make_plan(&p, a, mask);
    if (p.n_red == 0 && op != QKV_RED_SUM && op != QKV_RED_MEAN && op != QKV_RED_VAR) {
        char s[128];
        return qkv_set_error("%s: cannot take %s over an empty dimension of %s", name,
                             reduce_names[op], qkv_shape_str(a, s, sizeof s));
    }
    int n = 0;
    int64_t shape[QKV_MAX_DIMS];
    for (int i = 0; i < a->ndim; i++) {
        if (!(mask & (1u << i))) shape[n++] = a->shape[i];
        else if (keepdim) shape[n++] = 1;
    }
    qkv_dtype odt = a->dtype;
    if (op == QKV_RED_ARGMAX || op == QKV_RED_ARGMIN) odt = QKV_I64;
    if (op == QKV_RED_SUM && !qkv__is_float(a->dtype)) odt = QKV_I64;
    qkv_tensor *out = qkv_empty(odt, n, shape);
    if (!out) return NULL;
    void *o = qkv_data(out);
    int threads = qkv__threads_for(a->numel);
    if (p.n_out < threads) threads = (int)(p.n_out > 0 ? p.n_out : 1);
    if (threads <= 1) {
        reduce_range(&p, a, o, 0, p.n_out);
        return out;
    }
    int64_t pieces = qkv__pieces(p.n_out, threads);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < pieces; t++)
        reduce_range(&p, a, o, p.n_out * t / pieces, p.n_out * (t + 1) / pieces);
    return out;
}

/* ---- Softmax ----------------------------------------------------------------------------- */

/* A row whose every entry is -inf (fully masked) gives zeros for softmax and -inf for
 * log_softmax, where the textbook formula would give NaN. */
#define SOFTMAX_ROW(T, EXP, LOG)                                                                \
    static void softmax_row_##T(const T *x, int64_t sx, T *y, int64_t sy, int64_t n, bool take_log) {            \
        T m = -INFINITY;                                                                        \
        for (int64_t j = 0; j < n; j++) {                                                       \
            T v = x[j * sx];                                                                    \
            if (v > m || v != v) m = v;                                                         \
            if (m != m) break;                                                                  \
        }                                                                                       \
        if (m == -INFINITY) {                                                                   \
            for (int64_t j = 0; j < n; j++) y[j * sy] = take_log ? -INFINITY : 0;                         \
            return;                                                                             \
        }                                                                                       \
        double s = 0;                                                                           \
        if (take_log) {                                                                         \
            for (int64_t j = 0; j < n; j++) s += EXP(x[j * sx] - m);                            \
            T ls = (T)LOG(s);                                                                   \
            for (int64_t j = 0; j < n; j++) y[j * sy] = x[j * sx] - m - ls;                          \
        } else {                                                                                \
            for (int64_t j = 0; j < n; j++) {                                                   \
                y[j * sy] = EXP(x[j * sx] - m);                                                 \
                s += y[j * sy];                                                                 \
            }                                                                                   \
            T inv = (T)(1.0 / s);                                                               \
            for (int64_t j = 0; j < n; j++) y[j * sy] *= inv;                                      \
        }                                                                                       \
    }

SOFTMAX_ROW(float, expf, log)
SOFTMAX_ROW(double, exp, log)

/* The common case, a contiguous float row in and out, a vector at a time. Lanes past the row's
 * end hold -inf, which the max ignores and whose exp is 0. */
/* One vector into a row's running lane maxima and NaN flags. */
static inline void max_step(qkv_vf v, qkv_vf *vm, qkv_vi *nan) {
    *vm = qkv__vf_select(v > *vm, v, *vm);
    *nan |= v != v;
}

/* The maximum over the lanes, NaN when any lane saw one. */
static inline float lanes_max(qkv_vf vm, qkv_vi nan) {
    float m = -INFINITY;
    bool any_nan = false;
    for (int l = 0; l < QKV_VF_LANES; l++) {
        if (vm[l] > m) m = vm[l];
        any_nan |= nan[l] != 0;
    }
    return any_nan ? NAN : m;
}

/* The row's maximum, NaN when the row holds one (then the whole row is NaN). */
static float row_max_vector(const float *x, int64_t n) {
    qkv_vf vm = qkv__vf_splat(-INFINITY);
    qkv_vi nan = {0};
    int64_t j = 0;
    for (; j + QKV_VF_LANES <= n; j += QKV_VF_LANES) max_step(qkv__vf_load(x + j), &vm, &nan);
    float m = lanes_max(vm, nan);
    for (; j < n; j++) {
        if (x[j] != x[j]) return NAN;
        if (x[j] > m) m = x[j];
    }
    return m;
}

static void softmax_row_vector(const float *x, float *y, int64_t n, bool take_log) {
    float m = row_max_vector(x, n);
    if (m == -INFINITY || m != m) {
        for (int64_t j = 0; j < n; j++) y[j] = m != m ? m : take_log ? -INFINITY : 0;
        return;
    }
    qkv_vf vsum = {0};
    int64_t j = 0;
    float tail[QKV_VF_LANES];
    for (; j < n; j += QKV_VF_LANES) {
        qkv_vf v;
        if (j + QKV_VF_LANES <= n) {
            v = qkv__vf_load(x + j);
        } else {
            for (int l = 0; l < QKV_VF_LANES; l++) tail[l] = j + l < n ? x[j + l] : -INFINITY;
            v = qkv__vf_load(tail);
        }
        qkv_vf e = qkv__vexp_nonpos(v - m);
        vsum += e;
        if (!take_log) {
            if (j + QKV_VF_LANES <= n) qkv__vf_store(y + j, e);
            else {
                qkv__vf_store(tail, e);
                memcpy(y + j, tail, (size_t)(n - j) * sizeof(float));
            }
        }
    }
    float s = 0;
    for (int l = 0; l < QKV_VF_LANES; l++) s += vsum[l];
    if (take_log) {
        /* (x - m) - log s: folding m into log s first would round it at m's magnitude. */
        float ls = logf(s);
        for (j = 0; j < n; j++) y[j] = (x[j] - m) - ls;
    } else {
        float inv = 1.0f / s;
        for (j = 0; j < n; j++) y[j] *= inv;
    }
}

qkv_tensor *qkv__softmax(const qkv_tensor *a, int axis, bool log, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    if (!qkv__is_float(a->dtype)) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__softmax(qkv__to_dtype(a, QKV_F32), axis, log, name));
        qkv_scope_end();
        return out;
    }
    if (a->dtype == QKV_BF16) return QKV__IN_F32(qkv__softmax(QKV__F32(a), axis, log, name));
    int ax = qkv__norm_axis(name, a, axis);
    if (ax < 0) return NULL;
    qkv_tensor *out = qkv_empty(a->dtype, a->ndim, a->shape);
    if (!out || a->numel == 0) return out;
    int64_t n = a->ndim ? a->shape[ax] : 1, sx = a->ndim ? a->strides[ax] : 1;
    plan p;
    make_plan(&p, a, a->ndim ? 1u << ax : 0);
    int64_t rows = p.n_out;
    int64_t ostride = 1;
    for (int i = ax + 1; i < a->ndim; i++) ostride *= a->shape[i];
    int threads = qkv__threads_for(a->numel * 8);
    if (rows < threads) threads = 1;
    char *od = qkv_data(out);
    const char *ad = qkv_data(a);
    size_t es = qkv_dtype_size(a->dtype);
    int64_t pieces = qkv__pieces(rows, threads);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < pieces; t++) {
        for (int64_t r = rows * t / pieces; r < rows * (t + 1) / pieces; r++) {
            int64_t off = kept_offset(&p, r);
            int64_t obase = (r / ostride) * ostride * n + r % ostride;
            if (es == 4 && sx == 1 && ostride == 1)
                softmax_row_vector((const float *)ad + off, (float *)od + obase, n, log);
            else if (es == 4)
                softmax_row_float((const float *)ad + off, sx, (float *)od + obase, ostride, n,
                                  log);
            else
                softmax_row_double((const double *)ad + off, sx, (double *)od + obase, ostride,
                                   n, log);
        }
    }
    return out;
}

qkv_tensor *qkv__softmax_f32(const qkv_tensor *a, int axis, bool log, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    int ax = a->dtype == QKV_BF16 && a->ndim ? qkv__norm_axis(name, a, axis) : -1;
    if (ax != a->ndim - 1 || a->strides[ax] != 1 || a->numel == 0) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__softmax(qkv__to_dtype(a, QKV_F32), axis, log, name));
        qkv_scope_end();
        return out;
    }
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    qkv_tensor *out = qkv_empty(QKV_F32, a->ndim, a->shape);
    if (!out) return NULL;
    int64_t n = a->shape[ax];
    plan p;
    make_plan(&p, a, 1u << ax);
    int64_t rows = p.n_out;
    int threads = qkv__threads_for(a->numel * 8);
    if (rows < threads) threads = 1;
    float *od = qkv_data(out);
    const uint16_t *ad = qkv_data(a);
    int64_t pieces = qkv__pieces(rows, threads);
    /* each row widened into its output row, then softmax in place there */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < pieces; t++)
        for (int64_t r = rows * t / pieces; r < rows * (t + 1) / pieces; r++) {
            const uint16_t *x = ad + kept_offset(&p, r);
            float *y = od + r * n;
            for (int64_t j = 0; j < n; j++) y[j] = qkv__bf16_to_f32(x[j]);
            softmax_row_vector(y, y, n, log);
        }
    return out;
}

/* ---- Causal softmax --------------------------------------------------------------------- */

/* How many leading entries of row r take part: rows of n keys, L queries per matrix, query
 * i = r % L sees keys j <= past + i. */
static int64_t causal_width(int64_t r, int64_t L, int64_t n, int64_t past) {
    int64_t i = r % L;
    return past >= n - i - 1 ? n : past + i + 1;
}

/* The entries a causal row reads are a prefix of it, longer by one each row: the hardware's
 * stream prefetchers do not follow that from row to row, and each row would start on cold
 * cache lines. The kernels ask for the prefix of the row CAUSAL_AHEAD rows on (its first
 * bytes of a and, if not NULL, of b) before they compute a row. */
enum { CAUSAL_AHEAD = 4 };

static void prefetch_prefix(const char *a, const char *b, int64_t bytes) {
    for (int64_t c = 0; c < bytes; c += 64) {
        __builtin_prefetch(a + c);
        if (b) __builtin_prefetch(b + c);
    }
}

/* Lanes of the vector at column j that lie before column m */
static inline qkv_vi lanes_before(int64_t j, int64_t m) {
    qkv_vi lane;
    for (int l = 0; l < QKV_VF_LANES; l++) lane[l] = l;
    return lane < (qkv_vi){0} + (int32_t)(m - j);
}

/* The vector of a row of n floats at column j < m, lanes from m on -inf: read whole where
 * the row holds the whole vector (the masked entries read are never used), else through a
 * buffer. */
static inline qkv_vf causal_lanes(const float *x, int64_t j, int64_t m, int64_t n) {
    if (j + QKV_VF_LANES <= n)
        return qkv__vf_select(lanes_before(j, m), qkv__vf_load(x + j), qkv__vf_splat(-INFINITY));
    float buf[QKV_VF_LANES];
    for (int l = 0; l < QKV_VF_LANES; l++) buf[l] = j + l < m ? x[j + l] : -INFINITY;
    return qkv__vf_load(buf);
}

/* The maximum of a causal row's first m entries, NaN when they hold one. */
static float causal_row_max(const float *x, int64_t n, int64_t m) {
    qkv_vf vm = qkv__vf_splat(-INFINITY);
    qkv_vi nan = {0};
    for (int64_t j = 0; j < m; j += QKV_VF_LANES)
        max_step(j + QKV_VF_LANES <= m ? qkv__vf_load(x + j) : causal_lanes(x, j, m, n), &vm,
                 &nan);
    return lanes_max(vm, nan);
}

/* exp(x - mx) of a causal row's first m entries into y, whole vectors with zeros past m
 * where the row holds them; the sum as softmax_row_vector's (lane sums, then the lanes in
 * order). *end gets the column the stores reached. */
static float causal_row_exp(const float *x, float *y, int64_t n, int64_t m, float mx,
                            int64_t *end) {
    qkv_vf vsum = {0};
    int64_t j = 0;
    for (; j + QKV_VF_LANES <= m; j += QKV_VF_LANES) {
        qkv_vf e = qkv__vexp_nonpos(qkv__vf_load(x + j) - mx);
        vsum += e;
        qkv__vf_store(y + j, e);
    }
    *end = j;
    if (j < m) {
        qkv_vf e = qkv__vexp_nonpos(causal_lanes(x, j, m, n) - mx);
        vsum += e;
        float tail[QKV_VF_LANES];
        qkv__vf_store(j + QKV_VF_LANES <= n ? y + j : tail, e);
        if (j + QKV_VF_LANES > n) memcpy(y + j, tail, (size_t)(m - j) * sizeof(float));
        *end = j + QKV_VF_LANES <= n ? j + QKV_VF_LANES : m;
    }
    float s = 0;
    for (int l = 0; l < QKV_VF_LANES; l++) s += vsum[l];
    return s;
}

/* Row r of the causal softmax over floats: softmax_row_vector over the leading m entries
 * that take part, then zeros (NaN when the row is NaN), in fewer passes. Those zeros are
 * what exp(-inf) gives, and the sums are those of the full row with the masked entries left
 * out, so the result is softmax(x.masked_fill(mask, -inf))'s bit for bit; masked entries are
 * read by whole vectors but never used. The exps past m of the last vector are zeros already
 * (0 * inv stays 0), so one store of zeros ends the row. */
static void softmax_causal_row_f32(const float *x, float *y, int64_t n, int64_t m) {
    float mx = causal_row_max(x, n, m);
    if (mx != mx) {
        for (int64_t j = 0; j < n; j++) y[j] = NAN;
        return;
    }
    int64_t end = 0;
    if (mx != -INFINITY) {
        float inv = 1.0f / causal_row_exp(x, y, n, m, mx, &end);
        int64_t j = 0;
        for (; j + QKV_VF_LANES <= end; j += QKV_VF_LANES)
            qkv__vf_store(y + j, qkv__vf_load(y + j) * inv);
        for (; j < end; j++) y[j] *= inv;
    }
    memset(y + end, 0, (size_t)(n - end) * sizeof(float));
}

/* Row r of the causal softmax: the leading m entries that take part, zeros after them (NaN
 * when the row is NaN), as softmax(x.masked_fill(mask, -inf)) gives them bit for bit. */
static void softmax_causal_row(qkv_dtype dtype, const char *x, char *y, int64_t n, int64_t m) {
    if (dtype == QKV_F32) {
        softmax_causal_row_f32((const float *)x, (float *)y, n, m);
    } else {
        double *yd = (double *)y;
        softmax_row_double((const double *)x, 1, yd, 1, m, false);
        double rest = yd[0] != yd[0] ? yd[0] : 0;
        for (int64_t j = m; j < n; j++) yd[j] = rest;
    }
}

qkv_tensor *qkv__softmax_causal(const qkv_tensor *a, int64_t past, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    char s[128];
    if (a->ndim < 2)
        return qkv_set_error("%s: expected scores [..., L, S], got %s", name,
                             qkv_shape_str(a, s, sizeof s));
    if (past < 0) return qkv_set_error("%s: past %lld < 0", name, (long long)past);
    if (!qkv__is_float(a->dtype)) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__softmax_causal(qkv__to_dtype(a, QKV_F32), past, name));
        qkv_scope_end();
        return out;
    }
    if (a->dtype == QKV_BF16) return QKV__IN_F32(qkv__softmax_causal(QKV__F32(a), past, name));
    qkv_tensor *ac = qkv__contiguous(a);
    qkv_tensor *out = ac ? qkv_empty(a->dtype, a->ndim, a->shape) : NULL;
    if (!out || a->numel == 0) return out;
    int64_t n = a->shape[a->ndim - 1], L = a->shape[a->ndim - 2], rows = a->numel / n;
    int threads = qkv__threads_for(a->numel * 4);
    if (rows < threads) threads = 1;
    const char *ad = qkv_data(ac);
    char *od = qkv_data(out);
    int64_t pieces = qkv__pieces(rows, threads);
    size_t es = qkv_dtype_size(a->dtype);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < pieces; t++)
        for (int64_t r = rows * t / pieces; r < rows * (t + 1) / pieces; r++) {
            int64_t at = r * n * (int64_t)es;
            if (r + CAUSAL_AHEAD < rows)
                prefetch_prefix(ad + at + CAUSAL_AHEAD * n * (int64_t)es, NULL,
                                causal_width(r + CAUSAL_AHEAD, L, n, past) * (int64_t)es);
            softmax_causal_row(a->dtype, ad + at, od + at, n, causal_width(r, L, n, past));
        }
    return out;
}

/* The gradient of softmax (or log_softmax) along the last axis from its output y and the
 * output's gradient g, one row at a time: y (g - sum(g y)) for softmax, g - exp(y) sum(g) for
 * log_softmax. Rows are independent, so threads split them. */
#define SOFTMAX_GRAD_ROW(T, EXP)                                                                \
    static void softmax_grad_row_##T(const T *y, const T *g, T *out, int64_t n, bool take_log) { \
        double s = 0;                                                                           \
        if (take_log) {                                                                         \
            /* a fully masked row is the constant -inf: no gradient flows through it */         \
            bool masked = true;                                                                 \
            for (int64_t j = 0; j < n; j++) {                                                   \
                s += g[j];                                                                      \
                masked = masked && y[j] == -INFINITY;                                           \
            }                                                                                   \
            for (int64_t j = 0; j < n; j++) out[j] = masked ? 0 : g[j] - EXP(y[j]) * (T)s;     \
        } else {                                                                                \
            for (int64_t j = 0; j < n; j++) s += (double)g[j] * y[j];                           \
            for (int64_t j = 0; j < n; j++) out[j] = y[j] * (g[j] - (T)s);                     \
        }                                                                                       \
    }

SOFTMAX_GRAD_ROW(double, exp)

/* Softmax's gradient of a float row, eight lanes at a time: the products g y are exact in
 * double, and lane j % 8 sums them in order, so a row's result is fixed whatever the thread
 * count. */
static void softmax_grad_row_vector(const float *y, const float *g, float *out, int64_t n) {
    qkv_d8 acc = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        qkv_f8 yv, gv;
        memcpy(&yv, y + j, sizeof yv);
        memcpy(&gv, g + j, sizeof gv);
        acc += __builtin_convertvector(gv, qkv_d8) * __builtin_convertvector(yv, qkv_d8);
    }
    double s = 0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; j < n; j++) s += (double)g[j] * y[j];
    float fs = (float)s;
    for (j = 0; j < n; j++) out[j] = y[j] * (g[j] - fs);
}

/* log_softmax's gradient of a float row, g - exp(y) sum(g), with the vector exp (y <= 0);
 * sum(g) in double, in order, as the double rows'. */
static void log_softmax_grad_row_vector(const float *y, const float *g, float *out, int64_t n) {
    double s = 0;
    bool masked = true;
    for (int64_t j = 0; j < n; j++) {
        s += g[j];
        masked = masked && y[j] == -INFINITY;
    }
    if (masked) {
        memset(out, 0, (size_t)n * sizeof(float));
        return;
    }
    float fs = (float)s;
    int64_t j = 0;
    for (; j + QKV_VF_LANES <= n; j += QKV_VF_LANES)
        qkv__vf_store(out + j, qkv__vf_load(g + j) -
                                   qkv__vexp_nonpos(qkv__vf_load(y + j)) * fs);
    for (; j < n; j++) out[j] = g[j] - expf(y[j]) * fs;
}

/* One row of softmax's gradient of n entries, of which the first m take part (the rest have
 * output 0 and get gradient 0). */
static void softmax_grad_row(qkv_dtype dtype, const char *y, const char *g, char *out,
                             int64_t n, int64_t m, bool log) {
    size_t es = qkv_dtype_size(dtype);
    if (dtype == QKV_F32 && !log)
        softmax_grad_row_vector((const float *)y, (const float *)g, (float *)out, m);
    else if (dtype == QKV_F32)
        log_softmax_grad_row_vector((const float *)y, (const float *)g, (float *)out, m);
    else
        softmax_grad_row_double((const double *)y, (const double *)g, (double *)out, m, log);
    if (m < n) memset(out + (size_t)m * es, 0, (size_t)(n - m) * es);
}

/* Softmax's gradient over the last axis; past >= 0: causal, as qkv__softmax_causal. */
static qkv_tensor *softmax_backward_rows(const qkv_tensor *y, const qkv_tensor *g, bool log,
                                         int64_t past, const char *name) {
    if (QKV__NULL_ARGS(name, y, g)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, y, g)) return NULL;
    if (y->ndim == 0 || (past >= 0 && y->ndim < 2) || g->dtype != y->dtype ||
        g->ndim != y->ndim || g->numel != y->numel)
        return qkv_set_error("%s: gradient does not match the output", name);
    if (y->dtype == QKV_BF16)
        return QKV__IN_F32(softmax_backward_rows(QKV__F32(y), QKV__F32(g), log, past, name));
    qkv_tensor *yc = qkv__contiguous(y), *gc = qkv__contiguous(g);
    qkv_tensor *out = yc && gc ? qkv_empty(y->dtype, y->ndim, y->shape) : NULL;
    if (!out || out->numel == 0) return out;
    int64_t n = y->shape[y->ndim - 1], rows = y->numel / n;
    int64_t L = y->ndim >= 2 ? y->shape[y->ndim - 2] : 1;
    int threads = qkv__threads_for(y->numel * 4);
    if (rows < threads) threads = 1;
    const char *yd = qkv_data(yc), *gd = qkv_data(gc);
    char *od = qkv_data(out);
    int64_t pieces = qkv__pieces(rows, threads);
    size_t es = qkv_dtype_size(y->dtype);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < pieces; t++)
        for (int64_t r = rows * t / pieces; r < rows * (t + 1) / pieces; r++) {
            int64_t at = r * n * (int64_t)es, m = past < 0 ? n : causal_width(r, L, n, past);
            if (past >= 0 && r + CAUSAL_AHEAD < rows) {
                int64_t ahead = at + CAUSAL_AHEAD * n * (int64_t)es;
                prefetch_prefix(yd + ahead, gd + ahead,
                                causal_width(r + CAUSAL_AHEAD, L, n, past) * (int64_t)es);
            }
            softmax_grad_row(y->dtype, yd + at, gd + at, od + at, n, m, log);
        }
    return out;
}

qkv_tensor *qkv__softmax_backward(const qkv_tensor *y, const qkv_tensor *g, bool log,
                                  const char *name) {
    return softmax_backward_rows(y, g, log, -1, name);
}

qkv_tensor *qkv__softmax_causal_backward(const qkv_tensor *y, const qkv_tensor *g,
                                         int64_t past, const char *name) {
    return softmax_backward_rows(y, g, false, past < 0 ? 0 : past, name);
}
