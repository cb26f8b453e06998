/* Vocabularies: built by counting training tokens, looked up through a hash table, encoding
 * texts to ids, and serialized for checkpoints. */
#include "data/data_internal.h"

#include <stdlib.h>
#include <string.h>

struct qkv_vocab {
    qkv_tokenizer kind;
    qkv__strtab tab; /* id -> token, token -> id */
};

static const char vocab_magic[8] = {'q', 'k', 'v', 'v', 'o', 'c', 'a', 'b'};

/* ---- Building ---------------------------------------------------------------------------- */

typedef struct ranked {
    const char *s;
    size_t len;
    int64_t count;
} ranked;

/* Most frequent first; equal counts in memcmp order of the bytes, a prefix first. */
static int by_count_then_bytes(const void *pa, const void *pb) {
    const ranked *a = pa, *b = pb;
    if (a->count != b->count) return a->count > b->count ? -1 : 1;
    int c = memcmp(a->s, b->s, a->len < b->len ? a->len : b->len);
    if (c) return c;
    return (a->len > b->len) - (a->len < b->len);
}

static bool check_build_args(qkv_tokenizer kind, const char *const *texts, int64_t n,
                             int64_t min_count, int64_t max_size) {
    const char *op = "qkv_vocab_build";
    if (!qkv__check_tokenizer(op, kind)) return false;
    if (n < 0 || (n > 0 && !texts)) {
        qkv_set_error("%s: %lld texts at %p", op, (long long)n, (const void *)texts);
        return false;
    }
    for (int64_t i = 0; i < n; i++) {
        if (!texts[i]) {
            qkv_set_error("%s: text %lld is NULL", op, (long long)i);
            return false;
        }
    }
    if (min_count < 1) {
        qkv_set_error("%s: min_count must be at least 1, got %lld", op, (long long)min_count);
        return false;
    }
    if (max_size < 0 || max_size == 1) {
        qkv_set_error("%s: max_size must be 0 (no limit) or at least 2, got %lld", op,
                      (long long)max_size);
        return false;
    }
    return true;
}

static bool count_tokens(qkv_tokenizer kind, const char *const *texts, int64_t n,
                         qkv__strtab *counts) {
    qkv__buf tok = {0};
    bool ok = false;
    for (int64_t i = 0; i < n; i++) {
        qkv__token_iter it;
        qkv__token_iter_init(&it, kind, texts[i]);
        int r;
        while ((r = qkv__token_next(&it, &tok)) == 1) {
            uint64_t hash = qkv__hash(tok.data, tok.len);
            int64_t id = qkv__strtab_find(counts, tok.data, tok.len, hash);
            if (id < 0 && (id = qkv__strtab_add(counts, tok.data, tok.len, hash)) < 0) goto done;
            counts->entries[id].count++;
        }
        if (r < 0) goto done;
    }
    ok = true;
done:
    qkv__buf_free(&tok);
    return ok;
}

static bool add_token(qkv_vocab *v, const char *s, size_t len, int64_t count) {
    int64_t id = qkv__strtab_add(&v->tab, s, len, qkv__hash(s, len));
    if (id < 0) return false;
    v->tab.entries[id].count = count;
    return true;
}

qkv_vocab *qkv_vocab_build(qkv_tokenizer kind, const char *const *texts, int64_t n,
                           int64_t min_count, int64_t max_size) {
    if (!check_build_args(kind, texts, n, min_count, max_size)) return NULL;
    qkv__strtab counts = {0};
    ranked *order = NULL;
    size_t order_size = 0;
    qkv_vocab *v = NULL;
    if (!count_tokens(kind, texts, n, &counts)) goto fail;

    order_size = (size_t)(counts.n ? counts.n : 1) * sizeof *order;
    if (!(order = qkv__alloc(order_size))) goto fail;
    size_t kept = 0;
    for (int64_t id = 0; id < counts.n; id++) {
        const qkv__strentry *e = &counts.entries[id];
        if (e->count >= min_count)
            order[kept++] = (ranked){qkv__strtab_str(&counts, id), (size_t)e->length, e->count};
    }
    qsort(order, kept, sizeof *order, by_count_then_bytes);
    if (max_size && kept > (size_t)(max_size - 2)) kept = (size_t)(max_size - 2);

    if (!(v = qkv__calloc(sizeof *v))) goto fail;
    v->kind = kind;
    if (!add_token(v, "<pad>", 5, 0) || !add_token(v, "<unk>", 5, 0)) goto fail;
    for (size_t i = 0; i < kept; i++)
        if (!add_token(v, order[i].s, order[i].len, order[i].count)) goto fail;
    qkv__free(order, order_size);
    qkv__strtab_free(&counts);
    return v;
fail:
    qkv_vocab_free(v);
    qkv__free(order, order_size);
    qkv__strtab_free(&counts);
    return NULL;
}

void qkv_vocab_free(qkv_vocab *vocab) {
    if (!vocab) return;
    qkv__strtab_free(&vocab->tab);
    qkv__free(vocab, sizeof *vocab);
}

