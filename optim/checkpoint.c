/*
 * A training checkpoint: a module's state and its optimizer's state (moments, step counts,
 * hyperparameters) in one safetensors file, so that training resumes exactly where it stopped.
 * The optimizer's tensors are extras named "optim.state...", its settings metadata "optim...".
 */
#include <string.h>

#include "optim/optim.h"
#include "tensor/tensor_internal.h"

/* The caller's extras followed by the optimizer state, as one list of each kind. */
typedef struct merged {
    int n_tensors, n_meta;
    const char **names;
    qkv_tensor **tensors;
    qkv_meta_pair *meta;
} merged;

static void merged_free(merged *m) {
    if (m->names) qkv__free(m->names, (size_t)(m->n_tensors + 1) * sizeof *m->names);
    if (m->tensors) qkv__free(m->tensors, (size_t)(m->n_tensors + 1) * sizeof *m->tensors);
    if (m->meta) qkv__free(m->meta, (size_t)(m->n_meta + 1) * sizeof *m->meta);
}

static bool merge(merged *m, const qkv_checkpoint_contents *x, const qkv_optim_state *st) {
    m->n_tensors = x->n_tensors + st->tensors.n;
    m->n_meta = x->n_meta + st->n_meta;
    m->names = qkv__alloc((size_t)(m->n_tensors + 1) * sizeof *m->names);
    m->tensors = qkv__alloc((size_t)(m->n_tensors + 1) * sizeof *m->tensors);
    m->meta = qkv__alloc((size_t)(m->n_meta + 1) * sizeof *m->meta);
    if (!m->names || !m->tensors || !m->meta) return false;
    for (int i = 0; i < x->n_tensors; i++) {
        m->names[i] = x->tensor_names[i];
        m->tensors[i] = x->tensors[i];
    }
    for (int i = 0; i < st->tensors.n; i++) {
        m->names[x->n_tensors + i] = st->tensors.names[i];
        m->tensors[x->n_tensors + i] = st->tensors.tensors[i];
    }
    for (int i = 0; i < x->n_meta; i++) m->meta[i] = x->meta[i];
    for (int i = 0; i < st->n_meta; i++)
        m->meta[x->n_meta + i] = (qkv_meta_pair){st->meta_keys[i], st->meta_values[i]};
    return true;
}

bool qkv_checkpoint_save(const void *module, const qkv_optimizer *opt, const char *path,
                         const qkv_checkpoint_contents *extras) {
    if (!module) return false;
    if (!opt) return qkv_module_save(module, path, extras);
    const qkv_checkpoint_contents none = {0};
    const qkv_checkpoint_contents *x = extras ? extras : &none;
    qkv_optim_state *st = qkv_optimizer_state_export(opt);
    merged m = {0};
    bool ok = st && merge(&m, x, st);
    if (ok) {
        qkv_checkpoint_contents all = {m.n_tensors, m.names, m.tensors, x->n_bytes, x->bytes,
                                       m.n_meta, m.meta};
        ok = qkv_module_save(module, path, &all);
    }
    merged_free(&m);
    qkv_optim_state_free(st);
    return ok;
}

/* The file's "optim." tensors (read into the current scope) and metadata as an optimizer
 * state to import. The strings stay the file's. */
static bool state_of(const qkv_safetensors *f, qkv_optim_state *st) {
    int n = qkv_safetensors_count(f), nm = qkv_safetensors_meta_count(f);
    st->tensors.names = qkv__calloc((size_t)(n + 1) * sizeof(char *));
    st->tensors.tensors = qkv__calloc((size_t)(n + 1) * sizeof(qkv_tensor *));
    st->meta_keys = qkv__calloc((size_t)(nm + 1) * sizeof(char *));
    st->meta_values = qkv__calloc((size_t)(nm + 1) * sizeof(char *));
    if (!st->tensors.names || !st->tensors.tensors || !st->meta_keys || !st->meta_values)
        return false;
    for (int i = 0; i < n; i++) {
        const char *name = qkv_safetensors_name(f, i);
        if (strncmp(name, "optim.", 6)) continue;
        qkv_tensor *t = qkv_safetensors_tensor(f, name);
        if (!t) return false;
        st->tensors.names[st->tensors.n] = (char *)name;
        st->tensors.tensors[st->tensors.n++] = t;
    }
    for (int i = 0; i < nm; i++) {
        const char *key = qkv_safetensors_meta_key(f, i);
        if (strncmp(key, "optim.", 6)) continue;
        st->meta_keys[st->n_meta] = (char *)key;
        st->meta_values[st->n_meta++] = (char *)qkv_safetensors_meta(f, key);
    }
    return true;
}

static void state_of_free(const qkv_safetensors *f, qkv_optim_state *st) {
    size_t n = (size_t)qkv_safetensors_count(f) + 1;
    size_t nm = (size_t)qkv_safetensors_meta_count(f) + 1;
    if (st->tensors.names) qkv__free(st->tensors.names, n * sizeof(char *));
    if (st->tensors.tensors) qkv__free(st->tensors.tensors, n * sizeof(qkv_tensor *));
    if (st->meta_keys) qkv__free(st->meta_keys, nm * sizeof(char *));
    if (st->meta_values) qkv__free(st->meta_values, nm * sizeof(char *));
}

bool qkv_checkpoint_load(void *module, qkv_optimizer *opt, const char *path,
                         const qkv_load_options *opts) {
    if (!module) return false;
    qkv_safetensors *f = qkv_safetensors_read(path);
    qkv_optim_state st = {0};
    qkv_scope_begin();
    bool ok = f && qkv_module_load_safetensors(module, f, opts);
    ok = ok && (!opt || (state_of(f, &st) && qkv_optimizer_state_import(opt, &st)));
    qkv_scope_end();
    if (f) state_of_free(f, &st);
    qkv_safetensors_free(f);
    return ok;
}
