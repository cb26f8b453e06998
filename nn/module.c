/*
 * The module base: named parameters, buffers and submodules, their dotted-name listing,
 * training mode, dtype conversion and freeing. Concrete layers embed a qkv_module first and
 * register what they own here, so these functions work on any module without knowing its type.
 */
#include <string.h>

#include "autograd/autograd_internal.h"
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

void qkv_module_init(qkv_module *m, const char *type, size_t size,
                     void (*destroy)(qkv_module *m)) {
    m->type = type;
    m->training = true;
    m->n_params = m->n_buffers = m->n_modules = m->n_generators = 0;
    m->params = m->buffers = m->modules = m->generators = NULL;
    m->cap_params = m->cap_buffers = m->cap_modules = m->cap_generators = 0;
    m->destroy = destroy;
    m->size = size;
    m->forward = NULL;
}

void *qkv_module_new(const char *type, size_t size, void (*destroy)(qkv_module *m)) {
    if (size < sizeof(qkv_module))
        return qkv_set_error("qkv_module_new: size %zu is smaller than a qkv_module", size);
    qkv_module *m = qkv__calloc(size);
    if (m) qkv_module_init(m, type, size, destroy);
    return m;
}

/* ---- Registration ------------------------------------------------------------------------ */

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *c = qkv__alloc(n);
    if (c) memcpy(c, s, n);
    return c;
}

static void free_string(char *s) {
    if (s) qkv__free(s, strlen(s) + 1);
}

static bool has_name(const qkv_module_entry *e, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(e[i].name, name) == 0) return true;
    return false;
}

static bool check_name(const qkv_module *m, const char *op, const char *name) {
    if (!name || !*name || strchr(name, '.')) {
        qkv_set_error("%s: bad name \"%s\" (non-empty, no '.')", op, name ? name : "(null)");
        return false;
    }
    if (has_name(m->params, m->n_params, name) || has_name(m->buffers, m->n_buffers, name) ||
        has_name(m->modules, m->n_modules, name) ||
        has_name(m->generators, m->n_generators, name)) {
        qkv_set_error("%s: %s already has a member named \"%s\"", op, m->type, name);
        return false;
    }
    return true;
}

/* Appends an entry with a copy of name to *list; false on allocation failure. */
static bool append(qkv_module_entry **list, int *n, int *cap, const char *name,
                   qkv_tensor *tensor, qkv_module *module) {
    size_t c = (size_t)*cap;
    if (!qkv__reserve((void **)list, &c, (size_t)*n + 1, sizeof **list)) return false;
    *cap = (int)c;
    char *copy = copy_string(name);
    if (!copy) return false;
    (*list)[(*n)++] = (qkv_module_entry){copy, tensor, module, NULL};
    return true;
}

qkv_tensor *qkv_module_add_parameter(qkv_module *m, const char *name, qkv_tensor *t) {
    if (qkv__null_object("qkv_module_add_parameter", "module", m) ||
        QKV__NULL_ARGS("qkv_module_add_parameter", t))
        return NULL;
    if (!check_name(m, "qkv_module_add_parameter", name)) return NULL;
    if (!qkv_requires_grad_(t, true)) return NULL;
    if (!append(&m->params, &m->n_params, &m->cap_params, name, t, NULL)) return NULL;
    return qkv__retain(t);
}

qkv_tensor *qkv_module_add_buffer(qkv_module *m, const char *name, qkv_tensor *t) {
    if (qkv__null_object("qkv_module_add_buffer", "module", m) ||
        QKV__NULL_ARGS("qkv_module_add_buffer", t))
        return NULL;
    if (!check_name(m, "qkv_module_add_buffer", name)) return NULL;
    if (t->grad_fn) return qkv_set_error("qkv_module_add_buffer: \"%s\" is not a leaf", name);
    if (!append(&m->buffers, &m->n_buffers, &m->cap_buffers, name, t, NULL)) return NULL;
    return qkv__retain(t);
}

void *qkv_module_add_module(qkv_module *m, const char *name, qkv_module *child) {
    if (!m || !child) {
        qkv_module_free(child);
        return NULL;
    }
    if (!check_name(m, "qkv_module_add_module", name) ||
        !append(&m->modules, &m->n_modules, &m->cap_modules, name, NULL, child)) {
        qkv_module_free(child);
        return NULL;
    }
    return child;
}

