/* Elementwise kernels: binary ops with NumPy broadcasting, unary math, where. */
/* Contract a*b + c into fused multiply-adds (as tensor/gemm.c does): the polynomials of exp
 * and erf behind GELU, sigmoid and SiLU are chains of them. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <math.h>
#include <string.h>

#include "tensor/tensor_internal.h"
#include "tensor/vmath.h"

qkv_dtype qkv__promote(qkv_dtype a, qkv_dtype b) {
    if (a == QKV_F64 || b == QKV_F64) return QKV_F64;
    if (a == QKV_F32 || b == QKV_F32) return QKV_F32;
    if (a == QKV_BF16 || b == QKV_BF16) return QKV_BF16;
    if (a == QKV_I64 || b == QKV_I64) return QKV_I64;
    return QKV_BOOL;
}

static int category(qkv_dtype t) {
    return t == QKV_BOOL ? 0 : t == QKV_I64 ? 1 : 2;
}

qkv_dtype qkv__result_type(const qkv_tensor *a, const qkv_tensor *b) {
    /* As in PyTorch, a 0-d operand beside one with dimensions decides the dtype only when it
     * is of a higher kind (bool < integer < float): f32 [n] + f64 [] is f32. */
    if ((a->ndim == 0) != (b->ndim == 0)) {
        const qkv_tensor *dim = a->ndim ? a : b, *zero = a->ndim ? b : a;
        if (category(zero->dtype) <= category(dim->dtype)) return dim->dtype;
        return zero->dtype;
    }
    return qkv__promote(a->dtype, b->dtype);
}

static bool is_compare(qkv_binary_op op) {
    return op >= QKV_OP_EQ;
}

/* Output of a binary op: a new contiguous tensor of the broadcast shape. */
static qkv_tensor *broadcast_out(const qkv_tensor *a, const qkv_tensor *b, qkv_dtype dtype,
                                 const char *name) {
    int n;
    int64_t shape[QKV_MAX_DIMS];
    if (!qkv__broadcast_shape(a->ndim, a->shape, b->ndim, b->shape, &n, shape)) {
        char sa[128], sb[128];
        return qkv_set_error("%s: shapes do not broadcast: %s and %s", name,
                             qkv_shape_str(a, sa, sizeof sa), qkv_shape_str(b, sb, sizeof sb));
    }
    return qkv_empty(dtype, n, shape);
}

/* Byte strides of each operand seen through the output's shape. */
static void operand_strides(const qkv_tensor *out, const qkv_tensor *const *ins, int nin,
                            int64_t (*st)[QKV_MAX_DIMS]) {
    for (int i = 0; i < out->ndim; i++) st[0][i] = out->strides[i] * (int64_t)qkv_dtype_size(out->dtype);
    for (int k = 0; k < nin; k++) {
        qkv__broadcast_strides(ins[k], out->ndim, out->shape, st[k + 1]);
        for (int i = 0; i < out->ndim; i++) st[k + 1][i] *= (int64_t)qkv_dtype_size(ins[k]->dtype);
    }
}

/* One loop over a run, specialised for the layouts that matter: all contiguous, and either
 * input a broadcast scalar. The generic case walks byte strides. */
#define RUN2(TO, T, EXPR)                                                                       \
    do {                                                                                        \
        if (st[0] == sizeof(TO) && st[1] == sizeof(T) && st[2] == sizeof(T)) {                 \
            TO *restrict o = (TO *)p[0];                                                        \
            const T *restrict A = (const T *)p[1], *restrict B = (const T *)p[2];               \
            for (int64_t i = 0; i < n; i++) { T x = A[i], y = B[i]; o[i] = (EXPR); }            \
        } else if (st[0] == sizeof(TO) && st[1] == sizeof(T) && st[2] == 0) {                   \
            TO *restrict o = (TO *)p[0];                                                        \
            const T *restrict A = (const T *)p[1];                                              \
            const T y = *(const T *)p[2];                                                       \
            for (int64_t i = 0; i < n; i++) { T x = A[i]; o[i] = (EXPR); }                      \
        } else if (st[0] == sizeof(TO) && st[1] == 0 && st[2] == sizeof(T)) {                   \
            TO *restrict o = (TO *)p[0];                                                        \
            const T *restrict B = (const T *)p[2];                                              \
            const T x = *(const T *)p[1];                                                       \
            for (int64_t i = 0; i < n; i++) { T y = B[i]; o[i] = (EXPR); }                      \
        } else {                                                                                \
            for (int64_t i = 0; i < n; i++) {                                                   \
                T x = *(const T *)(p[1] + i * st[1]), y = *(const T *)(p[2] + i * st[2]);       \
                *(TO *)(p[0] + i * st[0]) = (EXPR);                                             \
            }                                                                                   \
        }                                                                                       \
    } while (0)

