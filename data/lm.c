/*
 * A language-model dataset: one token stream cut into windows of context + 1 tokens, each
 * giving inputs (the first context) and next-token targets (the last context). Windows do not
 * overlap; the last ones form the validation split, so no validation text is trained on.
 */
#include "data/data_internal.h"

#include <math.h>
#include <string.h>

struct qkv_lm_dataset {
    int64_t n, context;
    int64_t *tokens;
    int64_t n_train, n_valid; /* windows 0..n_train, then n_train..n_train + n_valid */
};

void qkv_lm_dataset_free(qkv_lm_dataset *ds) {
    if (!ds) return;
    if (ds->tokens) qkv__free(ds->tokens, (size_t)ds->n * sizeof *ds->tokens);
    qkv__free(ds, sizeof *ds);
}

static bool check_new(const int64_t *tokens, int64_t n, int64_t context, double valid_fraction) {
    const char *op = "qkv_lm_dataset_new";
    if (!tokens || n < 0 || context < 1) {
        qkv_set_error("%s: %lld tokens at %p with context %lld (>= 1)", op, (long long)n,
                      (const void *)tokens, (long long)context);
    } else if (n - 1 < context) {
        qkv_set_error("%s: a stream of %lld tokens has no window of context %lld + 1", op,
                      (long long)n, (long long)context);
    } else if (!(valid_fraction >= 0 && valid_fraction < 1)) {
        qkv_set_error("%s: valid_fraction %g not in [0, 1)", op, valid_fraction);
    } else {
        for (int64_t i = 0; i < n; i++)
            if (tokens[i] < 0)
                return qkv_set_error("%s: token %lld is %lld, negative", op, (long long)i,
                                     (long long)tokens[i]), false;
        return true;
    }
    return false;
}

qkv_lm_dataset *qkv_lm_dataset_new(const int64_t *tokens, int64_t n, int64_t context,
                                   double valid_fraction) {
    if (!check_new(tokens, n, context, valid_fraction)) return NULL;
    int64_t windows = (n - 1) / context;
    int64_t n_valid = (int64_t)llround((double)windows * valid_fraction);
    if (valid_fraction > 0 && (n_valid < 1 || n_valid >= windows))
        return qkv_set_error("qkv_lm_dataset_new: %lld windows of %lld cannot be split %g for "
                             "validation with both splits non-empty", (long long)windows,
                             (long long)context, valid_fraction);
    qkv_lm_dataset *ds = qkv__calloc(sizeof *ds);
    if (!ds) return NULL;
    ds->tokens = qkv__alloc((size_t)n * sizeof *ds->tokens);
    if (!ds->tokens) {
        qkv__free(ds, sizeof *ds);
        return NULL;
    }
    memcpy(ds->tokens, tokens, (size_t)n * sizeof *tokens);
    ds->n = n;
    ds->context = context;
    ds->n_valid = n_valid;
    ds->n_train = windows - n_valid;
    return ds;
}

int64_t qkv_lm_dataset_size(const qkv_lm_dataset *ds, qkv_split split) {
    if (qkv__null_object("qkv_lm_dataset_size", "dataset", ds)) return -1;
    return split == QKV_SPLIT_VALID ? ds->n_valid : ds->n_train;
}

int64_t qkv_lm_dataset_context(const qkv_lm_dataset *ds) {
    return ds ? ds->context : -1;
}

static bool check_split(qkv_split split, const char *op) {
    if (split == QKV_SPLIT_TRAIN || split == QKV_SPLIT_VALID) return true;
    qkv_set_error("%s: split %d is neither QKV_SPLIT_TRAIN nor QKV_SPLIT_VALID", op, (int)split);
    return false;
}

bool qkv_lm_dataset_order(const qkv_lm_dataset *ds, qkv_split split, int64_t *idx,
                          qkv_generator *g) {
    if (!ds || !check_split(split, "qkv_lm_dataset_order")) return false;
    int64_t n = qkv_lm_dataset_size(ds, split);
    if (n > 0 && !idx) return qkv_set_error("qkv_lm_dataset_order: idx is NULL"), false;
    for (int64_t i = 0; i < n; i++) idx[i] = i;
    if (g) qkv_shuffle(idx, n, g);
    return true;
}

/* Copies the windows' inputs (shift 0) or targets (shift 1) into a new [n, context] tensor. */
static qkv_tensor *windows(const qkv_lm_dataset *ds, int64_t first, const int64_t *idx,
                           int64_t n, int64_t shift) {
    qkv_tensor *t = qkv_empty(QKV_I64, QKV_SHAPE(n, ds->context));
    if (!t) return NULL;
    int64_t *out = qkv_data(t);
    for (int64_t i = 0; i < n; i++)
        memcpy(out + i * ds->context, ds->tokens + (first + idx[i]) * ds->context + shift,
               (size_t)ds->context * sizeof *out);
    return t;
}

qkv_lm_batch qkv_lm_dataset_batch(const qkv_lm_dataset *ds, qkv_split split,
                                  const int64_t *idx, int64_t n) {
    const char *op = "qkv_lm_dataset_batch";
    qkv_lm_batch none = {NULL, NULL};
    if (!ds || !check_split(split, op)) return none;
    int64_t size = qkv_lm_dataset_size(ds, split);
    if (n < 1 || !idx) {
        qkv_set_error("%s: %lld indices at %p", op, (long long)n, (const void *)idx);
        return none;
    }
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= size) {
            qkv_set_error("%s: window %lld not in [0, %lld) of the %s split", op,
                          (long long)idx[i], (long long)size,
                          split == QKV_SPLIT_VALID ? "validation" : "training");
            return none;
        }
    }
    int64_t first = split == QKV_SPLIT_VALID ? ds->n_train : 0;
    qkv_lm_batch b = {windows(ds, first, idx, n, 0), windows(ds, first, idx, n, 1)};
    if (b.inputs && b.targets) return b;
    return none;
}
