/* Datasets encoded once to ids, the batches cut from them, and shuffling. */
#include "data/data_internal.h"

#include <string.h>

struct qkv_dataset {
    int64_t n;
    int64_t *starts;     /* n + 1 offsets: example i has ids[starts[i] .. starts[i + 1]) */
    int64_t *ids;
    size_t ids_cap;      /* elements */
    int64_t *labels;     /* n class ids, or NULL */
};

void qkv_dataset_free(qkv_dataset *ds) {
    if (!ds) return;
    qkv__free(ds->starts, (size_t)(ds->n + 1) * sizeof *ds->starts);
    qkv__free(ds->ids, ds->ids_cap * sizeof *ds->ids);
    qkv__free(ds->labels, (size_t)(ds->n ? ds->n : 1) * sizeof *ds->labels);
    qkv__free(ds, sizeof *ds);
}

static bool check_new_args(const qkv_vocab *vocab, const char *const *texts,
                           const qkv_labels *set, const char *const *labels, int64_t n) {
    const char *op = "qkv_dataset_new";
    if (!vocab) {
        qkv_set_error("%s: vocabulary is NULL", op);
    } else if (n < 0 || (n > 0 && !texts)) {
        qkv_set_error("%s: %lld texts at %p", op, (long long)n, (const void *)texts);
    } else if (!set != !labels) {
        qkv_set_error("%s: give both the label set and the labels, or neither", op);
    } else {
        return true;
    }
    return false;
}

static bool encode_label(qkv_dataset *ds, const qkv_labels *set, const char *const *labels,
                         int64_t i) {
    if (!labels[i]) {
        qkv_set_error("qkv_dataset_new: label %lld is NULL", (long long)i);
        return false;
    }
    ds->labels[i] = qkv_labels_id(set, labels[i]);
    if (ds->labels[i] < 0) {
        qkv_set_error("qkv_dataset_new: example %lld has label \"%s\", not in the label set",
                      (long long)i, labels[i]);
        return false;
    }
    return true;
}

qkv_dataset *qkv_dataset_new(const qkv_vocab *vocab, const char *const *texts,
                             const qkv_labels *set, const char *const *labels, int64_t n) {
    if (!check_new_args(vocab, texts, set, labels, n)) return NULL;
    qkv__buf tok = {0};
    qkv_dataset *ds = qkv__calloc(sizeof *ds);
    if (!ds) return NULL;
    ds->n = n;
    if (!(ds->starts = qkv__calloc((size_t)(n + 1) * sizeof *ds->starts))) goto fail;
    if (set && !(ds->labels = qkv__alloc((size_t)(n ? n : 1) * sizeof *ds->labels))) goto fail;
    for (int64_t i = 0; i < n; i++) {
        if (!texts[i]) {
            qkv_set_error("qkv_dataset_new: text %lld is NULL", (long long)i);
            goto fail;
        }
        int64_t k = qkv__vocab_encode_append(vocab, texts[i], &tok, &ds->ids, &ds->ids_cap,
                                             (size_t)ds->starts[i]);
        if (k < 0) goto fail;
        ds->starts[i + 1] = ds->starts[i] + k;
        if (set && !encode_label(ds, set, labels, i)) goto fail;
    }
    qkv__buf_free(&tok);
    return ds;
fail:
    qkv__buf_free(&tok);
    qkv_dataset_free(ds);
    return NULL;
}

int64_t qkv_dataset_size(const qkv_dataset *ds) {
    if (!ds) return qkv_set_error("qkv_dataset_size: dataset is NULL"), -1;
    return ds->n;
}

static bool check_batch_args(const qkv_dataset *ds, const int64_t *idx, int64_t n,
                             int64_t max_len) {
    const char *op = "qkv_dataset_batch";
    if (!ds || !idx) {
        qkv_set_error("%s: NULL argument", op);
        return false;
    }
    if (n < 1 || max_len < 1) {
        qkv_set_error("%s: batch of %lld examples of length %lld; both must be at least 1", op,
                      (long long)n, (long long)max_len);
        return false;
    }
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= ds->n) {
            qkv_set_error("%s: idx[%lld] = %lld out of range for %lld examples", op,
                          (long long)i, (long long)idx[i], (long long)ds->n);
            return false;
        }
    }
    return true;
}

static void fill_batch(const qkv_dataset *ds, const int64_t *idx, int64_t n, int64_t max_len,
                       qkv_batch *b) {
    int64_t *ids = qkv_data(b->ids);
    bool *mask = qkv_data(b->key_padding_mask);
    for (int64_t i = 0; i < n; i++) {
        int64_t start = ds->starts[idx[i]], len = ds->starts[idx[i] + 1] - start;
        if (len > max_len) len = max_len;
        int64_t *row = ids + i * max_len;
        bool *mrow = mask + i * max_len;
        memcpy(row, ds->ids + start, (size_t)len * sizeof *row);
        for (int64_t j = len; j < max_len; j++) row[j] = QKV_PAD_ID;
        for (int64_t j = 0; j < max_len; j++) mrow[j] = j >= len;
        if (b->labels) ((int64_t *)qkv_data(b->labels))[i] = ds->labels[idx[i]];
    }
}

