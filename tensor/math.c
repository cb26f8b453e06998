/*
 * Element-wise math beyond elementwise.c's core set: the activations SiLU, softplus, leaky
 * ReLU and ELU, sin, cos, erf, log1p, expm1, square, clamp and the rounding family; and for
 * each differentiable one, its backward's product g * f'(x) in one pass over x and g. The
 * formulas are PyTorch's CPU ones, branch for branch, so that the values and gradients agree
 * at the edges (thresholds, kinks, NaN). These are scalar libm loops over the strided driver,
 * except SiLU over contiguous f32, the gate of LLaMA's feed-forward, which runs in vectors
 * through tensor/vmath.h's exp (within a few ulp of libm's).
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tensor/tensor_internal.h"
#include "tensor/vmath.h"

/* The loop's context: the op, its parameters and the dtype it computes in. */
typedef struct math_loop {
    qkv_math_op op;
    double p0, p1;
    qkv_dtype dtype;
} math_loop;

/* f(x) in the precision T, with libm's function for T (F: the float name's suffix). The
 * parameters are cast to T first, as torch casts a Scalar to the tensor's dtype. */
#define DEFINE_FORWARD(T, NAME, F)                                                           \
    static inline T NAME(qkv_math_op op, T x, T p0, T p1) {                                  \
        switch (op) {                                                                        \
        case QKV_MATH_SILU: return x / ((T)1 + exp##F(-x));                                  \
        case QKV_MATH_SOFTPLUS: return x * p0 > p1 ? x : log1p##F(exp##F(x * p0)) / p0;      \
        case QKV_MATH_LEAKY_RELU: return x > 0 ? x : x * p0;                                 \
        case QKV_MATH_ELU: return x > 0 ? x : p0 * expm1##F(x);                              \
        case QKV_MATH_SIN: return sin##F(x);                                                 \
        case QKV_MATH_COS: return cos##F(x);                                                 \
        case QKV_MATH_ERF: return erf##F(x);                                                 \
        case QKV_MATH_LOG1P: return log1p##F(x);                                             \
        case QKV_MATH_EXPM1: return expm1##F(x);                                             \
        case QKV_MATH_SQUARE: return x * x;                                                  \
        case QKV_MATH_CLAMP: return x != x ? x : fmin##F(fmax##F(x, p0), p1);                \
        case QKV_MATH_FLOOR: return floor##F(x);                                             \
        case QKV_MATH_CEIL: return ceil##F(x);                                               \
        case QKV_MATH_ROUND: return nearbyint##F(x); /* half to even, as torch.round */      \
        case QKV_MATH_SIGN: return (T)((x > 0) - (x < 0)); /* 0 at NaN, as torch 1.13 */     \
        }                                                                                    \
        return x;                                                                            \
    }

/* g * f'(x) for the forward op f, selected rather than multiplied where torch selects (a kink
 * or a threshold), so an infinite g on the flat side gives 0, not NaN. For expm1, x is the
 * output. */
#define DEFINE_BACKWARD(T, NAME, F)                                                          \
    static inline T NAME(qkv_math_op op, T x, T g, T p0, T p1) {                             \
        switch (op) {                                                                        \
        case QKV_MATH_SILU: { /* s (1 + x (1 - s)), s = sigmoid(x) */                        \
            T s = (T)1 / ((T)1 + exp##F(-x));                                                \
            return g * s * ((T)1 + x * ((T)1 - s));                                          \
        }                                                                                    \
        case QKV_MATH_SOFTPLUS: { /* z / (z + 1), z = exp(beta x); 1 past the threshold */   \
            T z = exp##F(x * p0);                                                            \
            return x * p0 > p1 ? g : g * z / (z + (T)1);                                     \
        }                                                                                    \
        case QKV_MATH_LEAKY_RELU: return x > 0 ? g : g * p0;                                 \
        case QKV_MATH_ELU: return x <= 0 ? g * p0 * exp##F(x) : g;                           \
        case QKV_MATH_SIN: return g * cos##F(x);                                             \
        case QKV_MATH_COS: return g * -sin##F(x);                                            \
        case QKV_MATH_ERF: return g * (T)M_2_SQRTPI * exp##F(-x * x);                        \
        case QKV_MATH_LOG1P: return g / (x + (T)1);                                          \
        case QKV_MATH_EXPM1: return g * (x + (T)1);                                          \
        case QKV_MATH_SQUARE: return g * ((T)2 * x);                                         \
        case QKV_MATH_CLAMP: return x >= p0 && x <= p1 ? g : (T)0;                           \
        default: return (T)0; /* the rounding family */                                     \
        }                                                                                    \
    }

DEFINE_FORWARD(float, forward_f32, f)
DEFINE_FORWARD(double, forward_f64, )
DEFINE_BACKWARD(float, backward_f32, f)
DEFINE_BACKWARD(double, backward_f64, )

/* Integers keep their dtype through the ops that map integers to integers. Products wrap
 * (two's complement), as torch's do; bounds are whole numbers here (keeps_integers). */
static inline int64_t forward_i64(qkv_math_op op, int64_t x, int64_t lo, int64_t hi) {
    switch (op) {
    case QKV_MATH_SQUARE: return (int64_t)((uint64_t)x * (uint64_t)x);
    case QKV_MATH_SIGN: return (x > 0) - (x < 0);
    case QKV_MATH_CLAMP: {
        int64_t y = x < lo ? lo : x;
        return y > hi ? hi : y;
    }
    default: return x; /* floor, ceil, round */
    }
}

#define RUN_FORWARD(T, FN, P0, P1)                                                           \
    do {                                                                                     \
        T p0_ = (P0), p1_ = (P1);                                                            \
        for (int64_t i = 0; i < n; i++)                                                      \
            *(T *)(p[0] + i * st[0]) = FN(c->op, *(const T *)(p[1] + i * st[1]), p0_, p1_);  \
    } while (0)

/* A clamp bound as an integer: -inf and +inf are no bound. */
static int64_t int_bound(double v) {
    return v == -INFINITY ? INT64_MIN : v == INFINITY ? INT64_MAX : (int64_t)v;
}

/* SiLU forward (x / (1 + exp(-x)), torch's formula) or backward (g s (1 + x (1 - s))) of
 * one vector. */
static inline qkv_vf silu_lanes(qkv_vf x, const qkv_vf *g) {
    qkv_vf e = 1.0f + qkv__vexp(-x);
    if (!g) return x / e;
    qkv_vf s = 1.0f / e;
    return *g * s * (1.0f + x * (1.0f - s));
}

/* SiLU or its backward (g not NULL) over n contiguous floats: whole vectors, then the tail
 * through a padded one. */
static void silu_vector(int64_t n, float *out, const float *x, const float *g) {
    int64_t i = 0;
    for (; i + QKV_VF_LANES <= n; i += QKV_VF_LANES) {
        qkv_vf gv = g ? qkv__vf_load(g + i) : (qkv_vf){0};
        qkv__vf_store(out + i, silu_lanes(qkv__vf_load(x + i), g ? &gv : NULL));
    }
    if (i == n) return;
    float xb[QKV_VF_LANES] = {0}, gb[QKV_VF_LANES] = {0}, ob[QKV_VF_LANES];
    memcpy(xb, x + i, (size_t)(n - i) * sizeof(float));
    if (g) memcpy(gb, g + i, (size_t)(n - i) * sizeof(float));
    qkv_vf gv = qkv__vf_load(gb);
    qkv__vf_store(ob, silu_lanes(qkv__vf_load(xb), g ? &gv : NULL));
    memcpy(out + i, ob, (size_t)(n - i) * sizeof(float));
}

/* ---- SiLU times a second factor: the gate of LLaMA's feed-forward ------------------------ */

/* silu(a) b, and its gradients ga = g b s (1 + a (1 - s)) and gb = g silu(a), s = sigmoid(a),
 * in one pass where qkv_mul(qkv_silu(a), b) makes one per op. Over floats the expressions are
 * silu_lanes' and the product's, in the same order, so a contiguous f32 result is the
 * composition's bit for bit; every layout computes in vectors (a strided one through chunks
 * gathered into buffers), so the values do not depend on the layout. */
static inline qkv_vf silu_mul_lanes(qkv_vf a, qkv_vf b) {
    return a / (1.0f + qkv__vexp(-a)) * b;
}

static inline void silu_mul_grad_lanes(qkv_vf a, qkv_vf b, qkv_vf g, qkv_vf *ga, qkv_vf *gb) {
    qkv_vf e = 1.0f + qkv__vexp(-a), s = 1.0f / e;
    *ga = g * b * s * (1.0f + a * (1.0f - s));
    *gb = g * (a / e);
}

/* m < QKV_VF_LANES values into a vector padded with zeros, and back */
static inline qkv_vf load_part(const float *p, int64_t m) {
    float buf[QKV_VF_LANES] = {0};
    memcpy(buf, p, (size_t)m * sizeof(float));
    return qkv__vf_load(buf);
}
static inline void store_part(float *p, int64_t m, qkv_vf v) {
    float buf[QKV_VF_LANES];
    qkv__vf_store(buf, v);
    memcpy(p, buf, (size_t)m * sizeof(float));
}

static void silu_mul_f32(int64_t n, float *out, const float *a, const float *b) {
    int64_t i = 0;
    for (; i + QKV_VF_LANES <= n; i += QKV_VF_LANES)
        qkv__vf_store(out + i, silu_mul_lanes(qkv__vf_load(a + i), qkv__vf_load(b + i)));
    if (i < n) store_part(out + i, n - i, silu_mul_lanes(load_part(a + i, n - i),
                                                         load_part(b + i, n - i)));
}

/* Either gradient may be left out (NULL). */
static void silu_mul_grad_f32(int64_t n, float *ga, float *gb, const float *a, const float *b,
                              const float *g) {
    qkv_vf va, vb;
    for (int64_t i = 0; i < n; i += QKV_VF_LANES) {
        int64_t m = n - i < QKV_VF_LANES ? n - i : QKV_VF_LANES;
        bool whole = m == QKV_VF_LANES;
        silu_mul_grad_lanes(whole ? qkv__vf_load(a + i) : load_part(a + i, m),
                            whole ? qkv__vf_load(b + i) : load_part(b + i, m),
                            whole ? qkv__vf_load(g + i) : load_part(g + i, m), &va, &vb);
        if (ga && whole) qkv__vf_store(ga + i, va);
        else if (ga) store_part(ga + i, m, va);
        if (gb && whole) qkv__vf_store(gb + i, vb);
        else if (gb) store_part(gb + i, m, vb);
    }
}

/* BF16 keeps the composition's roundings, so that its result is the composition's bits too:
 * the gate silu(a) and the product g b are rounded to bf16 before they are used, as the
 * composition stores them. The values come widened to f32 and leave rounded. */
static float through_bf16(float x) {
    return qkv__bf16_to_f32(qkv__f32_to_bf16(x));
}

static void silu_mul_bf16(int64_t n, float *out, const float *a, const float *b) {
    silu_vector(n, out, a, NULL);
    for (int64_t i = 0; i < n; i++) out[i] = through_bf16(out[i]) * b[i];
}

static void silu_mul_grad_bf16(int64_t n, float *ga, float *gb, const float *a, const float *b,
                               const float *g, float *tmp) {
    if (ga) {
        for (int64_t i = 0; i < n; i++) tmp[i] = through_bf16(g[i] * b[i]);
        silu_vector(n, ga, a, tmp);
    }
    if (gb) {
        silu_vector(n, gb, a, NULL);
        for (int64_t i = 0; i < n; i++) gb[i] = g[i] * through_bf16(gb[i]);
    }
}

/* The loop's context. Operands: out, a, b; for the backward, ga and gb where wanted, then
 * a, b, g. */
typedef struct silu_mul_loop {
    qkv_dtype dtype;
    bool backward, grad_a, grad_b;
} silu_mul_loop;

#define AT(T, k) (*(T *)(p[k] + i * st[k]))

/* F64: the scalar formulas of forward_f64 and backward_f64, in their order. */
static void silu_mul_f64(int64_t n, char **p, const int64_t *st, const silu_mul_loop *c) {
    if (!c->backward) {
        for (int64_t i = 0; i < n; i++) {
            double a = AT(double, 1);
            AT(double, 0) = a / (1 + exp(-a)) * AT(double, 2);
        }
        return;
    }
    int in = c->grad_a + c->grad_b;
    for (int64_t i = 0; i < n; i++) {
        double a = AT(double, in), b = AT(double, in + 1), g = AT(double, in + 2);
        double e = 1 + exp(-a), s = 1 / e;
        if (c->grad_a) AT(double, 0) = g * b * s * (1 + a * (1 - s));
        if (c->grad_b) AT(double, c->grad_a) = g * (a / e);
    }
}

#undef AT

enum { SILU_MUL_CHUNK = 256 };

/* An operand's m values as contiguous floats: in place when they are contiguous f32, else
 * gathered (widened from bf16) into buf. */
static const float *chunk_in(const char *p, int64_t st, qkv_dtype dtype, int64_t m,
                             float *buf) {
    if (dtype == QKV_F32 && st == sizeof(float)) return (const float *)p;
    for (int64_t j = 0; j < m; j++)
        buf[j] = dtype == QKV_F32 ? *(const float *)(p + j * st)
                                  : qkv__bf16_to_f32(*(const uint16_t *)(p + j * st));
    return buf;
}

/* Where a result's values are computed: in place when it is contiguous f32, else in buf,
 * which chunk_out then stores (rounded to bf16). */
static float *chunk_at(char *p, int64_t st, qkv_dtype dtype, float *buf) {
    return dtype == QKV_F32 && st == sizeof(float) ? (float *)p : buf;
}

static void chunk_out(char *p, int64_t st, qkv_dtype dtype, int64_t m, const float *v) {
    if (v == (const float *)p) return;
    if (dtype == QKV_BF16 && st == sizeof(uint16_t)) {
        qkv__bf16_round_n((uint16_t *)p, v, m);
        return;
    }
    for (int64_t j = 0; j < m; j++) {
        if (dtype == QKV_F32) *(float *)(p + j * st) = v[j];
        else *(uint16_t *)(p + j * st) = qkv__f32_to_bf16(v[j]);
    }
}

/* A run: contiguous f32 in one piece, anything else in chunks through buffers. */
static void silu_mul_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const silu_mul_loop *c = vctx;
    if (c->dtype == QKV_F64) {
        silu_mul_f64(n, p, st, c);
        return;
    }
    int n_out = c->backward ? c->grad_a + c->grad_b : 1, n_in = c->backward ? 3 : 2;
    bool direct = c->dtype == QKV_F32, bf16 = c->dtype == QKV_BF16;
    for (int k = 0; k < n_out + n_in; k++) direct = direct && st[k] == sizeof(float);
    float in_buf[3][SILU_MUL_CHUNK], out_buf[2][SILU_MUL_CHUNK], tmp[SILU_MUL_CHUNK];
    int64_t step = direct ? n : SILU_MUL_CHUNK;
    for (int64_t i = 0; i < n; i += step) {
        int64_t m = n - i < step ? n - i : step;
        const float *in[3] = {NULL, NULL, NULL};
        float *out[2] = {NULL, NULL};
        for (int k = 0; k < n_in; k++) {
            int o = n_out + k;
            in[k] = chunk_in(p[o] + i * st[o], st[o], c->dtype, m, in_buf[k]);
        }
        for (int k = 0; k < n_out; k++)
            out[k] = chunk_at(p[k] + i * st[k], st[k], c->dtype, out_buf[k]);
        float *ga = c->grad_a ? out[0] : NULL, *gb = c->grad_b ? out[c->grad_a] : NULL;
        if (!c->backward && bf16) silu_mul_bf16(m, out[0], in[0], in[1]);
        else if (!c->backward) silu_mul_f32(m, out[0], in[0], in[1]);
        else if (bf16) silu_mul_grad_bf16(m, ga, gb, in[0], in[1], in[2], tmp);
        else silu_mul_grad_f32(m, ga, gb, in[0], in[1], in[2]);
        for (int k = 0; k < n_out; k++) chunk_out(p[k] + i * st[k], st[k], c->dtype, m, out[k]);
    }
}

static bool contiguous_f32(int n_operands, const int64_t *st) {
    for (int k = 0; k < n_operands; k++)
        if (st[k] != (int64_t)sizeof(float)) return false;
    return true;
}

static void forward_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const math_loop *c = vctx;
    qkv_dtype dtype = c->dtype;
    if (c->op == QKV_MATH_SILU && dtype == QKV_F32 && contiguous_f32(2, st)) {
        silu_vector(n, (float *)p[0], (const float *)p[1], NULL);
        return;
    }
    if (dtype == QKV_F32) RUN_FORWARD(float, forward_f32, (float)c->p0, (float)c->p1);
    else if (dtype == QKV_F64) RUN_FORWARD(double, forward_f64, c->p0, c->p1);
    else RUN_FORWARD(int64_t, forward_i64, int_bound(c->p0), int_bound(c->p1));
}

