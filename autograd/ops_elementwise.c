/* Elementwise ops: forward with the tensor kernels, backward beside each. */
#include <math.h>

#include "autograd/autograd_internal.h"

#define IN(i) (node->inputs[i])
#define SAVED(i) (node->saved[i])
#define REC2(out, def, a, b) qkv__record(out, def, 2, (const qkv_tensor *const[]){a, b})
#define REC1(out, def, a) qkv__record(out, def, 1, (const qkv_tensor *const[]){a})

/* ---- Binary ------------------------------------------------------------------------------ */

/* d(a+b) = g, g */
static void add_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = (qkv_tensor *)g;
    gi[1] = (qkv_tensor *)g;
}
static const qkv_op_def add_op = {"add", add_backward, .drop = QKV_DROP_ALL};
qkv_tensor *qkv_add(const qkv_tensor *a, const qkv_tensor *b) {
    return REC2(qkv__binary(QKV_OP_ADD, a, b, "qkv_add"), &add_op, a, b);
}

/* d(a-b) = g, -g */
static void sub_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = (qkv_tensor *)g;
    /* Negated after the broadcast dims are summed out (the same values, as negation is
     * exact): for b = mean(x), as in layer norm, that is a pass over the reduced size only. */
    if (IN(1)->requires_grad) gi[1] = qkv_neg(qkv__sum_to(g, IN(1)->ndim, IN(1)->shape));
}
static const qkv_op_def sub_op = {"sub", sub_backward, .drop = QKV_DROP_ALL};
qkv_tensor *qkv_sub(const qkv_tensor *a, const qkv_tensor *b) {
    return REC2(qkv__binary(QKV_OP_SUB, a, b, "qkv_sub"), &sub_op, a, b);
}

/* d(a*b) = g*b, g*a */
static void mul_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    if (IN(0)->requires_grad) gi[0] = qkv_mul(g, IN(1));
    if (IN(1)->requires_grad) gi[1] = qkv_mul(g, IN(0));
}
static const qkv_op_def mul_op = {"mul", mul_backward, .cross = true};
qkv_tensor *qkv_mul(const qkv_tensor *a, const qkv_tensor *b) {
    return REC2(qkv__binary(QKV_OP_MUL, a, b, "qkv_mul"), &mul_op, a, b);
}

/* d(a/b) = g/b, -g*a/b^2 */
static void div_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *gb = qkv_div(g, IN(1));
    if (IN(0)->requires_grad) gi[0] = gb;
    if (IN(1)->requires_grad) gi[1] = qkv_neg(qkv_div(qkv_mul(gb, IN(0)), IN(1)));
}
static const qkv_op_def div_op = {"div", div_backward, .drop = 0};
qkv_tensor *qkv_div(const qkv_tensor *a, const qkv_tensor *b) {
    return REC2(qkv__binary(QKV_OP_DIV, a, b, "qkv_div"), &div_op, a, b);
}

/* d(a^b) = g*b*a^(b-1), g*a^b*log(a) (taken as 0 where a is 0, as PyTorch does) */
static void pow_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    if (IN(0)->requires_grad)
        gi[0] = qkv_mul(g, qkv_mul(IN(1), qkv_pow(IN(0), qkv_sub_scalar(IN(1), 1))));
    if (IN(1)->requires_grad) {
        qkv_tensor *zero = qkv_eq_scalar(IN(0), 0);
        qkv_tensor *lg = qkv_masked_fill(qkv_log(IN(0)), zero, 0);
        gi[1] = qkv_mul(g, qkv_mul(SAVED(0), lg));
    }
}
static const qkv_op_def pow_op = {"pow", pow_backward, .drop = 0};
qkv_tensor *qkv_pow(const qkv_tensor *a, const qkv_tensor *b) {
    qkv_tensor *out = REC2(qkv__binary(QKV_OP_POW, a, b, "qkv_pow"), &pow_op, a, b);
    if (out && out->grad_fn && !qkv__save_output(out->grad_fn, 0, out)) return NULL;
    return out;
}

