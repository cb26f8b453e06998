/*
 * The safetensors file format: an 8-byte little-endian header length N, N bytes of JSON
 * mapping each tensor name to {"dtype", "shape", "data_offsets"} (plus an optional
 * "__metadata__" object of strings), then the raw little-endian data. This file writes such
 * files atomically and reads them as hostile input: every length, offset, shape and string is
 * checked before it is used, and a bad file is an error that names the file and the problem.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"
#include "io/io_internal.h"
#include "tensor/tensor_internal.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this host is not"
#endif

/* The format's own limit on the header (the reference implementation refuses larger ones). */
#define MAX_HEADER 100000000u
#define CHECKSUM_KEY "qkv.checksum"
#define EXTRAS_KEY "qkv.extras"
/* Present in files whose checksum covers the whole file (format 2). Files of format 1 carry a
 * checksum of the data alone and no such key. The two keys guard each other: a damaged
 * checksum key leaves this one asking for a checksum, and a damaged one of these makes the
 * file's own checksum disagree. */
#define FORMAT_KEY "qkv.format"
#define FORMAT_VALUE "2"
/* "crc32:" and 8 lowercase hex digits */
#define CHECKSUM_PREFIX "crc32:"
#define CHECKSUM_LEN 14

/* ---- Dtypes ------------------------------------------------------------------------------ */

/* The dtypes a file may hold, and what each becomes when read as a qkv tensor. */
typedef struct file_dtype {
    const char *name;
    size_t size;
    qkv_dtype as;
} file_dtype;

static const file_dtype file_dtypes[] = {
    {"F32", 4, QKV_F32},  {"F64", 8, QKV_F64},  {"I64", 8, QKV_I64},  {"BOOL", 1, QKV_BOOL},
    {"U8", 1, QKV_I64},   {"I8", 1, QKV_I64},   {"I16", 2, QKV_I64},  {"U16", 2, QKV_I64},
    {"I32", 4, QKV_I64},  {"U32", 4, QKV_I64},  {"F16", 2, QKV_F32},  {"BF16", 2, QKV_BF16},
};
#define N_FILE_DTYPES (int)(sizeof file_dtypes / sizeof file_dtypes[0])
enum { DT_F32, DT_F64, DT_I64, DT_BOOL, DT_U8, DT_BF16 = 11 };

static int find_dtype(const char *name) {
    for (int i = 0; i < N_FILE_DTYPES; i++)
        if (strcmp(file_dtypes[i].name, name) == 0) return i;
    return -1;
}

static int dtype_of(qkv_dtype d) {
    return d == QKV_F32 ? DT_F32 : d == QKV_F64 ? DT_F64 : d == QKV_I64 ? DT_I64
         : d == QKV_BF16 ? DT_BF16 : DT_BOOL;
}

/* ---- CRC-32 (IEEE 802.3, reflected, as zlib's crc32) -------------------------------------- */

uint32_t qkv__crc32(uint32_t crc, const void *data, size_t n) {
    /* Four bits at a time: a table small enough to write out, so nothing is built at run time
     * (and no thread can see it half built). */
    static const uint32_t nibble[16] = {
        0x00000000, 0x1DB71064, 0x3B6E20C8, 0x26D930AC, 0x76DC4190, 0x6B6B51F4,
        0x4DB26158, 0x5005713C, 0xEDB88320, 0xF00F9344, 0xD6D6A3E8, 0xCB61B38C,
        0x9B64C2B0, 0x86D3D2D4, 0xA00AE278, 0xBDBDF21C,
    };
    const unsigned char *p = data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        crc = nibble[crc & 15] ^ (crc >> 4);
        crc = nibble[crc & 15] ^ (crc >> 4);
    }
    return ~crc;
}

/* ---- A growable byte buffer (for the header) -------------------------------------------- */

typedef struct buffer {
    char *data;
    size_t n, cap;
    bool failed;
} buffer;

static void put(buffer *b, const void *s, size_t n) {
    if (b->failed) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap;
        if (!qkv__reserve((void **)&b->data, &cap, b->n + n + 1, 1)) {
            b->failed = true;
            return;
        }
        b->cap = cap;
    }
    memcpy(b->data + b->n, s, n);
    b->n += n;
    b->data[b->n] = '\0';
}

static void put_text(buffer *b, const char *s) {
    put(b, s, strlen(s));
}

static void putf(buffer *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(buffer *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) b->failed = true; /* never: the formats are short */
    else put(b, tmp, (size_t)n);
}

static void put_json_string(buffer *b, const char *s) {
    put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            put(b, esc, 2);
        } else if (c < 0x20) {
            putf(b, "\\u%04x", c);
        } else {
            put(b, s, 1);
        }
    }
    put(b, "\"", 1);
}

static void buffer_free(buffer *b) {
    if (b->data) qkv__free(b->data, b->cap);
    *b = (buffer){0};
}

/* ---- Writing ----------------------------------------------------------------------------- */

static size_t fail_write_after = SIZE_MAX;

void qkv_debug_fail_write_after(size_t nbytes) {
    fail_write_after = nbytes ? nbytes : SIZE_MAX;
}

/* One entry to write: a tensor (contiguous copy made on demand) or raw bytes. */
typedef struct out_entry {
    const char *name;
    const qkv_tensor *tensor;
    const void *bytes;
    size_t nbytes;
} out_entry;

static bool valid_utf8(const unsigned char *s, size_t n);

