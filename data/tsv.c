/* The TSV reader: `label<TAB>text` lines into a qkv_tsv, cleaned to valid UTF-8 on the way. */
#include "data/data_internal.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "io/io_internal.h"

typedef struct tsv_impl {
    qkv_tsv pub;
    qkv__buf bytes;       /* label and text of each example, each NUL-terminated, in order */
    const char **labels;
    const char **texts;
    size_t ptrs_size;     /* bytes of each of the two pointer arrays */
} tsv_impl;

void qkv_tsv_free(qkv_tsv *tsv) {
    if (!tsv) return;
    tsv_impl *t = (tsv_impl *)tsv;
    qkv__buf_free(&t->bytes);
    qkv__free(t->labels, t->ptrs_size);
    qkv__free(t->texts, t->ptrs_size);
    qkv__free(t, sizeof *t);
}

/* What a pipe may give: /dev/stdin fed by /dev/zero, or an endless generator, would otherwise
 * grow the buffer until memory runs out. A regular file may give its size, or this much if it
 * grows while it is read. */
#define PIPE_LIMIT ((size_t)256 << 20)

/* Which files are read: regular files and pipes (`--train <(zcat x.tsv.gz)` works). Devices
 * and sockets are refused: nothing says they end. *limit is what may be read. */
static bool open_checked(const char *path, FILE **out, size_t *limit, bool *regular) {
    FILE *f = fopen(path, "rb");
    struct stat st;
    int err = !f ? errno : fstat(fileno(f), &st) ? errno : 0;
    if (!err && S_ISDIR(st.st_mode)) err = EISDIR;
    if (err) {
        qkv_set_error("qkv_tsv_read: %s: %s", path, strerror(err));
    } else if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode)) {
        qkv_set_error("qkv_tsv_read: %s: not a regular file or a pipe", path);
        err = EINVAL;
    }
    if (err) {
        if (f) fclose(f);
        return false;
    }
    *regular = S_ISREG(st.st_mode);
    *limit = *regular && (uint64_t)st.st_size >= PIPE_LIMIT ? (size_t)st.st_size + 1
                                                             : PIPE_LIMIT;
    *out = f;
    return true;
}

static bool read_file(const char *path, qkv__buf *out) {
    FILE *f;
    size_t limit;
    bool regular, ok = false;
    if (!open_checked(path, &f, &limit, &regular)) return false;
    for (;;) {
        size_t want = out->len + 65536 < limit ? out->len + 65536 : limit;
        if (want == out->len) {
            if (regular)
                qkv_set_error("qkv_tsv_read: %s: the file grew past %zu bytes while it was "
                              "read", path, limit);
            else
                qkv_set_error("qkv_tsv_read: %s: a pipe is read up to %zu MiB, and this one "
                              "gave more (save it to a file)", path, PIPE_LIMIT >> 20);
            goto done;
        }
        if (!qkv__reserve((void **)&out->data, &out->cap, want, 1)) goto done;
        size_t room = (out->cap < limit ? out->cap : limit) - out->len;
        size_t got = fread(out->data + out->len, 1, room, f);
        out->len += got;
        if (got == 0) break;
    }
    if (ferror(f)) {
        qkv_set_error("qkv_tsv_read: %s: %s", path, strerror(errno));
        goto done;
    }
    ok = true;
done:
    fclose(f);
    return ok;
}

/* Appends [p, end) as valid UTF-8 (see qkv__utf8_decode), tabs as spaces, then a NUL. */
static bool append_clean(qkv__buf *b, const unsigned char *p, const unsigned char *end) {
    while (p < end) {
        const unsigned char *run = p;
        while (p < end && *p != 0 && *p < 0x80 && *p != '\t') p++;
        if (!qkv__buf_append(b, run, (size_t)(p - run))) return false;
        if (p == end) break;
        if (*p == '\t') {
            if (!qkv__buf_append(b, " ", 1)) return false;
            p++;
        } else {
            uint32_t cp;
            int n = qkv__utf8_decode(p, end, &cp);
            if (!qkv__utf8_append(b, p, n)) return false;
            p += n ? n : 1;
        }
    }
    return qkv__buf_append(b, "", 1);
}

/* Splits the file's lines into t->bytes; returns the number of examples or -1. */
static int64_t parse(const char *path, const unsigned char *p, const unsigned char *end,
                     tsv_impl *t) {
    static const unsigned char bom[3] = {0xEF, 0xBB, 0xBF};
    if (end - p >= 3 && memcmp(p, bom, 3) == 0) p += 3;
    int64_t n = 0;
    for (long long line = 1; p < end; line++) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));
        const unsigned char *e = nl ? nl : end;
        if (e > p && e[-1] == '\r') e--;
        if (e > p) {
            const unsigned char *tab = memchr(p, '\t', (size_t)(e - p));
            if (!tab) {
                qkv_set_error("qkv_tsv_read: %s:%lld: no tab between label and text", path,
                              line);
                return -1;
            }
            if (tab == p) {
                qkv_set_error("qkv_tsv_read: %s:%lld: empty label", path, line);
                return -1;
            }
            if (!append_clean(&t->bytes, p, tab) || !append_clean(&t->bytes, tab + 1, e))
                return -1;
            n++;
        }
        p = nl ? nl + 1 : end;
    }
    return n;
}

qkv_tsv *qkv_tsv_read(const char *path) {
    if (!path) return qkv_set_error("qkv_tsv_read: path is NULL");
    bool had_error = qkv_error() != NULL;
    qkv__buf file = {0};
    tsv_impl *t = qkv__calloc(sizeof *t);
    if (!t || !read_file(path, &file)) goto fail;
    const unsigned char *start = (const unsigned char *)file.data;
    int64_t n = parse(path, start, start + file.len, t);
    if (n < 0) goto fail;
    qkv__buf_free(&file);

    t->ptrs_size = (size_t)(n ? n : 1) * sizeof(const char *);
    if (!(t->labels = qkv__alloc(t->ptrs_size)) || !(t->texts = qkv__alloc(t->ptrs_size)))
        goto fail;
    const char *s = t->bytes.data;
    for (int64_t i = 0; i < n; i++) {
        t->labels[i] = s;
        s += strlen(s) + 1;
        t->texts[i] = s;
        s += strlen(s) + 1;
    }
    t->pub = (qkv_tsv){n, t->labels, t->texts};
    return &t->pub;
fail:
    qkv__name_file_in_error("qkv_tsv_read", path, had_error);
    qkv__buf_free(&file);
    qkv_tsv_free(t ? &t->pub : NULL);
    return NULL;
}
