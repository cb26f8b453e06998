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
    if (qkv__null_object("qkv_module_save", "module", m)) return false;
    qkv_named_list *state = qkv_module_state(m);
    bool ok = state && qkv_safetensors_write(path, state, extras);
    qkv_named_list_free(state);
    return ok;
}

static bool same_kind(qkv_dtype a, qkv_dtype b) {
    return a == b || (qkv__is_float(a) && qkv__is_float(b));
}

/* Where a module entry's values are in the file: a tensor of its own name, or with
 * split_in_proj one third (part 0, 1, 2 for q, k, v) of a packed in_proj tensor, or
 * PyTorch's separate X_proj_weight. name NULL: not in the file. */
typedef struct source {
    const char *name;
    int part; /* -1: the whole tensor */
} source;

static bool file_has(const qkv_safetensors *f, const char *name) {
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    qkv_dtype dtype;
    return qkv__safetensors_info(f, name, &ndim, shape, &dtype);
}

/* The name in the file that PyTorch's nn.MultiheadAttention gives entry `name` ("P.k_proj.bias"
 * -> "P.in_proj_bias", part 1; "P.k_proj.weight" -> "P.k_proj_weight" or "P.in_proj_weight"),
 * written into buf; false when name is no projection entry or the file has neither. */
static bool packed_source(const qkv_safetensors *f, const char *name, char *buf, size_t size,
                          source *src) {
    static const char *const kinds[2] = {"weight", "bias"};
    size_t n = strlen(name);
    for (int part = 0; part < 3; part++) {
        for (int kind = 0; kind < 2; kind++) {
            char suffix[32];
            int w = snprintf(suffix, sizeof suffix, "%c_proj.%s", "qkv"[part], kinds[kind]);
            size_t ns = (size_t)w, np = n - ns;
            if (n < ns || strcmp(name + np, suffix) || (np > 0 && name[np - 1] != '.')) continue;
            if (kind == 0 && snprintf(buf, size, "%.*s%c_proj_weight", (int)np, name,
                                      "qkv"[part]) < (int)size && file_has(f, buf)) {
                *src = (source){buf, -1};
                return true;
            }
            if (snprintf(buf, size, "%.*sin_proj_%s", (int)np, name, kinds[kind]) < (int)size &&
                file_has(f, buf)) {
                *src = (source){buf, part};
                return true;
            }
            return false;
        }
    }
    return false;
}

static source find_source(const qkv_safetensors *f, const char *name, bool split, char *buf,
                          size_t size) {
    source src = {NULL, -1};
    if (file_has(f, name)) src.name = name;
    else if (split) packed_source(f, name, buf, size, &src);
    return src;
}

/* The module's entry `name` against its source in the file: same shape (a third of the rows
 * for a part), compatible dtype. */
static bool check_one(const qkv_safetensors *f, const char *name, const qkv_tensor *t,
                      source src) {
    const char *path = qkv__safetensors_path(f);
    qkv_tensor file = {0};
    qkv_dtype dtype;
    qkv__safetensors_info(f, src.name, &file.ndim, file.shape, &dtype);
    qkv_tensor want = *t;
    if (src.part >= 0 && want.ndim > 0) want.shape[0] *= 3;
    char ws[128], gs[128];
    qkv_shape_str(&want, ws, sizeof ws);
    qkv_shape_str(&file, gs, sizeof gs);
    if (file.ndim != want.ndim || memcmp(file.shape, want.shape,
                                         (size_t)want.ndim * sizeof *want.shape)) {
        qkv_set_error("qkv_module_load: %s: \"%s\" is %s in the file but %s in the model%s",
                      path, src.name, gs, ws, src.part >= 0 ? " (3 packed)" : "");
        return false;
    }
    if (!same_kind(dtype, t->dtype)) {
        qkv_set_error("qkv_module_load: %s: \"%s\" is %s in the file but %s in the model", path,
                      src.name, qkv_dtype_name(dtype), qkv_dtype_name(t->dtype));
        return false;
    }
    (void)name;
    return true;
}

/* ---- The names a load found, and the report ----------------------------------------------- */

static void free_names(char **names, int n) {
    for (int i = 0; i < n; i++) qkv__free(names[i], strlen(names[i]) + 1);
    if (names) qkv__free(names, (size_t)(n ? n : 1) * sizeof *names);
}