static bool check_name(const char *path, const char *name) {
    size_t n = strlen(name);
    bool ok = n > 0 && strcmp(name, "__metadata__") != 0 &&
              valid_utf8((const unsigned char *)name, n);
    for (size_t i = 0; ok && i < n; i++) ok = (unsigned char)name[i] >= 0x20;
    if (!ok) qkv_set_error("qkv_safetensors_write: %s: bad tensor name \"%s\"", path, name);
    return ok;
}

static size_t entry_bytes(const out_entry *e) {
    return e->tensor ? (size_t)e->tensor->numel * qkv_dtype_size(e->tensor->dtype) : e->nbytes;
}

/* The header, with the checksum's 8 hex digits left as zeros at *digits (an offset in h): the
 * checksum covers every byte of the file but those, so it is computed once the header is. */
static bool build_header(buffer *h, const char *path, const out_entry *e, int n,
                         const qkv_checkpoint_contents *x, size_t *digits) {
    put(h, "{", 1);
    size_t offset = 0;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < i; j++)
            if (strcmp(e[i].name, e[j].name) == 0) {
                qkv_set_error("qkv_safetensors_write: %s: two tensors named \"%s\"", path,
                              e[i].name);
                return false;
            }
        if (!check_name(path, e[i].name)) return false;
        size_t size = entry_bytes(&e[i]);
        put_json_string(h, e[i].name);
        const qkv_tensor *t = e[i].tensor;
        putf(h, ":{\"dtype\":\"%s\",\"shape\":[",
             file_dtypes[t ? dtype_of(t->dtype) : DT_U8].name);
        for (int d = 0; t && d < t->ndim; d++)
            putf(h, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        if (!t) putf(h, "%zu", size);
        putf(h, "],\"data_offsets\":[%zu,%zu]},", offset, offset + size);
        offset += size;
    }
    put(h, "\"__metadata__\":{", 16);
    put_text(h, "\"" CHECKSUM_KEY "\":\"" CHECKSUM_PREFIX);
    *digits = h->n;
    put_text(h, "00000000\",\"" FORMAT_KEY "\":\"" FORMAT_VALUE "\"");
    for (int i = 0; x && i < x->n_meta; i++) {
        const char *k = x->meta[i].key, *v = x->meta[i].value;
        bool repeated = false;
        for (int j = 0; k && j < i; j++) repeated |= x->meta[j].key && !strcmp(x->meta[j].key, k);
        if (!k || !v || repeated || !strncmp(k, "qkv.", 4) ||
            !valid_utf8((const unsigned char *)k, strlen(k)) ||
            !valid_utf8((const unsigned char *)v, strlen(v))) {
            qkv_set_error("qkv_safetensors_write: %s: bad metadata key \"%s\"", path,
                          k ? k : "(null)");
            return false;
        }
        put(h, ",", 1);
        put_json_string(h, k);
        put(h, ":", 1);
        put_json_string(h, v);
    }
    if (x && (x->n_tensors || x->n_bytes)) {
        /* The extras' names, one per line, so a strict load knows they are not the model's. */
        buffer names = {0};
        for (int i = 0; i < x->n_tensors + x->n_bytes; i++) {
            const char *name = i < x->n_tensors ? x->tensor_names[i]
                                                : x->bytes[i - x->n_tensors].name;
            put(&names, name, strlen(name));
            put(&names, "\n", 1);
        }
        put(h, ",\"" EXTRAS_KEY "\":", 14);
        if (!names.failed) put_json_string(h, names.data);
        h->failed |= names.failed;
        buffer_free(&names);
    }
    put(h, "}}", 2);
    /* Pad with spaces so that the data starts 8-byte aligned, as the reference writer does. */
    while (!h->failed && (8 + h->n) % 8) put(h, " ", 1);
    if (h->failed) qkv_set_error("qkv_safetensors_write: %s: out of memory", path);
    return !h->failed;
}

