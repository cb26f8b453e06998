/*
 * Containers that only hold submodules, as torch.nn.ModuleList and ModuleDict: their children's
 * names become path components ("blocks.0.attn.q_proj.weight"), so a stack built in a loop
 * has PyTorch's parameter names. They have no forward of their own: the model that holds them
 * calls their children.
 */
#include <stdio.h>
#include <string.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

qkv_module_list *qkv_module_list_new(void) {
    return qkv_module_new("module_list", sizeof(qkv_module_list), NULL);
}

void *qkv_module_list_append(qkv_module_list *l, qkv_module *module) {
    if (!l) {
        qkv_module_free(module);
        return qkv_set_error("qkv_module_list_append: the list is NULL");
    }
    char name[24];
    snprintf(name, sizeof name, "%d", l->n);
    void *added = qkv_module_add_module(&l->base, name, module);
    if (added) l->n++;
    return added;
}

/* Negative indices count from the end, as in Python. */
qkv_module *qkv_module_list_get(const qkv_module_list *l, int index) {
    if (qkv__null_object("qkv_module_list_get", "module list", l)) return NULL;
    int i = index < 0 ? index + l->n : index;
    if (i < 0 || i >= l->n)
        return qkv_set_error("qkv_module_list_get: index %d out of range for a list of %d",
                             index, l->n);
    return l->base.modules[i].module;
}

qkv_module_dict *qkv_module_dict_new(void) {
    return qkv_module_new("module_dict", sizeof(qkv_module_dict), NULL);
}

void *qkv_module_dict_set(qkv_module_dict *d, const char *name, qkv_module *module) {
    if (!d) {
        qkv_module_free(module);
        return qkv_set_error("qkv_module_dict_set: the dict is NULL");
    }
    return qkv_module_add_module(&d->base, name, module);
}

qkv_module *qkv_module_dict_get(const qkv_module_dict *d, const char *name) {
    if (qkv__null_object("qkv_module_dict_get", "module dict", d) ||
        qkv__null_object("qkv_module_dict_get", "name", name))
        return NULL;
    for (int i = 0; i < d->base.n_modules; i++)
        if (strcmp(d->base.modules[i].name, name) == 0) return d->base.modules[i].module;
    return qkv_set_error("qkv_module_dict_get: no module named \"%s\"", name);
}

int qkv_module_dict_size(const qkv_module_dict *d) {
    return d ? d->base.n_modules : 0;
}
