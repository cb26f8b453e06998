/*
 * Transformer encoder blocks as torch.nn.TransformerEncoderLayer and TransformerEncoder
 * (batch first), built from the attention, linear, dropout and layer norm modules. Submodules
 * are registered in PyTorch's order under PyTorch's names, so parameter lists line up.
 */
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static bool check_config(const qkv_transformer_config *c) {
    if (!c) return qkv_set_error("qkv_transformer_encoder_layer_new: no config"), false;
    if (c->d_model <= 0 || c->nhead <= 0 || c->d_model % c->nhead || c->dim_feedforward <= 0) {
        qkv_set_error("qkv_transformer_encoder_layer_new: d_model %lld must be a positive "
                      "multiple of nhead %lld, dim_feedforward %lld positive",
                      (long long)c->d_model, (long long)c->nhead, (long long)c->dim_feedforward);
        return false;
    }
    if (c->activation != QKV_ACT_RELU && c->activation != QKV_ACT_GELU) {
        qkv_set_error("qkv_transformer_encoder_layer_new: activation must be relu or gelu");
        return false;
    }
    return true;
}

static qkv_tensor *encoder_layer(qkv_transformer_encoder_layer *m, const qkv_tensor *src,
                                 const qkv_encoder_options *o);
static const qkv_encoder_options no_options;

/* The one-input forward in the module base, with no masks: qkv_module_forward makes it one
 * call. */
static qkv_tensor *layer_module_forward(qkv_module *m, const qkv_tensor *x) {
    return encoder_layer((qkv_transformer_encoder_layer *)m, x, &no_options);
}