/* write(2) until done; honours the test switch that makes a write fail part way. */
static bool write_all(int fd, const void *data, size_t n, size_t *written) {
    const char *p = data;
    while (n > 0) {
        size_t chunk = n;
        if (*written >= fail_write_after) {
            errno = ENOSPC;
            return false;
        }
        if (chunk > fail_write_after - *written) chunk = fail_write_after - *written;
        ssize_t w = write(fd, p, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
        *written += (size_t)w;
    }
    return true;
}

/* Writes the header and data to a new temporary file beside path, syncs it, and renames it
 * over path, so that a reader sees either the old file or the whole new one. */
static bool write_file(const char *path, const buffer *h, const out_entry *e, int n,
                       const void *const *data) {
    size_t target_size;
    char *target = qkv__resolve_links("qkv_safetensors_write", path, &target_size);
    if (!target) return false;
    size_t len = strlen(target) + 48;
    char *tmp = qkv__alloc(len);
    if (!tmp) {
        qkv__free(target, target_size);
        return false;
    }
    qkv__remove_stale_temporaries(target);
    int fd = qkv__open_temporary(target, tmp, len);
    int err = fd < 0 ? errno : 0; /* the first failure's errno */
    size_t written = 0;
    unsigned char head[8];
    for (int i = 0; i < 8; i++) head[i] = (unsigned char)((uint64_t)h->n >> (8 * i));
    bool ok = fd >= 0 && write_all(fd, head, 8, &written) &&
              write_all(fd, h->data, h->n, &written);
    for (int i = 0; ok && i < n; i++) ok = write_all(fd, data[i], entry_bytes(&e[i]), &written);
    ok = ok && fsync(fd) == 0;
    if (!ok && !err) err = errno;
    if (fd >= 0 && close(fd) != 0 && ok) err = errno, ok = false;
    if (ok && rename(tmp, target) != 0) err = errno, ok = false;
    if (!ok) {
        qkv_set_error("qkv_safetensors_write: %s: %s", path, strerror(err ? err : EIO));
        if (fd >= 0) unlink(tmp);
    } else {
        /* Make the rename itself durable. */
        char *slash = strrchr(tmp, '/');
        if (slash) *slash = '\0';
        int dir = open(slash ? (slash == tmp ? "/" : tmp) : ".",
                       O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir >= 0) {
            fsync(dir);
            close(dir);
        }
    }
    qkv__free(tmp, len);
    qkv__free(target, target_size);
    return ok;
}

bool qkv_safetensors_writable(const char *path, size_t size) {
    if (!path) return qkv_set_error("qkv_safetensors_writable: no path"), false;
    size_t target_size, len = 0;
    char *target = qkv__resolve_links("qkv_safetensors_writable", path, &target_size);
    char *tmp = target ? qkv__alloc(len = strlen(target) + 48) : NULL;
    if (!tmp) {
        if (target) qkv__free(target, target_size);
        return false;
    }
    struct stat st;
    int err = stat(target, &st) == 0 && S_ISDIR(st.st_mode) ? EISDIR : 0, fd = -1;
    if (!err) {
        qkv__remove_stale_temporaries(target);
        fd = qkv__open_temporary(target, tmp, len);
        if (fd < 0) err = errno;
    }
    if (fd >= 0) {
        /* Room for the file, taken for real: a full disk says so now, not after the work. */
        if (size >= fail_write_after) err = ENOSPC;
        else if (size && (err = posix_fallocate(fd, 0, (off_t)size)) == EOPNOTSUPP) err = 0;
        close(fd);
        unlink(tmp);
    }
    if (err) qkv_set_error("qkv_safetensors_writable: %s: %s", path, strerror(err));
    qkv__free(tmp, len);
    qkv__free(target, target_size);
    return !err;
}

static bool write_entries(const char *path, const out_entry *e, int n,
                          const qkv_checkpoint_contents *x) {
    buffer h = {0};
    const void **data = qkv__calloc((size_t)(n ? n : 1) * sizeof *data);
    bool ok = data != NULL;
    size_t digits = 0;
    qkv_scope_begin();
    for (int i = 0; ok && i < n; i++) {
        if (e[i].tensor) {
            qkv_tensor *c = qkv__contiguous(e[i].tensor);
            ok = c != NULL;
            data[i] = c ? qkv_data(c) : NULL;
        } else {
            data[i] = e[i].bytes;
        }
    }
    ok = ok && build_header(&h, path, e, n, x, &digits);
    if (ok) {
        /* Every byte of the file but the digits themselves, in file order. */
        unsigned char len[8];
        for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)h.n >> (8 * i));
        uint32_t crc = qkv__crc32(0, len, 8);
        crc = qkv__crc32(crc, h.data, digits);
        crc = qkv__crc32(crc, h.data + digits + 8, h.n - digits - 8);
        for (int i = 0; i < n; i++) crc = qkv__crc32(crc, data[i], entry_bytes(&e[i]));
        char hex[9];
        snprintf(hex, sizeof hex, "%08x", (unsigned)crc);
        memcpy(h.data + digits, hex, 8);
    }
    ok = ok && write_file(path, &h, e, n, data);
    qkv_scope_end();
    buffer_free(&h);
    if (data) qkv__free(data, (size_t)(n ? n : 1) * sizeof *data);
    return ok;
}

bool qkv_safetensors_write(const char *path, const qkv_named_list *tensors,
                           const qkv_checkpoint_contents *extras) {
    if (!path) return qkv_set_error("qkv_safetensors_write: no path"), false;
    const qkv_checkpoint_contents none = {0};
    const qkv_checkpoint_contents *x = extras ? extras : &none;
    int n_main = tensors ? tensors->n : 0;
    int n = n_main + x->n_tensors + x->n_bytes;
    out_entry *e = qkv__calloc((size_t)(n ? n : 1) * sizeof *e);
    if (!e) return false;
    bool ok = true;
    for (int i = 0; i < n_main; i++) {
        e[i] = (out_entry){tensors->names[i], tensors->tensors[i], NULL, 0};
        ok = ok && tensors->names[i] && tensors->tensors[i];
    }
    for (int i = 0; i < x->n_tensors; i++) {
        e[n_main + i] = (out_entry){x->tensor_names[i], x->tensors[i], NULL, 0};
        ok = ok && x->tensor_names[i] && x->tensors[i];
    }
    for (int i = 0; i < x->n_bytes; i++) {
        const qkv_named_bytes *b = &x->bytes[i];
        e[n_main + x->n_tensors + i] = (out_entry){b->name, NULL, b->data, b->size};
        ok = ok && b->name && (b->data || b->size == 0);
    }
    if (!ok) qkv_set_error("qkv_safetensors_write: %s: an entry has no name or no data", path);
    ok = ok && write_entries(path, e, n, x);
    qkv__free(e, (size_t)(n ? n : 1) * sizeof *e);
    return ok;
}

/* ---- Reading: JSON ------------------------------------------------------------------------ */

/* Well-formed UTF-8 (no overlongs, no surrogates, nothing past U+10FFFF). */
static bool valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) len = 1, cp = c;
        else if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
        else return false;
        if (i + len > n) return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

/* A cursor over the header's JSON. Errors record the byte position. */
typedef struct json {
    const char *path;
    const char *s;
    size_t n, i;
    bool failed;
} json;

static bool jfail(json *j, const char *what) {
    if (!j->failed)
        qkv_set_error("qkv_safetensors_read: %s: header byte %zu: %s", j->path, j->i, what);
    j->failed = true;
    return false;
}

