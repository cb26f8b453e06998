/*
 * Broadcast of an optimizer's state: rank 0 exports it (qkv_optimizer_state_export) and
 * writes it into one byte buffer, every rank reads the buffer back and imports it. A world of
 * one process takes the same path, so the writer and the reader are checked there too.
 *
 * Buffer: u32 tensor count; per tensor u32 name length, the name, u32 dtype, u32 ndim, i64
 * shape[ndim], the elements; u32 metadata count; per pair u32 length + key, u32 length + value.
 * Host byte order: every rank of a job runs the same build.
 */
#include <stdlib.h>
#include <string.h>

#include "dist/dist_internal.h"

#define FN "qkv_dist_broadcast_optimizer"

typedef struct buf {
    char *data;
    size_t size, cap, pos;
    bool bad;
} buf;

static void put(buf *b, const void *p, size_t n) {
    if (b->bad) return;
    if (b->size + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->size + n) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) {
            b->bad = true;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->size, p, n);
    b->size += n;
}

static void put_u32(buf *b, uint32_t v) { put(b, &v, sizeof v); }

static void put_str(buf *b, const char *s) {
    put_u32(b, (uint32_t)strlen(s));
    put(b, s, strlen(s));
}

static bool write_state(const qkv_optim_state *st, buf *b) {
    put_u32(b, (uint32_t)st->tensors.n);
    for (int i = 0; i < st->tensors.n; i++) {
        const qkv_tensor *t = st->tensors.tensors[i];
        put_str(b, st->tensors.names[i]);
        put_u32(b, (uint32_t)t->dtype);
        put_u32(b, (uint32_t)t->ndim);
        put(b, t->shape, (size_t)t->ndim * sizeof(int64_t));
        put(b, qkv_data(t), (size_t)t->numel * qkv_dtype_size(t->dtype));
    }
    put_u32(b, (uint32_t)st->n_meta);
    for (int i = 0; i < st->n_meta; i++) {
        put_str(b, st->meta_keys[i]);
        put_str(b, st->meta_values[i]);
    }
    if (b->bad) qkv_set_error(FN ": out of memory");
    return !b->bad;
}

static const void *take(buf *b, size_t n) {
    if (b->bad || n > b->size - b->pos) {
        b->bad = true;
        return NULL;
    }
    b->pos += n;
    return b->data + b->pos - n;
}

static uint32_t take_u32(buf *b) {
    const void *p = take(b, sizeof(uint32_t));
    uint32_t v = 0;
    if (p) memcpy(&v, p, sizeof v);
    return v;
}

static char *take_str(buf *b) {
    uint32_t n = take_u32(b);
    const char *p = take(b, n);
    char *s = p ? malloc((size_t)n + 1) : NULL;
    if (!s) {
        b->bad = true;
        return NULL;
    }
    memcpy(s, p, n);
    s[n] = 0;
    return s;
}

/* The tensors belong to the scope open around the read. */
static void free_read(qkv_optim_state *st) {
    for (int i = 0; i < st->tensors.n; i++) {
        if (st->tensors.names) free(st->tensors.names[i]);
    }
    for (int i = 0; i < st->n_meta; i++) {
        if (st->meta_keys) free(st->meta_keys[i]);
        if (st->meta_values) free(st->meta_values[i]);
    }
    free(st->tensors.names);
    free(st->tensors.tensors);
    free(st->meta_keys);
    free(st->meta_values);
}

static qkv_tensor *take_tensor(buf *b) {
    uint32_t dtype = take_u32(b), ndim = take_u32(b);
    if (b->bad || dtype > QKV_BOOL || ndim > QKV_MAX_DIMS) return b->bad = true, NULL;
    int64_t shape[QKV_MAX_DIMS];
    const void *p = take(b, ndim * sizeof(int64_t));
    if (!p) return NULL;
    memcpy(shape, p, ndim * sizeof(int64_t));
    int64_t numel = 1;
    for (uint32_t d = 0; d < ndim; d++) numel *= shape[d];
    const void *data = take(b, (size_t)numel * qkv_dtype_size((qkv_dtype)dtype));
    return data ? qkv_from_array((qkv_dtype)dtype, (int)ndim, shape, data) : NULL;
}