#define RUN_BACKWARD(T, FN)                                                                  \
    do {                                                                                     \
        T p0_ = (T)c->p0, p1_ = (T)c->p1;                                                    \
        for (int64_t i = 0; i < n; i++)                                                      \
            *(T *)(p[0] + i * st[0]) = FN(c->op, *(const T *)(p[1] + i * st[1]),             \
                                          *(const T *)(p[2] + i * st[2]), p0_, p1_);         \
    } while (0)

static void backward_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const math_loop *c = vctx;
    qkv_dtype dtype = c->dtype;
    if (c->op == QKV_MATH_SILU && dtype == QKV_F32 && contiguous_f32(3, st)) {
        silu_vector(n, (float *)p[0], (const float *)p[1], (const float *)p[2]);
        return;
    }
    if (dtype == QKV_F32) RUN_BACKWARD(float, backward_f32);
    else RUN_BACKWARD(double, backward_f64);
}

/* The ops an integer input goes through as integers; the rest compute in F32, as torch
 * promotes integers for them. A clamp stays integral when its bounds are whole numbers. */
static bool keeps_integers(qkv_math_op op, double p0, double p1) {
    switch (op) {
    case QKV_MATH_FLOOR: case QKV_MATH_CEIL: case QKV_MATH_ROUND: case QKV_MATH_SIGN:
    case QKV_MATH_SQUARE:
        return true;
    case QKV_MATH_CLAMP:
        for (int k = 0; k < 2; k++) {
            double v = k ? p1 : p0;
            if (!isinf(v) && (v != floor(v) || fabs(v) >= 9.2e18)) return false;
        }
        return true;
    default:
        return false;
    }
}

