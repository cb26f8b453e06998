/* Elementwise ops: forward with the tensor kernels, backward beside each. */
#include <math.h>

#include "autograd/autograd_internal.h"

#define IN(i) qkv_ctx_input(ctx, i)
#define NEEDS(i) qkv_ctx_needs_grad(ctx, i)
#define SAVED(k) qkv_saved(ctx, k)

/* ---- Binary ------------------------------------------------------------------------------ */

/* d(a+b) = g, g */
static void add_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    gi[0] = (qkv_tensor *)g;
    gi[1] = (qkv_tensor *)g;
}
static const qkv_function add_fn = {.name = "add", .backward = add_backward};
qkv_tensor *qkv_add(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_ctx *ctx = qkv_function_begin(&add_fn, 2, QKV_INPUTS(a, b), NULL);
    return qkv_function_end(ctx, qkv__binary(QKV_OP_ADD, a, b, "qkv_add"));
}

/* d(a-b) = g, -g */
static void sub_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = (qkv_tensor *)g;
    /* Negated after the broadcast dims are summed out (the same values, as negation is
     * exact): for b = mean(x), as in layer norm, that is a pass over the reduced size only. */
    if (NEEDS(1)) gi[1] = qkv_neg(qkv__sum_to(g, IN(1)->ndim, IN(1)->shape));
}
static const qkv_function sub_fn = {.name = "sub", .backward = sub_backward};
qkv_tensor *qkv_sub(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_ctx *ctx = qkv_function_begin(&sub_fn, 2, QKV_INPUTS(a, b), NULL);
    return qkv_function_end(ctx, qkv__binary(QKV_OP_SUB, a, b, "qkv_sub"));
}

/* d(a*b) = g*b, g*a */
static void mul_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    if (NEEDS(0)) gi[0] = qkv_mul(g, SAVED(1));
    if (NEEDS(1)) gi[1] = qkv_mul(g, SAVED(0));
}
static const qkv_function mul_fn = {.name = "mul", .backward = mul_backward};
qkv_tensor *qkv_mul(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_ctx *ctx = qkv_function_begin(&mul_fn, 2, QKV_INPUTS(a, b), NULL);
    if (NEEDS(0)) qkv_save(ctx, 1, b);
    if (NEEDS(1)) qkv_save(ctx, 0, a);
    return qkv_function_end(ctx, qkv__binary(QKV_OP_MUL, a, b, "qkv_mul"));
}

/* d(a/b) = g/b, -g*a/b^2 */
static void div_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *gb = qkv_div(g, SAVED(1));
    if (NEEDS(0)) gi[0] = gb;
    if (NEEDS(1)) gi[1] = qkv_neg(qkv_div(qkv_mul(gb, SAVED(0)), SAVED(1)));
}
static const qkv_function div_fn = {.name = "div", .backward = div_backward};
qkv_tensor *qkv_div(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_ctx *ctx = qkv_function_begin(&div_fn, 2, QKV_INPUTS(a, b), NULL);
    qkv_save(ctx, 1, b);
    if (NEEDS(1)) qkv_save(ctx, 0, a);
    return qkv_function_end(ctx, qkv__binary(QKV_OP_DIV, a, b, "qkv_div"));
}

/* d(a^b) = g*b*a^(b-1), g*a^b*log(a) (taken as 0 where a is 0, as PyTorch does) */
static void pow_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *a = SAVED(0), *b = SAVED(1);
    if (NEEDS(0)) gi[0] = qkv_mul(g, qkv_mul(b, qkv_pow(a, qkv_sub_scalar(b, 1))));
    if (NEEDS(1)) {
        qkv_tensor *zero = qkv_eq_scalar(a, 0);
        qkv_tensor *lg = qkv_masked_fill(qkv_log(a), zero, 0);
        gi[1] = qkv_mul(g, qkv_mul(SAVED(2), lg));
    }
}
static const qkv_function pow_fn = {.name = "pow", .backward = pow_backward};
qkv_tensor *qkv_pow(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_ctx *ctx = qkv_function_begin(&pow_fn, 2, QKV_INPUTS(a, b), NULL);
    qkv_save(ctx, 0, a);
    qkv_save(ctx, 1, b);
    qkv_tensor *out = qkv__binary(QKV_OP_POW, a, b, "qkv_pow");
    if (NEEDS(1)) qkv_save(ctx, 2, out);
    return qkv_function_end(ctx, out);
}

