/*
 * Byte-pair encoding over raw bytes: ids 0..255 are the bytes themselves, id 256 + i is merge
 * i. Training repeatedly merges the most frequent adjacent pair of the corpus (ties to the
 * lowest pair of ids), so one corpus gives one tokenizer everywhere. Every byte string, invalid
 * UTF-8 and empty included, encodes and decodes back to itself, because tokens only ever stand
 * for byte strings.
 */
#include "data/data_internal.h"

#include <string.h>

struct qkv_bpe {
    int64_t n_merges;
    uint32_t *merges;     /* 2 * n_merges ids: the pair merged into 256 + i */
    int64_t *tok_start;   /* vocab + 1 offsets: token t is bytes[tok_start[t]..tok_start[t+1]) */
    unsigned char *bytes;
    size_t n_bytes;
    uint64_t *keys;       /* pair -> merged id, open addressing; key 0 is empty */
    int64_t *vals;
    size_t cap;
};

/* ---- Pair tables ------------------------------------------------------------------------- */

static uint64_t pair_key(uint32_t a, uint32_t b) {
    return ((uint64_t)a << 32 | b) + 1;
}

static size_t slot_of(const uint64_t *keys, size_t cap, uint64_t key) {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h >> 17) & (cap - 1);
    while (keys[i] && keys[i] != key) i = (i + 1) & (cap - 1);
    return i;
}

/* A power of two at least twice n, so probes stay short. */
static size_t table_cap(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 2) cap *= 2;
    return cap;
}

/* ---- The tokenizer object ---------------------------------------------------------------- */

void qkv_bpe_free(qkv_bpe *b) {
    if (!b) return;
    int64_t vocab = 256 + b->n_merges;
    if (b->merges) qkv__free(b->merges, (size_t)(2 * b->n_merges + 1) * sizeof *b->merges);
    if (b->tok_start) qkv__free(b->tok_start, (size_t)(vocab + 1) * sizeof *b->tok_start);
    if (b->bytes) qkv__free(b->bytes, b->n_bytes + 1);
    if (b->keys) qkv__free(b->keys, b->cap * sizeof *b->keys);
    if (b->vals) qkv__free(b->vals, b->cap * sizeof *b->vals);
    qkv__free(b, sizeof *b);
}

/* Builds the token byte strings and the pair table from the merges (checked by the caller:
 * each merge's ids are below its own id, no pair twice). */
static bool finish(qkv_bpe *b) {
    int64_t vocab = 256 + b->n_merges;
    b->tok_start = qkv__alloc((size_t)(vocab + 1) * sizeof *b->tok_start);
    if (!b->tok_start) return false;
    b->tok_start[0] = 0;
    for (int64_t t = 0; t < vocab; t++) {
        int64_t len = t < 256 ? 1 : (b->tok_start[b->merges[2 * (t - 256)] + 1] -
                                     b->tok_start[b->merges[2 * (t - 256)]]) +
                                        (b->tok_start[b->merges[2 * (t - 256) + 1] + 1] -
                                         b->tok_start[b->merges[2 * (t - 256) + 1]]);
        b->tok_start[t + 1] = b->tok_start[t] + len;
    }
    size_t total = (size_t)b->tok_start[vocab];
    b->n_bytes = total;
    b->bytes = qkv__alloc(total + 1);
    b->cap = table_cap((size_t)b->n_merges);
    b->keys = qkv__calloc(b->cap * sizeof *b->keys);
    b->vals = qkv__alloc(b->cap * sizeof *b->vals);
    if (!b->bytes || !b->keys || !b->vals) return false;
    for (int t = 0; t < 256; t++) b->bytes[t] = (unsigned char)t;
    for (int64_t i = 0; i < b->n_merges; i++) {
        uint32_t l = b->merges[2 * i], r = b->merges[2 * i + 1];
        size_t nl = (size_t)(b->tok_start[l + 1] - b->tok_start[l]);
        unsigned char *dst = b->bytes + b->tok_start[256 + i];
        memcpy(dst, b->bytes + b->tok_start[l], nl);
        memcpy(dst + nl, b->bytes + b->tok_start[r],
               (size_t)(b->tok_start[r + 1] - b->tok_start[r]));
        size_t s = slot_of(b->keys, b->cap, pair_key(l, r));
        b->keys[s] = pair_key(l, r);
        b->vals[s] = 256 + i;
    }
    return true;
}