bool qkv_module_add_generator(qkv_module *m, const char *name, qkv_generator *g) {
    if (qkv__null_object("qkv_module_add_generator", "module", m) ||
        qkv__null_object("qkv_module_add_generator", "generator", g))
        return false;
    if (!check_name(m, "qkv_module_add_generator", name) ||
        !append(&m->generators, &m->n_generators, &m->cap_generators, name, NULL, NULL))
        return false;
    m->generators[m->n_generators - 1].generator = g;
    return true;
}

/* ---- Freeing and modes ------------------------------------------------------------------- */

static void free_entries(qkv_module_entry *e, int n, int cap) {
    for (int i = 0; i < n; i++) {
        free_string(e[i].name);
        qkv__release(e[i].tensor);
        qkv_module_free(e[i].module);
    }
    if (e) qkv__free(e, (size_t)cap * sizeof *e);
}

void qkv_module_free(qkv_module *m) {
    if (!m) return;
    if (m->destroy) m->destroy(m);
    free_entries(m->params, m->n_params, m->cap_params);
    free_entries(m->buffers, m->n_buffers, m->cap_buffers);
    free_entries(m->modules, m->n_modules, m->cap_modules);
    free_entries(m->generators, m->n_generators, m->cap_generators);
    qkv__free(m, m->size);
}

void qkv_module_train(qkv_module *m, bool training) {
    if (qkv__null_object("qkv_module_train", "module", m)) return;
    m->training = training;
    for (int i = 0; i < m->n_modules; i++) qkv_module_train(m->modules[i].module, training);
}

qkv_tensor *qkv_module_forward(qkv_module *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_module_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_module_forward", x))
        return NULL;
    if (!m->forward)
        return qkv_set_error("qkv_module_forward: a %s module has no one-input forward",
                             m->type);
    qkv_module_call_begin(m);
    return qkv_module_call_end(m, m->forward(m, x));
}

/* ---- Calls ------------------------------------------------------------------------------- */

/* The thread's running module calls, beside its scope stack; past QKV_CALL_DEPTH only
 * counted. In anomaly mode each call also names itself to autograd (sited). */
static _Thread_local qkv_module *calls[QKV_CALL_DEPTH];
static _Thread_local bool sited[QKV_CALL_DEPTH];
static _Thread_local int n_calls;

/* The dotted path of child under parent ("linear2", or "layers.0" through a container that
 * is never called itself), found depth first; false if child is not there. */
static bool path_below(const qkv_module *parent, const qkv_module *child, char *buf,
                       size_t size, int depth) {
    for (int i = 0; i < parent->n_modules; i++) {
        const qkv_module *c = parent->modules[i].module;
        const char *name = parent->modules[i].name;
        if (c == child) return snprintf(buf, size, "%s", name) < (int)size;
        if (depth > 0) {
            int w = snprintf(buf, size, "%s.", name);
            if (w > 0 && (size_t)w < size &&
                path_below(c, child, buf + w, size - (size_t)w, depth - 1))
                return true;
        }
    }
    return false;
}

void qkv_module_call_begin(qkv_module *m) {
    bool site = qkv_is_anomaly_enabled() && n_calls < QKV_CALL_DEPTH;
    if (site) {
        char name[64] = "";
        if (n_calls > 0 && calls[n_calls - 1] && m &&
            !path_below(calls[n_calls - 1], m, name, sizeof name, 2))
            snprintf(name, sizeof name, "(%s)", m->type);
        qkv__site_push(name);
    }
    if (n_calls < QKV_CALL_DEPTH) {
        calls[n_calls] = m;
        sited[n_calls] = site;
    }
    n_calls++;
    qkv_scope_begin();
}

qkv_tensor *qkv_module_call_end(qkv_module *m, qkv_tensor *out) {
    (void)m;
    if (n_calls > 0 && --n_calls < QKV_CALL_DEPTH && sited[n_calls]) qkv__site_pop();
    return qkv_scope_end_keep(out);
}

qkv_module *const *qkv_module_calls(int *n) {
    if (n) *n = n_calls < QKV_CALL_DEPTH ? n_calls : QKV_CALL_DEPTH;
    return calls;
}

