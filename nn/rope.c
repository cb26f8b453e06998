/*
 * Rotary position embedding in the GPT-NeoX / LLaMA (Hugging Face) layout: the head dim is
 * split in two halves, and pair (i, i + dim/2) is rotated by pos * base^(-2i/dim): the
 * qkv_rotary op with the module's cos and sin tables at the positions asked for.
 */
#include <math.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static void rope_destroy(qkv_module *base) {
    qkv_rotary_embedding *m = (qkv_rotary_embedding *)base;
    qkv__release(m->cos);
    qkv__release(m->sin);
}

/* The tables in F64, from angles computed in double: cos and sin of pos * inv_freq[i],
 * repeated over both halves (HF's cat((freqs, freqs), -1)). */
static bool make_tables(qkv_rotary_embedding *m) {
    int64_t half = m->dim / 2, n = m->max_len * m->dim;
    double *c = qkv__alloc((size_t)n * sizeof *c), *s = qkv__alloc((size_t)n * sizeof *s);
    bool ok = c && s;
    for (int64_t t = 0; ok && t < m->max_len; t++) {
        for (int64_t i = 0; i < half; i++) {
            double angle = (double)t * pow(m->theta, -2.0 * (double)i / (double)m->dim);
            c[t * m->dim + i] = c[t * m->dim + half + i] = cos(angle);
            s[t * m->dim + i] = s[t * m->dim + half + i] = sin(angle);
        }
    }
    qkv_scope_begin();
    if (ok) {
        m->cos = qkv__retain(qkv_from_array(QKV_F64, QKV_SHAPE(m->max_len, m->dim), c));
        ok = m->cos != NULL;
    }
    if (ok) {
        m->sin = qkv__retain(qkv_from_array(QKV_F64, QKV_SHAPE(m->max_len, m->dim), s));
        ok = m->sin != NULL;
    }
    qkv_scope_end();
    if (c) qkv__free(c, (size_t)n * sizeof *c);
    if (s) qkv__free(s, (size_t)n * sizeof *s);
    return ok;
}

qkv_rotary_embedding *qkv_rotary_embedding_new(int64_t dim, int64_t max_len, double base) {
    if (dim <= 0 || dim % 2 || max_len <= 0 || !(base >= 0) || base == 1)
        return qkv_set_error("qkv_rotary_embedding_new: dim %lld must be positive and even, "
                             "max_len %lld positive, base %g > 1 (or 0)", (long long)dim,
                             (long long)max_len, base);
    if (max_len > INT64_MAX / dim)
        return qkv_set_error("qkv_rotary_embedding_new: max_len %lld x dim %lld is too large",
                             (long long)max_len, (long long)dim);
    qkv_rotary_embedding *m = qkv_module_new("rotary_embedding", sizeof *m, rope_destroy);
    if (!m) return NULL;
    m->dim = dim;
    m->max_len = max_len;
    m->theta = base ? base : 10000.0;
    if (!make_tables(m)) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *rope(qkv_rotary_embedding *m, const qkv_tensor *x, int64_t offset) {
    int64_t T = x->shape[x->ndim - 2];
    qkv_tensor *c = qkv_to_dtype(qkv_narrow(m->cos, 0, offset, T), x->dtype);
    qkv_tensor *s = qkv_to_dtype(qkv_narrow(m->sin, 0, offset, T), x->dtype);
    return qkv_rotary(x, c, s);
}

qkv_tensor *qkv_rotary_embedding_forward(qkv_rotary_embedding *m, const qkv_tensor *x,
                                         int64_t offset) {
    if (qkv__null_object("qkv_rotary_embedding_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_rotary_embedding_forward", x))
        return NULL;
    char s[128];
    if (x->ndim < 2 || x->shape[x->ndim - 1] != m->dim || !qkv__is_float(x->dtype))
        return qkv_set_error("qkv_rotary_embedding_forward: x %s %s; expected a float "
                             "[..., T, %lld]", qkv_dtype_name(x->dtype),
                             qkv_shape_str(x, s, sizeof s), (long long)m->dim);
    int64_t T = x->shape[x->ndim - 2];
    if (offset < 0 || offset > m->max_len || T > m->max_len - offset)
        return qkv_set_error("qkv_rotary_embedding_forward: positions %lld..%lld are past the "
                             "table's %lld (max_len)", (long long)offset,
                             (long long)(offset + T - 1), (long long)m->max_len);
    return QKV_CALL(m, rope(m, x, offset));
}