/* maximum/minimum: the gradient goes to the larger (smaller) input; ties split it in half. */
static void extremum_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi,
                              bool is_max) {
    qkv_tensor *wins = is_max ? qkv_gt(IN(0), IN(1)) : qkv_lt(IN(0), IN(1));
    qkv_tensor *ties = qkv_eq(IN(0), IN(1));
    qkv_tensor *w0 = qkv_add(qkv_to_dtype(wins, g->dtype),
                             qkv_mul_scalar(qkv_to_dtype(ties, g->dtype), 0.5));
    if (IN(0)->requires_grad) gi[0] = qkv_mul(g, w0);
    if (IN(1)->requires_grad) gi[1] = qkv_mul(g, qkv_rsub_scalar(1, w0));
}
static void maximum_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_backward(node, g, gi, true);
}
static void minimum_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_backward(node, g, gi, false);
}
static const qkv_op_def maximum_op = {"maximum", maximum_backward, .drop = 0};
static const qkv_op_def minimum_op = {"minimum", minimum_backward, .drop = 0};
qkv_tensor *qkv_maximum(const qkv_tensor *a, const qkv_tensor *b) {
    return REC2(qkv__binary(QKV_OP_MAXIMUM, a, b, "qkv_maximum"), &maximum_op, a, b);
}
qkv_tensor *qkv_minimum(const qkv_tensor *a, const qkv_tensor *b) {
    return REC2(qkv__binary(QKV_OP_MINIMUM, a, b, "qkv_minimum"), &minimum_op, a, b);
}

/* ---- Tensor-scalar ----------------------------------------------------------------------- */
/* dargs[0] holds the scalar. */

static qkv_tensor *scalar_op(qkv_binary_op op, const qkv_tensor *a, double s, bool reverse,
                             const qkv_op_def *def, const char *name) {
    qkv_tensor *out = REC1(qkv__binary_scalar(op, a, s, reverse, name), def, a);
    if (out && out->grad_fn) out->grad_fn->dargs[0] = s;
    return out;
}

/* d(a+s) = g; d(a-s) = g */
static void identity_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = (qkv_tensor *)g;
}
static const qkv_op_def add_scalar_op = {"add_scalar", identity_backward, .drop = QKV_DROP_ALL};
qkv_tensor *qkv_add_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_ADD, a, s, false, &add_scalar_op, "qkv_add_scalar");
}
qkv_tensor *qkv_sub_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_ADD, a, -s, false, &add_scalar_op, "qkv_sub_scalar");
}

/* d(s-a) = -g */
static void rsub_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_neg(g);
}
static const qkv_op_def rsub_scalar_op = {"rsub_scalar", rsub_backward, .drop = QKV_DROP_ALL};
qkv_tensor *qkv_rsub_scalar(double s, const qkv_tensor *a) {
    return scalar_op(QKV_OP_SUB, a, s, true, &rsub_scalar_op, "qkv_rsub_scalar");
}

/* d(a*s) = g*s */
static void mul_scalar_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul_scalar(g, node->dargs[0]);
}
static const qkv_op_def mul_scalar_op = {"mul_scalar", mul_scalar_backward, .drop = QKV_DROP_ALL};
qkv_tensor *qkv_mul_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_MUL, a, s, false, &mul_scalar_op, "qkv_mul_scalar");
}
qkv_tensor *qkv_div_scalar(const qkv_tensor *a, double s) {
    if (a && qkv__is_float(a->dtype))
        return scalar_op(QKV_OP_MUL, a, 1.0 / s, false, &mul_scalar_op, "qkv_div_scalar");
    return scalar_op(QKV_OP_DIV, a, s, false, &mul_scalar_op, "qkv_div_scalar");
}

/* d(s/a) = -g*s/a^2 = -g*out/a */
static void rdiv_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_neg(qkv_div(qkv_mul(g, SAVED(0)), IN(0)));
}
static const qkv_op_def rdiv_scalar_op = {"rdiv_scalar", rdiv_backward, .drop = 0};
qkv_tensor *qkv_rdiv_scalar(double s, const qkv_tensor *a) {
    qkv_tensor *out = scalar_op(QKV_OP_DIV, a, s, true, &rdiv_scalar_op, "qkv_rdiv_scalar");
    if (out && out->grad_fn && !qkv__save_output(out->grad_fn, 0, out)) return NULL;
    return out;
}

/* d(a^s) = g*s*a^(s-1) */
static void pow_scalar_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    double s = node->dargs[0];
    gi[0] = qkv_mul(g, qkv_mul_scalar(qkv_pow_scalar(IN(0), s - 1), s));
}
static const qkv_op_def pow_scalar_op = {"pow_scalar", pow_scalar_backward, .drop = 0};
qkv_tensor *qkv_pow_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_POW, a, s, false, &pow_scalar_op, "qkv_pow_scalar");
}

