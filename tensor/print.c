/* Printing tensors the way PyTorch's repr does, summarizing those over 1000 elements. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tensor/tensor_internal.h"

#define EDGE 3          /* items shown at each end of a long dimension when summarizing */
#define THRESHOLD 1000  /* tensors with more elements are summarized, as PyTorch does */

typedef struct buf {
    char *s;
    size_t n, cap;
    bool failed;
} buf;

static void put(buf *b, const char *fmt, ...) {
    if (b->failed) return;
    va_list ap;
    va_start(ap, fmt);
    char tmp[64];
    int len = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (len < 0) return;
    if (b->n + (size_t)len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + (size_t)len + 1) cap *= 2;
        char *ns = realloc(b->s, cap);
        if (!ns) {
            b->failed = true;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->n, tmp, (size_t)len + 1);
    b->n += (size_t)len;
}

/* How every float of one tensor is written, chosen once from all its values as PyTorch
 * does: integers as "3.", fixed point with 4 decimals, or scientific when the magnitudes span
 * more than 1000x or leave [1e-4, 1e8); all right-aligned to one width. */
typedef struct style {
    enum { INT_MODE, FIXED_MODE, SCI_MODE } mode;
    int width;
} style;

static int format_value(char *out, size_t size, const qkv_tensor *t, int64_t off,
                        const style *st) {
    double v = qkv__load(qkv_data(t), t->dtype, off);
    switch (t->dtype) {
    case QKV_BOOL: return snprintf(out, size, "%s", v != 0 ? "True" : "False");
    case QKV_I64:
        return snprintf(out, size, "%lld", (long long)((const int64_t *)qkv_data(t))[off]);
    default: break;
    }
    if (isnan(v)) return snprintf(out, size, "nan");
    if (isinf(v)) return snprintf(out, size, v > 0 ? "inf" : "-inf");
    if (st->mode == INT_MODE) return snprintf(out, size, "%.0f.", v);
    if (st->mode == FIXED_MODE) return snprintf(out, size, "%.4f", v);
    return snprintf(out, size, "%.4e", v);
}

static void choose_style(const qkv_tensor *t, style *st) {
    st->mode = INT_MODE;
    st->width = 0;
    double lo = INFINITY, hi = 0;
    bool all_int = true;
    int64_t idx[QKV_MAX_DIMS] = {0};
    for (int64_t e = 0; e < t->numel; e++) {
        int64_t off = 0;
        for (int d = 0; d < t->ndim; d++) off += idx[d] * t->strides[d];
        double v = qkv__load(qkv_data(t), t->dtype, off);
        if (isfinite(v)) {
            if (v != floor(v)) all_int = false;
            if (v != 0) {
                lo = fmin(lo, fabs(v));
                hi = fmax(hi, fabs(v));
            }
        }
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < t->shape[d]) break;
            idx[d] = 0;
        }
    }
    if (qkv__is_float(t->dtype)) {
        if (all_int) st->mode = hi > 1e8 ? SCI_MODE : INT_MODE;
        else st->mode = hi > 0 && (hi / lo > 1000 || hi > 1e8 || lo < 1e-4) ? SCI_MODE : FIXED_MODE;
    }
    idx[0] = 0;
    for (int64_t e = 0; e < t->numel; e++) {
        int64_t off = 0, rem = e;
        for (int d = t->ndim - 1; d >= 0; d--) {
            off += (rem % t->shape[d]) * t->strides[d];
            rem /= t->shape[d];
        }
        /* PyTorch sizes float columns by the finite nonzero values only: nan, inf and 0
         * are padded to that width but never widen it. */
        double v = qkv__load(qkv_data(t), t->dtype, off);
        if (qkv__is_float(t->dtype) && (!isfinite(v) || v == 0)) continue;
        char tmp[64];
        int w = format_value(tmp, sizeof tmp, t, off, st);
        if (w > st->width) st->width = w;
    }
}

static void put_value(buf *b, const qkv_tensor *t, int64_t off, const style *st) {
    char tmp[64];
    format_value(tmp, sizeof tmp, t, off, st);
    put(b, "%*s", t->ndim ? st->width : 0, tmp);
}

/* Between the items of dimension d: ", " in the last dimension, else a comma, one line break
 * per dimension below d (a blank line between matrices, two between their stacks), and the
 * indent, as PyTorch's repr. */
static void put_separator(buf *b, const qkv_tensor *t, int d, int indent) {
    if (d == t->ndim - 1) {
        put(b, ", ");
        return;
    }
    put(b, ",");
    for (int k = d + 1; k < t->ndim; k++) put(b, "\n");
    put(b, "%*s", indent + 1, "");
}

static void put_dim(buf *b, const qkv_tensor *t, int d, int64_t off, int indent, bool elide,
                    const style *st) {
    if (d == t->ndim) {
        put_value(b, t, off, st);
        return;
    }
    put(b, "[");
    int64_t n = t->shape[d];
    for (int64_t i = 0; i < n; i++) {
        if (elide && n > 2 * EDGE && i == EDGE) {
            put(b, d == t->ndim - 1 ? " ..." : "...");
            put_separator(b, t, d, indent);
            i = n - EDGE;
        }
        put_dim(b, t, d + 1, off + i * t->strides[d], indent + 1, elide, st);
        if (i + 1 < n) put_separator(b, t, d, indent);
    }
    put(b, "]");
}

char *qkv_to_string(const qkv_tensor *t) {
    buf b = {0};
    if (!t) {
        put(&b, "tensor(NULL)");
        return b.s;
    }
    if (!QKV__CHECK("qkv_to_string", t)) return NULL;
    put(&b, "tensor(");
    style st;
    choose_style(t, &st);
    put_dim(&b, t, 0, 0, 7, t->numel > THRESHOLD, &st);
    char s[128];
    put(&b, ", dtype=%s, shape=", qkv_dtype_name(t->dtype));
    put(&b, "%s", qkv_shape_str(t, s, sizeof s));
    if (t->requires_grad) put(&b, ", requires_grad=True");
    put(&b, ")");
    if (b.failed) {
        free(b.s);
        return qkv_set_error("qkv_to_string: out of memory");
    }
    return b.s;
}

void qkv_fprint(FILE *f, const qkv_tensor *t) {
    char *s = qkv_to_string(t);
    if (s) fprintf(f, "%s\n", s);
    free(s);
}

void qkv_print(const qkv_tensor *t) {
    qkv_fprint(stdout, t);
}
