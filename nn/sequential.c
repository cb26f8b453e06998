/*
 * A chain of one-input modules. Each entry keeps the forward function to call, so any module
 * can take part; built-in layers are recognised by their type and need none.
 */
#include <string.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static void sequential_destroy(qkv_module *base) {
    qkv_sequential *s = (qkv_sequential *)base;
    if (s->forwards) qkv__free(s->forwards, (size_t)s->cap * sizeof *s->forwards);
}

qkv_sequential *qkv_sequential_new(void) {
    return qkv_module_new("sequential", sizeof(qkv_sequential), sequential_destroy);
}

/* Calls the built-in forward of a module, by its type. */
static qkv_tensor *builtin_forward(void *module, const qkv_tensor *x) {
    qkv_module *m = module;
    if (strcmp(m->type, "linear") == 0) return qkv_linear_forward(module, x);
    if (strcmp(m->type, "embedding") == 0) return qkv_embedding_forward(module, x);
    if (strcmp(m->type, "dropout") == 0) return qkv_dropout_layer_forward(module, x);
    if (strcmp(m->type, "layer_norm") == 0) return qkv_layer_norm_forward(module, x);
    if (strcmp(m->type, "sequential") == 0) return qkv_sequential_forward(module, x);
    return qkv_activation_forward(module, x);
}

static bool is_builtin(const qkv_module *m) {
    static const char *const types[] = {"linear", "embedding", "dropout", "layer_norm",
                                        "sequential", "relu", "gelu", "gelu_tanh", "tanh",
                                        "sigmoid"};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (strcmp(m->type, types[i]) == 0) return true;
    return false;
}

void *qkv_sequential_add(qkv_sequential *s, qkv_module *module, qkv_forward_fn forward) {
    if (!s || !module) {
        qkv_module_free(module);
        return NULL;
    }
    if (!forward && !is_builtin(module)) {
        qkv_set_error("qkv_sequential_add: a %s module needs a forward function",
                      ((qkv_module *)module)->type);
        qkv_module_free(module);
        return NULL;
    }
    size_t cap = (size_t)s->cap;
    if (!qkv__reserve((void **)&s->forwards, &cap, (size_t)s->n + 1, sizeof *s->forwards)) {
        qkv_module_free(module);
        return NULL;
    }
    s->cap = (int)cap;
    char name[24];
    snprintf(name, sizeof name, "%d", s->n);
    if (!qkv_module_add_module(&s->base, name, module)) return NULL;
    s->forwards[s->n++] = forward ? forward : builtin_forward;
    return module;
}

qkv_tensor *qkv_sequential_forward(qkv_sequential *s, const qkv_tensor *x) {
    if (!s || !x) return NULL;
    qkv_tensor *y = (qkv_tensor *)x;
    for (int i = 0; i < s->n && y; i++) y = s->forwards[i](s->base.modules[i].module, y);
    return y;
}