/* d max(a, s) = g where a > s, g/2 where a == s */
static void extremum_scalar_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi,
                                     bool is_max) {
    double s = node->dargs[0];
    qkv_tensor *wins = is_max ? qkv_gt_scalar(IN(0), s) : qkv_lt_scalar(IN(0), s);
    qkv_tensor *w = qkv_add(qkv_to_dtype(wins, g->dtype),
                            qkv_mul_scalar(qkv_to_dtype(qkv_eq_scalar(IN(0), s), g->dtype), 0.5));
    gi[0] = qkv_mul(g, w);
}
static void maximum_scalar_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_scalar_backward(node, g, gi, true);
}
static void minimum_scalar_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    extremum_scalar_backward(node, g, gi, false);
}
static const qkv_op_def maximum_scalar_op = {"maximum_scalar", maximum_scalar_backward, .drop = 0};
static const qkv_op_def minimum_scalar_op = {"minimum_scalar", minimum_scalar_backward, .drop = 0};
qkv_tensor *qkv_maximum_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_MAXIMUM, a, s, false, &maximum_scalar_op, "qkv_maximum_scalar");
}
qkv_tensor *qkv_minimum_scalar(const qkv_tensor *a, double s) {
    return scalar_op(QKV_OP_MINIMUM, a, s, false, &minimum_scalar_op, "qkv_minimum_scalar");
}

/* ---- Unary ------------------------------------------------------------------------------- */

static qkv_tensor *unary_op(qkv_unary_op op, const qkv_tensor *a, const qkv_op_def *def,
                            bool save_out, const char *name) {
    qkv_tensor *out = REC1(qkv__unary(op, a, name), def, a);
    if (save_out && out && out->grad_fn && !qkv__save_output(out->grad_fn, 0, out)) return NULL;
    return out;
}

/* d(-a) = -g */
static const qkv_op_def neg_op = {"neg", rsub_backward, .drop = QKV_DROP_ALL};
qkv_tensor *qkv_neg(const qkv_tensor *a) {
    return unary_op(QKV_OP_NEG, a, &neg_op, false, "qkv_neg");
}

/* d exp(a) = g*exp(a) */
static void exp_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, SAVED(0));
}
static const qkv_op_def exp_op = {"exp", exp_backward, .drop = QKV_DROP_ALL,
                                   .recompute = qkv__saved_output};
qkv_tensor *qkv_exp(const qkv_tensor *a) {
    return unary_op(QKV_OP_EXP, a, &exp_op, true, "qkv_exp");
}

/* d log(a) = g/a */
static void log_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_div(g, IN(0));
}
static const qkv_op_def log_op = {"log", log_backward, .drop = 0};
qkv_tensor *qkv_log(const qkv_tensor *a) {
    return unary_op(QKV_OP_LOG, a, &log_op, false, "qkv_log");
}

/* d sqrt(a) = g/(2 sqrt(a)) */
static void sqrt_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_div(qkv_mul_scalar(g, 0.5), SAVED(0));
}
static const qkv_op_def sqrt_op = {"sqrt", sqrt_backward, .drop = QKV_DROP_ALL,
                                   .recompute = qkv__saved_output};
qkv_tensor *qkv_sqrt(const qkv_tensor *a) {
    return unary_op(QKV_OP_SQRT, a, &sqrt_op, true, "qkv_sqrt");
}

/* d a^(-1/2) = -g/2 * a^(-3/2) = -g/2 * out^3 */
static void rsqrt_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *o = SAVED(0);
    gi[0] = qkv_mul(qkv_mul_scalar(g, -0.5), qkv_mul(o, qkv_mul(o, o)));
}
static const qkv_op_def rsqrt_op = {"rsqrt", rsqrt_backward, .drop = QKV_DROP_ALL,
                                   .recompute = qkv__saved_output};
qkv_tensor *qkv_rsqrt(const qkv_tensor *a) {
    return unary_op(QKV_OP_RSQRT, a, &rsqrt_op, true, "qkv_rsqrt");
}

/* d|a| = g*sign(a) */
static void abs_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, qkv__unary(QKV_OP_SIGN, IN(0), "abs_backward"));
}
static const qkv_op_def abs_op = {"abs", abs_backward, .drop = 0};
qkv_tensor *qkv_abs(const qkv_tensor *a) {
    return unary_op(QKV_OP_ABS, a, &abs_op, false, "qkv_abs");
}

/* d tanh(a) = g*(1 - out^2) */
static void tanh_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, qkv_rsub_scalar(1, qkv_mul(SAVED(0), SAVED(0))));
}
static const qkv_op_def tanh_op = {"tanh", tanh_backward, .drop = QKV_DROP_ALL,
                                   .recompute = qkv__saved_output};
