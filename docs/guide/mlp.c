/* The guide's model: construction and forward pass (docs/guide.md, steps 1 and 2). */
#include "mlp.h"

static qkv_tensor *mlp_body(mlp *m, const qkv_tensor *x);

/* The forward as the module's one-input forward, which qkv_module_forward (and so
 * qkv_sequential) runs as one call. */
static qkv_tensor *mlp_module_forward(qkv_module *m, const qkv_tensor *x) {
    return mlp_body((mlp *)m, x);
}

mlp *mlp_new(int64_t in, int64_t hidden, int64_t classes, qkv_generator *g) {
    mlp *m = qkv_module_new("mlp", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = mlp_module_forward;
    m->hidden = qkv_module_add_module(&m->base, "hidden",
                                      QKV_MODULE(qkv_linear_new(in, hidden, true, g)));
    m->out = qkv_module_add_module(&m->base, "out",
                                   QKV_MODULE(qkv_linear_new(hidden, classes, true, g)));
    qkv_scope_begin(); /* the module keeps its own reference; the scope drops ours */
    m->temperature = qkv_module_add_parameter(&m->base, "temperature",
                                              qkv_full(QKV_F32, QKV_SHAPE(1), 1.0));
    qkv_scope_end();
    if (!m->hidden || !m->out || !m->temperature) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *mlp_body(mlp *m, const qkv_tensor *x) {
    qkv_tensor *h = qkv_gelu(qkv_linear_forward(m->hidden, x), false);
    return qkv_div(qkv_linear_forward(m->out, h), m->temperature);
}

/* One module call: what the body makes and no backward reads is freed when it returns. */
qkv_tensor *mlp_forward(mlp *m, const qkv_tensor *x) {
    return m ? QKV_CALL(m, mlp_body(m, x)) : NULL;
}