#define MAXIMUM(x, y) ((x) > (y) || (x) != (x) ? (x) : (y))
#define MINIMUM(x, y) ((x) < (y) || (x) != (x) ? (x) : (y))

#define PLUS(x, y) ((x) + (y))
#define MINUS(x, y) ((x) - (y))
#define TIMES(x, y) ((x) * (y))

/* ADD, SUB and MUL are the operators for floats, the wrapping helpers for I64. */
#define BINARY_FOR_TYPE(T, POW, ADD, SUB, MUL)                                                  \
    switch (op) {                                                                               \
    case QKV_OP_ADD: RUN2(T, T, ADD(x, y)); break;                                              \
    case QKV_OP_SUB: RUN2(T, T, SUB(x, y)); break;                                              \
    case QKV_OP_MUL: RUN2(T, T, MUL(x, y)); break;                                              \
    case QKV_OP_DIV: RUN2(T, T, x / y); break;                                                  \
    case QKV_OP_POW: RUN2(T, T, (T)POW(x, y)); break;                                           \
    case QKV_OP_MAXIMUM: RUN2(T, T, MAXIMUM(x, y)); break;                                      \
    case QKV_OP_MINIMUM: RUN2(T, T, MINIMUM(x, y)); break;                                      \
    case QKV_OP_EQ: RUN2(bool, T, x == y); break;                                               \
    case QKV_OP_NE: RUN2(bool, T, x != y); break;                                               \
    case QKV_OP_LT: RUN2(bool, T, x < y); break;                                                \
    case QKV_OP_LE: RUN2(bool, T, x <= y); break;                                               \
    case QKV_OP_GT: RUN2(bool, T, x > y); break;                                                \
    case QKV_OP_GE: RUN2(bool, T, x >= y); break;                                               \
    }

/* x^y for integers, wrapping as repeated I64 multiplication does. */
static int64_t ipow(int64_t x, int64_t y) {
    if (y < 0) return x == 1 ? 1 : x == -1 ? (y % 2 ? -1 : 1) : 0;
    int64_t r = 1;
    while (y) {
        if (y & 1) r = qkv__wrap_mul(r, x);
        x = qkv__wrap_mul(x, x);
        y >>= 1;
    }
    return r;
}

typedef struct bin_ctx {
    qkv_binary_op op;
    qkv_dtype dtype;
    int widened; /* 1 or 2: that operand is bf16 in an f32 op, widened as it is read */
} bin_ctx;

/* BF16 runs are computed in f32, as torch's kernels do: a chunk of each operand is widened
 * into a float buffer (one value for a broadcast scalar), the f32 loop runs over the buffers,
 * and its result is rounded on store (a comparison writes its bools straight out). */
enum { BF16_CHUNK = 256 };

static void widen_chunk(float *restrict dst, const char *src, int64_t stride, int64_t m) {
    if (stride == 2) { /* contiguous: a loop the compiler vectorizes */
        const uint16_t *restrict s = (const uint16_t *)src;
        for (int64_t j = 0; j < m; j++) dst[j] = qkv__bf16_to_f32(s[j]);
        return;
    }
    if (stride == 0) m = 1;
    for (int64_t j = 0; j < m; j++)
        dst[j] = qkv__bf16_to_f32(*(const uint16_t *)(src + j * stride));
}

static void round_chunk(char *dst, int64_t stride, const float *src, int64_t m) {
    if (stride == 2) {
        qkv__bf16_round_n((uint16_t *)dst, src, m);
        return;
    }
    for (int64_t j = 0; j < m; j++) *(uint16_t *)(dst + j * stride) = qkv__f32_to_bf16(src[j]);
}