/* Reads st from b; on failure st holds what was read, for free_read. */
static bool read_state(buf *b, qkv_optim_state *st) {
    uint32_t n = take_u32(b);
    if (!b->bad && n <= b->size) {
        st->tensors.names = calloc(n ? n : 1, sizeof(char *));
        st->tensors.tensors = calloc(n ? n : 1, sizeof(qkv_tensor *));
        if (!st->tensors.names || !st->tensors.tensors) b->bad = true;
    } else {
        b->bad = true;
    }
    for (uint32_t i = 0; !b->bad && i < n; i++) {
        st->tensors.n = (int)i + 1;
        st->tensors.names[i] = take_str(b);
        st->tensors.tensors[i] = take_tensor(b);
        if (!st->tensors.tensors[i]) b->bad = true;
    }
    uint32_t m = take_u32(b);
    if (!b->bad && m <= b->size) {
        st->meta_keys = calloc(m ? m : 1, sizeof(char *));
        st->meta_values = calloc(m ? m : 1, sizeof(char *));
        if (!st->meta_keys || !st->meta_values) b->bad = true;
    } else {
        b->bad = true;
    }
    for (uint32_t i = 0; !b->bad && i < m; i++) {
        st->n_meta = (int)i + 1;
        st->meta_keys[i] = take_str(b);
        st->meta_values[i] = take_str(b);
    }
    if (b->bad || b->pos != b->size)
        qkv_set_error(FN ": the state received is malformed or memory ran out");
    return !b->bad && b->pos == b->size;
}

/* Rank 0's buffer, sent to every rank (size first). */
static bool share(buf *b) {
#ifdef QKV_HAVE_MPI
    if (qkv_dist_size() > 1) {
        uint64_t size = b->size;
        if (!qkv__dist_ok(MPI_Bcast(&size, 1, MPI_UINT64_T, 0, qkv__dist_comm()), FN,
                          "MPI_Bcast"))
            return false;
        bool ok = true;
        if (qkv_dist_rank() != 0) {
            b->data = malloc(size ? size : 1);
            b->size = b->cap = size;
            ok = b->data != NULL;
            if (!ok) qkv_set_error(FN ": out of memory for %llu bytes", (unsigned long long)size);
        }
        if (!qkv__dist_agree(ok, FN)) return false;
        for (uint64_t off = 0; off < size;) {
            int piece = size - off > (1u << 30) ? 1 << 30 : (int)(size - off);
            if (!qkv__dist_ok(MPI_Bcast(b->data + off, piece, MPI_BYTE, 0, qkv__dist_comm()),
                              FN, "MPI_Bcast"))
                return false;
            off += (uint64_t)piece;
        }
    }
#endif
    (void)b;
    return true;
}

bool qkv_dist_broadcast_optimizer(qkv_optimizer *opt) {
    bool ok = opt != NULL;
    if (!ok) qkv_set_error(FN ": optimizer is NULL");
    buf b = {0};
    if (ok && qkv_dist_rank() == 0) {
        qkv_optim_state *st = qkv_optimizer_state_export(opt);
        ok = st && write_state(st, &b);
        qkv_optim_state_free(st);
    }
    if (!qkv__dist_agree(ok, FN) || !share(&b)) {
        free(b.data);
        return false;
    }
    qkv_optim_state st = {0};
    qkv_scope_begin();
    ok = read_state(&b, &st) && qkv_optimizer_state_import(opt, &st);
    free_read(&st);
    qkv_scope_end();
    free(b.data);
    return qkv__dist_agree(ok, FN);
}