void qkv_load_report_free(qkv_load_report *r) {
    if (!r) return;
    free_names(r->missing, r->n_missing);
    free_names(r->unexpected, r->n_unexpected);
    *r = (qkv_load_report){0};
}

/* Copies of the names picked by want[i] out of names[0..n), in an array of exactly *count. */
static char **copy_names(const char *const *names, const bool *want, int n, int *count) {
    int picked = 0;
    for (int i = 0; i < n; i++) picked += want[i];
    *count = 0;
    char **out = qkv__calloc((size_t)(picked ? picked : 1) * sizeof *out);
    for (int i = 0; out && i < n; i++) {
        if (!want[i]) continue;
        size_t len = strlen(names[i]) + 1;
        if (!(out[*count] = qkv__alloc(len))) {
            for (int j = 0; j < *count; j++) qkv__free(out[j], strlen(out[j]) + 1);
            qkv__free(out, (size_t)(picked ? picked : 1) * sizeof *out);
            *count = 0;
            return NULL;
        }
        memcpy(out[(*count)++], names[i], len);
    }
    return out;
}

/* Appends "\"a\", \"b\"" for the picked names to msg, stopping with "..." when it is full. */
static void append_names(char *msg, size_t size, const char *const *names, const bool *want,
                         int n) {
    bool first = true;
    for (int i = 0; i < n; i++) {
        if (!want[i]) continue;
        size_t used = strlen(msg);
        if (used + strlen(names[i]) + 8 >= size) {
            snprintf(msg + used, size - used, ", ...");
            return;
        }
        snprintf(msg + used, size - used, "%s\"%s\"", first ? "" : ", ", names[i]);
        first = false;
    }
}

/* The load's findings: which module entries have no source, which file tensors nobody reads
 * (the extras saved with the module aside). */
typedef struct findings {
    int n_entries, n_file;
    bool *missing;      /* per module entry */
    bool *unexpected;   /* per file tensor */
    const char **file_names;
    int count_missing, count_unexpected;
} findings;

static void findings_free(findings *fd) {
    if (fd->missing) qkv__free(fd->missing, (size_t)(fd->n_entries + 1) * sizeof(bool));
    if (fd->unexpected) qkv__free(fd->unexpected, (size_t)(fd->n_file + 1) * sizeof(bool));
    if (fd->file_names)
        qkv__free(fd->file_names, (size_t)(fd->n_file + 1) * sizeof *fd->file_names);
}

static bool findings_init(findings *fd, const qkv_safetensors *f, int n_entries) {
    *fd = (findings){.n_entries = n_entries, .n_file = qkv_safetensors_count(f)};
    fd->missing = qkv__calloc((size_t)(n_entries + 1) * sizeof(bool));
    fd->unexpected = qkv__calloc((size_t)(fd->n_file + 1) * sizeof(bool));
    fd->file_names = qkv__calloc((size_t)(fd->n_file + 1) * sizeof *fd->file_names);
    if (!fd->missing || !fd->unexpected || !fd->file_names) return false;
    for (int i = 0; i < fd->n_file; i++) {
        fd->file_names[i] = qkv_safetensors_name(f, i);
        fd->unexpected[i] = !qkv__safetensors_is_extra(f, fd->file_names[i]);
    }
    return true;
}

static void mark_used(findings *fd, const char *name) {
    for (int i = 0; i < fd->n_file; i++)
        if (strcmp(fd->file_names[i], name) == 0) fd->unexpected[i] = false;
}

static void count_findings(findings *fd) {
    for (int i = 0; i < fd->n_entries; i++) fd->count_missing += fd->missing[i];
    for (int i = 0; i < fd->n_file; i++) fd->count_unexpected += fd->unexpected[i];
}

static bool fill_report(qkv_load_report *r, const findings *fd, const qkv_named_list *state) {
    *r = (qkv_load_report){0};
    r->missing = copy_names((const char *const *)state->names, fd->missing, fd->n_entries,
                            &r->n_missing);
    r->unexpected = copy_names(fd->file_names, fd->unexpected, fd->n_file, &r->n_unexpected);
    if (r->missing && r->unexpected) return true;
    qkv_load_report_free(r);
    return false;
}

