/* Reductions and softmax: forward with the tensor kernels, backward beside each. */
#include <math.h>

#include "autograd/autograd_internal.h"

#define IN(i) qkv_ctx_input(ctx, i)

/* What every reduction's backward needs: the reduced axes (bit i for axis i), var's
 * correction, and for max/min the one axis reduced (-1: all of them). */
typedef struct reduce_args {
    uint32_t mask;
    double correction;
    int axis;
} reduce_args;

static const reduce_args *args_of(qkv_ctx *ctx) {
    return qkv_ctx_args(ctx);
}

/* Turns an axis list into a bit mask, checking range and repeats. */
static bool axes_mask(const char *op, const qkv_tensor *a, int naxes, const int *axes,
                      uint32_t *mask) {
    *mask = 0;
    if (naxes < 0) return qkv_set_error("%s: negative number of axes %d", op, naxes), false;
    if (naxes > 0 && !axes) return qkv_set_error("%s: axes is NULL", op), false;
    for (int i = 0; i < naxes; i++) {
        int ax = qkv__norm_axis(op, a, axes[i]);
        if (ax < 0) return false;
        if (*mask & (1u << ax)) {
            qkv_set_error("%s: axis %d appears twice", op, axes[i]);
            return false;
        }
        *mask |= 1u << ax;
    }
    return true;
}

/* The output gradient with the reduced axes put back as size 1, broadcast to the input. */
static qkv_tensor *expand_back(qkv_ctx *ctx, const qkv_tensor *g) {
    const qkv_tensor *a = IN(0);
    uint32_t mask = args_of(ctx)->mask;
    int64_t kshape[QKV_MAX_DIMS];
    for (int i = 0; i < a->ndim; i++) kshape[i] = mask & (1u << i) ? 1 : a->shape[i];
    return qkv_expand(qkv_reshape(g, a->ndim, kshape), a->ndim, a->shape);
}

static int64_t reduced_count(qkv_ctx *ctx) {
    int64_t n = 1;
    for (int i = 0; i < IN(0)->ndim; i++)
        if (args_of(ctx)->mask & (1u << i)) n *= IN(0)->shape[i];
    return n;
}

/* A reduction whose backward reads nothing but the input's shape, or (save_input) its
 * values too. */
static qkv_tensor *reduce_op(qkv_reduce_op op, const qkv_tensor *a, uint32_t mask, bool keepdim,
                             double correction, const qkv_function *fn, bool save_input,
                             const char *name) {
    qkv_ctx *ctx = qkv_function_begin(fn, 1, QKV_INPUTS(a), &(reduce_args){mask, correction, -1});
    if (save_input) qkv_save(ctx, 0, a);
    return qkv_function_end(ctx, qkv__reduce(op, a, mask, keepdim, correction, name));
}

static uint32_t all_axes(const qkv_tensor *a) {
    return a && a->ndim ? (uint32_t)((1u << a->ndim) - 1) : 0;
}

/* ---- sum, mean, var ---------------------------------------------------------------------- */

/* d sum = g broadcast over the reduced axes */
static void sum_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = expand_back(ctx, g);
}
static const qkv_function sum_fn = {.name = "sum", .backward = sum_backward,
                                    .args_size = sizeof(reduce_args)};

/* The reduction op over the listed axes, reported in errors as name. */
static qkv_tensor *reduce_axes(qkv_reduce_op op, const qkv_tensor *a, int naxes,
                               const int *axes, bool keepdim, double correction,
                               const qkv_function *fn, const char *name) {
    uint32_t mask;
    if (QKV__NULL_ARGS(name, a) || !axes_mask(name, a, naxes, axes, &mask)) return NULL;
    if (!(a = qkv__autocast_f32(a))) return NULL; /* sum, mean, var: f32 under autocast */
    return reduce_op(op, a, mask, keepdim, correction, fn, op == QKV_RED_VAR, name);
}

qkv_tensor *qkv_sum_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim) {
    return reduce_axes(QKV_RED_SUM, a, naxes, axes, keepdim, 0, &sum_fn, "qkv_sum_axes");
}
qkv_tensor *qkv_sum(const qkv_tensor *a, int axis, bool keepdim) {
    return reduce_axes(QKV_RED_SUM, a, 1, &axis, keepdim, 0, &sum_fn, "qkv_sum");
}
qkv_tensor *qkv_sum_all(const qkv_tensor *a) {
    if (QKV__NULL_ARGS("qkv_sum_all", a) || !(a = qkv__autocast_f32(a))) return NULL;
    return reduce_op(QKV_RED_SUM, a, all_axes(a), false, 0, &sum_fn, false, "qkv_sum_all");
}

