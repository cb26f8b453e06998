/*
 * More element-wise ops: the activations SiLU, softplus, leaky ReLU and ELU, SwiGLU's gate
 * silu(a) * b, sin, cos, erf, log1p, expm1, square, clamp, and the rounding family. Each
 * differentiable one saves the values its derivative reads (its input; expm1 its output) and,
 * but for the gate, being one cheap pass over them, recomputes its output from them, so an op
 * that reads the output holds no copy. The derivatives are computed by tensor/math.c's
 * backward kernels, one line per op there; each op below states its own.
 */
#include <math.h>

#include "autograd/autograd_internal.h"

/* The op and its parameters, in the node for the backward and the recompute. */
typedef struct math_args {
    qkv_math_op op;
    double p0, p1;
    const char *name;
} math_args;

static const math_args *args_of(qkv_ctx *ctx) {
    return qkv_ctx_args(ctx);
}

/* g * f'(x), x the saved value */
static void math_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const math_args *a = args_of(ctx);
    gi[0] = qkv__math_backward(a->op, qkv_saved(ctx, 0), g, a->p0, a->p1, a->name);
}

/* The output again from the saved input: the forward kernel, bit for bit. */
static qkv_tensor *math_recompute(qkv_ctx *ctx) {
    const math_args *a = args_of(ctx);
    return qkv__math(a->op, qkv_saved(ctx, 0), a->p0, a->p1, a->name);
}

#define MATH_FN(NAME)                                                                        \
    static const qkv_function NAME##_fn = {.name = #NAME, .backward = math_backward,         \
                                           .recompute = math_recompute,                      \
                                           .args_size = sizeof(math_args)}

/* op(a) recorded with fn: the input saved in slot 0, or the output (save_out). */
static qkv_tensor *math_op(const qkv_function *fn, qkv_math_op op, const qkv_tensor *a,
                           double p0, double p1, bool save_out, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(fn, 1, QKV_INPUTS(a), &(math_args){op, p0, p1, name});
    if (!save_out) qkv_save(ctx, 0, a);
    qkv_tensor *out = qkv__math(op, a, p0, p1, name);
    if (save_out) qkv_save(ctx, 0, out);
    return qkv_function_end(ctx, out);
}

/* ---- Activations ------------------------------------------------------------------------- */

/* d silu(x) = g * s (1 + x (1 - s)), s = sigmoid(x) */
MATH_FN(silu);
qkv_tensor *qkv_silu(const qkv_tensor *a) {
    return math_op(&silu_fn, QKV_MATH_SILU, a, 0, 0, false, "qkv_silu");
}

/* silu(a) * b as one op: SwiGLU's gate. Both inputs are saved (each gradient reads a, and
 * a's reads b too). The output has no recompute: recomputing it (an exp and a division per
 * entry) cost its consumer's backward a pass of its own, which holding it saves. */
enum { SILU_MUL_A, SILU_MUL_B };

/* d(silu(a) b) = g b s (1 + a (1 - s)), g silu(a); s = sigmoid(a) */
static void silu_mul_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv__silu_mul_backward(qkv_saved(ctx, SILU_MUL_A), qkv_saved(ctx, SILU_MUL_B), g,
                           qkv_ctx_needs_grad(ctx, 0) ? &gi[0] : NULL,
                           qkv_ctx_needs_grad(ctx, 1) ? &gi[1] : NULL, "silu_mul_backward");
}

static const qkv_function silu_mul_fn = {.name = "silu_mul", .backward = silu_mul_backward};

qkv_tensor *qkv_silu_mul(const qkv_tensor *a, const qkv_tensor *b) {
    if (QKV__NULL_ARGS("qkv_silu_mul", a, b)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&silu_mul_fn, 2, QKV_INPUTS(a, b), NULL);
    qkv_save(ctx, SILU_MUL_A, a);
    qkv_save(ctx, SILU_MUL_B, b);
    return qkv_function_end(ctx, qkv__silu_mul(a, b, "qkv_silu_mul"));
}

/* d softplus(x) = g * z / (z + 1), z = exp(beta x); g where beta x > threshold */
MATH_FN(softplus);
qkv_tensor *qkv_softplus(const qkv_tensor *a, double beta, double threshold) {
    return math_op(&softplus_fn, QKV_MATH_SOFTPLUS, a, beta, threshold, false,
                   "qkv_softplus");
}