static void binary_run(int64_t n, char **p, const int64_t *st, void *vctx);

static void binary_bf16(int64_t n, char **p, const int64_t *st, qkv_binary_op op) {
    float a[BF16_CHUNK], b[BF16_CHUNK], r[BF16_CHUNK];
    bool compare = is_compare(op);
    bin_ctx c = {op, QKV_F32, 0};
    for (int64_t i = 0; i < n; i += BF16_CHUNK) {
        int64_t m = n - i < BF16_CHUNK ? n - i : BF16_CHUNK;
        widen_chunk(a, p[1] + i * st[1], st[1], m);
        widen_chunk(b, p[2] + i * st[2], st[2], m);
        char *q[3] = {compare ? p[0] + i * st[0] : (char *)r, (char *)a, (char *)b};
        int64_t qs[3] = {compare ? st[0] : 4, st[1] ? 4 : 0, st[2] ? 4 : 0};
        binary_run(m, q, qs, &c);
        if (!compare) round_chunk(p[0] + i * st[0], st[0], r, m);
    }
}

/* An f32 op with one bf16 operand (a residual add under autocast): that operand is widened a
 * chunk at a time into a buffer, where the f32 loop reads it; no f32 copy of the tensor. */
static void binary_widening(int64_t n, char **p, const int64_t *st, const bin_ctx *c) {
    float w[BF16_CHUNK];
    int k = c->widened;
    bin_ctx f = {c->op, QKV_F32, 0};
    for (int64_t i = 0; i < n; i += BF16_CHUNK) {
        int64_t m = n - i < BF16_CHUNK ? n - i : BF16_CHUNK;
        widen_chunk(w, p[k] + i * st[k], st[k], m);
        char *q[3] = {p[0] + i * st[0], p[1] + i * st[1], p[2] + i * st[2]};
        int64_t qs[3] = {st[0], st[1], st[2]};
        q[k] = (char *)w;
        qs[k] = st[k] ? 4 : 0;
        binary_run(m, q, qs, &f);
    }
}

static void binary_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const bin_ctx *c = vctx;
    qkv_binary_op op = c->op;
    if (c->widened) {
        binary_widening(n, p, st, c);
        return;
    }
    switch (c->dtype) {
    case QKV_F32: BINARY_FOR_TYPE(float, powf, PLUS, MINUS, TIMES); break;
    case QKV_F64: BINARY_FOR_TYPE(double, pow, PLUS, MINUS, TIMES); break;
    case QKV_I64:
        BINARY_FOR_TYPE(int64_t, ipow, qkv__wrap_add, qkv__wrap_sub, qkv__wrap_mul);
        break;
    case QKV_BOOL: /* only comparisons and maximum/minimum compute in bool */
        switch (op) {
        case QKV_OP_MAXIMUM: RUN2(bool, bool, x || y); break;
        case QKV_OP_MINIMUM: RUN2(bool, bool, x && y); break;
        case QKV_OP_EQ: RUN2(bool, bool, x == y); break;
        case QKV_OP_NE: RUN2(bool, bool, x != y); break;
        case QKV_OP_LT: RUN2(bool, bool, !x && y); break;
        case QKV_OP_LE: RUN2(bool, bool, !x || y); break;
        case QKV_OP_GT: RUN2(bool, bool, x && !y); break;
        case QKV_OP_GE: RUN2(bool, bool, x || !y); break;
        default: break;
        }
        break;
    case QKV_BF16: binary_bf16(n, p, st, op); break;
    }
}

/* The dtype a binary op computes in: promotion, with true division and arithmetic on masks
 * lifted to a numeric type as in PyTorch. */
static qkv_dtype compute_dtype(qkv_binary_op op, const qkv_tensor *a, const qkv_tensor *b) {
    qkv_dtype ct = qkv__result_type(a, b);
    if (op == QKV_OP_DIV && !qkv__is_float(ct)) return QKV_F32;
    if (ct == QKV_BOOL && !is_compare(op) && op != QKV_OP_MAXIMUM && op != QKV_OP_MINIMUM)
        return QKV_I64;
    return ct;
}

