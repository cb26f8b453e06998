/*
 * Layer norm as one op: the forward keeps only each row's mean and 1/std beside its input,
 * where the same function composed from reductions and broadcasts keeps four tensors the size
 * of the input and runs a dozen passes over it each way.
 */
#include "autograd/autograd_internal.h"

#define IN(i) (node->inputs[i])
#define SAVED(i) (node->saved[i])

/* With xh = (x - mean) rstd and gh = g w:
 * dx = rstd (gh - mean(gh) - xh mean(gh xh)) over each row, dw = sum over rows of g xh,
 * db = sum over rows of g */
static void layer_norm_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *x = IN(0), *w = IN(1), *b = IN(2);
    int64_t d = node->iargs[0], rows = d ? x->numel / d : 0;
    qkv_tensor *xc = qkv__contiguous(x), *gc = qkv__contiguous(g);
    qkv_tensor *wc = w ? qkv__contiguous(w) : NULL;
    qkv_tensor *gx = x->requires_grad ? qkv_empty(x->dtype, x->ndim, x->shape) : NULL;
    qkv_tensor *gw = w && w->requires_grad ? qkv_empty(w->dtype, w->ndim, w->shape) : NULL;
    qkv_tensor *gb = b && b->requires_grad ? qkv_empty(b->dtype, b->ndim, b->shape) : NULL;
    if (!xc || !gc || (w && !wc) || (x->requires_grad && !gx) ||
        (w && w->requires_grad && !gw) || (b && b->requires_grad && !gb))
        return;
    if (!qkv__layer_norm_backward_rows(x->dtype, rows, d, qkv_data(xc), qkv_data(gc),
                                       wc ? qkv_data(wc) : NULL, qkv_data(SAVED(0)),
                                       qkv_data(SAVED(1)), gx ? qkv_data(gx) : NULL,
                                       gw ? qkv_data(gw) : NULL, gb ? qkv_data(gb) : NULL)) {
        qkv_set_error("layer_norm_backward: out of memory");
        return;
    }
    gi[0] = gx;
    gi[1] = gw;
    gi[2] = gb;
}
/* out, and each row's mean and 1/std into *mean and *rstd, for x normalised over its last d
 * elements: the forward, and the same computation again for a consumer's backward */
static qkv_tensor *layer_norm_values(const qkv_tensor *x, int64_t d, const qkv_tensor *weight,
                                     const qkv_tensor *bias, double eps, qkv_tensor **mean,
                                     qkv_tensor **rstd) {
    int64_t rows = d ? x->numel / d : 0;
    qkv_tensor *xc = qkv__contiguous(x);
    qkv_tensor *wc = weight ? qkv__contiguous(weight) : NULL;
    qkv_tensor *bc = bias ? qkv__contiguous(bias) : NULL;
    qkv_tensor *out = xc ? qkv_empty(x->dtype, x->ndim, x->shape) : NULL;
    *mean = out ? qkv_empty(x->dtype, 1, &rows) : NULL;
    *rstd = *mean ? qkv_empty(x->dtype, 1, &rows) : NULL;
    if (!*rstd || (weight && !wc) || (bias && !bc)) return NULL;
    qkv__layer_norm_rows(x->dtype, rows, d, qkv_data(xc), wc ? qkv_data(wc) : NULL,
                         bc ? qkv_data(bc) : NULL, eps, qkv_data(out), qkv_data(*mean),
                         qkv_data(*rstd));
    return out;
}

/* the output again from the held input, weight and bias: one pass over a tensor the size of
 * the input, where holding the output would keep that much memory until the backward */
static qkv_tensor *layer_norm_recompute(qkv_node *node) {
    qkv_tensor *x = qkv__values(node, 0), *w = NULL, *b = NULL, *mean, *rstd;
    if (node->inputs[1] && !(w = qkv__values(node, 1))) return NULL;
    if (node->inputs[2] && !(b = qkv__values(node, 2))) return NULL;
    return x ? layer_norm_values(x, node->iargs[0], w, b, node->dargs[0], &mean, &rstd) : NULL;
}

static const qkv_op_def layer_norm_op = {"layer_norm", layer_norm_backward, .drop = 0x4,
                                         .recompute = layer_norm_recompute,
                                         .recompute_reads = 0x7};

qkv_tensor *qkv__layer_norm(const qkv_tensor *x, int ndim, const qkv_tensor *weight,
                            const qkv_tensor *bias, double eps, const char *name) {
    if (!x) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, weight, bias)) return NULL;
    int64_t d = 1;
    for (int i = x->ndim - ndim; i < x->ndim; i++) d *= i >= 0 ? x->shape[i] : 0;
    char s[128];
    if (!qkv__is_float(x->dtype) || ndim < 1 || ndim > x->ndim ||
        (weight && (weight->dtype != x->dtype || weight->numel != d)) ||
        (bias && (bias->dtype != x->dtype || bias->numel != d)))
        return qkv_set_error("%s: cannot normalise %s over its last %d dims with the given "
                             "weight and bias", name, qkv_shape_str(x, s, sizeof s), ndim);
    qkv_tensor *mean, *rstd;
    qkv_tensor *out = layer_norm_values(x, d, weight, bias, eps, &mean, &rstd);
    out = qkv__record(out, &layer_norm_op, 3, (const qkv_tensor *const[]){x, weight, bias});
    if (out && out->grad_fn) {
        out->grad_fn->iargs[0] = d;
        out->grad_fn->dargs[0] = eps;
        if (!qkv__save(out->grad_fn, 0, mean) || !qkv__save(out->grad_fn, 1, rstd)) return NULL;
    }
    return out;
}
