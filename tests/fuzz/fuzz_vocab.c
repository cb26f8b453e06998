/*
 * libFuzzer target: any bytes offered as a serialized vocabulary or label set are either
 * refused with a message or loaded into an object that serializes back to the same bytes and
 * maps every id to a name and back.
 */
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qkv_clear_error();
    qkv_vocab *v = qkv_vocab_from_bytes(data, size);
    if (v) {
        uint8_t *out = malloc(size ? size : 1);
        if (!out || qkv_vocab_to_bytes(v, out, size) != size || memcmp(out, data, size)) abort();
        for (int64_t i = 0; i < qkv_vocab_size(v); i++)
            if (qkv_vocab_id(v, qkv_vocab_token(v, i)) != i) abort();
        free(out);
        qkv_vocab_free(v);
    } else if (!qkv_error()) {
        abort();
    }
    qkv_clear_error();
    qkv_labels *l = qkv_labels_from_bytes(data, size);
    if (l) {
        uint8_t *out = malloc(size ? size : 1);
        if (!out || qkv_labels_to_bytes(l, out, size) != size || memcmp(out, data, size)) abort();
        free(out);
        for (int64_t i = 0; i < qkv_labels_size(l); i++)
            if (qkv_labels_id(l, qkv_labels_name(l, i)) != i) abort();
        qkv_labels_free(l);
    } else if (!qkv_error()) {
        abort();
    }
    return 0;
}