/* d leaky_relu(x) = g where x > 0, else g * negative_slope */
MATH_FN(leaky_relu);
qkv_tensor *qkv_leaky_relu(const qkv_tensor *a, double negative_slope) {
    return math_op(&leaky_relu_fn, QKV_MATH_LEAKY_RELU, a, negative_slope, 0, false,
                   "qkv_leaky_relu");
}

/* d elu(x) = g where x > 0, else g * alpha * exp(x) */
MATH_FN(elu);
qkv_tensor *qkv_elu(const qkv_tensor *a, double alpha) {
    return math_op(&elu_fn, QKV_MATH_ELU, a, alpha, 0, false, "qkv_elu");
}

/* ---- Math -------------------------------------------------------------------------------- */

/* d sin(x) = g cos(x) */
MATH_FN(sin);
qkv_tensor *qkv_sin(const qkv_tensor *a) {
    return math_op(&sin_fn, QKV_MATH_SIN, a, 0, 0, false, "qkv_sin");
}

/* d cos(x) = -g sin(x) */
MATH_FN(cos);
qkv_tensor *qkv_cos(const qkv_tensor *a) {
    return math_op(&cos_fn, QKV_MATH_COS, a, 0, 0, false, "qkv_cos");
}

/* d erf(x) = g * 2/sqrt(pi) * exp(-x^2) */
MATH_FN(erf);
qkv_tensor *qkv_erf(const qkv_tensor *a) {
    return math_op(&erf_fn, QKV_MATH_ERF, a, 0, 0, false, "qkv_erf");
}

/* d log1p(x) = g / (1 + x) */
MATH_FN(log1p);
qkv_tensor *qkv_log1p(const qkv_tensor *a) {
    return math_op(&log1p_fn, QKV_MATH_LOG1P, a, 0, 0, false, "qkv_log1p");
}

/* d expm1(x) = g * (out + 1): the output is saved, and is its own recompute */
static const qkv_function expm1_fn = {.name = "expm1", .backward = math_backward,
                                      .recompute = qkv__saved_output,
                                      .args_size = sizeof(math_args)};
qkv_tensor *qkv_expm1(const qkv_tensor *a) {
    return math_op(&expm1_fn, QKV_MATH_EXPM1, a, 0, 0, true, "qkv_expm1");
}

/* d x^2 = g * 2x */
MATH_FN(square);
qkv_tensor *qkv_square(const qkv_tensor *a) {
    return math_op(&square_fn, QKV_MATH_SQUARE, a, 0, 0, false, "qkv_square");
}

/* d clamp(x) = g where min <= x <= max (NaN x included nowhere), else 0 */
MATH_FN(clamp);
qkv_tensor *qkv_clamp(const qkv_tensor *a, double min, double max) {
    if (QKV__NULL_ARGS("qkv_clamp", a)) return NULL;
    if (isnan(min) && isnan(max))
        return qkv_set_error("qkv_clamp: at least one of min and max must be a bound, "
                             "not NAN");
    /* No bound is an infinite one: the same values and the same gradient mask. */
    return math_op(&clamp_fn, QKV_MATH_CLAMP, a, isnan(min) ? -INFINITY : min,
                   isnan(max) ? INFINITY : max, false, "qkv_clamp");
}

/* ---- Rounding: piecewise constant ------------------------------------------------------- */

/* d floor(x) = d ceil(x) = d round(x) = d sign(x) = 0: a zero gradient, as torch gives, so a
 * leaf behind them gets zeros rather than no gradient at all. */
static void zero_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *in = qkv_ctx_input(ctx, 0);
    gi[0] = qkv_zeros(g->dtype, in->ndim, in->shape);
}

static qkv_tensor *rounding_op(const qkv_function *fn, qkv_math_op op, const qkv_tensor *a,
                               const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(fn, 1, QKV_INPUTS(a), NULL);
    return qkv_function_end(ctx, qkv__math(op, a, 0, 0, name));
}

static const qkv_function floor_fn = {.name = "floor", .backward = zero_backward};
static const qkv_function ceil_fn = {.name = "ceil", .backward = zero_backward};
static const qkv_function round_fn = {.name = "round", .backward = zero_backward};
static const qkv_function sign_fn = {.name = "sign", .backward = zero_backward};

