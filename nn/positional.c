/*
 * Positional encodings added to a batch-first sequence [B,T,d_model]: a learned table (an
 * embedding over positions 0..T-1, read as a slice view) or the fixed sinusoids of PyTorch's
 * transformer tutorial, kept as a buffer so checkpoints carry it.
 */
#include <math.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static bool check_sizes(const char *op, int64_t max_len, int64_t d_model) {
    if (max_len > 0 && d_model > 0) return true;
    qkv_set_error("%s: bad sizes max_len %lld, d_model %lld", op, (long long)max_len,
                  (long long)d_model);
    return false;
}

static qkv_tensor *positional_encoding_forward(qkv_positional_encoding *m, const qkv_tensor *x);

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *positional_module_forward(qkv_module *m, const qkv_tensor *x) {
    return positional_encoding_forward((qkv_positional_encoding *)m, x);
}

qkv_positional_encoding *qkv_learned_positional_encoding_new(int64_t max_len, int64_t d_model,
                                                             qkv_generator *g) {
    if (!check_sizes("qkv_learned_positional_encoding_new", max_len, d_model)) return NULL;
    if (!g) return qkv_set_error("qkv_learned_positional_encoding_new: no generator");
    qkv_positional_encoding *m =
        qkv_module_new("learned_positional_encoding", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = positional_module_forward;
    m->max_len = max_len;
    m->d_model = d_model;
    qkv_scope_begin();
    m->table = qkv_module_add_parameter(&m->base, "weight",
                                        qkv_empty(QKV_F32, QKV_SHAPE(max_len, d_model)));
    bool ok = qkv_init_normal_(m->table, 0.0, 1.0, g);
    qkv_scope_end();
    if (!ok) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

/* The tutorial computes in float32: div_term = exp(2i * -(ln 10000 / d)), angle = t * div_term.
 * The same steps in float give the same table. */
static void fill_sinusoids(float *pe, int64_t max_len, int64_t d_model) {
    float scale = (float)(-log(10000.0) / (double)d_model);
    for (int64_t t = 0; t < max_len; t++) {
        for (int64_t i = 0; i < d_model; i += 2) {
            float angle = (float)t * expf((float)i * scale);
            pe[t * d_model + i] = sinf(angle);
            if (i + 1 < d_model) pe[t * d_model + i + 1] = cosf(angle);
        }
    }
}

qkv_positional_encoding *qkv_sinusoidal_positional_encoding_new(int64_t max_len,
                                                                int64_t d_model) {
    if (!check_sizes("qkv_sinusoidal_positional_encoding_new", max_len, d_model)) return NULL;
    qkv_positional_encoding *m =
        qkv_module_new("sinusoidal_positional_encoding", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = positional_module_forward;
    m->max_len = max_len;
    m->d_model = d_model;
    qkv_scope_begin();
    m->table = qkv_module_add_buffer(&m->base, "pe",
                                     qkv_empty(QKV_F32, QKV_SHAPE(max_len, d_model)));
    if (m->table) fill_sinusoids(qkv_data(m->table), max_len, d_model);
    qkv_scope_end();
    if (!m->table) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *positional_encoding_forward(qkv_positional_encoding *m, const qkv_tensor *x) {
    if (!m || !x) return NULL;
    if (x->ndim != 3 || x->shape[1] > m->max_len || x->shape[2] != m->d_model) {
        char s[128];
        return qkv_set_error("qkv_positional_encoding_forward: input %s; expected [B,T,%lld] "
                             "with T <= %lld", qkv_shape_str(x, s, sizeof s),
                             (long long)m->d_model, (long long)m->max_len);
    }
    return qkv_add(x, qkv_narrow(m->table, 0, 0, x->shape[1]));
}

qkv_tensor *qkv_positional_encoding_forward(qkv_positional_encoding *m, const qkv_tensor *x) {
    if (qkv__null_object("qkv_positional_encoding_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_positional_encoding_forward", x))
        return NULL;
    return QKV_CALL(m, positional_encoding_forward(m, x));
}