/* maximum/minimum: the gradient goes to the larger (smaller) input; ties split it in half.
 * The gradient is selected, not multiplied by a 0/1 factor, as in PyTorch: an infinite or NaN
 * g reaching the losing side gives 0 there, not NaN. */
static qkv_tensor *extremum_share(const qkv_tensor *g, const qkv_tensor *loses,
                                  const qkv_tensor *ties) {
    qkv_tensor *zero = qkv_zeros(g->dtype, 0, NULL);
    qkv_tensor *tied = qkv__where(ties, qkv_mul_scalar(g, 0.5), g, "maximum_backward");
    return qkv__where(loses, zero, tied, "maximum_backward");
}
static void extremum_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi,
                              bool is_max) {
    qkv_tensor *a = SAVED(0), *b = SAVED(1);
    qkv_tensor *ties = qkv_eq(a, b);
    if (NEEDS(0)) gi[0] = extremum_share(g, is_max ? qkv_lt(a, b) : qkv_gt(a, b), ties);
    if (NEEDS(1)) gi[1] = extremum_share(g, is_max ? qkv_gt(a, b) : qkv_lt(a, b), ties);
}
static void maximum_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_backward(ctx, g, gi, true);
}
static void minimum_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_backward(ctx, g, gi, false);
}
static const qkv_function maximum_fn = {.name = "maximum", .backward = maximum_backward};
static const qkv_function minimum_fn = {.name = "minimum", .backward = minimum_backward};
static qkv_tensor *extremum(const qkv_function *fn, qkv_binary_op op, const qkv_tensor *a,
                            const qkv_tensor *b, const char *name) {
    qkv_ctx *ctx = qkv_function_begin(fn, 2, QKV_INPUTS(a, b), NULL);
    qkv_save(ctx, 0, a);
    qkv_save(ctx, 1, b);
    return qkv_function_end(ctx, qkv__binary(op, a, b, name));
}
qkv_tensor *qkv_maximum(const qkv_tensor *a, const qkv_tensor *b) {
    return extremum(&maximum_fn, QKV_OP_MAXIMUM, a, b, "qkv_maximum");
}
qkv_tensor *qkv_minimum(const qkv_tensor *a, const qkv_tensor *b) {
    return extremum(&minimum_fn, QKV_OP_MINIMUM, a, b, "qkv_minimum");
}

/* ---- Tensor-scalar ----------------------------------------------------------------------- */

typedef struct scalar_args {
    double s;
} scalar_args;

#define SCALAR (((const scalar_args *)qkv_ctx_args(ctx))->s)

/* The op of a tensor and the scalar s, saving a (save_input) and its output (save_out). */
static qkv_tensor *scalar_op(qkv_binary_op op, const qkv_tensor *a, double s, bool reverse,
                             const qkv_function *fn, bool save_input, bool save_out,
                             const char *name) {
    qkv_ctx *ctx = qkv_function_begin(fn, 1, QKV_INPUTS(a), &(scalar_args){s});
    if (save_input) qkv_save(ctx, 0, a);
    qkv_tensor *out = qkv__binary_scalar(op, a, s, reverse, name);
    if (save_out) qkv_save(ctx, 1, out);
    return qkv_function_end(ctx, out);
}

/* d(a+s) = g; d(a-s) = g */
static void identity_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    gi[0] = (qkv_tensor *)g;
}
static const qkv_function add_scalar_fn = {.name = "add_scalar", .backward = identity_backward,
                                           .args_size =                                            sizeof(scalar_args)};
qkv_tensor *qkv_add_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_ADD, a, s, false, &add_scalar_fn, false, false, "qkv_add_scalar");
}
qkv_tensor *qkv_sub_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_ADD, a, -s, false, &add_scalar_fn, false, false, "qkv_sub_scalar");
}

/* d(s-a) = -g */
static void rsub_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    gi[0] = qkv_neg(g);
}
static const qkv_function rsub_scalar_fn = {.name = "rsub_scalar", .backward = rsub_backward,
                                            .args_size =                                             sizeof(scalar_args)};
qkv_tensor *qkv_rsub_scalar(double s, const qkv_tensor *a) {
    return scalar_op(QKV_OP_SUB, a, s, true, &rsub_scalar_fn, false, false, "qkv_rsub_scalar");
}