qkv_tensor *qkv_floor(const qkv_tensor *a) {
    return rounding_op(&floor_fn, QKV_MATH_FLOOR, a, "qkv_floor");
}
qkv_tensor *qkv_ceil(const qkv_tensor *a) {
    return rounding_op(&ceil_fn, QKV_MATH_CEIL, a, "qkv_ceil");
}
qkv_tensor *qkv_round(const qkv_tensor *a) {
    return rounding_op(&round_fn, QKV_MATH_ROUND, a, "qkv_round");
}
qkv_tensor *qkv_sign(const qkv_tensor *a) {
    return rounding_op(&sign_fn, QKV_MATH_SIGN, a, "qkv_sign");
}

/* ---- rotary embedding -------------------------------------------------------------------- */

enum { ROPE_COS, ROPE_SIN };

/* x cos + rotate_half(x) sin in x's dtype; grad: the gradient from g. x is read in place
 * when its last axis has stride 1 (attention's heads, a view of a projection). */
static qkv_tensor *rope_values(const qkv_tensor *x, const qkv_tensor *cos,
                               const qkv_tensor *sin, bool grad) {
    qkv_tensor *xc = x->strides[x->ndim - 1] == 1 ? (qkv_tensor *)x : qkv__contiguous(x);
    qkv_tensor *cc = qkv__contiguous(cos), *sc = qkv__contiguous(sin);
    qkv_tensor *out = xc && cc && sc ? qkv_empty(x->dtype, x->ndim, x->shape) : NULL;
    if (!out || out->numel == 0) return out;
    qkv__rope_rows(xc, qkv_data(cc), qkv_data(sc), grad, qkv_data(out));
    return out;
}

/* d(x c + rotate_half(x) s)/dx applied to g: g c + [g2 s2, -g1 s1] */
static void rotary_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *c = qkv_saved(ctx, ROPE_COS), *s = qkv_saved(ctx, ROPE_SIN);
    if (c && s) gi[0] = rope_values(g, c, s, true);
}
static const qkv_function rotary_fn = {.name = "rotary", .backward = rotary_backward};

/* The tables as x's dtype, checked against x: NULL (an error set) when they do not fit. */
static bool rotary_tables(const char *name, const qkv_tensor *x, const qkv_tensor **cos,
                          const qkv_tensor **sin) {
    char sx[128], sc[128], ss[128];
    const qkv_tensor *c = *cos, *s = *sin;
    int64_t d = x->ndim ? x->shape[x->ndim - 1] : 0, T = x->ndim >= 2 ? x->shape[x->ndim - 2] : 0;
    bool fits = x->ndim >= 2 && d % 2 == 0 && qkv__is_float(x->dtype) && c->ndim == 2 &&
                s->ndim == 2 && c->shape[0] == T && c->shape[1] == d && s->shape[0] == T &&
                s->shape[1] == d && qkv__is_float(c->dtype) && qkv__is_float(s->dtype);
    if (!fits) {
        qkv_set_error("%s: x %s %s, cos %s, sin %s; expected a float x [..., T, d] with d even "
                      "and float tables [T, d]", name, qkv_dtype_name(x->dtype),
                      qkv_shape_str(x, sx, sizeof sx), qkv_shape_str(c, sc, sizeof sc),
                      qkv_shape_str(s, ss, sizeof ss));
        return false;
    }
    if (qkv__needs_grad(c) || qkv__needs_grad(s)) {
        qkv_set_error("%s: cos and sin are tables; they cannot require grad", name);
        return false;
    }
    if (c->dtype != x->dtype) *cos = qkv__to_dtype(c, x->dtype);
    if (s->dtype != x->dtype) *sin = qkv__to_dtype(s, x->dtype);
    return *cos && *sin;
}

qkv_tensor *qkv_rotary(const qkv_tensor *x, const qkv_tensor *cos, const qkv_tensor *sin) {
    static const char *const name = "qkv_rotary";
    if (QKV__NULL_ARGS(name, x, cos, sin)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, cos, sin) || !rotary_tables(name, x, &cos, &sin)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&rotary_fn, 1, QKV_INPUTS(x), NULL);
    qkv_save(ctx, ROPE_COS, cos);
    qkv_save(ctx, ROPE_SIN, sin);
    return qkv_function_end(ctx, rope_values(x, cos, sin, false));
}