/* Byte strides of t seen through shape (0 along broadcast dims). */
static void byte_strides(const qkv_tensor *t, int ndim, const int64_t *shape, int64_t *st) {
    qkv__broadcast_strides(t, ndim, shape, st);
    for (int i = 0; i < ndim; i++) st[i] *= (int64_t)qkv_dtype_size(t->dtype);
}

qkv_tensor *qkv__math(qkv_math_op op, const qkv_tensor *a, double p0, double p1,
                      const char *name) {
    if (!a) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    qkv_dtype ct = a->dtype;
    if (!qkv__is_float(ct)) ct = keeps_integers(op, p0, p1) ? QKV_I64 : QKV_F32;
    if (ct != a->dtype) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__math(op, qkv__to_dtype(a, ct), p0, p1, name));
        qkv_scope_end();
        return out;
    }
    if (ct == QKV_BF16) return QKV__IN_F32(qkv__math(op, QKV__F32(a), p0, p1, name));
    qkv_tensor *out = qkv_empty(ct, a->ndim, a->shape);
    if (!out) return NULL;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    byte_strides(out, out->ndim, out->shape, st[0]);
    byte_strides(a, out->ndim, out->shape, st[1]);
    char *bases[2] = {qkv_data(out), qkv_data(a)};
    math_loop l = {op, p0, p1, ct};
    qkv__foreach(2, bases, out->ndim, out->shape, (const int64_t(*)[QKV_MAX_DIMS])st,
                 forward_run, &l, true);
    return out;
}

