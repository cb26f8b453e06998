/*
 * A training checkpoint: a module's state, its optimizer's state (moments, step counts,
 * hyperparameters) and where the module's generators stand (dropout masks), in one safetensors
 * file, so that training resumes exactly where it stopped. The optimizer's tensors are extras
 * named "optim.state...", its settings metadata "optim...", and each generator an I64 [2]
 * extra "rng.<name>" holding its state and increment.
 */
#include <stdio.h>
#include <string.h>

#include "io/io.h"
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

static bool reserved(const char *name) {
    return name && (!strncmp(name, "optim.", 6) || !strncmp(name, RNG_PREFIX, strlen(RNG_PREFIX)));
}

/* The caller's extras may not use the names the optimizer and the generators are saved under. */
static bool check_reserved(const qkv_checkpoint_contents *x, const char *path) {
    const char *bad = NULL;
    for (int i = 0; !bad && i < x->n_tensors; i++)
        if (reserved(x->tensor_names[i])) bad = x->tensor_names[i];
    for (int i = 0; !bad && i < x->n_bytes; i++)
        if (reserved(x->bytes[i].name)) bad = x->bytes[i].name;
    for (int i = 0; !bad && i < x->n_meta; i++)
        if (reserved(x->meta[i].key)) bad = x->meta[i].key;
    if (bad)
        qkv_set_error("qkv_checkpoint_save: %s: \"%s\": names starting with optim. or rng. "
                      "are the checkpoint's own", path ? path : "(null)", bad);
    return bad == NULL;
}

bool qkv_checkpoint_save(const qkv_module *module, const qkv_optimizer *opt, const char *path,
                         const qkv_checkpoint_contents *contents) {
    if (qkv__null_object("qkv_checkpoint_save", "module", module)) return false;
    const qkv_checkpoint_contents none = {0};
    const qkv_checkpoint_contents *x = contents ? contents : &none;
    if (!check_reserved(x, path)) return false;
    const qkv_optim_state no_state = {0};
    qkv_scope_begin(); /* whatever the export and the copies make ends with the save */
    qkv_optim_state *st = opt ? qkv_optimizer_state_export(opt) : NULL;
    qkv_generator_list *gens = qkv_module_generators(module);
    extras e = {0};
    bool ok = (st || !opt) && gens && gather(&e, x, st ? st : &no_state, gens);
    if (ok) {
        qkv_checkpoint_contents all = {e.n_tensors, e.names, e.tensors, x->n_bytes, x->bytes,
                                       e.n_meta, e.meta};
        ok = qkv_module_save(module, path, &all);
    }
    extras_free(&e);
    qkv_generator_list_free(gens);
    qkv_optim_state_free(st);
    qkv_scope_end();
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

/* The saved states of the module's generators, read and checked before anything changes. */
typedef struct saved_generators {
    qkv_generator_list *list;
    qkv_generator *states; /* one per generator */
    bool *found;           /* whether the file has it: one without it is left as it is */
} saved_generators;

static void saved_generators_free(saved_generators *s) {
    size_t n = (size_t)(s->list ? s->list->n : 0) + 1;
    if (s->states) qkv__free(s->states, n * sizeof *s->states);
    if (s->found) qkv__free(s->found, n * sizeof *s->found);
    qkv_generator_list_free(s->list);
}

static bool read_generators(qkv_module *module, const qkv_safetensors *f, saved_generators *s) {
    s->list = qkv_module_generators(module);
    if (!s->list) return false;
    size_t n = (size_t)s->list->n + 1;
    s->states = qkv__calloc(n * sizeof *s->states);
    s->found = qkv__calloc(n * sizeof *s->found);
    bool ok = s->states && s->found;
    for (int i = 0; ok && i < s->list->n; i++) {
        char *name = rng_name(s->list->items[i].name);
        s->found[i] = name && has_entry(f, name);
        qkv_tensor *t = s->found[i] ? qkv_safetensors_tensor(f, name) : NULL;
        bool shaped = t && t->dtype == QKV_I64 && t->ndim == 1 && t->shape[0] == 2;
        int64_t words[2];
        if (t && !shaped) qkv_set_error("%s is not an I64 [2] generator state", name);
        bool good = !s->found[i] || (shaped && qkv_copy_out(t, QKV_I64, words));
        if (s->found[i] && good)
            s->states[i] = (qkv_generator){(uint64_t)words[0], (uint64_t)words[1]};
        ok = name && good;
        if (name) qkv__free(name, strlen(name) + 1);
    }
    return ok;
}

static void restore_generators(const saved_generators *s) {
    for (int i = 0; i < s->list->n; i++)
        if (s->found[i]) *s->list->items[i].generator = s->states[i];
}

/* Puts "qkv_checkpoint_load: <path>: " before the message of a failure in a part that does
 * not name the file, unless an older error was already recorded (that one stays first). */
static void name_the_file(const char *path, bool had_error) {
    const char *e = qkv_error();
    if (had_error || !e || strstr(e, path)) return;
    size_t n = strlen(e) + 1;
    char *copy = qkv__alloc(n);
    if (!copy) return;
    memcpy(copy, e, n);
    qkv_clear_error();
    qkv_set_error("qkv_checkpoint_load: %s: %s", path, copy);
    qkv__free(copy, n);
}

bool qkv_checkpoint_load(qkv_module *module, qkv_optimizer *opt, const char *path,
                         const qkv_load_options *opts) {
    if (qkv__null_object("qkv_checkpoint_load", "module", module)) return false;
    bool had_error = qkv_error() != NULL;
    qkv_safetensors *f = qkv_safetensors_read(path);
    qkv_optim_state st = {0};
    saved_generators gens = {0};
    qkv_scope_begin();
    /* The optimizer's state names the module's parameters with their shapes, so a file of
     * another model fails its import, which checks everything before it changes anything;
     * the module is loaded after it. */
    bool ok = f && read_generators(module, f, &gens) &&
              (!opt || (state_of(f, &st) && qkv_optimizer_state_import(opt, &st)));
    if (f && !ok) name_the_file(path, had_error);
    ok = ok && qkv_module_load_safetensors(module, f, opts);
    if (ok) restore_generators(&gens);
    qkv_scope_end();
    saved_generators_free(&gens);
    if (f) state_of_free(f, &st);
    qkv_safetensors_free(f);
    return ok;
}
