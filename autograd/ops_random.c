/*
 * Random ops: dropout. Its mask is drawn serially from the caller's generator in row-major
 * order, one 32-bit draw per element, so one seed gives one mask on every platform and for
 * every thread count.
 */
#include <math.h>

#include "autograd/autograd_internal.h"

#define REC1(out, def, a) qkv__record(out, def, 1, (const qkv_tensor *const[]){a})

/* d dropout = g * mask / (1 - p), with mask / (1 - p) saved by the forward; g itself for the
 * identity (evaluation, p = 0), which saves nothing */
static void dropout_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = node->saved[0] ? qkv_mul(g, node->saved[0]) : (qkv_tensor *)g;
}
static const qkv_op_def dropout_op = {"dropout", dropout_backward};

/* The uniform of an element is u = (x >> 8) / 2^24 for its draw x (qkv_rand's F32 uniform),
 * kept when u >= p, that is when x >> 8 >= ceil(p * 2^24): one integer compare per element. */
#define DROPOUT_LOOP(T)                                                                        \
    do {                                                                                       \
        const T *x = qkv_data(src);                                                            \
        T *y = qkv_data(out), *m = mask ? qkv_data(mask) : NULL, s = (T)scale;                \
        for (int64_t i = 0; i < n; i++) {                                                      \
            T k = (qkv_generator_next_u32(g) >> 8) >= threshold ? s : (T)0;                    \
            y[i] = x[i] * k;                                                                   \
            if (m) m[i] = k;                                                                   \
        }                                                                                      \
    } while (0)

/* out = a * mask / (1 - p) in one pass; mask / (1 - p) also goes to *mask_out when asked. */
static qkv_tensor *dropout_forward(const qkv_tensor *a, double p, qkv_generator *g,
                                   qkv_tensor **mask_out) {
    qkv_tensor *src = qkv__contiguous(a);
    qkv_tensor *out = src ? qkv_empty(a->dtype, a->ndim, a->shape) : NULL;
    qkv_tensor *mask = out && mask_out ? qkv_empty(a->dtype, a->ndim, a->shape) : NULL;
    if (!out || (mask_out && !mask)) return NULL;
    uint32_t threshold = (uint32_t)ceil(p * 16777216.0);
    double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
    int64_t n = a->numel;
    if (a->dtype == QKV_F32) DROPOUT_LOOP(float);
    else DROPOUT_LOOP(double);
    if (mask_out) *mask_out = mask;
    return out;
}

qkv_tensor *qkv_dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g) {
    if (!a) return NULL;
    char s[128];
    if (!qkv__is_float(a->dtype))
        return qkv_set_error("qkv_dropout: input %s must be f32 or f64, not %s",
                             qkv_shape_str(a, s, sizeof s), qkv_dtype_name(a->dtype));
    if (!(p >= 0 && p <= 1))
        return qkv_set_error("qkv_dropout: p must be in [0, 1], not %g", p);
    if (!training || p == 0)
        return REC1(qkv__view(a, a->ndim, a->shape, a->strides, a->offset), &dropout_op, a);
    if (!g) return qkv_set_error("qkv_dropout: training with p = %g needs a generator", p);
    bool record = qkv_is_grad_enabled() && a->requires_grad;
    qkv_scope_begin();
    qkv_tensor *mask = NULL;
    qkv_tensor *out = REC1(dropout_forward(a, p, g, record ? &mask : NULL), &dropout_op, a);
    if (out && out->grad_fn && !qkv__save(out->grad_fn, 0, mask)) out = NULL;
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}