qkv_transformer_encoder_layer *qkv_transformer_encoder_layer_new(
    const qkv_transformer_config *config, qkv_generator *g) {
    if (!check_config(config)) return NULL;
    qkv_transformer_config c = *config;
    if (c.layer_norm_eps == 0) c.layer_norm_eps = 1e-5;
    qkv_transformer_encoder_layer *m =
        qkv_module_new("transformer_encoder_layer", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = layer_module_forward;
    m->config = c;
    qkv_module *b = &m->base;
    const int64_t *d = &c.d_model;
    m->self_attn = qkv_module_add_module(
        b, "self_attn",
        QKV_MODULE(qkv_multi_head_attention_new(c.d_model, c.nhead, c.dropout, true, 0, 0, g)));
    m->linear1 = qkv_module_add_module(
        b, "linear1", QKV_MODULE(qkv_linear_new(c.d_model, c.dim_feedforward, true, g)));
    m->dropout = qkv_module_add_module(b, "dropout",
                                       QKV_MODULE(qkv_dropout_layer_new(c.dropout, g)));
    m->linear2 = qkv_module_add_module(
        b, "linear2", QKV_MODULE(qkv_linear_new(c.dim_feedforward, c.d_model, true, g)));
    m->norm1 = qkv_module_add_module(b, "norm1",
                                     QKV_MODULE(qkv_layer_norm_new(1, d, c.layer_norm_eps, true)));
    m->norm2 = qkv_module_add_module(b, "norm2",
                                     QKV_MODULE(qkv_layer_norm_new(1, d, c.layer_norm_eps, true)));
    m->dropout1 = qkv_module_add_module(b, "dropout1",
                                        QKV_MODULE(qkv_dropout_layer_new(c.dropout, g)));
    m->dropout2 = qkv_module_add_module(b, "dropout2",
                                        QKV_MODULE(qkv_dropout_layer_new(c.dropout, g)));
    if (!m->self_attn || !m->linear1 || !m->dropout || !m->linear2 || !m->norm1 || !m->norm2 ||
        !m->dropout1 || !m->dropout2) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

/* d's dropout over x's own values: x is a fresh result nobody reads again (qkv_dropout_) */
static qkv_tensor *dropout_over(qkv_dropout_layer *d, qkv_tensor *x) {
    return qkv_dropout_(x, d->p, d->base.training, &d->generator);
}

/* dropout1(self_attn(x, x, x)) */
static qkv_tensor *self_attention_block(qkv_transformer_encoder_layer *m, const qkv_tensor *x,
                                        const qkv_encoder_options *o) {
    qkv_attention_options ao = {.key_padding_mask = o->src_key_padding_mask,
                                .attn_mask = o->src_mask, .is_causal = o->is_causal};
    return dropout_over(m->dropout1, qkv_multi_head_attention_forward(m->self_attn, x, x, x, &ao));
}

/* dropout2(linear2(dropout(activation(linear1(x))))). The dropout overwrites the activation's
 * output, which nothing holds once linear2 has read it: the backward recomputes it from
 * linear1's output. */
static qkv_tensor *feed_forward_block(qkv_transformer_encoder_layer *m, const qkv_tensor *x) {
    qkv_tensor *h = qkv_activate(m->config.activation, qkv_linear_forward(m->linear1, x));
    return dropout_over(m->dropout2, qkv_linear_forward(m->linear2, dropout_over(m->dropout, h)));
}

static qkv_tensor *encoder_layer(qkv_transformer_encoder_layer *m, const qkv_tensor *src,
                                 const qkv_encoder_options *o) {
    qkv_tensor *x = (qkv_tensor *)src;
    if (m->config.norm_first) {
        x = qkv_add(x, self_attention_block(m, qkv_layer_norm_forward(m->norm1, x), o));
        return qkv_add(x, feed_forward_block(m, qkv_layer_norm_forward(m->norm2, x)));
    }
    x = qkv_layer_norm_forward(m->norm1, qkv_add(x, self_attention_block(m, x, o)));
    return qkv_layer_norm_forward(m->norm2, qkv_add(x, feed_forward_block(m, x)));
}

static const qkv_encoder_options no_options = {0};

qkv_tensor *qkv_transformer_encoder_layer_forward(qkv_transformer_encoder_layer *m,
                                                  const qkv_tensor *src,
                                                  const qkv_encoder_options *opts) {
    if (qkv__null_object("qkv_transformer_encoder_layer_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_transformer_encoder_layer_forward", src))
        return NULL;
    return QKV_CALL(m, encoder_layer(m, src, opts ? opts : &no_options));
}

/* ---- The stack --------------------------------------------------------------------------- */

static void encoder_destroy(qkv_module *base) {
    qkv_transformer_encoder *m = (qkv_transformer_encoder *)base;
    if (m->layers) qkv__free(m->layers, (size_t)m->num_layers * sizeof *m->layers);
}

static qkv_tensor *encoder(qkv_transformer_encoder *m, const qkv_tensor *src,
                           const qkv_encoder_options *opts);

/* The one-input forward in the module base, with no masks: qkv_module_forward makes it one
 * call. */
static qkv_tensor *encoder_module_forward(qkv_module *m, const qkv_tensor *x) {
    return encoder((qkv_transformer_encoder *)m, x, NULL);
}

/* The layers live in a plain container module named "layers" whose children are "0", "1", ...,
 * which gives PyTorch's names (layers.0.self_attn...); m->layers points at them directly. */
qkv_transformer_encoder *qkv_transformer_encoder_new(const qkv_transformer_config *config,
                                                     int num_layers, bool final_norm,
                                                     qkv_generator *g) {
    if (num_layers < 1)
        return qkv_set_error("qkv_transformer_encoder_new: num_layers %d < 1", num_layers);
    if (!check_config(config)) return NULL;
    qkv_transformer_encoder *m =
        qkv_module_new("transformer_encoder", sizeof *m, encoder_destroy);
    if (!m) return NULL;
    m->base.forward = encoder_module_forward;
    m->layers = qkv__calloc((size_t)num_layers * sizeof *m->layers);
    if (!m->layers) goto fail;
    m->num_layers = num_layers;
    qkv_module *list = qkv_module_add_module(&m->base, "layers",
                                             qkv_module_new("module_list", sizeof(qkv_module),
                                                            NULL));
    if (!list) goto fail;
    for (int i = 0; i < num_layers; i++) {
        char name[24];
        snprintf(name, sizeof name, "%d", i);
        m->layers[i] = qkv_module_add_module(
            list, name, QKV_MODULE(qkv_transformer_encoder_layer_new(config, g)));
        if (!m->layers[i]) goto fail;
    }
    if (final_norm) {
        double eps = config->layer_norm_eps ? config->layer_norm_eps : 1e-5;
        m->norm = qkv_module_add_module(
            &m->base, "norm", QKV_MODULE(qkv_layer_norm_new(1, &config->d_model, eps, true)));
        if (!m->norm) goto fail;
    }
    return m;
fail:
    qkv_module_free(QKV_MODULE(m));
    return NULL;
}

static qkv_tensor *encoder(qkv_transformer_encoder *m, const qkv_tensor *src,
                           const qkv_encoder_options *opts) {
    qkv_tensor *x = (qkv_tensor *)src;
    for (int i = 0; i < m->num_layers; i++)
        x = qkv_transformer_encoder_layer_forward(m->layers[i], x, opts);
    return m->norm ? qkv_layer_norm_forward(m->norm, x) : x;
}

qkv_tensor *qkv_transformer_encoder_forward(qkv_transformer_encoder *m, const qkv_tensor *src,
                                            const qkv_encoder_options *opts) {
    if (qkv__null_object("qkv_transformer_encoder_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_transformer_encoder_forward", src))
        return NULL;
    return QKV_CALL(m, encoder(m, src, opts));
}