/* d mean = g/N broadcast */
static void mean_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    /* Divided while still reduced, then broadcast: a view, not a pass over the input. */
    gi[0] = expand_back(ctx, qkv_div_scalar(g, (double)reduced_count(ctx)));
}
static const qkv_function mean_fn = {.name = "mean", .backward = mean_backward,
                                     .args_size = sizeof(reduce_args)};

qkv_tensor *qkv_mean_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim) {
    return reduce_axes(QKV_RED_MEAN, a, naxes, axes, keepdim, 0, &mean_fn, "qkv_mean_axes");
}
qkv_tensor *qkv_mean(const qkv_tensor *a, int axis, bool keepdim) {
    return reduce_axes(QKV_RED_MEAN, a, 1, &axis, keepdim, 0, &mean_fn, "qkv_mean");
}
qkv_tensor *qkv_mean_all(const qkv_tensor *a) {
    if (QKV__NULL_ARGS("qkv_mean_all", a) || !(a = qkv__autocast_f32(a))) return NULL;
    return reduce_op(QKV_RED_MEAN, a, all_axes(a), false, 0, &mean_fn, false, "qkv_mean_all");
}

/* d var = g * 2 (a - mean) / (N - correction) */
static void var_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *a = qkv_saved(ctx, 0);
    int axes[QKV_MAX_DIMS], n = 0;
    for (int i = 0; i < IN(0)->ndim; i++)
        if (args_of(ctx)->mask & (1u << i)) axes[n++] = i;
    qkv_tensor *centered = qkv_sub(a, qkv_mean_axes(a, n, axes, true));
    double dof = (double)reduced_count(ctx) - args_of(ctx)->correction;
    /* (2 / dof) * g while g is still reduced, as torch orders it: two passes over the input
     * (centre, multiply) instead of three. */
    gi[0] = qkv_mul(expand_back(ctx, qkv_mul_scalar(g, 2.0 / dof)), centered);
}
static const qkv_function var_fn = {.name = "var", .backward = var_backward,
                                    .args_size = sizeof(reduce_args)};

qkv_tensor *qkv_var_axes(const qkv_tensor *a, int naxes, const int *axes, double correction,
                         bool keepdim) {
    return reduce_axes(QKV_RED_VAR, a, naxes, axes, keepdim, correction, &var_fn,
                       "qkv_var_axes");
}
qkv_tensor *qkv_var(const qkv_tensor *a, int axis, double correction, bool keepdim) {
    return reduce_axes(QKV_RED_VAR, a, 1, &axis, keepdim, correction, &var_fn, "qkv_var");
}

/* ---- max, min, argmax, argmin ------------------------------------------------------------ */

/* d max = g at the first position that attains the maximum, 0 elsewhere. Slot 0 holds that
 * position (keepdim shape along the axis, or the flat index for a full reduction). */
static void extremum_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *a = IN(0);
    int axis = args_of(ctx)->axis;
    qkv_tensor *pos;
    if (axis < 0) {
        pos = qkv_reshape(qkv_arange(QKV_I64, 0, (double)a->numel, 1), a->ndim, a->shape);
    } else {
        int64_t shape[QKV_MAX_DIMS];
        for (int i = 0; i < a->ndim; i++) shape[i] = i == axis ? a->shape[i] : 1;
        pos = qkv_reshape(qkv_arange(QKV_I64, 0, (double)a->shape[axis], 1), a->ndim, shape);
    }
    qkv_tensor *hit = qkv_eq(pos, qkv_saved(ctx, 0));
    gi[0] = qkv__where(hit, expand_back(ctx, g), qkv_zeros(g->dtype, 0, NULL),
                       "max_backward");
}
static const qkv_function max_fn = {.name = "max", .backward = extremum_backward,
                                    .args_size = sizeof(reduce_args)};
static const qkv_function min_fn = {.name = "min", .backward = extremum_backward,
                                    .args_size = sizeof(reduce_args)};

