/* The hashed string table behind vocabularies and label sets, and the byte format in which both
 * are serialized. */
#include "data/data_internal.h"

#include <inttypes.h>
#include <string.h>

/* ---- String table ------------------------------------------------------------------------ */

uint64_t qkv__hash(const void *s, size_t len) {
    const unsigned char *p = s;
    uint64_t h = 14695981039346656037ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

int64_t qkv__strtab_find(const qkv__strtab *t, const void *s, size_t len, uint64_t hash) {
    if (t->n_slots == 0) return -1;
    size_t mask = t->n_slots - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        int64_t id = t->slots[i];
        if (id < 0) return -1;
        const qkv__strentry *e = &t->entries[id];
        if (e->hash == hash && (size_t)e->length == len &&
            memcmp(t->bytes.data + e->offset, s, len) == 0)
            return id;
    }
}

static void place(int64_t *slots, size_t n_slots, uint64_t hash, int64_t id) {
    size_t mask = n_slots - 1, i = hash & mask;
    while (slots[i] >= 0) i = (i + 1) & mask;
    slots[i] = id;
}

static bool grow_slots(qkv__strtab *t) {
    size_t n_slots = t->n_slots ? t->n_slots * 2 : 64;
    int64_t *slots = qkv__alloc(n_slots * sizeof *slots);
    if (!slots) return false;
    memset(slots, 0xff, n_slots * sizeof *slots); /* all -1 */
    for (int64_t id = 0; id < t->n; id++) place(slots, n_slots, t->entries[id].hash, id);
    qkv__free(t->slots, t->n_slots * sizeof *t->slots);
    t->slots = slots;
    t->n_slots = n_slots;
    return true;
}

int64_t qkv__strtab_add(qkv__strtab *t, const void *s, size_t len, uint64_t hash) {
    if ((size_t)(t->n + 1) * 2 >= t->n_slots && !grow_slots(t)) return -1;
    if (!qkv__reserve((void **)&t->entries, &t->entries_cap, (size_t)t->n + 1,
                      sizeof *t->entries))
        return -1;
    size_t offset = t->bytes.len;
    if (!qkv__buf_append(&t->bytes, s, len) || !qkv__buf_append(&t->bytes, "", 1)) {
        t->bytes.len = offset;
        return -1;
    }
    t->entries[t->n] = (qkv__strentry){(int64_t)offset, (int64_t)len, 0, hash};
    place(t->slots, t->n_slots, hash, t->n);
    return t->n++;
}

const char *qkv__strtab_str(const qkv__strtab *t, int64_t id) {
    return t->bytes.data + t->entries[id].offset;
}

void qkv__strtab_free(qkv__strtab *t) {
    qkv__buf_free(&t->bytes);
    qkv__free(t->entries, t->entries_cap * sizeof *t->entries);
    qkv__free(t->slots, t->n_slots * sizeof *t->slots);
    *t = (qkv__strtab){0};
}

/* ---- Serialization ----------------------------------------------------------------------- */

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

size_t qkv__strings_to_bytes(const char magic[8], uint32_t kind, const qkv__strtab *t,
                             void *buf, size_t cap) {
    size_t size = QKV__SER_HEADER;
    for (int64_t i = 0; i < t->n; i++) size += 4 + (size_t)t->entries[i].length;
    if (!buf || cap < size) return size;
    unsigned char *p = buf;
    memcpy(p, magic, 8);
    put_u32(p + 8, 1);
    put_u32(p + 12, kind);
    put_u64(p + 16, (uint64_t)t->n);
    p += QKV__SER_HEADER;
    for (int64_t i = 0; i < t->n; i++) {
        size_t len = (size_t)t->entries[i].length;
        put_u32(p, (uint32_t)len);
        memcpy(p + 4, qkv__strtab_str(t, i), len);
        p += 4 + len;
    }
    return size;
}

/* Walks the entries without storing them: every length is checked against what is left. */
static bool check_entries(const char *op, const unsigned char *b, size_t size, uint64_t count) {
    size_t pos = QKV__SER_HEADER;
    for (uint64_t i = 0; i < count; i++) {
        if (size - pos < 4) {
            qkv_set_error("%s: truncated at entry %" PRIu64 " of %" PRIu64, op, i, count);
            return false;
        }
        uint32_t len = get_u32(b + pos);
        pos += 4;
        if (len > size - pos) {
            qkv_set_error("%s: entry %" PRIu64 ": length %" PRIu32 " exceeds the %zu bytes left",
                          op, i, len, size - pos);
            return false;
        }
        if (len == 0) {
            qkv_set_error("%s: entry %" PRIu64 " is empty", op, i);
            return false;
        }
        if (!qkv__utf8_valid(b + pos, len)) {
            qkv_set_error("%s: entry %" PRIu64 " is not valid UTF-8", op, i);
            return false;
        }
        pos += len;
    }
    if (pos != size) {
        qkv_set_error("%s: %zu trailing bytes after %" PRIu64 " entries", op, size - pos, count);
        return false;
    }
    return true;
}

bool qkv__strings_from_bytes(const char *op, const char magic[8], const void *buf, size_t size,
                             uint32_t *kind, qkv__strtab *t) {
    const unsigned char *b = buf;
    if (!b) {
        qkv_set_error("%s: buffer is NULL", op);
        return false;
    }
    if (size < QKV__SER_HEADER) {
        qkv_set_error("%s: %zu bytes, shorter than the %d-byte header", op, size,
                      QKV__SER_HEADER);
        return false;
    }
    if (memcmp(b, magic, 8) != 0) {
        qkv_set_error("%s: bad magic, expected \"%.8s\"", op, magic);
        return false;
    }
    uint32_t version = get_u32(b + 8);
    if (version != 1) {
        qkv_set_error("%s: unsupported version %" PRIu32, op, version);
        return false;
    }
    *kind = get_u32(b + 12);
    uint64_t count = get_u64(b + 16);
    if (count > (size - QKV__SER_HEADER) / 4) { /* every entry takes at least 4 bytes */
        qkv_set_error("%s: count %" PRIu64 " exceeds the buffer of %zu bytes", op, count, size);
        return false;
    }
    if (!check_entries(op, b, size, count)) return false;
    size_t pos = QKV__SER_HEADER;
    for (uint64_t i = 0; i < count; i++) {
        size_t len = get_u32(b + pos);
        const unsigned char *s = b + pos + 4;
        uint64_t hash = qkv__hash(s, len);
        if (qkv__strtab_find(t, s, len, hash) >= 0) {
            qkv_set_error("%s: entry %" PRIu64 " \"%.*s\" is a duplicate", op, i,
                          len > 40 ? 40 : (int)len, (const char *)s);
            return false;
        }
        if (qkv__strtab_add(t, s, len, hash) < 0) return false;
        pos += 4 + len;
    }
    return true;
}
