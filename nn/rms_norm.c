/*
 * RMSNorm (torch.nn.RMSNorm, LLaMA): a layer norm without the mean,
 * x * rsqrt(mean(x^2) + eps) * weight over the last dim, as one op (layer norm's kernels).
 */
#include <float.h>

#include "autograd/autograd_internal.h"
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *rms_norm_module_forward(qkv_module *m, const qkv_tensor *x) {
    return qkv_rms_norm_forward((qkv_rms_norm *)m, x);
}

qkv_rms_norm *qkv_rms_norm_new(int64_t dim, double eps) {
    if (dim <= 0 || !(eps >= 0))
        return qkv_set_error("qkv_rms_norm_new: dim %lld must be positive, eps %g >= 0",
                             (long long)dim, eps);
    qkv_rms_norm *m = qkv_module_new("rms_norm", sizeof *m, NULL);
    if (!m) return NULL;
    m->dim = dim;
    m->eps = eps;
    qkv_scope_begin();
    m->weight = qkv_module_add_parameter(&m->base, "weight", qkv_ones(QKV_F32, 1, &dim));
    qkv_scope_end();
    if (!m->weight) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    m->base.forward = rms_norm_module_forward;
    return m;
}

static qkv_tensor *rms_norm(qkv_rms_norm *m, const qkv_tensor *x) {
    double eps = m->eps ? m->eps : x->dtype == QKV_F64 ? DBL_EPSILON : FLT_EPSILON;
    /* One fused op when the weight shares x's float dtype; the composition otherwise, which
     * promotes. */
    if (qkv__is_float(x->dtype) && m->weight->dtype == x->dtype)
        return qkv__rms_norm(x, m->weight, eps, "qkv_rms_norm_forward");
    qkv_tensor *ms = qkv_mean(qkv_mul(x, x), -1, true);
    return qkv_mul(qkv_mul(x, qkv_rsqrt(qkv_add_scalar(ms, eps))), m->weight);
}

qkv_tensor *qkv_rms_norm_forward(qkv_rms_norm *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_rms_norm_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_rms_norm_forward", x))
        return NULL;
    if (x->ndim < 1 || x->shape[x->ndim - 1] != m->dim) {
        char s[128];
        return qkv_set_error("qkv_rms_norm_forward: x %s; expected [..., %lld]",
                             qkv_shape_str(x, s, sizeof s), (long long)m->dim);
    }
    return QKV_CALL(m, rms_norm(m, x));
}