/* d(a*s) = g*s */
static void mul_scalar_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul_scalar(g, SCALAR);
}
static const qkv_function mul_scalar_fn = {.name = "mul_scalar", .backward = mul_scalar_backward,
                                           .args_size =                                            sizeof(scalar_args)};
qkv_tensor *qkv_mul_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_MUL, a, s, false, &mul_scalar_fn, false, false, "qkv_mul_scalar");
}
qkv_tensor *qkv_div_scalar(const qkv_tensor *a, double s) {
    if (a && qkv__is_float(a->dtype))
        return scalar_op(QKV_OP_MUL, a, 1.0 / s, false, &mul_scalar_fn, false, false,
                         "qkv_div_scalar");
    return scalar_op(QKV_OP_DIV, a, s, false, &mul_scalar_fn, false, false, "qkv_div_scalar");
}

/* d(s/a) = -g*s/a^2 = -g*out/a */
static void rdiv_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_neg(qkv_div(qkv_mul(g, SAVED(1)), SAVED(0)));
}
static const qkv_function rdiv_scalar_fn = {.name = "rdiv_scalar", .backward = rdiv_backward,
                                            .args_size =                                             sizeof(scalar_args)};
qkv_tensor *qkv_rdiv_scalar(double s, const qkv_tensor *a) {
    return scalar_op(QKV_OP_DIV, a, s, true, &rdiv_scalar_fn, true, true, "qkv_rdiv_scalar");
}

/* d(a^s) = g*s*a^(s-1) */
static void pow_scalar_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    double s = SCALAR;
    gi[0] = qkv_mul(g, qkv_mul_scalar(qkv_pow_scalar(SAVED(0), s - 1), s));
}
static const qkv_function pow_scalar_fn = {.name = "pow_scalar", .backward = pow_scalar_backward,
                                           .args_size =                                            sizeof(scalar_args)};
qkv_tensor *qkv_pow_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_POW, a, s, false, &pow_scalar_fn, true, false, "qkv_pow_scalar");
}

/* d max(a, s) = g where a > s, g/2 where a == s */
static void extremum_scalar_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi,
                                     bool is_max) {
    double s = SCALAR;
    qkv_tensor *a = SAVED(0);
    qkv_tensor *loses = is_max ? qkv_lt_scalar(a, s) : qkv_gt_scalar(a, s);
    gi[0] = extremum_share(g, loses, qkv_eq_scalar(a, s));
}
static void maximum_scalar_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_scalar_backward(ctx, g, gi, true);
}
static void minimum_scalar_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_scalar_backward(ctx, g, gi, false);
}
static const qkv_function maximum_scalar_fn = {.name = "maximum_scalar",
                                               .backward = maximum_scalar_backward,
                                               .args_size = sizeof(scalar_args)};
static const qkv_function minimum_scalar_fn = {.name = "minimum_scalar",
                                               .backward = minimum_scalar_backward,
                                               .args_size = sizeof(scalar_args)};
qkv_tensor *qkv_maximum_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_MAXIMUM, a, s, false, &maximum_scalar_fn, true, false,
                     "qkv_maximum_scalar");
}
qkv_tensor *qkv_minimum_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_MINIMUM, a, s, false, &minimum_scalar_fn, true, false,
                     "qkv_minimum_scalar");
}

/* ---- Unary ------------------------------------------------------------------------------- */

/* The op over a, saving a (save_input) or its output (save_out) in slot 0. */
static qkv_tensor *unary_op(qkv_unary_op op, const qkv_tensor *a, const qkv_function *fn,
                            bool save_input, bool save_out, const void *args,
                            const char *name) {
    qkv_ctx *ctx = qkv_function_begin(fn, 1, QKV_INPUTS(a), args);
    if (save_input) qkv_save(ctx, 0, a);
    qkv_tensor *out = qkv__unary(op, a, name);
    if (save_out) qkv_save(ctx, 0, out);
    return qkv_function_end(ctx, out);
}

/* d(-a) = -g */
static const qkv_function neg_fn = {.name = "neg", .backward = rsub_backward};
qkv_tensor *qkv_neg(const qkv_tensor *a) {
    return unary_op(QKV_OP_NEG, a, &neg_fn, false, false, NULL, "qkv_neg");
}

/* d exp(a) = g*exp(a) */
static void exp_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, SAVED(0));
}
static const qkv_function exp_fn = {.name = "exp", .backward = exp_backward,
                                    .recompute = qkv__saved_output};