qkv_tensor *qkv__math_backward(qkv_math_op op, const qkv_tensor *x, const qkv_tensor *g,
                               double p0, double p1, const char *name) {
    if (!x || !g) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, g)) return NULL;
    if (!qkv__is_float(x->dtype))
        return qkv_set_error("%s: no gradient for %s values", name, qkv_dtype_name(x->dtype));
    if (g->dtype != x->dtype) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__math_backward(op, x, qkv__to_dtype(g, x->dtype), p0,
                                                      p1, name));
        qkv_scope_end();
        return out;
    }
    if (x->dtype == QKV_BF16)
        return QKV__IN_F32(qkv__math_backward(op, QKV__F32(x), QKV__F32(g), p0, p1, name));
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    if (!qkv__broadcast_shape(x->ndim, x->shape, g->ndim, g->shape, &ndim, shape)) {
        char sx[128], sg[128];
        return qkv_set_error("%s: gradient %s does not broadcast with %s", name,
                             qkv_shape_str(g, sg, sizeof sg), qkv_shape_str(x, sx, sizeof sx));
    }
    qkv_tensor *out = qkv_empty(x->dtype, ndim, shape);
    if (!out) return NULL;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    byte_strides(out, ndim, shape, st[0]);
    byte_strides(x, ndim, shape, st[1]);
    byte_strides(g, ndim, shape, st[2]);
    char *bases[3] = {qkv_data(out), qkv_data(x), qkv_data(g)};
    math_loop l = {op, p0, p1, x->dtype};
    qkv__foreach(3, bases, ndim, shape, (const int64_t(*)[QKV_MAX_DIMS])st, backward_run, &l,
                 true);
    return out;
}

