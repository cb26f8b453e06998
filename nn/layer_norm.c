/*
 * torch.nn.LayerNorm: (x - mean) * rsqrt(var + eps) over the trailing normalized dims, with the
 * biased variance, then an optional elementwise affine map. One fused op (autograd/ops_norm.c)
 * when the parameters share the input's float dtype, composed from reductions otherwise.
 */
#include <string.h>

#include "autograd/autograd_internal.h"
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static qkv_tensor *layer_norm_forward(qkv_layer_norm *m, const qkv_tensor *x);

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *layer_norm_module_forward(qkv_module *m, const qkv_tensor *x) {
    return layer_norm_forward((qkv_layer_norm *)m, x);
}

qkv_layer_norm *qkv_layer_norm_new(int ndim, const int64_t *normalized_shape, double eps,
                                   bool elementwise_affine) {
    if (ndim < 1 || ndim > QKV_MAX_DIMS || !normalized_shape)
        return qkv_set_error("qkv_layer_norm_new: bad number of dims %d", ndim);
    for (int i = 0; i < ndim; i++)
        if (normalized_shape[i] <= 0)
            return qkv_set_error("qkv_layer_norm_new: bad size %lld",
                                 (long long)normalized_shape[i]);
    if (!(eps >= 0)) return qkv_set_error("qkv_layer_norm_new: bad eps %g", eps);
    qkv_layer_norm *m = qkv_module_new("layer_norm", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = layer_norm_module_forward;
    m->ndim = ndim;
    memcpy(m->normalized_shape, normalized_shape, (size_t)ndim * sizeof *normalized_shape);
    m->eps = eps;
    bool ok = true;
    if (elementwise_affine) {
        qkv_scope_begin();
        m->weight = qkv_module_add_parameter(&m->base, "weight",
                                             qkv_ones(QKV_F32, ndim, normalized_shape));
        m->bias = qkv_module_add_parameter(&m->base, "bias",
                                           qkv_zeros(QKV_F32, ndim, normalized_shape));
        ok = m->weight && m->bias;
        qkv_scope_end();
    }
    if (!ok) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static bool shape_matches(const qkv_layer_norm *m, const qkv_tensor *x) {
    if (x->ndim < m->ndim) return false;
    for (int i = 0; i < m->ndim; i++)
        if (x->shape[x->ndim - m->ndim + i] != m->normalized_shape[i]) return false;
    return true;
}

static qkv_tensor *layer_norm_forward(qkv_layer_norm *m, const qkv_tensor *x) {
    if (!m || !x || !(x = qkv__autocast_f32(x))) return NULL; /* f32 under autocast */
    if (!shape_matches(m, x)) {
        char s[128];
        return qkv_set_error("qkv_layer_norm_forward: input %s does not end with the "
                             "normalized shape (%d dims, last %lld)",
                             qkv_shape_str(x, s, sizeof s), m->ndim,
                             (long long)m->normalized_shape[m->ndim - 1]);
    }
    /* One fused op when the parameters share x's float dtype; the composition otherwise,
     * which promotes. */
    if (qkv__is_float(x->dtype) && (!m->weight || (m->weight->dtype == x->dtype &&
                                                   m->bias->dtype == x->dtype)))
        return qkv__layer_norm(x, m->ndim, m->weight, m->bias, m->eps,
                               "qkv_layer_norm_forward");
    int axes[QKV_MAX_DIMS];
    for (int i = 0; i < m->ndim; i++) axes[i] = x->ndim - m->ndim + i;
    qkv_tensor *mean = qkv_mean_axes(x, m->ndim, axes, true);
    qkv_tensor *var = qkv_var_axes(x, m->ndim, axes, 0.0, true);
    qkv_tensor *y = qkv_mul(qkv_sub(x, mean), qkv_rsqrt(qkv_add_scalar(var, m->eps)));
    if (m->weight) y = qkv_add(qkv_mul(y, m->weight), m->bias);
    return y;
}

qkv_tensor *qkv_layer_norm_forward(qkv_layer_norm *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_layer_norm_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_layer_norm_forward", x))
        return NULL;
    return QKV_CALL(m, layer_norm_forward(m, x));
}
