/*
 * The dropout module: qkv_dropout in training mode, the identity in eval mode. Each module
 * owns its generator (seeded from the construction generator), so masks do not depend on
 * what else draws random numbers.
 */
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static qkv_tensor *dropout_layer_forward(qkv_dropout_layer *m, const qkv_tensor *x);

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *dropout_module_forward(qkv_module *m, const qkv_tensor *x) {
    return dropout_layer_forward((qkv_dropout_layer *)m, x);
}

qkv_dropout_layer *qkv_dropout_layer_new(double p, qkv_generator *g) {
    if (!(p >= 0 && p <= 1)) return qkv_set_error("qkv_dropout_layer_new: p %g not in [0, 1]", p);
    if (!g) return qkv_set_error("qkv_dropout_layer_new: no generator");
    qkv_dropout_layer *m = qkv_module_new("dropout", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = dropout_module_forward;
    m->p = p;
    uint64_t seed = (uint64_t)qkv_generator_next_u32(g) << 32;
    seed |= qkv_generator_next_u32(g);
    qkv_generator_init(&m->generator, seed);
    if (!qkv_module_add_generator(&m->base, "generator", &m->generator)) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *dropout_layer_forward(qkv_dropout_layer *m, const qkv_tensor *x) {
    if (!m || !x) return NULL;
    return qkv_dropout(x, m->p, m->base.training, &m->generator);
}

qkv_tensor *qkv_dropout_layer_forward(qkv_dropout_layer *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_dropout_layer_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_dropout_layer_forward", x))
        return NULL;
    return QKV_CALL(m, dropout_layer_forward(m, x));
}