qkv_tensor *qkv_exp(const qkv_tensor *a) {
    return unary_op(QKV_OP_EXP, a, &exp_fn, false, true, NULL, "qkv_exp");
}

/* d log(a) = g/a */
static void log_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_div(g, SAVED(0));
}
static const qkv_function log_fn = {.name = "log", .backward = log_backward};
qkv_tensor *qkv_log(const qkv_tensor *a) {
    return unary_op(QKV_OP_LOG, a, &log_fn, true, false, NULL, "qkv_log");
}

/* d sqrt(a) = g/(2 sqrt(a)) */
static void sqrt_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_div(qkv_mul_scalar(g, 0.5), SAVED(0));
}
static const qkv_function sqrt_fn = {.name = "sqrt", .backward = sqrt_backward,
                                     .recompute = qkv__saved_output};
qkv_tensor *qkv_sqrt(const qkv_tensor *a) {
    return unary_op(QKV_OP_SQRT, a, &sqrt_fn, false, true, NULL, "qkv_sqrt");
}

/* d a^(-1/2) = -g/2 * a^(-3/2) = -g/2 * out^3 */
static void rsqrt_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *o = SAVED(0);
    gi[0] = qkv_mul(qkv_mul_scalar(g, -0.5), qkv_mul(o, qkv_mul(o, o)));
}
static const qkv_function rsqrt_fn = {.name = "rsqrt", .backward = rsqrt_backward,
                                      .recompute = qkv__saved_output};
qkv_tensor *qkv_rsqrt(const qkv_tensor *a) {
    return unary_op(QKV_OP_RSQRT, a, &rsqrt_fn, false, true, NULL, "qkv_rsqrt");
}

/* d|a| = g*sign(a) */
static void abs_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, qkv__unary(QKV_OP_SIGN, SAVED(0), "abs_backward"));
}
static const qkv_function abs_fn = {.name = "abs", .backward = abs_backward};
qkv_tensor *qkv_abs(const qkv_tensor *a) {
    return unary_op(QKV_OP_ABS, a, &abs_fn, true, false, NULL, "qkv_abs");
}

/* d tanh(a) = g*(1 - out^2) */
static void tanh_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *out = SAVED(0);
    gi[0] = qkv_mul(g, qkv_rsub_scalar(1, qkv_mul(out, out)));
}
static const qkv_function tanh_fn = {.name = "tanh", .backward = tanh_backward,
                                     .recompute = qkv__saved_output};
qkv_tensor *qkv_tanh(const qkv_tensor *a) {
    return unary_op(QKV_OP_TANH, a, &tanh_fn, false, true, NULL, "qkv_tanh");
}

/* d sigmoid(a) = g*out*(1 - out) */
static void sigmoid_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *out = SAVED(0);
    gi[0] = qkv_mul(g, qkv_mul(out, qkv_rsub_scalar(1, out)));
}
static const qkv_function sigmoid_fn = {.name = "sigmoid", .backward = sigmoid_backward,
                                        .recompute = qkv__saved_output};
qkv_tensor *qkv_sigmoid(const qkv_tensor *a) {
    return unary_op(QKV_OP_SIGMOID, a, &sigmoid_fn, false, true, NULL, "qkv_sigmoid");
}

/* d relu(a) = g where a > 0, else 0: selected, so an infinite g at a <= 0 gives 0 (PyTorch's
 * threshold_backward), not inf * 0. */
static void relu_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv__where(qkv_le_scalar(SAVED(0), 0), qkv_zeros(g->dtype, 0, NULL), g,
                       "relu_backward");
}
static qkv_tensor *relu_recompute(qkv_ctx *ctx) {
    return qkv__unary(QKV_OP_RELU, SAVED(0), "relu");
}
static const qkv_function relu_fn = {.name = "relu", .backward = relu_backward,
                                     .recompute = relu_recompute};
qkv_tensor *qkv_relu(const qkv_tensor *a) {
    return unary_op(QKV_OP_RELU, a, &relu_fn, true, false, NULL, "qkv_relu");
}