static qkv_bpe *bpe_alloc(int64_t n_merges) {
    qkv_bpe *b = qkv__calloc(sizeof *b);
    if (!b) return NULL;
    b->n_merges = n_merges;
    b->merges = qkv__alloc((size_t)(2 * n_merges + 1) * sizeof *b->merges);
    if (!b->merges) {
        b->n_merges = 0;
        qkv_bpe_free(b);
        return NULL;
    }
    return b;
}

qkv_bpe *qkv_bpe_new(void) {
    qkv_bpe *b = bpe_alloc(0);
    if (b && !finish(b)) {
        qkv_bpe_free(b);
        return NULL;
    }
    return b;
}

int64_t qkv_bpe_vocab_size(const qkv_bpe *b) {
    return b ? 256 + b->n_merges : -1;
}

const void *qkv_bpe_token(const qkv_bpe *b, int64_t id, size_t *size) {
    if (qkv__null_object("qkv_bpe_token", "tokenizer", b)) return NULL;
    if (id < 0 || id >= 256 + b->n_merges)
        return qkv_set_error("qkv_bpe_token: id %lld not in [0, %lld)", (long long)id,
                             (long long)(256 + b->n_merges));
    if (size) *size = (size_t)(b->tok_start[id + 1] - b->tok_start[id]);
    return b->bytes + b->tok_start[id];
}

/* ---- Merging a sequence ------------------------------------------------------------------ */

/* Replaces every occurrence of (l, r) in seq[0..*n), left to right, by id. */
static void merge_pair(uint32_t *seq, int64_t *n, uint32_t l, uint32_t r, uint32_t id) {
    int64_t w = 0;
    for (int64_t i = 0; i < *n; i++) {
        if (i + 1 < *n && seq[i] == l && seq[i + 1] == r) {
            seq[w++] = id;
            i++;
        } else {
            seq[w++] = seq[i];
        }
    }
    *n = w;
}

/* The most frequent adjacent pair of seq (ties to the lowest pair), counted in a table of cap
 * slots; its count, 0 for none. */
static int64_t best_pair(const uint32_t *seq, int64_t n, uint64_t *keys, int64_t *counts,
                         size_t cap, uint64_t *best) {
    memset(keys, 0, cap * sizeof *keys);
    int64_t top = 0;
    *best = 0;
    for (int64_t i = 0; i + 1 < n; i++) {
        uint64_t key = pair_key(seq[i], seq[i + 1]);
        size_t s = slot_of(keys, cap, key);
        if (!keys[s]) {
            keys[s] = key;
            counts[s] = 0;
        }
        int64_t c = ++counts[s];
        if (c > top || (c == top && key < *best)) {
            top = c;
            *best = key;
        }
    }
    return top;
}

/* ---- Training ---------------------------------------------------------------------------- */

typedef struct train_state {
    uint32_t *seq;
    uint64_t *keys;
    int64_t *counts;
    size_t n, cap;
} train_state;

static void train_state_free(train_state *t) {
    if (t->seq) qkv__free(t->seq, t->n * sizeof *t->seq);
    if (t->keys) qkv__free(t->keys, t->cap * sizeof *t->keys);
    if (t->counts) qkv__free(t->counts, t->cap * sizeof *t->counts);
}

static int64_t run_merges(train_state *t, int64_t n_merges, uint32_t *merges) {
    int64_t len = (int64_t)t->n, done = 0;
    for (; done < n_merges; done++) {
        uint64_t key;
        if (best_pair(t->seq, len, t->keys, t->counts, t->cap, &key) < 2) break;
        uint32_t l = (uint32_t)((key - 1) >> 32), r = (uint32_t)(key - 1);
        merges[2 * done] = l;
        merges[2 * done + 1] = r;
        merge_pair(t->seq, &len, l, r, (uint32_t)(256 + done));
    }
    return done;
}