qkv_tensor *qkv__binary(qkv_binary_op op, const qkv_tensor *a, const qkv_tensor *b,
                        const char *name) {
    if (QKV__NULL_ARGS(name, a, b)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a, b)) return NULL;
    qkv_dtype ct = compute_dtype(op, a, b);
    int widened = ct != QKV_F32 ? 0
                  : a->dtype == QKV_BF16 && b->dtype == QKV_F32 ? 1
                  : a->dtype == QKV_F32 && b->dtype == QKV_BF16 ? 2 : 0;
    if (!widened && (a->dtype != ct || b->dtype != ct)) {
        qkv_scope_begin();
        qkv_tensor *ca = a->dtype == ct ? (qkv_tensor *)a : qkv__to_dtype(a, ct);
        qkv_tensor *cb = b->dtype == ct ? (qkv_tensor *)b : qkv__to_dtype(b, ct);
        qkv_tensor *out = qkv_keep(qkv__binary(op, ca, cb, name));
        qkv_scope_end();
        return out;
    }
    qkv_tensor *out = broadcast_out(a, b, is_compare(op) ? QKV_BOOL : ct, name);
    if (!out) return NULL;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    const qkv_tensor *ins[2] = {a, b};
    operand_strides(out, ins, 2, st);
    char *bases[3] = {qkv_data(out), qkv_data(a), qkv_data(b)};
    bin_ctx c = {op, ct, widened};
    qkv__foreach(3, bases, out->ndim, out->shape, (const int64_t(*)[QKV_MAX_DIMS])st,
                 binary_run, &c, true);
    return out;
}

/* acc[i] = acc[i] + g[i]: x + y with x the accumulator, as binary_run's ADD computes it. */
#define ADD_INTO(T)                                                                             \
    do {                                                                                        \
        if (st[0] == sizeof(T) && st[1] == sizeof(T)) {                                         \
            T *o = (T *)p[0];                                                                   \
            const T *restrict g = (const T *)p[1];                                              \
            for (int64_t i = 0; i < n; i++) o[i] = o[i] + g[i];                                 \
        } else {                                                                                \
            for (int64_t i = 0; i < n; i++) {                                                   \
                T *o = (T *)(p[0] + i * st[0]);                                                 \
                *o = *o + *(const T *)(p[1] + i * st[1]);                                       \
            }                                                                                   \
        }                                                                                       \
    } while (0)

static void add_into_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    qkv_dtype dt = *(const qkv_dtype *)vctx;
    if (dt == QKV_F32) {
        ADD_INTO(float);
    } else if (dt == QKV_F64) {
        ADD_INTO(double);
    } else { /* bf16 widens a chunk of both before it writes the chunk's rounded sums */
        char *q[3] = {p[0], p[0], p[1]};
        int64_t qs[3] = {st[0], st[0], st[1]};
        binary_bf16(n, q, qs, QKV_OP_ADD);
    }
}

bool qkv__add_into(qkv_tensor *acc, const qkv_tensor *g) {
    if (!acc || !g || acc->refcount != 1 || !acc->storage || acc->storage->refcount != 1 ||
        !qkv_is_contiguous(acc) || !qkv__is_float(acc->dtype) ||
        g->dtype != acc->dtype || g->ndim > acc->ndim)
        return false;
    /* g must broadcast to acc's shape exactly: the sum's shape is acc's. */
    for (int i = 1; i <= g->ndim; i++) {
        int64_t gs = g->shape[g->ndim - i], as = acc->shape[acc->ndim - i];
        if (gs != as && gs != 1) return false;
    }
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    const qkv_tensor *ins[1] = {g};
    operand_strides(acc, ins, 1, st);
    char *bases[2] = {qkv_data(acc), (char *)qkv_data(g)};
    qkv_dtype dt = acc->dtype;
    qkv__foreach(2, bases, acc->ndim, acc->shape, (const int64_t(*)[QKV_MAX_DIMS])st,
                 add_into_run, &dt, true);
    qkv__bump_version(acc);
    return true;
}