/* ---- SiLU times a second factor ---------------------------------------------------------- */

/* The dtype silu(a) b computes in: a and b promoted, F32 for integers and bools. */
static qkv_dtype silu_mul_dtype(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_dtype ct = qkv__result_type(a, b);
    return qkv__is_float(ct) ? ct : QKV_F32;
}

/* t as dtype: itself when it is, else a converted copy */
static const qkv_tensor *as_dtype(const qkv_tensor *t, qkv_dtype dtype) {
    return t->dtype == dtype ? t : qkv__to_dtype(t, dtype);
}

static bool silu_mul_shape(const qkv_tensor *a, const qkv_tensor *b, int *ndim, int64_t *shape,
                           const char *name) {
    if (qkv__broadcast_shape(a->ndim, a->shape, b->ndim, b->shape, ndim, shape)) return true;
    char sa[128], sb[128];
    qkv_set_error("%s: shapes do not broadcast: %s and %s", name,
                  qkv_shape_str(a, sa, sizeof sa), qkv_shape_str(b, sb, sizeof sb));
    return false;
}

qkv_tensor *qkv__silu_mul(const qkv_tensor *a, const qkv_tensor *b, const char *name) {
    if (QKV__NULL_ARGS(name, a, b)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a, b)) return NULL;
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    if (!silu_mul_shape(a, b, &ndim, shape, name)) return NULL;
    qkv_dtype ct = silu_mul_dtype(a, b);
    if (a->dtype != ct || b->dtype != ct) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__silu_mul(as_dtype(a, ct), as_dtype(b, ct), name));
        qkv_scope_end();
        return out;
    }
    qkv_tensor *out = qkv_empty(ct, ndim, shape);
    if (!out) return NULL;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    byte_strides(out, ndim, shape, st[0]);
    byte_strides(a, ndim, shape, st[1]);
    byte_strides(b, ndim, shape, st[2]);
    char *bases[3] = {qkv_data(out), qkv_data(a), qkv_data(b)};
    silu_mul_loop l = {.dtype = ct};
    qkv__foreach(3, bases, ndim, shape, (const int64_t(*)[QKV_MAX_DIMS])st, silu_mul_run, &l,
                 true);
    return out;
}