/* ---- Listing ----------------------------------------------------------------------------- */

/* The listing is built in two passes: count the entries (an upper bound when shared tensors
 * are skipped), fill arrays of that size, then move the names and tensors into arrays of
 * exactly n entries, so that freeing needs no stored capacity. */
typedef struct list_builder {
    int n, cap;
    char **names;
    qkv_tensor **tensors;
    bool unique; /* skip a tensor already listed (a shared parameter) */
} list_builder;

static int count_entries(const qkv_module *m, bool buffers) {
    int n = m->n_params + (buffers ? m->n_buffers : 0);
    for (int i = 0; i < m->n_modules; i++) n += count_entries(m->modules[i].module, buffers);
    return n;
}

static bool listed(const list_builder *b, const qkv_tensor *t) {
    for (int i = 0; i < b->n; i++)
        if (b->tensors[i] == t) return true;
    return false;
}

static char *join(const char *prefix, const char *name, const char *suffix) {
    size_t np = strlen(prefix), nn = strlen(name), ns = strlen(suffix) + 1;
    char *s = qkv__alloc(np + nn + ns);
    if (!s) return NULL;
    memcpy(s, prefix, np);
    memcpy(s + np, name, nn);
    memcpy(s + np + nn, suffix, ns);
    return s;
}

static bool push(list_builder *b, const char *prefix, const char *name, qkv_tensor *t) {
    if (b->unique && listed(b, t)) return true;
    char *full = join(prefix, name, "");
    if (!full) return false;
    b->names[b->n] = full;
    b->tensors[b->n++] = t;
    return true;
}

/* Depth first, as PyTorch's state_dict: own parameters, own buffers, then each submodule. */
static bool collect(list_builder *b, const qkv_module *m, const char *prefix, bool buffers) {
    for (int i = 0; i < m->n_params; i++)
        if (!push(b, prefix, m->params[i].name, m->params[i].tensor)) return false;
    for (int i = 0; buffers && i < m->n_buffers; i++)
        if (!push(b, prefix, m->buffers[i].name, m->buffers[i].tensor)) return false;
    for (int i = 0; i < m->n_modules; i++) {
        char *sub = join(prefix, m->modules[i].name, ".");
        if (!sub) return false;
        bool ok = collect(b, m->modules[i].module, sub, buffers);
        free_string(sub);
        if (!ok) return false;
    }
    return true;
}

static qkv_named_list *build_list(const qkv_module *m, bool buffers, bool unique) {
    if (!m) return NULL;
    list_builder b = {0, count_entries(m, buffers), NULL, NULL, unique};
    qkv_named_list *l = qkv__calloc(sizeof *l);
    b.names = qkv__alloc((size_t)b.cap * sizeof *b.names);
    b.tensors = qkv__alloc((size_t)b.cap * sizeof *b.tensors);
    bool ok = l && b.names && b.tensors && collect(&b, m, "", buffers);
    if (ok) {
        l->names = qkv__alloc((size_t)b.n * sizeof *l->names);
        l->tensors = qkv__alloc((size_t)b.n * sizeof *l->tensors);
        ok = l->names && l->tensors;
    }
    if (ok) {
        memcpy(l->names, b.names, (size_t)b.n * sizeof *l->names);
        memcpy(l->tensors, b.tensors, (size_t)b.n * sizeof *l->tensors);
        l->n = b.n;
    } else {
        for (int i = 0; i < b.n; i++) free_string(b.names[i]);
        if (l && l->names) qkv__free(l->names, (size_t)b.n * sizeof *l->names);
        if (l && l->tensors) qkv__free(l->tensors, (size_t)b.n * sizeof *l->tensors);
        if (l) qkv__free(l, sizeof *l);
        l = NULL;
    }
    if (b.names) qkv__free(b.names, (size_t)b.cap * sizeof *b.names);
    if (b.tensors) qkv__free(b.tensors, (size_t)b.cap * sizeof *b.tensors);
    return l;
}

qkv_named_list *qkv_module_parameters(const qkv_module *m) {
    return build_list(m, false, true);
}

qkv_named_list *qkv_module_state(const qkv_module *m) {
    return build_list(m, true, false);
}