qkv_tensor *qkv__binary_scalar(qkv_binary_op op, const qkv_tensor *a, double s, bool reverse,
                               const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    qkv_dtype dt = a->dtype;
    if (!qkv__is_float(dt)) dt = s == floor(s) && fabs(s) < 9e15 ? QKV_I64 : QKV_F32;
    if (a->dtype == QKV_BOOL && is_compare(op) && (s == 0 || s == 1)) dt = QKV_BOOL;
    /* The scalar lives on the stack as a 0-d tensor: no allocation, nothing in the scope. */
    union { float f; double d; int64_t i; bool b; uint16_t h; } v;
    qkv_storage storage = {.data = &v, .nbytes = sizeof v, .refcount = 1};
    qkv_tensor st = {0};
    st.dtype = dt;
    st.numel = 1;
    st.storage = &storage;
    st.refcount = 1;
    qkv__store(&v, dt, 0, s);
    return reverse ? qkv__binary(op, &st, a, name) : qkv__binary(op, a, &st, name);
}

/* ---- Unary ------------------------------------------------------------------------------- */

#define RUN1(T, EXPR)                                                                           \
    do {                                                                                        \
        if (st[0] == sizeof(T) && st[1] == sizeof(T)) {                                         \
            T *restrict o = (T *)p[0];                                                          \
            const T *restrict A = (const T *)p[1];                                              \
            for (int64_t i = 0; i < n; i++) { T x = A[i]; o[i] = (EXPR); }                      \
        } else {                                                                                \
            for (int64_t i = 0; i < n; i++) {                                                   \
                T x = *(const T *)(p[1] + i * st[1]);                                           \
                *(T *)(p[0] + i * st[0]) = (EXPR);                                              \
            }                                                                                   \
        }                                                                                       \
    } while (0)

#define SQRT_2_OVER_PI 0.79788456080286535588
#define INV_SQRT_2 0.70710678118654752440
#define INV_SQRT_2PI 0.39894228040143267794
#define GELU_C 0.044715

static inline double gelu_tanh_grad(double x) {
    double u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x), t = tanh(u);
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_C * x * x);
}

#define UNARY_FLOAT(T, EXP, LOG, SQRT, FABS, TANH, ERF)                                         \
    switch (op) {                                                                               \
    case QKV_OP_NEG: RUN1(T, -x); break;                                                        \
    case QKV_OP_EXP: RUN1(T, EXP(x)); break;                                                    \
    case QKV_OP_LOG: RUN1(T, LOG(x)); break;                                                    \
    case QKV_OP_SQRT: RUN1(T, SQRT(x)); break;                                                  \
    case QKV_OP_RSQRT: RUN1(T, (T)1 / SQRT(x)); break;                                          \
    case QKV_OP_ABS: RUN1(T, FABS(x)); break;                                                   \
    case QKV_OP_TANH: RUN1(T, TANH(x)); break;                                                  \
    case QKV_OP_SIGMOID:                                                                        \
        RUN1(T, x >= 0 ? (T)1 / ((T)1 + EXP(-x)) : EXP(x) / ((T)1 + EXP(x)));                   \
        break;                                                                                  \
    case QKV_OP_RELU: RUN1(T, x > 0 || x != x ? x : (T)0); break; /* NaN stays, as in torch */  \
    case QKV_OP_GELU_ERF: RUN1(T, (T)0.5 * x * ((T)1 + ERF(x * (T)INV_SQRT_2))); break;         \
    case QKV_OP_GELU_TANH:                                                                      \
        RUN1(T, (T)0.5 * x * ((T)1 + TANH((T)SQRT_2_OVER_PI * (x + (T)GELU_C * x * x * x))));   \
        break;                                                                                  \
    case QKV_OP_SIGN: RUN1(T, (T)((x > 0) - (x < 0))); break;                                   \
    case QKV_OP_STEP: RUN1(T, x > 0 ? (T)1 : (T)0); break;                                      \
    case QKV_OP_GELU_ERF_GRAD:                                                                  \
        RUN1(T, (T)0.5 * ((T)1 + ERF(x * (T)INV_SQRT_2)) +                                      \
                    x * (T)INV_SQRT_2PI * EXP((T)-0.5 * x * x));                                \
        break;                                                                                  \
    case QKV_OP_GELU_TANH_GRAD: RUN1(T, (T)gelu_tanh_grad(x)); break;                           \
    }

typedef struct un_ctx {
    qkv_unary_op op;
    qkv_dtype dtype;
} un_ctx;

