/*
 * A training checkpoint: a module's state, its optimizer's state (moments, step counts,
 * hyperparameters) and where the module's generators stand (dropout masks), in one safetensors
 * file, so that training resumes exactly where it stopped. The optimizer's tensors are extras
 * named "optim.state...", its settings metadata "optim...", and each generator an I64 [2]
 * extra "rng.<name>" holding its state and increment.
 */
#include <stdio.h>
#include <string.h>

#include "optim/optim.h"
#include "tensor/tensor_internal.h"

#define RNG_PREFIX "rng."

/* Everything to save beside the module: the caller's extras, the optimizer state and the
 * generators, as one list of tensors and one of metadata. */
typedef struct extras {
    int n_tensors, n_meta, n_rng;
    const char **names;
    qkv_tensor **tensors;
    qkv_meta_pair *meta;
    char **rng_names; /* owned: the generators' entry names */
} extras;

static void extras_free(extras *e) {
    for (int i = 0; e->rng_names && i < e->n_rng; i++)
        if (e->rng_names[i]) qkv__free(e->rng_names[i], strlen(e->rng_names[i]) + 1);
    if (e->rng_names) qkv__free(e->rng_names, (size_t)(e->n_rng + 1) * sizeof *e->rng_names);
    if (e->names) qkv__free(e->names, (size_t)(e->n_tensors + 1) * sizeof *e->names);
    if (e->tensors) qkv__free(e->tensors, (size_t)(e->n_tensors + 1) * sizeof *e->tensors);
    if (e->meta) qkv__free(e->meta, (size_t)(e->n_meta + 1) * sizeof *e->meta);
}

static char *rng_name(const char *name) {
    size_t len = strlen(RNG_PREFIX) + strlen(name) + 1;
    char *s = qkv__alloc(len);
    if (s) snprintf(s, len, RNG_PREFIX "%s", name);
    return s;
}

static bool gather(extras *e, const qkv_checkpoint_contents *x, const qkv_optim_state *st,
                   const qkv_generator_list *gens) {
    e->n_rng = gens->n;
    e->n_tensors = x->n_tensors + st->tensors.n + gens->n;
    e->n_meta = x->n_meta + st->n_meta;
    e->rng_names = qkv__calloc((size_t)(e->n_rng + 1) * sizeof *e->rng_names);
    e->names = qkv__alloc((size_t)(e->n_tensors + 1) * sizeof *e->names);
    e->tensors = qkv__alloc((size_t)(e->n_tensors + 1) * sizeof *e->tensors);
    e->meta = qkv__alloc((size_t)(e->n_meta + 1) * sizeof *e->meta);
    if (!e->rng_names || !e->names || !e->tensors || !e->meta) return false;
    int k = 0;
    for (int i = 0; i < x->n_tensors; i++, k++) {
        e->names[k] = x->tensor_names[i];
        e->tensors[k] = x->tensors[i];
    }
    for (int i = 0; i < st->tensors.n; i++, k++) {
        e->names[k] = st->tensors.names[i];
        e->tensors[k] = st->tensors.tensors[i];
    }
    for (int i = 0; i < gens->n; i++, k++) {
        const qkv_generator *g = gens->items[i].generator;
        int64_t words[2] = {(int64_t)g->state, (int64_t)g->inc};
        e->names[k] = e->rng_names[i] = rng_name(gens->items[i].name);
        e->tensors[k] = qkv_from_array(QKV_I64, QKV_SHAPE(2), words);
        if (!e->names[k] || !e->tensors[k]) return false;
    }
    for (int i = 0; i < x->n_meta; i++) e->meta[i] = x->meta[i];
    for (int i = 0; i < st->n_meta; i++)
        e->meta[x->n_meta + i] = (qkv_meta_pair){st->meta_keys[i], st->meta_values[i]};
    return true;
}

bool qkv_checkpoint_save(const void *module, const qkv_optimizer *opt, const char *path,
                         const qkv_checkpoint_contents *contents) {
    if (!module) return false;
    const qkv_checkpoint_contents none = {0};
    const qkv_checkpoint_contents *x = contents ? contents : &none;
    const qkv_optim_state no_state = {0};
    qkv_optim_state *st = opt ? qkv_optimizer_state_export(opt) : NULL;
    qkv_generator_list *gens = qkv_module_generators(module);
    extras e = {0};
    qkv_scope_begin();
    bool ok = (st || !opt) && gens && gather(&e, x, st ? st : &no_state, gens);
    if (ok) {
        qkv_checkpoint_contents all = {e.n_tensors, e.names, e.tensors, x->n_bytes, x->bytes,
                                       e.n_meta, e.meta};
        ok = qkv_module_save(module, path, &all);
    }
    qkv_scope_end();
    extras_free(&e);
    qkv_generator_list_free(gens);
    qkv_optim_state_free(st);
    return ok;
}

/* ---- Loading ----------------------------------------------------------------------------- */

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

static bool has_entry(const qkv_safetensors *f, const char *name) {
    for (int i = 0; i < qkv_safetensors_count(f); i++)
        if (strcmp(qkv_safetensors_name(f, i), name) == 0) return true;
    return false;
}

/* Sets each generator of the module that the file has an "rng." entry for. All entries are
 * read and checked before any generator changes. */
static bool restore_generators(void *module, const qkv_safetensors *f) {
    qkv_generator_list *gens = qkv_module_generators(module);
    if (!gens) return false;
    int64_t *words = qkv__calloc((size_t)(2 * gens->n + 1) * sizeof *words);
    bool *found = qkv__calloc((size_t)(gens->n + 1) * sizeof *found);
    bool ok = words && found;
    for (int i = 0; ok && i < gens->n; i++) {
        char *name = rng_name(gens->items[i].name);
        /* a file without this generator leaves it as it is */
        found[i] = name && has_entry(f, name);
        qkv_tensor *t = found[i] ? qkv_safetensors_tensor(f, name) : NULL;
        if (found[i] && !t) ok = false;
        if (t && (t->dtype != QKV_I64 || t->ndim != 1 || t->shape[0] != 2))
            ok = qkv_set_error("qkv_checkpoint_load: %s is not an I64 [2] state", name) != NULL;
        if (ok && t) ok = qkv_copy_out(t, QKV_I64, words + 2 * i);
        if (name) qkv__free(name, strlen(name) + 1);
        ok = ok && name;
    }
    for (int i = 0; ok && i < gens->n; i++)
        if (found[i])
            *gens->items[i].generator = (qkv_generator){(uint64_t)words[2 * i],
                                                        (uint64_t)words[2 * i + 1]};
    if (words) qkv__free(words, (size_t)(2 * gens->n + 1) * sizeof *words);
    if (found) qkv__free(found, (size_t)(gens->n + 1) * sizeof *found);
    qkv_generator_list_free(gens);
    return ok;
}

bool qkv_checkpoint_load(void *module, qkv_optimizer *opt, const char *path,
                         const qkv_load_options *opts) {
    if (!module) return false;
    qkv_safetensors *f = qkv_safetensors_read(path);
    qkv_optim_state st = {0};
    qkv_scope_begin();
    bool ok = f && qkv_module_load_safetensors(module, f, opts) && restore_generators(module, f);
    ok = ok && (!opt || (state_of(f, &st) && qkv_optimizer_state_import(opt, &st)));
    qkv_scope_end();
    if (f) state_of_free(f, &st);
    qkv_safetensors_free(f);
    return ok;
}
