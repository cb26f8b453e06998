/*
 * Gradient clipping as torch.nn.utils.clip_grad_norm_ and clip_grad_value_, in place on the
 * grads of a parameter list.
 */
#include <math.h>

#include "optim/optim_internal.h"
#include "tensor/tensor_internal.h"

/* Checks the list and makes every grad contiguous in its parameter's dtype. */
static bool prepare(const char *op, const qkv_named_list *params) {
    if (!params) return qkv_set_error("%s: NULL parameter list", op), false;
    for (int i = 0; i < params->n; i++) {
        qkv_tensor *p = params->tensors[i];
        const char *name = params->names && params->names[i] ? params->names[i] : "?";
        if (!p) return qkv_set_error("%s: parameter %d is NULL", op, i), false;
        if (!p->grad) continue;
        if (p->dtype != QKV_F32 && p->dtype != QKV_F64) {
            qkv_set_error("%s: %s is %s; parameters must be f32 or f64", op, name,
                          qkv_dtype_name(p->dtype));
            return false;
        }
        if (!qkv__fit_grad(op, name, p)) return false;
    }
    return true;
}

/* The sum of squares is accumulated in double, serially, so the norm is the same for every
 * thread count. */
static double sum_squares(const qkv_tensor *g) {
    double s = 0;
    if (g->dtype == QKV_F32) {
        const float *x = qkv_data(g);
        for (int64_t i = 0; i < g->numel; i++) s += (double)x[i] * x[i];
    } else {
        const double *x = qkv_data(g);
        for (int64_t i = 0; i < g->numel; i++) s += x[i] * x[i];
    }
    return s;
}

static void scale(qkv_tensor *g, double factor) {
    int nt = qkv__threads_for(g->numel);
    int64_t n = g->numel;
    if (g->dtype == QKV_F32) {
        float *x = qkv_data(g), f = (float)factor;
        QKV__PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) x[i] = x[i] * f;
    } else {
        double *x = qkv_data(g);
        QKV__PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) x[i] = x[i] * factor;
    }
    qkv__bump_version(g);
}

double qkv_clip_grad_norm(const qkv_named_list *params, double max_norm) {
    if (!prepare("qkv_clip_grad_norm", params)) return NAN;
    double total = 0;
    for (int i = 0; i < params->n; i++)
        if (params->tensors[i]->grad) total += sum_squares(params->tensors[i]->grad);
    total = sqrt(total);
    double coef = max_norm / (total + 1e-6);
    if (coef < 1)
        for (int i = 0; i < params->n; i++)
            if (params->tensors[i]->grad) scale(params->tensors[i]->grad, coef);
    return total;
}

#define DEFINE_CLAMP(T, sfx)                                                             \
    static void clamp_##sfx(T *x, int64_t n, T c) {                                      \
        int nt = qkv__threads_for(n);                                                    \
        QKV__PARALLEL_FOR                                                                \
        for (int64_t i = 0; i < n; i++) {                                                \
            if (x[i] > c) x[i] = c;                                                      \
            else if (x[i] < -c) x[i] = -c;                                               \
        }                                                                                \
    }

DEFINE_CLAMP(float, f32)
DEFINE_CLAMP(double, f64)

bool qkv_clip_grad_value(const qkv_named_list *params, double clip) {
    if (!(clip >= 0)) return qkv_set_error("qkv_clip_grad_value: clip %g < 0", clip), false;
    if (!prepare("qkv_clip_grad_value", params)) return false;
    for (int i = 0; i < params->n; i++) {
        qkv_tensor *g = params->tensors[i]->grad;
        if (!g) continue;
        if (g->dtype == QKV_F32) clamp_f32(qkv_data(g), g->numel, (float)clip);
        else clamp_f64(qkv_data(g), g->numel, clip);
        qkv__bump_version(g);
    }
    return true;
}