bool qkv__silu_mul_backward(const qkv_tensor *a, const qkv_tensor *b, const qkv_tensor *g,
                            qkv_tensor **ga, qkv_tensor **gb, const char *name) {
    if (ga) *ga = NULL;
    if (gb) *gb = NULL;
    if (QKV__NULL_ARGS(name, a, b, g)) return false;
    QKV__OP(name);
    if (!QKV__CHECK(name, a, b, g)) return false;
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    if (!silu_mul_shape(a, b, &ndim, shape, name)) return false;
    if (g->ndim != ndim || memcmp(g->shape, shape, (size_t)ndim * sizeof *shape)) {
        char sg[128], sa[128], sb[128];
        qkv_set_error("%s: gradient %s is not the shape of silu(%s) * %s", name,
                      qkv_shape_str(g, sg, sizeof sg), qkv_shape_str(a, sa, sizeof sa),
                      qkv_shape_str(b, sb, sizeof sb));
        return false;
    }
    qkv_dtype ct = silu_mul_dtype(a, b);
    if (a->dtype != ct || b->dtype != ct || g->dtype != ct) {
        qkv_scope_begin();
        bool ok = qkv__silu_mul_backward(as_dtype(a, ct), as_dtype(b, ct), as_dtype(g, ct), ga,
                                         gb, name);
        if (ok && ga) qkv_keep(*ga);
        if (ok && gb) qkv_keep(*gb);
        qkv_scope_end();
        return ok;
    }
    qkv_tensor *da = ga ? qkv_empty(ct, ndim, shape) : NULL;
    qkv_tensor *db = gb ? qkv_empty(ct, ndim, shape) : NULL;
    if ((ga && !da) || (gb && !db)) return false;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    char *bases[QKV_MAX_OPERANDS];
    int k = 0;
    const qkv_tensor *ops[] = {da, db, a, b, g};
    for (int i = 0; i < 5; i++) {
        if (!ops[i]) continue;
        byte_strides(ops[i], ndim, shape, st[k]);
        bases[k++] = qkv_data(ops[i]);
    }
    silu_mul_loop l = {.dtype = ct, .backward = true, .grad_a = da != NULL,
                      .grad_b = db != NULL};
    qkv__foreach(k, bases, ndim, shape, (const int64_t(*)[QKV_MAX_DIMS])st, silu_mul_run, &l,
                 true);
    if (ga) *ga = da;
    if (gb) *gb = db;
    return true;
}