qkv_bpe *qkv_bpe_train(const void *corpus, size_t size, int64_t n_merges) {
    const char *op = "qkv_bpe_train";
    if (!corpus || size == 0) return qkv_set_error("%s: empty corpus", op);
    if (n_merges < 0 || n_merges > INT32_MAX - 256)
        return qkv_set_error("%s: n_merges %lld out of range", op, (long long)n_merges);
    if (size > (size_t)INT64_MAX / 16) return qkv_set_error("%s: corpus too large", op);
    train_state t = {.n = size, .cap = table_cap(size)};
    t.seq = qkv__alloc(size * sizeof *t.seq);
    t.keys = qkv__alloc(t.cap * sizeof *t.keys);
    t.counts = qkv__alloc(t.cap * sizeof *t.counts);
    uint32_t *merges = qkv__alloc((size_t)(2 * n_merges + 1) * sizeof *merges);
    qkv_bpe *b = NULL;
    if (t.seq && t.keys && t.counts && merges) {
        for (size_t i = 0; i < size; i++) t.seq[i] = ((const unsigned char *)corpus)[i];
        int64_t done = run_merges(&t, n_merges, merges);
        b = bpe_alloc(done);
        if (b) memcpy(b->merges, merges, (size_t)(2 * done) * sizeof *merges);
        if (b && !finish(b)) {
            qkv_bpe_free(b);
            b = NULL;
        }
    }
    if (merges) qkv__free(merges, (size_t)(2 * n_merges + 1) * sizeof *merges);
    train_state_free(&t);
    return b;
}

/* ---- Encoding and decoding --------------------------------------------------------------- */

/* The merged id of (l, r), or -1 when it is no merge. */
static int64_t lookup(const qkv_bpe *b, uint32_t l, uint32_t r) {
    if (!b->n_merges) return -1;
    size_t s = slot_of(b->keys, b->cap, pair_key(l, r));
    return b->keys[s] ? b->vals[s] : -1;
}

/* Applies the merges, earliest first: the adjacent pair with the lowest merged id goes next. */
static void encode_seq(const qkv_bpe *b, uint32_t *seq, int64_t *n) {
    for (;;) {
        int64_t best = -1;
        uint32_t bl = 0, br = 0;
        for (int64_t i = 0; i + 1 < *n; i++) {
            int64_t id = lookup(b, seq[i], seq[i + 1]);
            if (id >= 0 && (best < 0 || id < best)) {
                best = id;
                bl = seq[i];
                br = seq[i + 1];
            }
        }
        if (best < 0) return;
        merge_pair(seq, n, bl, br, (uint32_t)best);
    }
}

int64_t qkv_bpe_encode(const qkv_bpe *b, const void *text, size_t size, int64_t *ids,
                       int64_t cap) {
    if (qkv__null_object("qkv_bpe_encode", "tokenizer", b)) return -1;
    if ((!text && size) || cap < 0 || (cap > 0 && !ids)) {
        qkv_set_error("qkv_bpe_encode: %zu bytes at %p, room for %lld ids at %p", size, text,
                      (long long)cap, (void *)ids);
        return -1;
    }
    if (size == 0) return 0;
    if (size > (size_t)INT64_MAX / 8) return qkv_set_error("qkv_bpe_encode: too long"), -1;
    uint32_t *seq = qkv__alloc(size * sizeof *seq);
    if (!seq) return -1;
    for (size_t i = 0; i < size; i++) seq[i] = ((const unsigned char *)text)[i];
    int64_t n = (int64_t)size;
    encode_seq(b, seq, &n);
    for (int64_t i = 0; i < n && i < cap; i++) ids[i] = seq[i];
    qkv__free(seq, size * sizeof *seq);
    return n;
}