static inline __attribute__((always_inline)) qkv_vf vector_op(qkv_unary_op op, qkv_vf x) {
    switch (op) {
    case QKV_OP_EXP: return qkv__vexp(x);
    case QKV_OP_SIGMOID: return 1.0f / (1.0f + qkv__vexp(-x));
    case QKV_OP_GELU_ERF: return 0.5f * x * (1.0f + qkv__verf(x * (float)INV_SQRT_2));
    default: /* QKV_OP_GELU_ERF_GRAD */
        return qkv__vgelu_erf_grad(x);
    }
}

/* The transcendental ops of the hot path, over contiguous floats, a vector at a time; the
 * tail goes through a padded vector so every element sees the same arithmetic. */
static bool unary_vector(qkv_unary_op op, int64_t n, const float *x, float *y) {
    if (op != QKV_OP_EXP && op != QKV_OP_SIGMOID && op != QKV_OP_GELU_ERF &&
        op != QKV_OP_GELU_ERF_GRAD)
        return false;
    int64_t i = 0;
    for (; i + QKV_VF_LANES <= n; i += QKV_VF_LANES)
        qkv__vf_store(y + i, vector_op(op, qkv__vf_load(x + i)));
    if (i < n) {
        float in[QKV_VF_LANES] = {0}, out[QKV_VF_LANES];
        memcpy(in, x + i, (size_t)(n - i) * sizeof(float));
        qkv__vf_store(out, vector_op(op, qkv__vf_load(in)));
        memcpy(y + i, out, (size_t)(n - i) * sizeof(float));
    }
    return true;
}

static void unary_run(int64_t n, char **p, const int64_t *st, void *vctx);

/* As binary_bf16: in f32 chunks, rounded on store. */
static void unary_bf16(int64_t n, char **p, const int64_t *st, qkv_unary_op op) {
    float a[BF16_CHUNK], r[BF16_CHUNK];
    un_ctx c = {op, QKV_F32};
    for (int64_t i = 0; i < n; i += BF16_CHUNK) {
        int64_t m = n - i < BF16_CHUNK ? n - i : BF16_CHUNK;
        widen_chunk(a, p[1] + i * st[1], st[1], m);
        if (st[1] == 0)
            for (int64_t j = 1; j < m; j++) a[j] = a[0];
        char *q[2] = {(char *)r, (char *)a};
        unary_run(m, q, (const int64_t[]){4, 4}, &c);
        round_chunk(p[0] + i * st[0], st[0], r, m);
    }
}

static void unary_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const un_ctx *c = vctx;
    qkv_unary_op op = c->op;
    if (c->dtype == QKV_BF16) {
        unary_bf16(n, p, st, op);
        return;
    }
    if (c->dtype == QKV_F32 && st[0] == 4 && st[1] == 4 &&
        unary_vector(op, n, (const float *)p[1], (float *)p[0]))
        return;
    if (c->dtype == QKV_F32) {
        UNARY_FLOAT(float, expf, logf, sqrtf, fabsf, tanhf, erff);
    } else if (c->dtype == QKV_F64) {
        UNARY_FLOAT(double, exp, log, sqrt, fabs, tanh, erf);
    } else {
        switch (op) {
        case QKV_OP_NEG: RUN1(int64_t, qkv__wrap_neg(x)); break;
        case QKV_OP_ABS: RUN1(int64_t, x < 0 ? qkv__wrap_neg(x) : x); break; /* INT64_MIN stays */
        case QKV_OP_RELU: RUN1(int64_t, x > 0 ? x : 0); break;
        case QKV_OP_SIGN: RUN1(int64_t, (x > 0) - (x < 0)); break;
        default: RUN1(int64_t, x > 0 ? 1 : 0); break;
        }
    }
}

static bool keeps_integers(qkv_unary_op op) {
    return op == QKV_OP_NEG || op == QKV_OP_ABS || op == QKV_OP_RELU || op == QKV_OP_SIGN ||
           op == QKV_OP_STEP;
}

