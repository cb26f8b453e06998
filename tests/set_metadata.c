/* Rewrites a checkpoint with some metadata values changed, as anyone with a safetensors
 * library can (the checksum is made anew): `set_metadata IN OUT KEY=VALUE...`. The tests use
 * it to make files whose settings lie about their tensors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

#define MAX_ENTRIES 4096

static bool listed(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; p && *p;) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return true;
        p = eol ? eol + 1 : p + len;
    }
    return false;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: set_metadata IN OUT KEY=VALUE...\n");
        return 2;
    }
    qkv_scope_begin();
    qkv_safetensors *f = qkv_safetensors_read(argv[1]);
    int n = qkv_safetensors_count(f), nm = qkv_safetensors_meta_count(f);
    if (!f || n > MAX_ENTRIES || nm + argc > MAX_ENTRIES) {
        fprintf(stderr, "set_metadata: %s\n", f ? "too many entries" : qkv_error());
        return 1;
    }
    static char *names[MAX_ENTRIES];
    static qkv_tensor *tensors[MAX_ENTRIES];
    static qkv_named_bytes bytes[MAX_ENTRIES];
    static const char *extra_names[MAX_ENTRIES];
    static qkv_tensor *extra_tensors[MAX_ENTRIES];
    static qkv_meta_pair meta[MAX_ENTRIES];
    const char *extras = qkv_safetensors_meta(f, "qkv.extras");
    qkv_named_list list = {0, names, tensors};
    qkv_checkpoint_contents x = {.tensor_names = extra_names, .tensors = extra_tensors,
                                 .bytes = bytes, .meta = meta};
    bool ok = true;
    for (int i = 0; ok && i < n; i++) {
        const char *name = qkv_safetensors_name(f, i);
        int64_t shape[QKV_MAX_DIMS];
        bool one_dim = qkv_safetensors_shape(f, name, shape) == 1;
        const void *data = listed(extras, name) && one_dim
                               ? qkv_safetensors_bytes(f, name, &bytes[x.n_bytes].size)
                               : NULL;
        if (data) { /* a byte extra (vocabulary, labels) */
            bytes[x.n_bytes].name = name;
            bytes[x.n_bytes++].data = data;
        } else if (listed(extras, name)) { /* a tensor extra (an optimizer's state) */
            qkv_clear_error();
            extra_names[x.n_tensors] = name;
            ok = (extra_tensors[x.n_tensors++] = qkv_safetensors_tensor(f, name)) != NULL;
        } else {
            names[list.n] = (char *)name;
            ok = (tensors[list.n++] = qkv_safetensors_tensor(f, name)) != NULL;
        }
    }
    for (int i = 0; i < nm; i++) {
        const char *key = qkv_safetensors_meta_key(f, i);
        if (strncmp(key, "qkv.", 4))
            meta[x.n_meta++] = (qkv_meta_pair){key, qkv_safetensors_meta(f, key)};
    }
    for (int a = 3; a < argc; a++) {
        char *eq = strchr(argv[a], '=');
        if (!eq) continue;
        *eq = '\0';
        int k = 0;
        while (k < x.n_meta && strcmp(meta[k].key, argv[a])) k++;
        meta[k] = (qkv_meta_pair){argv[a], eq + 1};
        if (k == x.n_meta) x.n_meta++;
    }
    ok = ok && qkv_safetensors_write(argv[2], &list, &x);
    if (!ok) fprintf(stderr, "set_metadata: %s\n", qkv_error());
    qkv_safetensors_free(f);
    qkv_scope_end();
    return ok ? 0 : 1;
}
