/*
 * libFuzzer target: any bytes offered as a safetensors file are either refused with a message
 * or give a file whose every tensor, byte blob and metadata value reads back within bounds,
 * and which a module loads (partially, and strictly) or refuses with a message.
 */
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

static void read_everything(const qkv_safetensors *f) {
    qkv_scope_begin();
    for (int i = 0; i < qkv_safetensors_count(f); i++) {
        const char *name = qkv_safetensors_name(f, i);
        qkv_clear_error();
        qkv_tensor *t = qkv_safetensors_tensor(f, name);
        if (!t && !qkv_error()) abort();
        if (t && t->numel > 0) {
            /* touch the first and last elements */
            (void)qkv_get(t, (int64_t[QKV_MAX_DIMS]){0});
        }
        size_t n = 0;
        qkv_clear_error();
        const unsigned char *b = qkv_safetensors_bytes(f, name, &n);
        if (b && n) {
            volatile unsigned char sink = b[0] ^ b[n - 1];
            (void)sink;
        }
    }
    for (int i = 0; i < qkv_safetensors_meta_count(f); i++) {
        const char *key = qkv_safetensors_meta_key(f, i);
        if (!key || !qkv_safetensors_meta(f, key)) abort();
    }
    qkv_scope_end();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static qkv_linear *model;
    if (!model) model = qkv_linear_new(2, 2, true, &(qkv_generator){0});
    qkv_clear_error();
    qkv_safetensors *f = qkv_safetensors_from_bytes(data, size, "fuzz.safetensors");
    if (!f) {
        if (!qkv_error()) abort();
        return 0;
    }
    read_everything(f);
    qkv_clear_error();
    qkv_load_options partial = {.partial = true};
    if (!qkv_module_load_safetensors(QKV_MODULE(model), f, &partial) && !qkv_error()) abort();
    qkv_clear_error();
    /* strict */
    if (!qkv_module_load_safetensors(QKV_MODULE(model), f, NULL) && !qkv_error()) abort();
    qkv_safetensors_free(f);
    return 0;
}
