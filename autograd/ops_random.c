/*
 * Random ops: dropout. Its mask and the products with it are computed by tensor/dropout.c;
 * this file records the op and keeps the bit mask for the backward.
 */
#include "autograd/autograd_internal.h"

/* Whether nothing but its one holder can read t's values: t is held once, shares its storage
 * with no other tensor (so no graph node holds it) and is not a leaf that requires grad. */
static bool can_overwrite(const qkv_tensor *t) {
    return t->refcount == 1 && t->storage && t->storage->refcount == 1 &&
           qkv_is_contiguous(t) && !(t->requires_grad && !t->grad_fn);
}

/* Saved slots: the bit mask (none for the identity), and the input for recompute only. */
enum { MASK, INPUT };

typedef struct dropout_args {
    bool masked;  /* false for the identity (evaluation, p = 0) */
    double scale; /* 1 / (1 - p) */
} dropout_args;

static const dropout_args *args_of(qkv_ctx *ctx) {
    return qkv_ctx_args(ctx);
}

/* d dropout = g * mask / (1 - p), from the bit mask saved by the forward; g itself for the
 * identity. Over g's values when the node's slot is all that holds them (the engine lets go
 * of it once the backward has run): a fresh tensor would cost a pass of writes that miss
 * the cache. */
static void dropout_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    if (!args_of(ctx)->masked) {
        gi[0] = (qkv_tensor *)g;
        return;
    }
    qkv_tensor *mask = qkv_saved(ctx, MASK);
    gi[0] = mask ? qkv__dropout_apply_mask(g, mask, args_of(ctx)->scale, can_overwrite(g))
                 : NULL;
}
/* the output again: the input times the saved mask's factors, or the input itself. Over the
 * input's values when they were recomputed for this and nothing else holds them. */
static qkv_tensor *dropout_recompute(qkv_ctx *ctx) {
    qkv_tensor *a = qkv_saved(ctx, INPUT);
    if (!a || !args_of(ctx)->masked) return a;
    qkv_tensor *mask = qkv_saved(ctx, MASK);
    return mask ? qkv__dropout_apply_mask(a, mask, args_of(ctx)->scale, can_overwrite(a)) : NULL;
}
static const qkv_function dropout_fn = {.name = "dropout", .backward = dropout_backward,
                                        .recompute = dropout_recompute,
                                        .args_size = sizeof(dropout_args)};

static qkv_tensor *dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g,
                           bool in_place, const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    char s[128];
    if (!qkv__is_float(a->dtype))
        return qkv_set_error("%s: input %s must be f32, f64 or bf16, not %s", name,
                             qkv_shape_str(a, s, sizeof s), qkv_dtype_name(a->dtype));
    if (!(p >= 0 && p <= 1)) return qkv_set_error("%s: p must be in [0, 1], not %g", name, p);
    if (!training || p == 0) {
        qkv_ctx *ctx = qkv_function_begin(&dropout_fn, 1, QKV_INPUTS(a), &(dropout_args){false, 1});
        qkv__save_for_recompute(ctx, INPUT, a);
        return qkv_function_end(ctx, qkv__view(a, a->ndim, a->shape, a->strides, a->offset));
    }
    if (!g) return qkv_set_error("%s: training with p = %g needs a generator", name, p);
    /* Over a's values only where nothing else can read them: a is held once, shares its
     * storage with no other tensor (so no node holds it whole) and is no leaf parameter. */
    in_place = in_place && can_overwrite(a);
    qkv_scope_begin();
    qkv_ctx *ctx = qkv_function_begin(&dropout_fn, 1, QKV_INPUTS(a),
                                      &(dropout_args){true, p < 1 ? 1.0 / (1.0 - p) : 0.0});
    qkv__save_for_recompute(ctx, INPUT, a);
    qkv_tensor *mask = NULL;
    qkv_tensor *out = qkv__dropout(a, p, g, ctx ? &mask : NULL, in_place);
    qkv_save(ctx, MASK, mask);
    out = qkv_keep(qkv_function_end(ctx, out));
    qkv_scope_end();
    return out;
}

qkv_tensor *qkv_dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g) {
    return dropout(a, p, training, g, false, "qkv_dropout");
}

qkv_tensor *qkv_dropout_(qkv_tensor *a, double p, bool training, qkv_generator *g) {
    return dropout(a, p, training, g, true, "qkv_dropout_");
}
