/*
 * torch.nn.Linear: y = x W^T + b. The weight keeps PyTorch's [out, in] layout so checkpoints
 * line up; the product reads it through a transposed view, never a copy.
 */
#include <math.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static qkv_tensor *linear_forward(qkv_linear *m, const qkv_tensor *x);

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *linear_module_forward(qkv_module *m, const qkv_tensor *x) {
    return linear_forward((qkv_linear *)m, x);
}

qkv_linear *qkv_linear_new(int64_t in_features, int64_t out_features, bool bias,
                           qkv_generator *g) {
    if (in_features <= 0 || out_features <= 0)
        return qkv_set_error("qkv_linear_new: bad sizes in %lld, out %lld",
                             (long long)in_features, (long long)out_features);
    if (!g) return qkv_set_error("qkv_linear_new: no generator");
    qkv_linear *m = qkv_module_new("linear", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = linear_module_forward;
    m->in_features = in_features;
    m->out_features = out_features;
    qkv_scope_begin();
    /* kaiming_uniform(a = sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)), the bias's range too */
    double bound = 1.0 / sqrt((double)in_features);
    m->weight = qkv_module_add_parameter(&m->base, "weight",
                                         qkv_empty(QKV_F32, QKV_SHAPE(out_features, in_features)));
    bool ok = qkv_init_kaiming_uniform_(m->weight, sqrt(5.0), QKV_FAN_IN,
                                        QKV_NONLINEARITY_LEAKY_RELU, g);
    if (ok && bias) {
        m->bias = qkv_module_add_parameter(&m->base, "bias",
                                           qkv_empty(QKV_F32, QKV_SHAPE(out_features)));
        ok = qkv_init_uniform_(m->bias, -bound, bound, g);
    }
    qkv_scope_end();
    if (!ok) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *linear_forward(qkv_linear *m, const qkv_tensor *x) {
    if (!m || !x) return NULL;
    if (x->ndim < 1 || x->shape[x->ndim - 1] != m->in_features) {
        char s[128];
        return qkv_set_error("qkv_linear_forward: input %s, expected last dim %lld",
                             qkv_shape_str(x, s, sizeof s), (long long)m->in_features);
    }
    return qkv_affine(x, m->weight, m->bias);
}

qkv_tensor *qkv_linear_forward(qkv_linear *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_linear_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_linear_forward", x))
        return NULL;
    return QKV_CALL(m, linear_forward(m, x));
}
