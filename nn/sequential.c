/*
 * A chain of one-input modules, each called through the forward its constructor set in its
 * base, so any module with one can take part.
 */
#include <stdio.h>

#include "nn/nn.h"

/* Each entry through qkv_module_forward, so each is one call of its own. */
static qkv_tensor *sequential_forward(qkv_module *m, const qkv_tensor *x) {
    qkv_sequential *s = (qkv_sequential *)m;
    qkv_tensor *y = (qkv_tensor *)x;
    for (int i = 0; i < s->n && y; i++) y = qkv_module_forward(s->base.modules[i].module, y);
    return y;
}

qkv_sequential *qkv_sequential_new(void) {
    qkv_sequential *s = qkv_module_new("sequential", sizeof(qkv_sequential), NULL);
    if (s) s->base.forward = sequential_forward;
    return s;
}

void *qkv_sequential_add(qkv_sequential *s, qkv_module *module) {
    if (!s || !module) {
        qkv_module_free(module);
        return NULL;
    }
    if (!module->forward) {
        qkv_set_error("qkv_sequential_add: a %s module has no one-input forward", module->type);
        qkv_module_free(module);
        return NULL;
    }
    char name[24];
    snprintf(name, sizeof name, "%d", s->n);
    if (!qkv_module_add_module(&s->base, name, module)) return NULL;
    s->n++;
    return module;
}

qkv_tensor *qkv_sequential_forward(qkv_sequential *s, const qkv_tensor *x) {
    return qkv_module_forward(QKV_MODULE(s), x);
}
