/* Label sets: the distinct training labels in byte order, mapped to class ids 0..n-1. */
#include "data/data_internal.h"

#include <stdlib.h>
#include <string.h>

struct qkv_labels {
    qkv__strtab tab; /* in byte order, so the id is the rank */
};

static const char labels_magic[8] = {'q', 'k', 'v', 'l', 'a', 'b', 'e', 'l'};

static int by_bytes(const void *pa, const void *pb) {
    return strcmp(*(const char *const *)pa, *(const char *const *)pb); /* unsigned bytes */
}

qkv_labels *qkv_labels_build(const char *const *labels, int64_t n) {
    const char *op = "qkv_labels_build";
    if (n < 0 || (n > 0 && !labels)) {
        return qkv_set_error("%s: %lld labels at %p", op, (long long)n, (const void *)labels);
    }
    for (int64_t i = 0; i < n; i++) {
        if (!labels[i]) return qkv_set_error("%s: label %lld is NULL", op, (long long)i);
        if (!labels[i][0]) return qkv_set_error("%s: label %lld is empty", op, (long long)i);
        /* what qkv_labels_from_bytes would reject, so that every set round-trips */
        if (!qkv__utf8_valid((const unsigned char *)labels[i], strlen(labels[i]))) {
            return qkv_set_error("%s: label %lld is not valid UTF-8", op, (long long)i);
        }
    }
    size_t sorted_size = (size_t)(n ? n : 1) * sizeof(const char *);
    const char **sorted = qkv__alloc(sorted_size);
    qkv_labels *set = qkv__calloc(sizeof *set);
    if (!sorted || !set) goto fail;
    if (n > 0) memcpy(sorted, labels, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, by_bytes);
    for (int64_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(sorted[i], sorted[i - 1]) == 0) continue;
        size_t len = strlen(sorted[i]);
        if (qkv__strtab_add(&set->tab, sorted[i], len, qkv__hash(sorted[i], len)) < 0) goto fail;
    }
    qkv__free(sorted, sorted_size);
    return set;
fail:
    qkv__free(sorted, sorted_size);
    qkv_labels_free(set);
    return NULL;
}

void qkv_labels_free(qkv_labels *set) {
    if (!set) return;
    qkv__strtab_free(&set->tab);
    qkv__free(set, sizeof *set);
}

int64_t qkv_labels_size(const qkv_labels *set) {
    if (!set) return qkv_set_error("qkv_labels_size: label set is NULL"), -1;
    return set->tab.n;
}

int64_t qkv_labels_id(const qkv_labels *set, const char *label) {
    if (!set || !label) return qkv_set_error("qkv_labels_id: NULL argument"), -1;
    size_t len = strlen(label);
    return qkv__strtab_find(&set->tab, label, len, qkv__hash(label, len));
}

const char *qkv_labels_name(const qkv_labels *set, int64_t id) {
    if (!set) return qkv_set_error("qkv_labels_name: label set is NULL");
    if (id < 0 || id >= set->tab.n) {
        return qkv_set_error("qkv_labels_name: id %lld out of range for %lld labels",
                             (long long)id, (long long)set->tab.n);
    }
    return qkv__strtab_str(&set->tab, id);
}

size_t qkv_labels_to_bytes(const qkv_labels *set, void *buf, size_t cap) {
    if (!set) return qkv_set_error("qkv_labels_to_bytes: label set is NULL"), 0;
    return qkv__strings_to_bytes(labels_magic, 0, &set->tab, buf, cap);
}

qkv_labels *qkv_labels_from_bytes(const void *buf, size_t size) {
    const char *op = "qkv_labels_from_bytes";
    qkv_labels *set = qkv__calloc(sizeof *set);
    if (!set) return NULL;
    uint32_t kind;
    if (!qkv__strings_from_bytes(op, labels_magic, buf, size, &kind, &set->tab)) goto fail;
    if (kind != 0) {
        qkv_set_error("%s: kind %u, expected 0", op, (unsigned)kind);
        goto fail;
    }
    for (int64_t i = 1; i < set->tab.n; i++) {
        if (strcmp(qkv__strtab_str(&set->tab, i - 1), qkv__strtab_str(&set->tab, i)) > 0) {
            qkv_set_error("%s: labels %lld and %lld are not in byte order", op,
                          (long long)(i - 1), (long long)i);
            goto fail;
        }
    }
    return set;
fail:
    qkv_labels_free(set);
    return NULL;
}
