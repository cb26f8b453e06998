/*
 * Random ops: dropout. Its mask and the products with it are computed by tensor/dropout.c;
 * this file records the op and keeps the bit mask for the backward.
 */
#include "autograd/autograd_internal.h"

#define REC1(out, def, a) qkv__record(out, def, 1, (const qkv_tensor *const[]){a})

/* Whether nothing but its one holder can read t's values: t is held once, shares its storage
 * with no other tensor (so no graph node holds it) and is not a leaf that requires grad. */
static bool can_overwrite(const qkv_tensor *t) {
    return t->refcount == 1 && t->storage && t->storage->refcount == 1 &&
           qkv_is_contiguous(t) && !(t->requires_grad && !t->grad_fn);
}

/* d dropout = g * mask / (1 - p), from the bit mask saved by the forward; g itself for the
 * identity (evaluation, p = 0), which saves nothing */
static void dropout_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = node->saved[0]
                ? qkv__dropout_apply_mask(g, node->saved[0], node->dargs[0], false)
                : (qkv_tensor *)g;
}
/* the output again: the input times the saved mask's factors, or the input itself. Over the
 * input's values when they were recomputed for this and nothing else holds them. */
static qkv_tensor *dropout_recompute(qkv_node *node) {
    qkv_tensor *a = qkv__values(node, 0);
    if (!a || !node->saved[0]) return a;
    return qkv__dropout_apply_mask(a, node->saved[0], node->dargs[0], can_overwrite(a));
}
static const qkv_op_def dropout_op = {"dropout", dropout_backward, .drop = QKV_DROP_ALL,
                                      .recompute = dropout_recompute, .recompute_reads = 0x1};

static qkv_tensor *dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g,
                           bool in_place, const char *name) {
    if (!a) return NULL;
    char s[128];
    if (!qkv__is_float(a->dtype))
        return qkv_set_error("%s: input %s must be f32 or f64, not %s", name,
                             qkv_shape_str(a, s, sizeof s), qkv_dtype_name(a->dtype));
    if (!(p >= 0 && p <= 1)) return qkv_set_error("%s: p must be in [0, 1], not %g", name, p);
    if (!training || p == 0)
        return REC1(qkv__view(a, a->ndim, a->shape, a->strides, a->offset), &dropout_op, a);
    if (!g) return qkv_set_error("%s: training with p = %g needs a generator", name, p);
    bool record = qkv_is_grad_enabled() && a->requires_grad;
    /* Over a's values only where nothing else can read them: a is held once, shares its
     * storage with no other tensor (so no node holds it whole) and is no leaf parameter. */
    in_place = in_place && can_overwrite(a);
    qkv_scope_begin();
    qkv_tensor *mask = NULL;
    qkv_tensor *out = REC1(qkv__dropout(a, p, g, record ? &mask : NULL, in_place),
                           &dropout_op, a);
    if (out && out->grad_fn) {
        if (qkv__save(out->grad_fn, 0, mask))
            out->grad_fn->dargs[0] = p < 1 ? 1.0 / (1.0 - p) : 0.0;
        else
            out = NULL;
    }
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}

qkv_tensor *qkv_dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g) {
    return dropout(a, p, training, g, false, "qkv_dropout");
}

qkv_tensor *qkv_dropout_(qkv_tensor *a, double p, bool training, qkv_generator *g) {
    return dropout(a, p, training, g, true, "qkv_dropout_");
}
