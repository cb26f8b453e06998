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
static const qkv_op_def layer_norm_op = {"layer_norm", layer_norm_backward, .drop = 0x4};

qkv_tensor *qkv__layer_norm(const qkv_tensor *x, int ndim, const qkv_tensor *weight,
                            const qkv_tensor *bias, double eps, const char *name) {
    if (!x) return NULL;
    int64_t d = 1;
    for (int i = x->ndim - ndim; i < x->ndim; i++) d *= i >= 0 ? x->shape[i] : 0;
    char s[128];
    if (!qkv__is_float(x->dtype) || ndim < 1 || ndim > x->ndim ||
        (weight && (weight->dtype != x->dtype || weight->numel != d)) ||
        (bias && (bias->dtype != x->dtype || bias->numel != d)))
        return qkv_set_error("%s: cannot normalise %s over its last %d dims with the given "
                             "weight and bias", name, qkv_shape_str(x, s, sizeof s), ndim);
    int64_t rows = d ? x->numel / d : 0;
    qkv_tensor *xc = qkv__contiguous(x);
    qkv_tensor *wc = weight ? qkv__contiguous(weight) : NULL;
    qkv_tensor *bc = bias ? qkv__contiguous(bias) : NULL;
    qkv_tensor *out = xc ? qkv_empty(x->dtype, x->ndim, x->shape) : NULL;
    qkv_tensor *mean = out ? qkv_empty(x->dtype, 1, &rows) : NULL;
    qkv_tensor *rstd = mean ? qkv_empty(x->dtype, 1, &rows) : NULL;
    if (!rstd || (weight && !wc) || (bias && !bc)) return NULL;
    qkv__layer_norm_rows(x->dtype, rows, d, qkv_data(xc), wc ? qkv_data(wc) : NULL,
                         bc ? qkv_data(bc) : NULL, eps, qkv_data(out), qkv_data(mean),
                         qkv_data(rstd));
    out = qkv__record(out, &layer_norm_op, 3, (const qkv_tensor *const[]){x, weight, bias});
    if (out && out->grad_fn) {
        out->grad_fn->iargs[0] = d;
        if (!qkv__save(out->grad_fn, 0, mean) || !qkv__save(out->grad_fn, 1, rstd)) return NULL;
    }
    return out;
}