static void *jfail_null(json *j, const char *what) {
    jfail(j, what);
    return NULL;
}

static void skip_ws(json *j) {
    while (j->i < j->n && (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' ||
                           j->s[j->i] == '\r'))
        j->i++;
}

static bool expect(json *j, char c) {
    skip_ws(j);
    if (j->i < j->n && j->s[j->i] == c) {
        j->i++;
        return true;
    }
    char what[32];
    snprintf(what, sizeof what, "expected '%c'", c);
    return jfail(j, what);
}

/* True (consuming it) when the next character is c. */
static bool next_is(json *j, char c) {
    skip_ws(j);
    if (j->i < j->n && j->s[j->i] == c) {
        j->i++;
        return true;
    }
    return false;
}

static int hex4(const char *s) {
    int v = 0;
    for (int k = 0; k < 4; k++) {
        char c = s[k];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static size_t put_utf8(char *out, uint32_t cp) {
    size_t n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    if (n == 1) {
        out[0] = (char)cp;
        return 1;
    }
    for (size_t i = n - 1; i > 0; i--, cp >>= 6) out[i] = (char)(0x80 | (cp & 0x3F));
    out[0] = (char)((0xF00 >> n) | cp); /* 110xxxxx, 1110xxxx or 11110xxx */
    return n;
}

/* A JSON string, decoded into a new qkv__alloc'd C string of *size bytes (free with that). An
 * escaped NUL is refused: names and values are C strings. */
static char *parse_string(json *j, size_t *size) {
    if (!expect(j, '"')) return NULL;
    size_t start = j->i, end = start;
    while (end < j->n && j->s[end] != '"') end += j->s[end] == '\\' ? 2 : 1;
    if (end >= j->n) return jfail_null(j, "unterminated string");
    *size = end - start + 1;
    char *out = qkv__alloc(*size);
    if (!out) return jfail_null(j, "out of memory");
    size_t o = 0;
    while (j->i < end) {
        unsigned char c = (unsigned char)j->s[j->i];
        if (c < 0x20) {
            qkv__free(out, *size);
            jfail(j, "control character in a string");
            return NULL;
        }
        if (c != '\\') {
            out[o++] = (char)c;
            j->i++;
            continue;
        }
        char e = j->s[j->i + 1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            out[o++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
            j->i += 2;
            continue;
        }
        int cp = e == 'u' && j->i + 6 <= end ? hex4(j->s + j->i + 2) : -1;
        j->i += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF && j->i + 6 <= end && j->s[j->i] == '\\' &&
            j->s[j->i + 1] == 'u') {
            int lo = hex4(j->s + j->i + 2);
            cp = lo >= 0xDC00 && lo <= 0xDFFF ? 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                                              : -1;
            j->i += 6;
        }
        if (cp <= 0 || (cp >= 0xD800 && cp <= 0xDFFF)) {
            qkv__free(out, *size);
            return jfail_null(j, "bad escape in a string");
        }
        o += put_utf8(out + o, (uint32_t)cp); /* never longer than the 6-byte escape */
    }
    j->i = end + 1;
    out[o] = '\0';
    if (!valid_utf8((const unsigned char *)out, o)) {
        qkv__free(out, *size);
        return jfail_null(j, "string is not UTF-8");
    }
    return out;
}

/* A non-negative integer below 2^62 (shapes and offsets). */
static bool parse_count(json *j, uint64_t *v) {
    skip_ws(j);
    size_t start = j->i;
    *v = 0;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') {
        uint64_t d = (uint64_t)(j->s[j->i] - '0');
        if (*v > ((1ull << 62) - 1 - d) / 10) return jfail(j, "number too large");
        *v = *v * 10 + d;
        j->i++;
    }
    if (j->i == start) return jfail(j, "expected a non-negative integer");
    if (j->s[start] == '0' && j->i - start > 1) return jfail(j, "leading zero in a number");
    if (j->i < j->n && strchr(".eE", j->s[j->i])) return jfail(j, "expected an integer");
    return true;
}

/* ---- Reading: the file -------------------------------------------------------------------- */

typedef struct st_entry {
    char *name;
    size_t name_size;
    int dtype;                       /* index into file_dtypes */
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    uint64_t begin, end;             /* within the data section */
} st_entry;

typedef struct st_meta {
    char *key, *value;
    size_t key_size, value_size;
    size_t raw, raw_len;             /* the value as written: its bytes in the header */
} st_meta;

struct qkv_safetensors {
    char *path;
    size_t path_size;
    unsigned char *file;             /* the whole file */
    size_t file_size;
    const unsigned char *data;       /* the data section, inside file */
    uint64_t data_size;
    int n, cap;
    st_entry *entries;
    int n_meta, cap_meta;
    st_meta *meta;
    const st_entry **by_name;        /* the entries sorted by name, for lookups */
    const st_meta **meta_by_key;     /* the metadata sorted by key */
    char *extras;                    /* the names listed in qkv.extras, NUL-separated */
    size_t extras_size;
    const char **extras_sorted;
    int n_extras, cap_extras;
};

/* Duplicate keys are found after parsing, by sorting (check_metadata). */
static bool meta_add(qkv_safetensors *f, json *j, st_meta m) {
    size_t cap = (size_t)f->cap_meta;
    if (!qkv__reserve((void **)&f->meta, &cap, (size_t)f->n_meta + 1, sizeof *f->meta)) {
        qkv__free(m.key, m.key_size);
        qkv__free(m.value, m.value_size);
        return jfail(j, "out of memory");
    }
    f->cap_meta = (int)cap;
    f->meta[f->n_meta++] = m;
    return true;
}

static bool parse_metadata(qkv_safetensors *f, json *j) {
    if (!expect(j, '{')) return false;
    if (next_is(j, '}')) return true;
    do {
        size_t ks = 0, vs = 0;
        char *key = parse_string(j, &ks);
        if (!key) return false;
        bool colon = expect(j, ':');
        skip_ws(j);
        if (colon && (j->i >= j->n || j->s[j->i] != '"'))
            jfail(j, "__metadata__ values must be strings");
        size_t raw = j->i + 1; /* after the opening quote */
        char *value = j->failed ? NULL : parse_string(j, &vs);
        if (!value) {
            qkv__free(key, ks);
            return false;
        }
        if (!meta_add(f, j, (st_meta){key, value, ks, vs, raw, j->i - 1 - raw})) return false;
    } while (next_is(j, ','));
    return expect(j, '}');
}

static bool parse_shape(json *j, st_entry *e) {
    if (!expect(j, '[')) return false;
    if (next_is(j, ']')) return true;
    do {
        uint64_t d;
        if (e->ndim == QKV_MAX_DIMS) return jfail(j, "more than 8 dimensions");
        if (!parse_count(j, &d)) return false;
        e->shape[e->ndim++] = (int64_t)d;
    } while (next_is(j, ','));
    return expect(j, ']');
}

static bool parse_offsets(json *j, st_entry *e) {
    return expect(j, '[') && parse_count(j, &e->begin) && expect(j, ',') &&
           parse_count(j, &e->end) && expect(j, ']');
}

/* {"dtype": ..., "shape": [...], "data_offsets": [b, e]}, each field once, in any order. */
static bool parse_tensor(json *j, st_entry *e) {
    bool seen[3] = {false, false, false};
    if (!expect(j, '{')) return false;
    do {
        size_t ks = 0;
        char *key = parse_string(j, &ks);
        if (!key) return false;
        int field = !strcmp(key, "dtype") ? 0 : !strcmp(key, "shape") ? 1
                    : !strcmp(key, "data_offsets") ? 2 : -1;
        qkv__free(key, ks);
        if (field < 0) return jfail(j, "unknown field in a tensor entry");
        if (seen[field]) return jfail(j, "repeated field in a tensor entry");
        seen[field] = true;
        if (!expect(j, ':')) return false;
        if (field == 0) {
            size_t ds = 0;
            char *dtype = parse_string(j, &ds);
            if (!dtype) return false;
            e->dtype = find_dtype(dtype);
            qkv__free(dtype, ds);
            if (e->dtype < 0) return jfail(j, "unknown dtype");
        } else if (!(field == 1 ? parse_shape(j, e) : parse_offsets(j, e))) {
            return false;
        }
    } while (next_is(j, ','));
    if (!expect(j, '}')) return false;
    if (!seen[0] || !seen[1] || !seen[2])
        return jfail(j, "a tensor entry needs dtype, shape and data_offsets");
    return true;
}

static bool add_entry(qkv_safetensors *f, json *j, char *name, size_t name_size) {
    size_t cap = (size_t)f->cap;
    if (!qkv__reserve((void **)&f->entries, &cap, (size_t)f->n + 1, sizeof *f->entries)) {
        qkv__free(name, name_size);
        return jfail(j, "out of memory");
    }
    f->cap = (int)cap;
    st_entry *e = &f->entries[f->n++];
    *e = (st_entry){.name = name, .name_size = name_size};
    return parse_tensor(j, e);
}

static bool parse_header(qkv_safetensors *f, json *j) {
    bool seen_meta = false;
    if (!expect(j, '{')) return false;
    if (!next_is(j, '}')) {
        do {
            size_t ks = 0;
            char *key = parse_string(j, &ks);
            if (!key || !expect(j, ':')) {
                if (key) qkv__free(key, ks);
                return false;
            }
            if (strcmp(key, "__metadata__") == 0) {
                qkv__free(key, ks);
                if (seen_meta) return jfail(j, "two __metadata__ objects");
                seen_meta = true;
                if (!parse_metadata(f, j)) return false;
            } else if (!add_entry(f, j, key, ks)) {
                return false;
            }
        } while (next_is(j, ','));
        if (!expect(j, '}')) return false;
    }
    skip_ws(j);
    if (j->i != j->n) return jfail(j, "data after the header's JSON object");
    return true;
}

static int cmp_by_name(const void *a, const void *b) {
    return strcmp((*(const st_entry *const *)a)->name, (*(const st_entry *const *)b)->name);
}

/* By (begin, end), as the reference reader orders them: an empty tensor at an offset comes
 * before the tensor that starts there. */
static int cmp_by_offset(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    if (x->begin != y->begin) return (x->begin > y->begin) - (x->begin < y->begin);
    return (x->end > y->end) - (x->end < y->end);
}

static bool bad_file(const qkv_safetensors *f, const char *fmt, const char *name) {
    char what[256];
    snprintf(what, sizeof what, fmt, name);
    qkv_set_error("qkv_safetensors_read: %s: %s", f->path, what);
    return false;
}

/* Each tensor's byte size agrees with its dtype and shape, and the tensors tile the data
 * section exactly: no overlaps, no gaps, nothing outside it. Names are unique. */
static bool check_entries(qkv_safetensors *f) {
    for (int i = 0; i < f->n; i++) {
        const st_entry *e = &f->entries[i];
        /* The non-zero sizes are bounded too: an empty tensor may not hide huge ones. */
        uint64_t bytes = file_dtypes[e->dtype].size, nonzero = bytes;
        for (int d = 0; d < e->ndim; d++) {
            uint64_t s = (uint64_t)e->shape[d];
            if (s && nonzero > (1ull << 58) / s)
                return bad_file(f, "tensor \"%s\": its shape's size overflows", e->name);
            nonzero *= s ? s : 1;
            bytes *= s;
        }
        if (e->end < e->begin || e->end - e->begin != bytes)
            return bad_file(f, "tensor \"%s\": data_offsets disagree with its dtype and shape",
                            e->name);
        if (e->end > f->data_size)
            return bad_file(f, "tensor \"%s\": data_offsets run past the end of the file",
                            e->name);
    }
    size_t count = (size_t)(f->n ? f->n : 1);
    f->by_name = qkv__alloc(count * sizeof *f->by_name);
    const st_entry **order = qkv__alloc(count * sizeof *order);
    bool ok = f->by_name && order;
    for (int i = 0; ok && i < f->n; i++) order[i] = f->by_name[i] = &f->entries[i];
    if (ok) qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_by_name);
    for (int i = 1; i < f->n && ok; i++)
        if (strcmp(f->by_name[i]->name, f->by_name[i - 1]->name) == 0)
            ok = bad_file(f, "two tensors named \"%s\"", f->by_name[i]->name);
    if (ok) qsort(order, (size_t)f->n, sizeof *order, cmp_by_offset);
    uint64_t at = 0;
    for (int i = 0; i < f->n && ok; i++) {
        if (order[i]->begin != at)
            ok = bad_file(f, order[i]->begin < at ? "tensor \"%s\" overlaps another tensor"
                                                  : "a gap in the data before tensor \"%s\"",
                          order[i]->name);
        at = order[i]->end;
    }
    if (ok && at != f->data_size) ok = bad_file(f, "%s", "bytes after the last tensor's data");
    if (order) qkv__free(order, count * sizeof *order);
    return ok;
}