/* ---- Lookup ------------------------------------------------------------------------------ */

int64_t qkv_vocab_size(const qkv_vocab *vocab) {
    if (!vocab) return qkv_set_error("qkv_vocab_size: vocabulary is NULL"), -1;
    return vocab->tab.n;
}

qkv_tokenizer qkv_vocab_tokenizer(const qkv_vocab *vocab) {
    if (!vocab) qkv_set_error("qkv_vocab_tokenizer: vocabulary is NULL");
    return vocab ? vocab->kind : QKV_TOKENIZE_WORDS;
}

int64_t qkv_vocab_id(const qkv_vocab *vocab, const char *token) {
    if (!vocab || !token) return qkv_set_error("qkv_vocab_id: NULL argument"), -1;
    size_t len = strlen(token);
    int64_t id = qkv__strtab_find(&vocab->tab, token, len, qkv__hash(token, len));
    return id < 0 ? QKV_UNK_ID : id;
}

const char *qkv_vocab_token(const qkv_vocab *vocab, int64_t id) {
    if (!vocab) return qkv_set_error("qkv_vocab_token: vocabulary is NULL");
    if (id < 0 || id >= vocab->tab.n) {
        return qkv_set_error("qkv_vocab_token: id %lld out of range for %lld tokens",
                             (long long)id, (long long)vocab->tab.n);
    }
    return qkv__strtab_str(&vocab->tab, id);
}

/* ---- Encoding ---------------------------------------------------------------------------- */

static bool put_id(int64_t **ids, size_t *cap, size_t at, int64_t id) {
    if (!qkv__reserve((void **)ids, cap, at + 1, sizeof **ids)) return false;
    (*ids)[at] = id;
    return true;
}

int64_t qkv__vocab_encode_append(const qkv_vocab *vocab, const char *text, qkv__buf *tok,
                                 int64_t **ids, size_t *cap, size_t at) {
    qkv__token_iter it;
    qkv__token_iter_init(&it, vocab->kind, text);
    size_t n = 0;
    int r;
    while ((r = qkv__token_next(&it, tok)) == 1) {
        int64_t id = qkv__strtab_find(&vocab->tab, tok->data, tok->len,
                                      qkv__hash(tok->data, tok->len));
        if (!put_id(ids, cap, at + n++, id < 0 ? QKV_UNK_ID : id)) return -1;
    }
    if (r < 0) return -1;
    if (n == 0 && !put_id(ids, cap, at + n++, QKV_UNK_ID)) return -1;
    return (int64_t)n;
}

int64_t qkv_vocab_encode(const qkv_vocab *vocab, const char *text, int64_t *ids, int64_t cap) {
    if (!vocab || !text) return qkv_set_error("qkv_vocab_encode: NULL argument"), -1;
    if (cap < 0 || (cap > 0 && !ids)) {
        qkv_set_error("qkv_vocab_encode: no room for %lld ids at %p", (long long)cap,
                      (void *)ids);
        return -1;
    }
    qkv__buf tok = {0};
    int64_t *all = NULL;
    size_t all_cap = 0;
    int64_t n = qkv__vocab_encode_append(vocab, text, &tok, &all, &all_cap, 0);
    if (n > 0 && cap > 0) memcpy(ids, all, (size_t)(n < cap ? n : cap) * sizeof *ids);
    qkv__free(all, all_cap * sizeof *all);
    qkv__buf_free(&tok);
    return n;
}

/* ---- Serialization ----------------------------------------------------------------------- */

size_t qkv_vocab_to_bytes(const qkv_vocab *vocab, void *buf, size_t cap) {
    if (!vocab) return qkv_set_error("qkv_vocab_to_bytes: vocabulary is NULL"), 0;
    return qkv__strings_to_bytes(vocab_magic, (uint32_t)vocab->kind, &vocab->tab, buf, cap);
}

qkv_vocab *qkv_vocab_from_bytes(const void *buf, size_t size) {
    const char *op = "qkv_vocab_from_bytes";
    qkv_vocab *v = qkv__calloc(sizeof *v);
    if (!v) return NULL;
    uint32_t kind;
    if (!qkv__strings_from_bytes(op, vocab_magic, buf, size, &kind, &v->tab)) goto fail;
    if (kind != QKV_TOKENIZE_WORDS && kind != QKV_TOKENIZE_CHARS) {
        qkv_set_error("%s: unknown tokenizer %u", op, (unsigned)kind);
        goto fail;
    }
    v->kind = (qkv_tokenizer)kind;
    if (v->tab.n < 2 || strcmp(qkv__strtab_str(&v->tab, QKV_PAD_ID), "<pad>") != 0 ||
        strcmp(qkv__strtab_str(&v->tab, QKV_UNK_ID), "<unk>") != 0) {
        qkv_set_error("%s: ids 0 and 1 are not \"<pad>\" and \"<unk>\"", op);
        goto fail;
    }
    return v;
fail:
    qkv_vocab_free(v);
    return NULL;
}
