/*
 * libFuzzer target: a TSV file of any bytes goes through the reader, both tokenizers, the
 * vocabulary and label builders, encoding and the byte serializations. Anything the reader
 * accepts must survive the whole pipeline, and a serialization must load back to the same
 * bytes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qkv.h"

static char path[64];

static void write_input(const uint8_t *data, size_t size) {
    if (!path[0]) {
        strcpy(path, "/tmp/qkv-fuzz-tsv-XXXXXX");
        int fd = mkstemp(path);
        if (fd < 0) abort();
        close(fd);
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size) abort();
    fclose(f);
}

static void check_vocab_round_trip(const qkv_vocab *v) {
    size_t n = qkv_vocab_to_bytes(v, NULL, 0);
    uint8_t *buf = malloc(n), *again = malloc(n);
    if (!buf || !again || qkv_vocab_to_bytes(v, buf, n) != n) abort();
    qkv_vocab *back = qkv_vocab_from_bytes(buf, n);
    if (!back || qkv_vocab_to_bytes(back, again, n) != n || memcmp(buf, again, n)) abort();
    qkv_vocab_free(back);
    free(buf);
    free(again);
}

static void check_labels_round_trip(const qkv_labels *l) {
    size_t n = qkv_labels_to_bytes(l, NULL, 0);
    uint8_t *buf = malloc(n), *again = malloc(n);
    if (!buf || !again || qkv_labels_to_bytes(l, buf, n) != n) abort();
    qkv_labels *back = qkv_labels_from_bytes(buf, n);
    if (!back || qkv_labels_to_bytes(back, again, n) != n || memcmp(buf, again, n)) abort();
    for (int64_t i = 0; i < qkv_labels_size(back); i++)
        if (qkv_labels_id(back, qkv_labels_name(back, i)) != i) abort();
    qkv_labels_free(back);
    free(buf);
    free(again);
}

static void run_pipeline(const qkv_tsv *tsv, qkv_tokenizer kind) {
    for (int64_t i = 0; i < tsv->n; i++) qkv_tokens_free(qkv_tokenize(kind, tsv->texts[i]));
    qkv_vocab *v = qkv_vocab_build(kind, tsv->texts, tsv->n, 1, 64);
    qkv_labels *l = qkv_labels_build(tsv->labels, tsv->n);
    if (!v || !l) abort();
    check_vocab_round_trip(v);
    check_labels_round_trip(l);
    qkv_scope_begin();
    qkv_dataset *ds = qkv_dataset_new(v, tsv->texts, l, tsv->labels, tsv->n);
    if (!ds) abort();
    int64_t idx[4] = {0, 0, 0, 0};
    int64_t nb = tsv->n < 4 ? tsv->n : 4;
    for (int64_t i = 0; i < nb; i++) idx[i] = tsv->n - 1 - i;
    qkv_batch b = qkv_dataset_batch(ds, idx, nb, 16);
    if (nb > 0 && !b.ids) abort();
    qkv_dataset_free(ds);
    qkv_scope_end();
    qkv_labels_free(l);
    qkv_vocab_free(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    write_input(data, size);
    qkv_clear_error();
    qkv_tsv *tsv = qkv_tsv_read(path);
    if (!tsv) {
        if (!qkv_error()) abort(); /* a refusal always says why */
        return 0;
    }
    run_pipeline(tsv, QKV_TOKENIZE_WORDS);
    run_pipeline(tsv, QKV_TOKENIZE_CHARS);
    qkv_tsv_free(tsv);
    return 0;
}