qkv_tensor *qkv_tanh(const qkv_tensor *a) {
    return unary_op(QKV_OP_TANH, a, &tanh_op, true, "qkv_tanh");
}

/* d sigmoid(a) = g*out*(1 - out) */
static void sigmoid_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, qkv_mul(SAVED(0), qkv_rsub_scalar(1, SAVED(0))));
}
static const qkv_op_def sigmoid_op = {"sigmoid", sigmoid_backward, .drop = QKV_DROP_ALL,
                                   .recompute = qkv__saved_output};
qkv_tensor *qkv_sigmoid(const qkv_tensor *a) {
    return unary_op(QKV_OP_SIGMOID, a, &sigmoid_op, true, "qkv_sigmoid");
}

/* d relu(a) = g where a > 0 */
static void relu_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_mul(g, qkv__unary(QKV_OP_STEP, IN(0), "relu_backward"));
}
static qkv_tensor *relu_recompute(qkv_node *node) {
    return qkv__unary(QKV_OP_RELU, qkv__values(node, 0), "relu");
}
static const qkv_op_def relu_op = {"relu", relu_backward, .drop = 0,
                                   .recompute = relu_recompute, .recompute_reads = 0x1};
qkv_tensor *qkv_relu(const qkv_tensor *a) {
    return unary_op(QKV_OP_RELU, a, &relu_op, false, "qkv_relu");
}

/* d gelu(a) = g*(Phi(a) + a*phi(a)) (erf form), or the derivative of the tanh form */
static void gelu_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_unary_op d = node->iargs[0] ? QKV_OP_GELU_TANH_GRAD : QKV_OP_GELU_ERF_GRAD;
    gi[0] = qkv__unary_times(d, IN(0), g, "gelu_backward");
}
static qkv_tensor *gelu_recompute(qkv_node *node) {
    qkv_unary_op f = node->iargs[0] ? QKV_OP_GELU_TANH : QKV_OP_GELU_ERF;
    return qkv__unary(f, qkv__values(node, 0), "gelu");
}
static const qkv_op_def gelu_op = {"gelu", gelu_backward, .drop = 0,
                                   .recompute = gelu_recompute, .recompute_reads = 0x1};
qkv_tensor *qkv_gelu(const qkv_tensor *a, bool tanh_approximation) {
    qkv_tensor *out = unary_op(tanh_approximation ? QKV_OP_GELU_TANH : QKV_OP_GELU_ERF, a,
                               &gelu_op, false, "qkv_gelu");
    if (out && out->grad_fn) out->grad_fn->iargs[0] = tanh_approximation;
    return out;
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
static void where_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *zero = qkv_zeros(g->dtype, 0, NULL);
    if (IN(1)->requires_grad) gi[1] = qkv__where(IN(0), g, zero, "where_backward");
    if (IN(2)->requires_grad) gi[2] = qkv__where(IN(0), zero, g, "where_backward");
}
static const qkv_op_def where_op = {"where", where_backward, .drop = 0x6};
qkv_tensor *qkv_where(const qkv_tensor *cond, const qkv_tensor *a, const qkv_tensor *b) {
    return qkv__record(qkv__where(cond, a, b, "qkv_where"), &where_op, 3,
                       (const qkv_tensor *const[]){cond, a, b});
}

/* d masked_fill(a, m, v) = where(m, 0, g) */
static void masked_fill_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv__where(IN(1), qkv_zeros(g->dtype, 0, NULL), g, "masked_fill_backward");
}
static const qkv_op_def masked_fill_op = {"masked_fill", masked_fill_backward, .drop = 0x1};
qkv_tensor *qkv_masked_fill(const qkv_tensor *a, const qkv_tensor *mask, double value) {
    if (!a || !mask) return NULL;
    union { float f; double d; int64_t i; bool b; } v;
    qkv_storage storage = {.data = &v, .nbytes = sizeof v, .refcount = 1};
    qkv_tensor fill = {0};
    fill.dtype = a->dtype;
    fill.numel = 1;
    fill.storage = &storage;
    fill.refcount = 1;
    qkv__store(&v, a->dtype, 0, value);
    qkv_tensor *out = qkv__where(mask, &fill, a, "qkv_masked_fill");
    if (out && (out->ndim != a->ndim || out->numel != a->numel)) {
        char sa[128], sm[128];
        return qkv_set_error("qkv_masked_fill: mask %s does not broadcast to %s",
                             qkv_shape_str(mask, sm, sizeof sm), qkv_shape_str(a, sa, sizeof sa));
    }
    return qkv__record(out, &masked_fill_op, 2, (const qkv_tensor *const[]){a, mask});
}
