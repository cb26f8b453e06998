/*
 * A module's checkpoint: its parameters and buffers under their dotted names in one
 * safetensors file, with the caller's extras beside them. Loading checks every name, dtype and
 * shape before it changes anything, so a failed load leaves the module as it was.
 */
#include <string.h>

#include "io/io_internal.h"
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

bool qkv_module_save(const qkv_module *m, const char *path,
                     const qkv_checkpoint_contents *extras) {
    if (!m) return false;
    qkv_named_list *state = qkv_module_state(m);
    bool ok = state && qkv_safetensors_write(path, state, extras);
    qkv_named_list_free(state);
    return ok;
}

static bool same_kind(qkv_dtype a, qkv_dtype b) {
    return a == b || (qkv__is_float(a) && qkv__is_float(b));
}

/* The module's entry `name` against the file's: present, same shape, compatible dtype. */
static bool check_one(const qkv_safetensors *f, const char *name, const qkv_tensor *t,
                      bool partial, bool *present) {
    const char *path = qkv__safetensors_path(f);
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    qkv_dtype dtype;
    *present = qkv__safetensors_info(f, name, &ndim, shape, &dtype);
    if (!*present) {
        if (!partial) qkv_set_error("qkv_module_load: %s: no tensor \"%s\" in the file", path,
                                    name);
        return partial;
    }
    char want[128], got[128];
    qkv_shape_str(t, want, sizeof want);
    qkv_tensor view = {.ndim = ndim};
    memcpy(view.shape, shape, sizeof shape);
    qkv_shape_str(&view, got, sizeof got);
    if (ndim != t->ndim || memcmp(shape, t->shape, (size_t)ndim * sizeof *shape)) {
        qkv_set_error("qkv_module_load: %s: \"%s\" is %s in the file but %s in the model", path,
                      name, got, want);
        return false;
    }
    if (!same_kind(dtype, t->dtype)) {
        qkv_set_error("qkv_module_load: %s: \"%s\" is %s in the file but %s in the model", path,
                      name, qkv_dtype_name(dtype), qkv_dtype_name(t->dtype));
        return false;
    }
    return true;
}

static bool in_list(const qkv_named_list *l, const char *name) {
    for (int i = 0; i < l->n; i++)
        if (strcmp(l->names[i], name) == 0) return true;
    return false;
}

/* Every tensor of the file belongs to the model or was saved as an extra. */
static bool check_unexpected(const qkv_safetensors *f, const qkv_named_list *state) {
    int unexpected = 0;
    const char *first = NULL;
    for (int i = 0; i < qkv_safetensors_count(f); i++) {
        const char *name = qkv_safetensors_name(f, i);
        if (in_list(state, name) || qkv__safetensors_is_extra(f, name)) continue;
        if (!unexpected++) first = name;
    }
    if (unexpected)
        qkv_set_error("qkv_module_load: %s: the model has no \"%s\" (%d unexpected tensor%s in "
                      "the file)", qkv__safetensors_path(f), first, unexpected,
                      unexpected == 1 ? "" : "s");
    return unexpected == 0;
}

bool qkv_module_load_safetensors(qkv_module *m, const qkv_safetensors *f,
                                 const qkv_load_options *opts) {
    if (!m || !f) return false;
    bool partial = opts && opts->partial;
    qkv_named_list *state = qkv_module_state(m);
    if (!state) return false;
    bool *present = qkv__calloc((size_t)(state->n ? state->n : 1) * sizeof *present);
    bool ok = present != NULL;
    for (int i = 0; ok && i < state->n; i++)
        ok = check_one(f, state->names[i], state->tensors[i], partial, &present[i]);
    ok = ok && (partial || check_unexpected(f, state));
    /* Read everything first: a failure there (memory, a bad BOOL byte) changes nothing. */
    qkv_scope_begin();
    qkv_tensor **read = ok ? qkv__calloc((size_t)(state->n ? state->n : 1) * sizeof *read)
                           : NULL;
    ok = ok && read;
    for (int i = 0; ok && i < state->n; i++)
        if (present[i]) ok = (read[i] = qkv_safetensors_tensor(f, state->names[i])) != NULL;
    for (int i = 0; ok && i < state->n; i++)
        if (present[i]) ok = qkv_copy_(state->tensors[i], read[i]);
    if (read) qkv__free(read, (size_t)(state->n ? state->n : 1) * sizeof *read);
    qkv_scope_end();
    if (present) qkv__free(present, (size_t)(state->n ? state->n : 1) * sizeof *present);
    qkv_named_list_free(state);
    return ok;
}

bool qkv_module_load(qkv_module *m, const char *path, const qkv_load_options *opts) {
    if (!m) return false;
    qkv_safetensors *f = qkv_safetensors_read(path);
    bool ok = f && qkv_module_load_safetensors(m, f, opts);
    qkv_safetensors_free(f);
    return ok;
}
