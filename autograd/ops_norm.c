/*
 * Layer norm and RMS norm as one op: the forward keeps only each row's mean (layer norm) and
 * 1/std beside its input, where the same function composed from reductions and broadcasts
 * keeps four tensors the size of the input and runs a dozen passes over it each way.
 */
#include "autograd/autograd_internal.h"

#define IN(i) qkv_ctx_input(ctx, i)
#define NEEDS(i) qkv_ctx_needs_grad(ctx, i)

/* Saved slots: the input, the weight, the bias (for recompute only), each row's mean and
 * 1/std. */
enum { X, WEIGHT, BIAS, MEAN, RSTD };

typedef struct layer_norm_args {
    int64_t d; /* elements per normalised row */
    double eps;
    bool center; /* false: RMS norm (no mean subtracted, none saved) */
} layer_norm_args;

/* With xh = (x - mean) rstd and gh = g w:
 * dx = rstd (gh - mean(gh) - xh mean(gh xh)) over each row, dw = sum over rows of g xh,
 * db = sum over rows of g */
static void layer_norm_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *x = IN(0), *w = IN(1), *b = IN(2);
    const layer_norm_args *args = qkv_ctx_args(ctx);
    int64_t d = args->d, rows = d ? x->numel / d : 0;
    qkv_tensor *xc = qkv__contiguous(qkv_saved(ctx, X)), *gc = qkv__contiguous(g);
    qkv_tensor *wc = w ? qkv__contiguous(qkv_saved(ctx, WEIGHT)) : NULL;
    qkv_tensor *gx = NEEDS(0) ? qkv_empty(x->dtype, x->ndim, x->shape) : NULL;
    qkv_tensor *gw = NEEDS(1) ? qkv_empty(w->dtype, w->ndim, w->shape) : NULL;
    qkv_tensor *gb = NEEDS(2) ? qkv_empty(b->dtype, b->ndim, b->shape) : NULL;
    qkv_tensor *mean = args->center ? qkv_saved(ctx, MEAN) : NULL, *rstd = qkv_saved(ctx, RSTD);
    if (!xc || !gc || (w && !wc) || (args->center && !mean) || !rstd || (NEEDS(0) && !gx) ||
        (NEEDS(1) && !gw) || (NEEDS(2) && !gb))
        return;
    if (!qkv__layer_norm_backward_rows(x->dtype, rows, d, qkv_data(xc), qkv_data(gc),
                                       wc ? qkv_data(wc) : NULL, mean ? qkv_data(mean) : NULL,
                                       qkv_data(rstd), gx ? qkv_data(gx) : NULL,
                                       gw ? qkv_data(gw) : NULL, gb ? qkv_data(gb) : NULL)) {
        qkv_set_error("layer_norm_backward: out of memory");
        return;
    }
    gi[0] = gx;
    gi[1] = gw;
    gi[2] = gb;
}
/* out, and each row's mean (NULL when not centred) and 1/std into *mean and *rstd, for x
 * normalised over its last d elements: the forward, and the same computation again for a
 * consumer's backward */
static qkv_tensor *layer_norm_values(const qkv_tensor *x, const layer_norm_args *args,
                                     const qkv_tensor *weight, const qkv_tensor *bias,
                                     qkv_tensor **mean, qkv_tensor **rstd) {
    int64_t d = args->d;
    int64_t rows = d ? x->numel / d : 0;
    qkv_tensor *xc = qkv__contiguous(x);
    qkv_tensor *wc = weight ? qkv__contiguous(weight) : NULL;
    qkv_tensor *bc = bias ? qkv__contiguous(bias) : NULL;
    qkv_tensor *out = xc ? qkv_empty(x->dtype, x->ndim, x->shape) : NULL;
    *mean = out && args->center ? qkv_empty(x->dtype, 1, &rows) : NULL;
    *rstd = out && (*mean || !args->center) ? qkv_empty(x->dtype, 1, &rows) : NULL;
    if (!*rstd || (weight && !wc) || (bias && !bc)) return NULL;
    qkv__layer_norm_rows(x->dtype, rows, d, qkv_data(xc), wc ? qkv_data(wc) : NULL,
                         bc ? qkv_data(bc) : NULL, args->eps, qkv_data(out),
                         *mean ? qkv_data(*mean) : NULL, qkv_data(*rstd));
    return out;
}

/* the output again from the held input, weight and bias: one pass over a tensor the size of
 * the input, where holding the output would keep that much memory until the backward */