static int cmp_meta(const void *a, const void *b) {
    return strcmp((*(const st_meta *const *)a)->key, (*(const st_meta *const *)b)->key);
}

static int cmp_string(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Unique keys (found by sorting them), and the qkv.extras list split once for lookups. */
static bool check_metadata(qkv_safetensors *f) {
    size_t count = (size_t)(f->n_meta ? f->n_meta : 1);
    f->meta_by_key = qkv__alloc(count * sizeof *f->meta_by_key);
    if (!f->meta_by_key) return false;
    for (int i = 0; i < f->n_meta; i++) f->meta_by_key[i] = &f->meta[i];
    qsort(f->meta_by_key, (size_t)f->n_meta, sizeof *f->meta_by_key, cmp_meta);
    for (int i = 1; i < f->n_meta; i++)
        if (strcmp(f->meta_by_key[i]->key, f->meta_by_key[i - 1]->key) == 0)
            return bad_file(f, "duplicate key \"%s\" in __metadata__", f->meta_by_key[i]->key);
    const char *list = qkv_safetensors_meta(f, EXTRAS_KEY);
    if (!list) return true;
    f->extras_size = strlen(list) + 1;
    f->extras = qkv__alloc(f->extras_size);
    if (!f->extras) return false;
    memcpy(f->extras, list, f->extras_size);
    int n = 0;
    for (char *p = f->extras; *p; p++) n += *p == '\n';
    f->extras_sorted = qkv__alloc((size_t)(n + 1) * sizeof *f->extras_sorted);
    if (!f->extras_sorted) return false;
    f->cap_extras = n + 1;
    for (char *p = f->extras, *eol; (eol = strchr(p, '\n')); p = eol + 1) {
        *eol = '\0';
        f->extras_sorted[f->n_extras++] = p;
    }
    qsort(f->extras_sorted, (size_t)f->n_extras, sizeof *f->extras_sorted, cmp_string);
    return true;
}

static const st_meta *find_meta(const qkv_safetensors *f, const char *key);

/* Format 2 (qkv.format "2"): a CRC-32 of every byte of the file but the checksum's 8 digits,
 * so that no damage to the header (a key, a shape, the checksum's own name) goes unseen.
 * Format 1 (no qkv.format, qkv's files before it): a CRC-32 of the data alone. */
static bool check_checksum(const qkv_safetensors *f) {
    const st_meta *sum = find_meta(f, CHECKSUM_KEY);
    const char *format = qkv_safetensors_meta(f, FORMAT_KEY);
    if (!sum && format)
        return bad_file(f, "%s", FORMAT_KEY " without " CHECKSUM_KEY ": the file is damaged");
    if (!sum) return true; /* files from other writers carry none */
    if (format && strcmp(format, FORMAT_VALUE)) /* a later scheme, or a damaged digit */
        return bad_file(f, "unsupported " FORMAT_KEY " \"%s\"", format);
    const char *v = sum->value;
    uint32_t want = 0;
    /* As written, with no escapes: the digits are then the raw bytes the checksum skips. */
    bool ok = sum->raw_len == CHECKSUM_LEN && strlen(v) == CHECKSUM_LEN &&
              strncmp(v, CHECKSUM_PREFIX, 6) == 0;
    for (int i = 6; ok && i < CHECKSUM_LEN; i++) {
        char c = v[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        ok = d >= 0;
        want = want << 4 | (uint32_t)(ok ? d : 0);
    }
    if (!ok) return bad_file(f, "%s", "malformed " CHECKSUM_KEY);
    uint32_t got;
    if (format) {
        size_t digits = 8 + sum->raw + 6;
        got = qkv__crc32(0, f->file, digits);
        got = qkv__crc32(got, f->file + digits + 8, f->file_size - digits - 8);
    } else {
        got = qkv__crc32(0, f->data, f->data_size);
    }
    if (got != want) return bad_file(f, "%s", "checksum mismatch: the file is damaged");
    return true;
}

static bool read_whole(qkv_safetensors *f) {
    FILE *fp = fopen(f->path, "rb");
    if (!fp) return bad_file(f, "%s", strerror(errno));
    struct stat st;
    bool ok = fstat(fileno(fp), &st) == 0;
    if (!ok) bad_file(f, "%s", strerror(errno));
    if (ok && !S_ISREG(st.st_mode)) ok = bad_file(f, "%s", "not a regular file");
    if (ok && (uint64_t)st.st_size > (uint64_t)SIZE_MAX / 2)
        ok = bad_file(f, "%s", "file too large");
    if (ok) {
        f->file_size = (size_t)st.st_size;
        f->file = qkv__alloc(f->file_size ? f->file_size : 1);
        ok = f->file && fread(f->file, 1, f->file_size, fp) == f->file_size;
        if (f->file && !ok) bad_file(f, "%s", "read error");
    }
    fclose(fp);
    return ok;
}

/* A file object named `name` with its path copied; NULL on allocation failure. */
static qkv_safetensors *file_new(const char *name) {
    qkv_safetensors *f = qkv__calloc(sizeof *f);
    if (!f) return NULL;
    f->path_size = strlen(name) + 1;
    f->path = qkv__alloc(f->path_size);
    if (!f->path) {
        qkv_safetensors_free(f);
        return NULL;
    }
    memcpy(f->path, name, f->path_size);
    return f;
}

/* Checks and indexes f->file; frees f and returns NULL when it is not a good file. */
static qkv_safetensors *parse_file(qkv_safetensors *f) {
    uint64_t hlen = 0;
    bool ok = true;
    if (f->file_size < 8)
        ok = bad_file(f, "%s", "shorter than the 8-byte header length: not a safetensors file");
    for (int i = 0; ok && i < 8; i++) hlen |= (uint64_t)f->file[i] << (8 * i);
    if (ok && hlen > f->file_size - 8) {
        char what[96];
        snprintf(what, sizeof what, "header length %llu runs past the end of the file",
                 (unsigned long long)hlen);
        ok = bad_file(f, "%s", what);
    }
    if (ok && hlen > MAX_HEADER) ok = bad_file(f, "%s", "header larger than 100,000,000 bytes");
    if (ok) {
        json j = {f->path, (const char *)f->file + 8, (size_t)hlen, 0, false};
        f->data = f->file + 8 + hlen;
        f->data_size = f->file_size - 8 - hlen;
        ok = parse_header(f, &j) && check_entries(f) && check_metadata(f) &&
             check_checksum(f);
    }
    if (!ok) {
        qkv_safetensors_free(f);
        return NULL;
    }
    return f;
}

qkv_safetensors *qkv_safetensors_read(const char *path) {
    if (!path) return qkv_set_error("qkv_safetensors_read: no path");
    bool had_error = qkv_error() != NULL;
    qkv_safetensors *f = file_new(path);
    if (f && !read_whole(f)) {
        qkv_safetensors_free(f);
        f = NULL;
    }
    f = f ? parse_file(f) : NULL;
    if (!f) qkv__name_file_in_error("qkv_safetensors_read", path, had_error);
    return f;
}

qkv_safetensors *qkv_safetensors_from_bytes(const void *data, size_t size, const char *name) {
    qkv_safetensors *f = file_new(name ? name : "(memory)");
    if (!f) return NULL;
    f->file_size = size;
    f->file = qkv__alloc(size ? size : 1);
    if (!f->file) {
        qkv_safetensors_free(f);
        return NULL;
    }
    if (size) memcpy(f->file, data, size);
    return parse_file(f);
}

void qkv_safetensors_free(qkv_safetensors *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) qkv__free(f->entries[i].name, f->entries[i].name_size);
    if (f->entries) qkv__free(f->entries, (size_t)f->cap * sizeof *f->entries);
    for (int i = 0; i < f->n_meta; i++) {
        qkv__free(f->meta[i].key, f->meta[i].key_size);
        qkv__free(f->meta[i].value, f->meta[i].value_size);
    }
    if (f->meta) qkv__free(f->meta, (size_t)f->cap_meta * sizeof *f->meta);
    if (f->by_name) qkv__free(f->by_name, (size_t)(f->n ? f->n : 1) * sizeof *f->by_name);
    if (f->meta_by_key)
        qkv__free(f->meta_by_key, (size_t)(f->n_meta ? f->n_meta : 1) * sizeof *f->meta_by_key);
    if (f->extras) qkv__free(f->extras, f->extras_size);
    if (f->extras_sorted)
        qkv__free(f->extras_sorted, (size_t)f->cap_extras * sizeof *f->extras_sorted);
    if (f->file) qkv__free(f->file, f->file_size ? f->file_size : 1);
    if (f->path) qkv__free(f->path, f->path_size);
    qkv__free(f, sizeof *f);
}

/* ---- Reading: access ---------------------------------------------------------------------- */

int qkv_safetensors_count(const qkv_safetensors *f) {
    return f ? f->n : 0;
}

const char *qkv_safetensors_name(const qkv_safetensors *f, int i) {
    return f && i >= 0 && i < f->n ? f->entries[i].name : NULL;
}

int qkv_safetensors_meta_count(const qkv_safetensors *f) {
    return f ? f->n_meta : 0;
}

const char *qkv_safetensors_meta_key(const qkv_safetensors *f, int i) {
    return f && i >= 0 && i < f->n_meta ? f->meta[i].key : NULL;
}

static int cmp_key_meta(const void *key, const void *m) {
    return strcmp(key, (*(const st_meta *const *)m)->key);
}

static int cmp_key_entry(const void *key, const void *e) {
    return strcmp(key, (*(const st_entry *const *)e)->name);
}

static const st_meta *find_meta(const qkv_safetensors *f, const char *key) {
    if (!f || !key) return NULL;
    if (!f->meta_by_key) { /* while the file is being checked */
        for (int i = 0; i < f->n_meta; i++)
            if (strcmp(f->meta[i].key, key) == 0) return &f->meta[i];
        return NULL;
    }
    const st_meta *const *m =
        bsearch(key, f->meta_by_key, (size_t)f->n_meta, sizeof *f->meta_by_key, cmp_key_meta);
    return m ? *m : NULL;
}

const char *qkv_safetensors_meta(const qkv_safetensors *f, const char *key) {
    const st_meta *m = find_meta(f, key);
    return m ? m->value : NULL;
}

static const st_entry *find(const qkv_safetensors *f, const char *name) {
    if (!f || !name) return NULL;
    const st_entry *const *e =
        bsearch(name, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_key_entry);
    return e ? *e : NULL;
}

bool qkv__safetensors_info(const qkv_safetensors *f, const char *name, int *ndim,
                           int64_t *shape, qkv_dtype *dtype) {
    const st_entry *e = find(f, name);
    if (!e) return false;
    *ndim = e->ndim;
    memcpy(shape, e->shape, (size_t)e->ndim * sizeof *shape);
    *dtype = file_dtypes[e->dtype].as;
    return true;
}

int qkv_safetensors_shape(const qkv_safetensors *f, const char *name,
                          int64_t shape[QKV_MAX_DIMS]) {
    const st_entry *e = find(f, name);
    if (!e) return -1;
    memcpy(shape, e->shape, (size_t)e->ndim * sizeof *shape);
    return e->ndim;
}

bool qkv__safetensors_is_extra(const qkv_safetensors *f, const char *name) {
    return f->n_extras && bsearch(&name, f->extras_sorted, (size_t)f->n_extras,
                                  sizeof *f->extras_sorted, cmp_string);
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float v;
    if (exp == 0) {
        v = (float)man * 0x1p-24f; /* zero or subnormal */
        uint32_t bits;
        memcpy(&bits, &v, 4);
        bits |= sign;
        memcpy(&v, &bits, 4);
        return v;
    }
    uint32_t bits = sign | (exp == 31 ? 0x7F800000u | man << 13 : (exp + 112) << 23 | man << 13);
    memcpy(&v, &bits, 4);
    return v;
}

/* Element i of a file tensor as the qkv dtype it reads as. */
static void convert(const st_entry *e, const unsigned char *src, void *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const unsigned char *p = src + (size_t)i * file_dtypes[e->dtype].size;
        const char *d = file_dtypes[e->dtype].name;
        if (!strcmp(d, "F16")) {
            uint16_t h;
            memcpy(&h, p, 2);
            ((float *)dst)[i] = half_to_float(h);
            continue;
        }
        int64_t v = 0;
        if (!strcmp(d, "U8")) v = p[0];
        else if (!strcmp(d, "I8")) v = (int8_t)p[0];
        else if (!strcmp(d, "I16")) { int16_t x; memcpy(&x, p, 2); v = x; }
        else if (!strcmp(d, "U16")) { uint16_t x; memcpy(&x, p, 2); v = x; }
        else if (!strcmp(d, "I32")) { int32_t x; memcpy(&x, p, 4); v = x; }
        else if (!strcmp(d, "U32")) { uint32_t x; memcpy(&x, p, 4); v = x; }
        ((int64_t *)dst)[i] = v;
    }
}

