/*
 * Elementwise activations as parameterless modules, so that they can sit in a sequential
 * chain or be chosen by a configuration value.
 */
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static const char *kind_name(qkv_activation_kind kind) {
    switch (kind) {
    case QKV_ACT_RELU: return "relu";
    case QKV_ACT_GELU: return "gelu";
    case QKV_ACT_GELU_TANH: return "gelu_tanh";
    case QKV_ACT_TANH: return "tanh";
    case QKV_ACT_SIGMOID: return "sigmoid";
    }
    return NULL;
}

qkv_tensor *qkv_activate(qkv_activation_kind kind, const qkv_tensor *x) {
    switch (kind) {
    case QKV_ACT_RELU: return qkv_relu(x);
    case QKV_ACT_GELU: return qkv_gelu(x, false);
    case QKV_ACT_GELU_TANH: return qkv_gelu(x, true);
    case QKV_ACT_TANH: return qkv_tanh(x);
    case QKV_ACT_SIGMOID: return qkv_sigmoid(x);
    }
    return qkv_set_error("qkv_activate: unknown activation %d", (int)kind);
}

static qkv_tensor *activation_forward(qkv_activation *m, const qkv_tensor *x);

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *activation_module_forward(qkv_module *m, const qkv_tensor *x) {
    return activation_forward((qkv_activation *)m, x);
}

qkv_activation *qkv_activation_new(qkv_activation_kind kind) {
    const char *name = kind_name(kind);
    if (!name) return qkv_set_error("qkv_activation_new: unknown activation %d", (int)kind);
    qkv_activation *m = qkv_module_new(name, sizeof *m, NULL);
    if (!m) return NULL;
    m->kind = kind;
    m->base.forward = activation_module_forward;
    return m;
}

static qkv_tensor *activation_forward(qkv_activation *m, const qkv_tensor *x) {
    if (!m || !x) return NULL;
    return qkv_activate(m->kind, x);
}

qkv_tensor *qkv_activation_forward(qkv_activation *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_activation_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_activation_forward", x))
        return NULL;
    return QKV_CALL(m, activation_forward(m, x));
}