static qkv_tensor *layer_norm_recompute(qkv_ctx *ctx) {
    const layer_norm_args *args = qkv_ctx_args(ctx);
    qkv_tensor *x = qkv_saved(ctx, X), *w = NULL, *b = NULL, *mean, *rstd;
    if (IN(1) && !(w = qkv_saved(ctx, WEIGHT))) return NULL;
    if (IN(2) && !(b = qkv_saved(ctx, BIAS))) return NULL;
    return x ? layer_norm_values(x, args, w, b, &mean, &rstd) : NULL;
}

static const qkv_function layer_norm_fn = {.name = "layer_norm", .backward = layer_norm_backward,
                                           .recompute = layer_norm_recompute,
                                           .args_size = sizeof(layer_norm_args)};
static const qkv_function rms_norm_fn = {.name = "rms_norm", .backward = layer_norm_backward,
                                         .recompute = layer_norm_recompute,
                                         .args_size = sizeof(layer_norm_args)};

/* The op, its arguments checked: saves what the backward and the recompute read. */
static qkv_tensor *norm_op(const qkv_tensor *x, const qkv_tensor *weight,
                           const qkv_tensor *bias, const layer_norm_args *args) {
    qkv_ctx *ctx = qkv_function_begin(args->center ? &layer_norm_fn : &rms_norm_fn, 3,
                                      QKV_INPUTS(x, weight, bias), args);
    qkv_save(ctx, X, x);
    qkv_save(ctx, WEIGHT, weight);
    qkv__save_for_recompute(ctx, BIAS, bias);
    qkv_tensor *mean, *rstd;
    qkv_tensor *out = layer_norm_values(x, args, weight, bias, &mean, &rstd);
    if (args->center) qkv_save(ctx, MEAN, mean);
    qkv_save(ctx, RSTD, rstd);
    return qkv_function_end(ctx, out);
}

qkv_tensor *qkv__layer_norm(const qkv_tensor *x, int ndim, const qkv_tensor *weight,
                            const qkv_tensor *bias, double eps, const char *name) {
    if (QKV__NULL_ARGS(name, x)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, weight, bias)) return NULL;
    if (!(x = qkv__autocast_f32(x))) return NULL;
    int64_t d = 1;
    for (int i = x->ndim - ndim; i < x->ndim; i++) d *= i >= 0 ? x->shape[i] : 0;
    char s[128];
    if (!qkv__is_float(x->dtype) || ndim < 1 || ndim > x->ndim ||
        (weight && (weight->dtype != x->dtype || weight->numel != d)) ||
        (bias && (bias->dtype != x->dtype || bias->numel != d)))
        return qkv_set_error("%s: cannot normalise %s over its last %d dims with the given "
                             "weight and bias", name, qkv_shape_str(x, s, sizeof s), ndim);
    if (x->dtype == QKV_BF16) /* in f32, rounded once at the end, as torch's bf16 kernel */
        return qkv_to_dtype(qkv__layer_norm(qkv_to_dtype(x, QKV_F32), ndim,
                                            weight ? qkv_to_dtype(weight, QKV_F32) : NULL,
                                            bias ? qkv_to_dtype(bias, QKV_F32) : NULL, eps,
                                            name), QKV_BF16);
    return norm_op(x, weight, bias, &(layer_norm_args){d, eps, true});
}

qkv_tensor *qkv__rms_norm(const qkv_tensor *x, const qkv_tensor *weight, double eps,
                          const char *name) {
    if (QKV__NULL_ARGS(name, x)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, weight)) return NULL;
    int64_t d = x->ndim ? x->shape[x->ndim - 1] : 0;
    char s[128], sw[128];
    if (x->dtype == QKV_BF16) /* in f32, rounded once at the end, as torch's bf16 kernel */
        return qkv_to_dtype(qkv__rms_norm(qkv_to_dtype(x, QKV_F32),
                                          weight ? qkv_to_dtype(weight, QKV_F32) : NULL, eps,
                                          name), QKV_BF16);
    if (!qkv__is_float(x->dtype) || x->ndim < 1 ||
        (weight && (weight->dtype != x->dtype || weight->numel != d)))
        return qkv_set_error("%s: cannot normalise %s over its last dim with weight %s", name,
                             qkv_shape_str(x, s, sizeof s),
                             weight ? qkv_shape_str(weight, sw, sizeof sw) : "none");
    return norm_op(x, weight, NULL, &(layer_norm_args){d, eps, false});
}
