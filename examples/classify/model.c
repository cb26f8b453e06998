/* The text classifier's model, composed from qkv's nn layers. */
#include <stdio.h>
#include <string.h>

#include "model.h"

classifier *classifier_new(const classifier_config *c, qkv_generator *g) {
    classifier *m = qkv_module_new("classifier", sizeof *m, NULL);
    if (!m) return NULL;
    m->config = *c;
    qkv_transformer_config layer = {
        .d_model = c->dim,
        .nhead = c->heads,
        .dim_feedforward = c->ffn,
        .dropout = c->dropout,
        .activation = QKV_ACT_GELU,
        .norm_first = true,
    };
    m->tok_embed = qkv_module_add_module(
        &m->base, "tok_embed", QKV_MODULE(qkv_embedding_new(c->vocab_size, c->dim, 0, g)));
    m->pos_embed = qkv_module_add_module(
        &m->base, "pos_embed",
        QKV_MODULE(qkv_learned_positional_encoding_new(c->max_len, c->dim, g)));
    m->dropout = qkv_module_add_module(&m->base, "dropout",
                                       QKV_MODULE(qkv_dropout_layer_new(c->dropout, g)));
    m->encoder = qkv_module_add_module(
        &m->base, "encoder",
        QKV_MODULE(qkv_transformer_encoder_new(&layer, (int)c->layers, true, g)));
    m->head = qkv_module_add_module(&m->base, "head",
                                    QKV_MODULE(qkv_linear_new(c->dim, c->n_classes, true, g)));
    if (!m->tok_embed || !m->pos_embed || !m->dropout || !m->encoder || !m->head) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *classify(classifier *m, const qkv_tensor *ids, const qkv_tensor *pad) {
    qkv_tensor *x = qkv_embedding_forward(m->tok_embed, ids);
    x = qkv_dropout_layer_forward(m->dropout, qkv_positional_encoding_forward(m->pos_embed, x));
    qkv_encoder_options opts = {.src_key_padding_mask = pad};
    x = qkv_transformer_encoder_forward(m->encoder, x, &opts);
    /* Mean over the real tokens: padding positions weigh 0. */
    qkv_tensor *keep = qkv_to_dtype(qkv_eq_scalar(pad, 0), QKV_F32);
    qkv_tensor *count = qkv_sum(keep, 1, true);
    qkv_tensor *pooled = qkv_div(qkv_sum(qkv_mul(x, qkv_unsqueeze(keep, -1)), 1, false), count);
    return qkv_linear_forward(m->head, pooled);
}

/* One module call: the intermediates the backward does not read (the embedding sum, the final
 * norm's output, the masked products) are freed on return. */
qkv_tensor *classifier_forward(classifier *m, const qkv_tensor *ids, const qkv_tensor *pad) {
    return m ? QKV_CALL(m, classify(m, ids, pad)) : NULL;
}

/* ---- Checking a checkpoint before building its model ------------------------------------- */

static bool add_to(int64_t *total, int64_t a, int64_t b) {
    int64_t ab;
    return !__builtin_mul_overflow(a, b, &ab) && !__builtin_add_overflow(*total, ab, total);
}

int64_t classifier_parameter_count(const classifier_config *c) {
    int64_t d = c->dim, per_layer = 0, n = 0;
    bool ok = add_to(&per_layer, 4 * d, d + 1) &&      /* q, k, v, out projections */
              add_to(&per_layer, c->ffn, d + 1) &&     /* linear1 */
              add_to(&per_layer, d, c->ffn + 1) &&     /* linear2 */
              add_to(&per_layer, 4, d) &&              /* norm1, norm2 */
              add_to(&n, c->vocab_size, d) && add_to(&n, c->max_len, d) &&
              add_to(&n, c->layers, per_layer) && add_to(&n, 2, d) && /* final norm */
              add_to(&n, c->n_classes, d + 1);
    return ok ? n : -1;
}

/* Tensor `name` of f is 2-D with `size` along `axis` (the setting `key`). */
static bool fits_axis(const qkv_safetensors *f, const char *path, const char *name, int axis,
                      const char *key, int64_t size) {
    int64_t shape[QKV_MAX_DIMS];
    int ndim = qkv_safetensors_shape(f, name, shape);
    if (ndim == 2 && shape[axis] == size) return true;
    if (ndim < 0) {
        qkv_set_error("%s: setting %s=%lld, but the file has no tensor \"%s\"", path, key,
                      (long long)size, name);
        return false;
    }
    char text[8 * 24] = "[";
    for (int d = 0; d < ndim; d++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "%s%lld", d ? "," : "",
                 (long long)shape[d]);
    qkv_set_error("%s: setting %s=%lld disagrees with \"%s\", %s] in the file", path, key,
                  (long long)size, name, text);
    return false;
}

static int count_layers(const qkv_safetensors *f) {
    static const char prefix[] = "encoder.layers.", suffix[] = ".linear1.weight";
    int n = 0;
    for (int i = 0; i < qkv_safetensors_count(f); i++) {
        const char *name = qkv_safetensors_name(f, i);
        size_t len = strlen(name), p = sizeof prefix - 1, s = sizeof suffix - 1;
        n += len > p + s && !strncmp(name, prefix, p) && !strcmp(name + len - s, suffix);
    }
    return n;
}

bool classifier_config_fits(const classifier_config *c, const qkv_safetensors *f,
                            const char *path) {
    if (!fits_axis(f, path, "tok_embed.weight", 0, "vocab_size", c->vocab_size) ||
        !fits_axis(f, path, "tok_embed.weight", 1, "dim", c->dim) ||
        !fits_axis(f, path, "pos_embed.weight", 0, "max_len", c->max_len) ||
        !fits_axis(f, path, "head.weight", 0, "n_classes", c->n_classes))
        return false;
    if (c->heads < 1 || c->dim % c->heads) {
        qkv_set_error("%s: setting heads=%lld does not divide dim=%lld", path,
                      (long long)c->heads, (long long)c->dim);
        return false;
    }
    int layers = count_layers(f);
    if (c->layers != layers) {
        qkv_set_error("%s: setting layers=%lld disagrees with the %d encoder layers in the file",
                      path, (long long)c->layers, layers);
        return false;
    }
    for (int i = 0; i < layers; i++) {
        char name[64];
        snprintf(name, sizeof name, "encoder.layers.%d.linear1.weight", i);
        if (!fits_axis(f, path, name, 0, "ffn", c->ffn)) return false;
    }
    /* Each parameter is a value the file holds: a model larger than that is a lie. */
    int64_t params = classifier_parameter_count(c), values = 0;
    for (int i = 0; i < qkv_safetensors_count(f); i++) {
        int64_t shape[QKV_MAX_DIMS], numel = 1;
        int ndim = qkv_safetensors_shape(f, qkv_safetensors_name(f, i), shape);
        for (int d = 0; d < ndim; d++) numel *= shape[d]; /* the reader bounded these */
        values += numel;
    }
    if (params < 0 || params > values) {
        qkv_set_error("%s: the settings describe a model of %lld parameters, more than the "
                      "%lld values in the file", path, (long long)params, (long long)values);
        return false;
    }
    return true;
}