static qkv_tensor *extremum(const qkv_tensor *a, int axis, bool keepdim, bool all, bool is_max,
                            const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    int ax = all ? -1 : qkv__norm_axis(name, a, axis);
    if (!all && ax < 0) return NULL;
    /* Axis 0 of a 0-d tensor is its one element: a full reduction. */
    if (a->ndim == 0) all = true, ax = -1;
    uint32_t mask = all ? all_axes(a) : 1u << ax;
    qkv_ctx *ctx = qkv_function_begin(is_max ? &max_fn : &min_fn, 1, QKV_INPUTS(a),
                                      &(reduce_args){mask, 0, ax});
    qkv_tensor *out = qkv__reduce(is_max ? QKV_RED_MAX : QKV_RED_MIN, a, mask, keepdim, 0, name);
    if (ctx && out) {
        qkv_tensor *idx = qkv__reduce(is_max ? QKV_RED_ARGMAX : QKV_RED_ARGMIN, a, mask, true,
                                      0, name);
        /* For a full reduction the kernel's index already counts in row-major order. */
        if (all && idx) idx = qkv__view(idx, 0, NULL, NULL, idx->offset);
        if (!idx) out = NULL;
        qkv_save(ctx, 0, idx);
    }
    return qkv_function_end(ctx, out);
}

qkv_tensor *qkv_max(const qkv_tensor *a, int axis, bool keepdim) {
    return extremum(a, axis, keepdim, false, true, "qkv_max");
}
qkv_tensor *qkv_max_all(const qkv_tensor *a) {
    return extremum(a, 0, false, true, true, "qkv_max_all");
}
qkv_tensor *qkv_min(const qkv_tensor *a, int axis, bool keepdim) {
    return extremum(a, axis, keepdim, false, false, "qkv_min");
}
qkv_tensor *qkv_min_all(const qkv_tensor *a) {
    return extremum(a, 0, false, true, false, "qkv_min_all");
}

/* Several axes, one at a time from the last: each step keeps the first extreme index of its
 * axis among the winners of the axes after it, so the gradient reaches the first extreme
 * element in row-major order, as for one axis and for all. Composed, so no backward here. */
static qkv_tensor *extremum_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim,
                                 bool is_max, const char *name) {
    uint32_t mask;
    if (QKV__NULL_ARGS(name, a) || !axes_mask(name, a, naxes, axes, &mask)) return NULL;
    qkv_tensor *out = (qkv_tensor *)a;
    int64_t shape[QKV_MAX_DIMS];
    int ndim = 0;
    for (int i = a->ndim - 1; i >= 0 && out; i--)
        if (mask & (1u << i)) out = extremum(out, i, true, false, is_max, name);
    for (int i = 0; i < a->ndim; i++)
        if (!(mask & (1u << i)) || keepdim) shape[ndim++] = mask & (1u << i) ? 1 : a->shape[i];
    return qkv_reshape(out, ndim, shape);
}

qkv_tensor *qkv_max_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim) {
    return extremum_axes(a, naxes, axes, keepdim, true, "qkv_max_axes");
}
qkv_tensor *qkv_min_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim) {
    return extremum_axes(a, naxes, axes, keepdim, false, "qkv_min_axes");
}

static qkv_tensor *arg_extremum(const qkv_tensor *a, int axis, bool keepdim, qkv_reduce_op op,
                                const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    int ax = qkv__norm_axis(name, a, axis);
    if (ax < 0) return NULL;
    return qkv__reduce(op, a, a->ndim ? 1u << ax : 0, keepdim, 0, name);
}
qkv_tensor *qkv_argmax(const qkv_tensor *a, int axis, bool keepdim) {
    return arg_extremum(a, axis, keepdim, QKV_RED_ARGMAX, "qkv_argmax");
}
qkv_tensor *qkv_argmin(const qkv_tensor *a, int axis, bool keepdim) {
    return arg_extremum(a, axis, keepdim, QKV_RED_ARGMIN, "qkv_argmin");
}

/* ---- softmax, log_softmax ---------------------------------------------------------------- */

typedef struct softmax_args {
    int axis;
} softmax_args;

/* d softmax = out * (g - sum(g * out)) along the axis */
static void softmax_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *out = qkv_saved(ctx, 0);
    int axis = ((const softmax_args *)qkv_ctx_args(ctx))->axis;
    if (!out) return;
    if (axis == out->ndim - 1 && g->dtype == out->dtype) {
        gi[0] = qkv__softmax_backward(out, g, false, "softmax_backward");
        return;
    }
    qkv_tensor *dot = qkv_sum(qkv_mul(g, out), axis, true);
    gi[0] = qkv_mul(out, qkv_sub(g, dot));
}
static const qkv_function softmax_fn = {.name = "softmax", .backward = softmax_backward,
                                        .recompute = qkv__saved_output,
                                        .args_size = sizeof(softmax_args)};