/* d gelu(a) = g*(Phi(a) + a*phi(a)) (erf form), or the derivative of the tanh form */
typedef struct gelu_args {
    bool tanh_approximation;
} gelu_args;
static bool gelu_tanh(qkv_ctx *ctx) {
    return ((const gelu_args *)qkv_ctx_args(ctx))->tanh_approximation;
}
static void gelu_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_unary_op d = gelu_tanh(ctx) ? QKV_OP_GELU_TANH_GRAD : QKV_OP_GELU_ERF_GRAD;
    gi[0] = qkv__unary_times(d, SAVED(0), g, "gelu_backward");
}
static qkv_tensor *gelu_recompute(qkv_ctx *ctx) {
    qkv_unary_op f = gelu_tanh(ctx) ? QKV_OP_GELU_TANH : QKV_OP_GELU_ERF;
    return qkv__unary(f, SAVED(0), "gelu");
}
static const qkv_function gelu_fn = {.name = "gelu", .backward = gelu_backward,
                                     .recompute = gelu_recompute, .args_size = sizeof(gelu_args)};
qkv_tensor *qkv_gelu(const qkv_tensor *a, bool tanh_approximation) {
    return unary_op(tanh_approximation ? QKV_OP_GELU_TANH : QKV_OP_GELU_ERF, a, &gelu_fn, true,
                    false, &(gelu_args){tanh_approximation}, "qkv_gelu");
}

/* ---- Comparisons (not differentiable) ---------------------------------------------------- */

#define COMPARE(NAME, OP)                                                                       \
    qkv_tensor *qkv_##NAME(const qkv_tensor *a, const qkv_tensor *b) {                          \
        return qkv__binary(OP, a, b, "qkv_" #NAME);                                             \
    }                                                                                           \
    qkv_tensor *qkv_##NAME##_scalar(const qkv_tensor *a, double s) {                            \
        return qkv__binary_scalar(OP, a, s, false, "qkv_" #NAME "_scalar");                    \
    }
COMPARE(eq, QKV_OP_EQ)
COMPARE(ne, QKV_OP_NE)
COMPARE(lt, QKV_OP_LT)
COMPARE(le, QKV_OP_LE)
COMPARE(gt, QKV_OP_GT)
COMPARE(ge, QKV_OP_GE)

/* ---- where, masked_fill ------------------------------------------------------------------ */

/* d where(c, a, b) = where(c, g, 0), where(c, 0, g) */
static void where_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *zero = qkv_zeros(g->dtype, 0, NULL), *cond = SAVED(0);
    if (NEEDS(1)) gi[1] = qkv__where(cond, g, zero, "where_backward");
    if (NEEDS(2)) gi[2] = qkv__where(cond, zero, g, "where_backward");
}
static const qkv_function where_fn = {.name = "where", .backward = where_backward};
qkv_tensor *qkv_where(const qkv_tensor *cond, const qkv_tensor *a, const qkv_tensor *b) {
    qkv_ctx *ctx = qkv_function_begin(&where_fn, 3, QKV_INPUTS(cond, a, b), NULL);
    qkv_save(ctx, 0, cond);
    return qkv_function_end(ctx, qkv__where(cond, a, b, "qkv_where"));
}

/* d masked_fill(a, m, v) = where(m, 0, g) */
static void masked_fill_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv__where(SAVED(1), qkv_zeros(g->dtype, 0, NULL), g, "masked_fill_backward");
}
static const qkv_function masked_fill_fn = {.name = "masked_fill",
                                            .backward = masked_fill_backward};
qkv_tensor *qkv_masked_fill(const qkv_tensor *a, const qkv_tensor *mask, double value) {
    if (QKV__NULL_ARGS("qkv_masked_fill", a, mask)) return NULL;
    union { float f; double d; int64_t i; bool b; } v;
    qkv_storage storage = {.data = &v, .nbytes = sizeof v, .refcount = 1};
    qkv_tensor fill = {0};
    fill.dtype = a->dtype;
    fill.numel = 1;
    fill.storage = &storage;
    fill.refcount = 1;
    qkv__store(&v, a->dtype, 0, value);
    qkv_ctx *ctx = qkv_function_begin(&masked_fill_fn, 2, QKV_INPUTS(a, mask), NULL);
    qkv_save(ctx, 1, mask);
    qkv_tensor *out = qkv__where(mask, &fill, a, "qkv_masked_fill");
    if (out && (out->ndim != a->ndim || out->numel != a->numel)) {
        char sa[128], sm[128];
        out = qkv_set_error("qkv_masked_fill: mask %s does not broadcast to %s",
                            qkv_shape_str(mask, sm, sizeof sm), qkv_shape_str(a, sa, sizeof sa));
    }
    return qkv_function_end(ctx, out);
}