void qkv_named_list_free(qkv_named_list *l) {
    if (!l) return;
    for (int i = 0; i < l->n; i++) free_string(l->names[i]);
    if (l->names) qkv__free(l->names, (size_t)l->n * sizeof *l->names);
    if (l->tensors) qkv__free(l->tensors, (size_t)l->n * sizeof *l->tensors);
    qkv__free(l, sizeof *l);
}

int64_t qkv_module_num_parameters(const qkv_module *m) {
    qkv_named_list *l = qkv_module_parameters(m);
    if (!l) return -1;
    int64_t n = 0;
    for (int i = 0; i < l->n; i++) n += l->tensors[i]->numel;
    qkv_named_list_free(l);
    return n;
}

/* ---- Dtype and gradients ----------------------------------------------------------------- */

/* Gives t a fresh contiguous storage of dtype with its values converted. The tensor object
 * stays the same, so every pointer a module holds to it stays valid. Its gradient is dropped.
 * The new storage continues the old one's version, one further: a graph node that kept t
 * sees it changed in place (views of the old storage keep the old values and version). */
static bool convert_in_place(qkv_tensor *t, qkv_dtype dtype) {
    if (t->dtype == dtype || !qkv__is_float(t->dtype)) return true;
    qkv_scope_begin();
    qkv_tensor *c = qkv__to_dtype(t, dtype);
    if (c) {
        c->storage->version = t->storage->version + 1;
        c->storage->refcount++;
        qkv__storage_release(t->storage);
        t->storage = c->storage;
        t->dtype = dtype;
        t->offset = c->offset;
        memcpy(t->strides, c->strides, sizeof t->strides);
        qkv_zero_grad(t);
    }
    qkv_scope_end();
    return c != NULL;
}

bool qkv_module_to_dtype(qkv_module *m, qkv_dtype dtype) {
    if (qkv__null_object("qkv_module_to_dtype", "module", m)) return false;
    if (!qkv__is_float(dtype)) {
        qkv_set_error("qkv_module_to_dtype: %s is not a floating dtype", qkv_dtype_name(dtype));
        return false;
    }
    qkv_named_list *l = qkv_module_state(m);
    if (!l) return false;
    bool ok = true;
    for (int i = 0; i < l->n && ok; i++) ok = convert_in_place(l->tensors[i], dtype);
    qkv_named_list_free(l);
    return ok;
}

void qkv_module_zero_grad(qkv_module *m) {
    if (qkv__null_object("qkv_module_zero_grad", "module", m)) return;
    for (int i = 0; i < m->n_params; i++) qkv_zero_grad(m->params[i].tensor);
    for (int i = 0; i < m->n_modules; i++) qkv_module_zero_grad(m->modules[i].module);
}

/* ---- Generators -------------------------------------------------------------------------- */

static bool collect_generators(qkv_generator_list *l, const qkv_module *m, const char *prefix) {
    for (int i = 0; i < m->n_generators; i++) {
        size_t cap = (size_t)l->cap;
        if (!qkv__reserve((void **)&l->items, &cap, (size_t)l->n + 1, sizeof *l->items))
            return false;
        l->cap = (int)cap;
        char *full = join(prefix, m->generators[i].name, "");
        if (!full) return false;
        l->items[l->n++] = (qkv_named_generator){full, m->generators[i].generator};
    }
    for (int i = 0; i < m->n_modules; i++) {
        char *sub = join(prefix, m->modules[i].name, ".");
        if (!sub) return false;
        bool ok = collect_generators(l, m->modules[i].module, sub);
        free_string(sub);
        if (!ok) return false;
    }
    return true;
}

qkv_generator_list *qkv_module_generators(const qkv_module *m) {
    if (qkv__null_object("qkv_module_generators", "module", m)) return NULL;
    qkv_generator_list *l = qkv__calloc(sizeof *l);
    if (l && !collect_generators(l, m, "")) {
        qkv_generator_list_free(l);
        return NULL;
    }
    return l;
}

void qkv_generator_list_free(qkv_generator_list *l) {
    if (!l) return;
    for (int i = 0; i < l->n; i++) free_string(l->items[i].name);
    if (l->items) qkv__free(l->items, (size_t)l->cap * sizeof *l->items);
    qkv__free(l, sizeof *l);
}