qkv_tensor *qkv__unary(qkv_unary_op op, const qkv_tensor *a, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    qkv_dtype ct = a->dtype;
    if (ct == QKV_BOOL) ct = keeps_integers(op) ? QKV_I64 : QKV_F32;
    if (ct == QKV_I64 && !keeps_integers(op)) ct = QKV_F32;
    if (ct != a->dtype) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__unary(op, qkv__to_dtype(a, ct), name));
        qkv_scope_end();
        return out;
    }
    qkv_tensor *out = qkv_empty(ct, a->ndim, a->shape);
    if (!out) return NULL;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    operand_strides(out, &a, 1, st);
    char *bases[2] = {qkv_data(out), qkv_data(a)};
    un_ctx c = {op, ct};
    qkv__foreach(2, bases, out->ndim, out->shape, (const int64_t(*)[QKV_MAX_DIMS])st, unary_run,
                 &c, true);
    return out;
}

/* y[0:len] = g * d(x) over one vector of lanes or fewer (a short one through padded lanes,
 * so that every element sees the same arithmetic). */
static void times_f32(qkv_unary_op d, const float *x, const float *g, float *y, int64_t len) {
    if (len == QKV_VF_LANES) {
        qkv__vf_store(y, qkv__vf_load(g) * vector_op(d, qkv__vf_load(x)));
        return;
    }
    float in[QKV_VF_LANES] = {0}, gin[QKV_VF_LANES] = {0}, res[QKV_VF_LANES];
    memcpy(in, x, (size_t)len * sizeof(float));
    memcpy(gin, g, (size_t)len * sizeof(float));
    qkv__vf_store(res, qkv__vf_load(gin) * vector_op(d, qkv__vf_load(in)));
    memcpy(y, res, (size_t)len * sizeof(float));
}

/* The same on bf16: computed in f32 and rounded once, as torch's bf16 backward kernels. */
static void times_bf16(qkv_unary_op d, const uint16_t *x, const uint16_t *g, uint16_t *y,
                       int64_t len) {
    float in[QKV_VF_LANES], gin[QKV_VF_LANES], res[QKV_VF_LANES];
    if (len == QKV_VF_LANES) {
        /* Widened in registers (a bf16 is the high half of its f32): through arrays, the
         * widening's half-width stores stalled the full-width loads that read them back. */
        typedef uint16_t u16v __attribute__((vector_size(QKV_VF_LANES * 2)));
        typedef uint32_t u32v __attribute__((vector_size(QKV_VF_LANES * 4)));
        u16v hx, hg;
        memcpy(&hx, x, sizeof hx);
        memcpy(&hg, g, sizeof hg);
        u32v ux = __builtin_convertvector(hx, u32v) << 16;
        u32v ug = __builtin_convertvector(hg, u32v) << 16;
        qkv_vf vx, vg;
        memcpy(&vx, &ux, sizeof vx);
        memcpy(&vg, &ug, sizeof vg);
        qkv__vf_store(res, vg * vector_op(d, vx));
        qkv__bf16_round_n(y, res, QKV_VF_LANES);
        return;
    }
    for (int64_t j = 0; j < QKV_VF_LANES; j++) {
        in[j] = j < len ? qkv__bf16_to_f32(x[j]) : 0;
        gin[j] = j < len ? qkv__bf16_to_f32(g[j]) : 0;
    }
    qkv__vf_store(res, qkv__vf_load(gin) * vector_op(d, qkv__vf_load(in)));
    qkv__bf16_round_n(y, res, len);
}

/* g * d(x) for a derivative op d (a backward's chain rule step). Contiguous floats (f32, or
 * bf16 rounded once) of one shape, the common case, take one pass that keeps d(x) in
 * registers; anything else takes the two ops it stands for. For f32 both give the same
 * products (a single element, which unary_run computes with libm, takes the two ops). */
