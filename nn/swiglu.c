/*
 * LLaMA's SwiGLU feed-forward block, w2(silu(w1 x) * w3 x), composed from three bias-free
 * linear layers and qkv_silu_mul, silu(a) * b as one op.
 */
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *swiglu_module_forward(qkv_module *m, const qkv_tensor *x) {
    return qkv_swiglu_forward((qkv_swiglu *)m, x);
}

/* Registered in LLaMA's order (w1, w2, w3), so parameter lists line up with its state_dict. */
qkv_swiglu *qkv_swiglu_new(int64_t dim, int64_t hidden_dim, qkv_generator *g) {
    if (dim <= 0 || hidden_dim <= 0)
        return qkv_set_error("qkv_swiglu_new: dim %lld and hidden_dim %lld must be positive",
                             (long long)dim, (long long)hidden_dim);
    if (!g) return qkv_set_error("qkv_swiglu_new: no generator");
    qkv_swiglu *m = qkv_module_new("swiglu", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = swiglu_module_forward;
    m->dim = dim;
    m->hidden_dim = hidden_dim;
    qkv_module *b = &m->base;
    m->w1 = qkv_module_add_module(b, "w1", QKV_MODULE(qkv_linear_new(dim, hidden_dim, false, g)));
    m->w2 = qkv_module_add_module(b, "w2", QKV_MODULE(qkv_linear_new(hidden_dim, dim, false, g)));
    m->w3 = qkv_module_add_module(b, "w3", QKV_MODULE(qkv_linear_new(dim, hidden_dim, false, g)));
    if (!m->w1 || !m->w2 || !m->w3) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *swiglu(qkv_swiglu *m, const qkv_tensor *x) {
    qkv_tensor *gate = qkv_silu_mul(qkv_linear_forward(m->w1, x), qkv_linear_forward(m->w3, x));
    return qkv_linear_forward(m->w2, gate);
}

qkv_tensor *qkv_swiglu_forward(qkv_swiglu *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_swiglu_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_swiglu_forward", x))
        return NULL;
    return QKV_CALL(m, swiglu(m, x));
}