int64_t qkv_bpe_decode(const qkv_bpe *b, const int64_t *ids, int64_t n, void *buf, size_t cap) {
    if (qkv__null_object("qkv_bpe_decode", "tokenizer", b)) return -1;
    if (n < 0 || (n > 0 && !ids) || (cap > 0 && !buf)) {
        qkv_set_error("qkv_bpe_decode: %lld ids at %p, room for %zu bytes at %p", (long long)n,
                      (const void *)ids, cap, buf);
        return -1;
    }
    int64_t vocab = 256 + b->n_merges, total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab) {
            qkv_set_error("qkv_bpe_decode: id %lld at %lld not in [0, %lld)", (long long)ids[i],
                          (long long)i, (long long)vocab);
            return -1;
        }
        int64_t len = b->tok_start[ids[i] + 1] - b->tok_start[ids[i]];
        if ((size_t)(total + len) <= cap)
            memcpy((unsigned char *)buf + total, b->bytes + b->tok_start[ids[i]], (size_t)len);
        total += len;
    }
    return total;
}

/* ---- Serialization ----------------------------------------------------------------------- */

static const char bpe_magic[8] = {'q', 'k', 'v', 'b', 'p', 'e', '\0', '\0'};
#define HEADER 24

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}

size_t qkv_bpe_to_bytes(const qkv_bpe *b, void *buf, size_t cap) {
    if (qkv__null_object("qkv_bpe_to_bytes", "tokenizer", b)) return 0;
    size_t need = HEADER + (size_t)b->n_merges * 8;
    if (cap < need) return need;
    if (!buf) return qkv_set_error("qkv_bpe_to_bytes: no buffer"), 0;
    unsigned char *p = buf;
    memcpy(p, bpe_magic, 8);
    put_u32(p + 8, 1);
    put_u32(p + 12, 0);
    put_u32(p + 16, (uint32_t)b->n_merges);
    put_u32(p + 20, (uint32_t)((uint64_t)b->n_merges >> 32));
    for (int64_t i = 0; i < 2 * b->n_merges; i++) put_u32(p + HEADER + 4 * i, b->merges[i]);
    return need;
}

/* Each merge may only join earlier tokens, and no pair may be merged twice: otherwise encoding
 * would be ambiguous. */
static bool check_merges(const qkv_bpe *b, const char *op) {
    uint64_t *seen = qkv__calloc(table_cap((size_t)b->n_merges) * sizeof *seen);
    if (!seen) return false;
    size_t cap = table_cap((size_t)b->n_merges);
    bool ok = true;
    for (int64_t i = 0; ok && i < b->n_merges; i++) {
        uint32_t l = b->merges[2 * i], r = b->merges[2 * i + 1];
        if (l >= 256 + i || r >= 256 + i) {
            qkv_set_error("%s: merge %lld joins %u and %u, not both earlier than token %lld", op,
                          (long long)i, l, r, (long long)(256 + i));
            ok = false;
            break;
        }
        size_t s = slot_of(seen, cap, pair_key(l, r));
        if (seen[s]) {
            qkv_set_error("%s: merge %lld repeats the pair (%u, %u)", op, (long long)i, l, r);
            ok = false;
        }
        seen[s] = pair_key(l, r);
    }
    qkv__free(seen, cap * sizeof *seen);
    return ok;
}

qkv_bpe *qkv_bpe_from_bytes(const void *buf, size_t size) {
    const char *op = "qkv_bpe_from_bytes";
    const unsigned char *p = buf;
    if (!buf || size < HEADER || memcmp(p, bpe_magic, 8))
        return qkv_set_error("%s: not a BPE tokenizer (%zu bytes, bad magic or too short)", op,
                             size);
    if (get_u32(p + 8) != 1 || get_u32(p + 12) != 0)
        return qkv_set_error("%s: unknown version %u", op, get_u32(p + 8));
    uint64_t n = get_u32(p + 16) | (uint64_t)get_u32(p + 20) << 32;
    if (n > INT32_MAX - 256 || size != HEADER + n * 8)
        return qkv_set_error("%s: %llu merges need %llu bytes, the buffer has %zu", op,
                             (unsigned long long)n, (unsigned long long)(HEADER + n * 8), size);
    qkv_bpe *b = bpe_alloc((int64_t)n);
    if (!b) return NULL;
    for (uint64_t i = 0; i < 2 * n; i++) b->merges[i] = get_u32(p + HEADER + 4 * i);
    if (!check_merges(b, op) || !finish(b)) {
        qkv_bpe_free(b);
        return NULL;
    }
    return b;
}