qkv_tensor *qkv__unary_times(qkv_unary_op d, const qkv_tensor *x, const qkv_tensor *g,
                             const char *name) {
    if (QKV__NULL_ARGS(name, x, g)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, g)) return NULL;
    bool fused = (x->dtype == QKV_F32 || x->dtype == QKV_BF16) && g->dtype == x->dtype &&
                 x->ndim == g->ndim && x->numel > 1 &&
                 qkv_is_contiguous(x) && qkv_is_contiguous(g) &&
                 !memcmp(x->shape, g->shape, (size_t)x->ndim * sizeof *x->shape) &&
                 (d == QKV_OP_GELU_ERF_GRAD || d == QKV_OP_EXP || d == QKV_OP_SIGMOID);
    if (!fused) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__binary(QKV_OP_MUL, g, qkv__unary(d, x, name), name));
        qkv_scope_end();
        return out;
    }
    qkv_tensor *out = qkv_empty(x->dtype, x->ndim, x->shape);
    if (!out) return NULL;
    bool bf16 = x->dtype == QKV_BF16;
    const char *xs = qkv_data(x), *gs = qkv_data(g);
    char *ys = qkv_data(out);
    size_t es = qkv_dtype_size(x->dtype);
    int64_t n = x->numel, vectors = (n + QKV_VF_LANES - 1) / QKV_VF_LANES;
    int threads = qkv__threads_for(n);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t v = 0; v < vectors; v++) {
        int64_t i = v * QKV_VF_LANES, len = n - i < QKV_VF_LANES ? n - i : QKV_VF_LANES;
        size_t o = (size_t)i * es;
        if (bf16)
            times_bf16(d, (const uint16_t *)(xs + o), (const uint16_t *)(gs + o),
                       (uint16_t *)(ys + o), len);
        else
            times_f32(d, (const float *)(xs + o), (const float *)(gs + o), (float *)(ys + o),
                      len);
    }
    return out;
}

/* ---- where ------------------------------------------------------------------------------- */

#define RUN_WHERE(T)                                                                            \
    for (int64_t i = 0; i < n; i++)                                                             \
        *(T *)(p[0] + i * st[0]) = *(const bool *)(p[1] + i * st[1])                            \
                                       ? *(const T *)(p[2] + i * st[2])                         \
                                       : *(const T *)(p[3] + i * st[3])

static void where_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    switch (qkv_dtype_size(*(const qkv_dtype *)vctx)) {
    case 1: RUN_WHERE(uint8_t); break;
    case 2: RUN_WHERE(uint16_t); break;
    case 4: RUN_WHERE(uint32_t); break;
    default: RUN_WHERE(uint64_t); break;
    }
}

qkv_tensor *qkv__where(const qkv_tensor *cond, const qkv_tensor *a, const qkv_tensor *b,
                       const char *name) {
    if (QKV__NULL_ARGS(name, cond, a, b)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, cond, a, b)) return NULL;
    if (cond->dtype != QKV_BOOL)
        return qkv_set_error("%s: condition must be bool, not %s", name,
                             qkv_dtype_name(cond->dtype));
    qkv_dtype ct = qkv__result_type(a, b);
    if (a->dtype != ct || b->dtype != ct) {
        qkv_scope_begin();
        qkv_tensor *ca = a->dtype == ct ? (qkv_tensor *)a : qkv__to_dtype(a, ct);
        qkv_tensor *cb = b->dtype == ct ? (qkv_tensor *)b : qkv__to_dtype(b, ct);
        qkv_tensor *out = qkv_keep(qkv__where(cond, ca, cb, name));
        qkv_scope_end();
        return out;
    }
    int n1, n2;
    int64_t s1[QKV_MAX_DIMS], s2[QKV_MAX_DIMS];
    if (!qkv__broadcast_shape(a->ndim, a->shape, b->ndim, b->shape, &n1, s1) ||
        !qkv__broadcast_shape(cond->ndim, cond->shape, n1, s1, &n2, s2)) {
        char sc[128], sa[128], sb[128];
        return qkv_set_error("%s: shapes do not broadcast: %s, %s and %s", name,
                             qkv_shape_str(cond, sc, sizeof sc), qkv_shape_str(a, sa, sizeof sa),
                             qkv_shape_str(b, sb, sizeof sb));
    }
    qkv_tensor *out = qkv_empty(ct, n2, s2);
    if (!out) return NULL;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    const qkv_tensor *ins[3] = {cond, a, b};
    operand_strides(out, ins, 3, st);
    char *bases[4] = {qkv_data(out), qkv_data(cond), qkv_data(a), qkv_data(b)};
    qkv__foreach(4, bases, out->ndim, out->shape, (const int64_t(*)[QKV_MAX_DIMS])st, where_run,
                 &ct, true);
    return out;
}
