/*
 * qkv neural-network modules: named parameters, layers, losses.
 *
 * A module is a struct whose first member is a qkv_module. It owns its parameters (leaf
 * tensors that require grad, held outside every scope) and its submodules; qkv_module_free
 * releases all of it. Forward functions follow tensor.h's conventions: results belong to the
 * innermost scope, errors return NULL with qkv_error() set.
 *
 * Parameters have PyTorch-style dotted names built from the submodule names
 * ("blocks.0.attn.q_proj.weight"), so checkpoints line up with PyTorch's state_dict.
 */
#ifndef QKV_NN_H
#define QKV_NN_H

#include "autograd/autograd.h"
#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Modules ----------------------------------------------------------------------------- */

typedef struct qkv_module qkv_module;

typedef struct qkv_module_entry {
    char *name;
    qkv_tensor *tensor;   /* for parameters and buffers */
    qkv_module *module;   /* for submodules */
} qkv_module_entry;

struct qkv_module {
    const char *type;             /* "linear", "multi_head_attention", a user's own name */
    bool training;
    int n_params, n_buffers, n_modules;
    qkv_module_entry *params;     /* own parameters, in registration order */
    qkv_module_entry *buffers;    /* own non-trainable state saved in checkpoints */
    qkv_module_entry *modules;    /* own submodules, in registration order */
    int cap_params, cap_buffers, cap_modules;
    void (*destroy)(qkv_module *m); /* frees what the concrete struct adds; may be NULL */
    size_t size;                  /* sizeof the concrete struct, for freeing it */
};

/* Initialises the base of a concrete module struct of `size` bytes (training mode on). */
void qkv_module_init(qkv_module *m, const char *type, size_t size,
                     void (*destroy)(qkv_module *m));
/* Registers t as a parameter named `name` (the module takes a reference and makes t a leaf that
 * requires grad). Returns t, or NULL on error (duplicate name, NULL t). */
qkv_tensor *qkv_module_add_parameter(qkv_module *m, const char *name, qkv_tensor *t);
qkv_tensor *qkv_module_add_buffer(qkv_module *m, const char *name, qkv_tensor *t);
/* Registers child as a submodule; m now owns it and frees it. Returns child or NULL. */
void *qkv_module_add_module(qkv_module *m, const char *name, void *child);
void qkv_module_free(void *m);                 /* NULL is ignored */
void qkv_module_train(void *m, bool training); /* reaches every submodule */

/* All parameters (or, with buffers, parameters then buffers) in depth-first registration
 * order with full dotted names. The list is malloc'd; free it with qkv_named_list_free. */
typedef struct qkv_named_list {
    int n;
    char **names;
    qkv_tensor **tensors;
} qkv_named_list;
qkv_named_list *qkv_module_parameters(const void *m);
qkv_named_list *qkv_module_state(const void *m); /* parameters and buffers */
void qkv_named_list_free(qkv_named_list *list);
int64_t qkv_module_num_parameters(const void *m); /* total elements */
/* Converts every parameter and buffer to dtype in place (e.g. F64 for gradient checks). */
bool qkv_module_to_dtype(void *m, qkv_dtype dtype);
void qkv_module_zero_grad(void *m);

#ifdef __cplusplus
}
#endif
#endif