qkv_tensor *qkv_safetensors_tensor(const qkv_safetensors *f, const char *name) {
    if (qkv__null_object("qkv_safetensors_tensor", "file", f)) return NULL;
    const st_entry *e = find(f, name);
    if (!e)
        return qkv_set_error("qkv_safetensors_tensor: %s: no tensor named \"%s\"", f->path,
                             name ? name : "(null)");
    const file_dtype *fd = &file_dtypes[e->dtype];
    const unsigned char *src = f->data + e->begin;
    if (fd->as == QKV_BOOL)
        for (uint64_t i = 0; i < e->end - e->begin; i++)
            if (src[i] > 1)
                return qkv_set_error("qkv_safetensors_tensor: %s: BOOL tensor \"%s\" holds a "
                                     "byte other than 0 or 1", f->path, name);
    qkv_tensor *t = qkv_empty(fd->as, e->ndim, e->shape);
    if (!t) return NULL;
    if (fd->size == qkv_dtype_size(fd->as) || fd->as == QKV_BOOL)
        memcpy(qkv_data(t), src, e->end - e->begin);
    else
        convert(e, src, qkv_data(t), t->numel);
    return t;
}

const void *qkv_safetensors_bytes(const qkv_safetensors *f, const char *name, size_t *size) {
    if (qkv__null_object("qkv_safetensors_bytes", "file", f)) return NULL;
    const st_entry *e = find(f, name);
    if (!e || e->dtype != DT_U8 || e->ndim != 1)
        return qkv_set_error("qkv_safetensors_bytes: %s: no 1-D U8 tensor named \"%s\"",
                             f->path, name ? name : "(null)");
    *size = e->end - e->begin;
    return f->data + e->begin;
}

const char *qkv__safetensors_path(const qkv_safetensors *f) {
    return f->path;
}