/* One error naming every missing and unexpected tensor (as many as the message holds). */
static void report_error(const qkv_safetensors *f, const findings *fd,
                         const qkv_named_list *state) {
    char msg[900] = "";
    if (fd->count_missing) {
        snprintf(msg, sizeof msg, "%d missing from the file (", fd->count_missing);
        append_names(msg, sizeof msg - 40, (const char *const *)state->names, fd->missing,
                     fd->n_entries);
        strcat(msg, ")");
    }
    if (fd->count_unexpected) {
        size_t used = strlen(msg);
        snprintf(msg + used, sizeof msg - used, "%s%d unexpected in the file (",
                 fd->count_missing ? "; " : "", fd->count_unexpected);
        append_names(msg, sizeof msg - 4, fd->file_names, fd->unexpected, fd->n_file);
        strcat(msg, ")");
    }
    qkv_set_error("qkv_module_load: %s: %s", qkv__safetensors_path(f), msg);
}

/* ---- Loading ----------------------------------------------------------------------------- */

/* Finds and checks every entry's source, marking what is missing and what is read. */
static bool match_entries(const qkv_safetensors *f, const qkv_named_list *state, bool split,
                          source *srcs, char (*bufs)[256], findings *fd) {
    for (int i = 0; i < state->n; i++) {
        srcs[i] = find_source(f, state->names[i], split, bufs[i], sizeof bufs[i]);
        fd->missing[i] = srcs[i].name == NULL;
        if (!srcs[i].name) continue;
        mark_used(fd, srcs[i].name);
        if (!check_one(f, state->names[i], state->tensors[i], srcs[i])) return false;
    }
    count_findings(fd);
    return true;
}

/* Reads everything first: a failure there (memory, a bad BOOL byte) changes nothing. */
static bool copy_in(const qkv_safetensors *f, const qkv_named_list *state, const source *srcs) {
    qkv_scope_begin();
    size_t size = (size_t)(state->n ? state->n : 1) * sizeof(qkv_tensor *);
    qkv_tensor **read = qkv__calloc(size);
    bool ok = read != NULL;
    for (int i = 0; ok && i < state->n; i++) {
        if (!srcs[i].name) continue;
        read[i] = qkv_safetensors_tensor(f, srcs[i].name);
        if (read[i] && srcs[i].part >= 0) {
            int64_t rows = state->tensors[i]->shape[0];
            read[i] = qkv_narrow(read[i], 0, srcs[i].part * rows, rows);
        }
        ok = read[i] != NULL;
    }
    for (int i = 0; ok && i < state->n; i++)
        if (srcs[i].name) ok = qkv_copy_(state->tensors[i], read[i]);
    if (read) qkv__free(read, size);
    qkv_scope_end();
    return ok;
}

bool qkv_module_load_safetensors(qkv_module *m, const qkv_safetensors *f,
                                 const qkv_load_options *opts) {
    static const qkv_load_options none = {0};
    const qkv_load_options *o = opts ? opts : &none;
    if (o->report) *o->report = (qkv_load_report){0};
    if (!m || !f) return false;
    qkv_named_list *state = qkv_module_state(m);
    if (!state) return false;
    findings fd;
    size_t n = (size_t)(state->n ? state->n : 1);
    source *srcs = qkv__calloc(n * sizeof *srcs);
    char (*bufs)[256] = qkv__alloc(n * sizeof *bufs);
    bool ok = findings_init(&fd, f, state->n) && srcs && bufs &&
              match_entries(f, state, o->split_in_proj, srcs, bufs, &fd);
    if (ok && o->report) ok = fill_report(o->report, &fd, state);
    if (ok && !o->partial && (fd.count_missing || fd.count_unexpected)) {
        report_error(f, &fd, state);
        ok = false;
    }
    ok = ok && copy_in(f, state, srcs);
    findings_free(&fd);
    if (srcs) qkv__free(srcs, n * sizeof *srcs);
    if (bufs) qkv__free(bufs, n * sizeof *bufs);
    qkv_named_list_free(state);
    return ok;
}

bool qkv_module_load(qkv_module *m, const char *path, const qkv_load_options *opts) {
    if (opts && opts->report) *opts->report = (qkv_load_report){0};
    if (!m) return false;
    qkv_safetensors *f = qkv_safetensors_read(path);
    bool ok = f && qkv_module_load_safetensors(m, f, opts);
    qkv_safetensors_free(f);
    return ok;
}
