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

static void put_value(buf *b, const qkv_tensor *t, int64_t off) {
    double v = qkv__load(qkv_data(t), t->dtype, off);
    switch (t->dtype) {
    case QKV_BOOL: put(b, v != 0 ? "True" : "False"); break;
    case QKV_I64: put(b, "%lld", (long long)((const int64_t *)qkv_data(t))[off]); break;
    default:
        if (isnan(v)) put(b, "nan");
        else if (isinf(v)) put(b, v > 0 ? "inf" : "-inf");
        else if (v == floor(v) && fabs(v) < 1e8) put(b, "%.0f.", v);
        else if (fabs(v) >= 1e-4 && fabs(v) < 1e8) put(b, "%.4f", v);
        else put(b, "%.4e", v);
    }
}

static void put_dim(buf *b, const qkv_tensor *t, int d, int64_t off, int indent, bool elide) {
    if (d == t->ndim) {
        put_value(b, t, off);
        return;
    }
    put(b, "[");
    int64_t n = t->shape[d];
    for (int64_t i = 0; i < n; i++) {
        if (elide && n > 2 * EDGE && i == EDGE) {
            put(b, d == t->ndim - 1 ? "..., " : "...,\n%*s", indent + 1, "");
            i = n - EDGE;
        }
        put_dim(b, t, d + 1, off + i * t->strides[d], indent + 1, elide);
        if (i + 1 < n) {
            if (d == t->ndim - 1) put(b, ", ");
            else put(b, ",%s%*s", d == t->ndim - 2 ? "\n" : "\n\n", indent + 1, "");
        }
    }
    put(b, "]");
}

char *qkv_to_string(const qkv_tensor *t) {
    buf b = {0};
    if (!t) {
        put(&b, "tensor(NULL)");
        return b.s;
    }
    put(&b, "tensor(");
    put_dim(&b, t, 0, 0, 7, t->numel > THRESHOLD);
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