/* d log_softmax = g - exp(out) * sum(g) along the axis */
static void log_softmax_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *out = qkv_saved(ctx, 0);
    int axis = ((const softmax_args *)qkv_ctx_args(ctx))->axis;
    if (!out) return;
    if (axis == out->ndim - 1 && g->dtype == out->dtype) {
        gi[0] = qkv__softmax_backward(out, g, true, "log_softmax_backward");
        return;
    }
    if (out->numel == 0) {
        gi[0] = (qkv_tensor *)g;
        return;
    }
    /* a fully masked row is the constant -inf: no gradient flows through it */
    qkv_tensor *masked = qkv_eq_scalar(qkv_max(out, axis, true), -INFINITY);
    gi[0] = qkv_masked_fill(qkv_sub(g, qkv_mul(qkv_exp(out), qkv_sum(g, axis, true))), masked,
                            0);
}
static const qkv_function log_softmax_fn = {.name = "log_softmax",
                                            .backward = log_softmax_backward,
                                            .recompute = qkv__saved_output,
                                            .args_size = sizeof(softmax_args)};

/* Under autocast a bf16 input is widened row by row inside the kernel rather than through a
 * recorded cast: the same f32 result, and the engine rounds the input's gradient to bf16 as
 * the cast's backward would. */
static qkv_tensor *softmax_op_run(const qkv_tensor *a, int axis, bool log, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    bool widen = qkv_is_autocast_enabled() && a->dtype == QKV_BF16;
    if (!widen && !(a = qkv__autocast_f32(a))) return NULL;
    int ax = qkv__norm_axis(name, a, axis);
    if (ax < 0) return NULL;
    qkv_ctx *ctx = qkv_function_begin(log ? &log_softmax_fn : &softmax_fn, 1, QKV_INPUTS(a),
                                      &(softmax_args){ax});
    qkv_tensor *out = widen ? qkv__softmax_f32(a, ax, log, name) : qkv__softmax(a, ax, log, name);
    qkv_save(ctx, 0, out);
    return qkv_function_end(ctx, out);
}

qkv_tensor *qkv_softmax(const qkv_tensor *a, int axis) {
    return softmax_op_run(a, axis, false, "qkv_softmax");
}
qkv_tensor *qkv_log_softmax(const qkv_tensor *a, int axis) {
    return softmax_op_run(a, axis, true, "qkv_log_softmax");
}

/* ---- causal softmax ---------------------------------------------------------------------- */

typedef struct causal_softmax_args {
    int64_t past;
} causal_softmax_args;

/* d softmax = out * (g - sum(g * out)) along the last axis; masked entries get 0 */
static void causal_softmax_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tensor *out = qkv_saved(ctx, 0);
    int64_t past = ((const causal_softmax_args *)qkv_ctx_args(ctx))->past;
    if (!out) return;
    if (g->dtype != out->dtype) g = qkv__to_dtype(g, out->dtype);
    gi[0] = qkv__softmax_causal_backward(out, g, past, "causal_softmax_backward");
}
static const qkv_function causal_softmax_fn = {.name = "causal_softmax",
                                               .backward = causal_softmax_backward,
                                               .recompute = qkv__saved_output,
                                               .args_size = sizeof(causal_softmax_args)};

/* Under autocast a bf16 input gives an f32 output, as qkv_softmax's: it is widened in the
 * op (unrecorded, its f32 copy freed at once), and the engine rounds the input's gradient to
 * bf16. */
static qkv_tensor *causal_softmax_f32(const qkv_tensor *scores, int64_t past, const char *name) {
    qkv_scope_begin();
    qkv_tensor *out = qkv_keep(qkv__softmax_causal(qkv__to_dtype(scores, QKV_F32), past, name));
    qkv_scope_end();
    return out;
}

qkv_tensor *qkv_causal_softmax(const qkv_tensor *scores, int64_t past) {
    static const char *const name = "qkv_causal_softmax";
    if (QKV__NULL_ARGS(name, scores)) return NULL;
    bool widen = qkv_is_autocast_enabled() && scores->dtype == QKV_BF16;
    qkv_ctx *ctx = qkv_function_begin(&causal_softmax_fn, 1, QKV_INPUTS(scores),
                                      &(causal_softmax_args){past});
    qkv_tensor *out = widen ? causal_softmax_f32(scores, past, name)
                            : qkv__softmax_causal(scores, past, name);
    qkv_save(ctx, 0, out);
    return qkv_function_end(ctx, out);
}