int64_t qkv_dataset_length(const qkv_dataset *ds, int64_t i) {
    if (!ds || i < 0 || i >= ds->n) {
        qkv_set_error("qkv_dataset_length: example %lld out of range", (long long)i);
        return -1;
    }
    return ds->starts[i + 1] - ds->starts[i];
}

int64_t qkv_dataset_label(const qkv_dataset *ds, int64_t i) {
    if (!ds || !ds->labels || i < 0 || i >= ds->n) return -1;
    return ds->labels[i];
}

qkv_batch qkv_dataset_batch(const qkv_dataset *ds, const int64_t *idx, int64_t n,
                            int64_t max_len) {
    qkv_batch b = {0};
    if (!check_batch_args(ds, idx, n, max_len)) return b;
    b.ids = qkv_empty(QKV_I64, QKV_SHAPE(n, max_len));
    b.key_padding_mask = qkv_empty(QKV_BOOL, QKV_SHAPE(n, max_len));
    if (ds->labels) b.labels = qkv_empty(QKV_I64, QKV_SHAPE(n));
    if (!b.ids || !b.key_padding_mask || (ds->labels && !b.labels)) {
        if (qkv_scope_depth() == 0) { /* the caller would have owned them */
            qkv__release(b.ids);
            qkv__release(b.key_padding_mask);
            qkv__release(b.labels);
        }
        return (qkv_batch){0};
    }
    fill_batch(ds, idx, n, max_len, &b);
    return b;
}

qkv_batch qkv_dataset_batch_padded(const qkv_dataset *ds, const int64_t *idx, int64_t n,
                                   int64_t max_len) {
    if (!check_batch_args(ds, idx, n, max_len)) return (qkv_batch){0};
    int64_t longest = 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t len = ds->starts[idx[i] + 1] - ds->starts[idx[i]];
        if (len > longest) longest = len;
    }
    return qkv_dataset_batch(ds, idx, n, longest < max_len ? longest : max_len);
}

int64_t qkv_num_batches(int64_t n, int64_t batch_size) {
    if (n < 0 || batch_size < 1) {
        qkv_set_error("qkv_num_batches: %lld samples in batches of %lld; need n >= 0 and a "
                      "batch size >= 1", (long long)n, (long long)batch_size);
        return -1;
    }
    return n / batch_size + (n % batch_size != 0);
}

int64_t qkv_batch_count(int64_t n, int64_t batch_size, int64_t batch) {
    int64_t batches = qkv_num_batches(n, batch_size);
    if (batches < 0) return -1;
    if (batch < 0 || batch >= batches) {
        qkv_set_error("qkv_batch_count: batch %lld of %lld (%lld samples, batch size %lld) is "
                      "out of range", (long long)batch, (long long)batches, (long long)n,
                      (long long)batch_size);
        return -1;
    }
    int64_t left = n - batch * batch_size;
    return left < batch_size ? left : batch_size;
}

bool qkv_micro_batch_range(int64_t n, int64_t batch_size, int64_t batch, int micro_batches,
                           int micro, int64_t *first, int64_t *count) {
    int64_t batches = qkv_num_batches(n, batch_size);
    if (batches < 0) return false;
    if (!first || !count || batch < 0 || batch >= batches || micro_batches < 1 || micro < 0 ||
        micro >= micro_batches) {
        qkv_set_error("qkv_micro_batch_range: micro-batch %d of %d of batch %lld of %lld "
                      "(%lld samples, batch size %lld) is out of range", micro, micro_batches,
                      (long long)batch, (long long)batches, (long long)n,
                      (long long)batch_size);
        return false;
    }
    int64_t start = batch * batch_size;
    int64_t len = n - start < batch_size ? n - start : batch_size;
    int64_t lo = start + len * micro / micro_batches;
    int64_t hi = start + len * (micro + 1) / micro_batches;
    *first = lo;
    *count = hi - lo;
    return true;
}

void qkv_shuffle(int64_t *idx, int64_t n, qkv_generator *g) {
    if (n > 1 && (!idx || !g)) {
        qkv_set_error("qkv_shuffle: NULL argument");
        return;
    }
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)qkv_generator_below(g, (uint64_t)i + 1);
        int64_t tmp = idx[i];
        idx[i] = idx[j];
        idx[j] = tmp;
    }
}
