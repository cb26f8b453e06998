/*
 * torch.nn.TransformerDecoderLayer (batch first): masked self-attention, cross-attention over
 * the encoder's memory and a feed-forward block, each with dropout, a residual connection and
 * a layer norm, post-LN or pre-LN. Submodules are registered in PyTorch's order under its
 * names, so parameter lists line up with its state_dict.
 */
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static const char *const new_op = "qkv_transformer_decoder_layer_new";

static bool check_config(const qkv_transformer_config *c) {
    if (!c) return qkv_set_error("%s: no config", new_op), false;
    if (c->d_model <= 0 || c->nhead <= 0 || c->d_model % c->nhead || c->dim_feedforward <= 0) {
        qkv_set_error("%s: d_model %lld must be a positive multiple of nhead %lld, "
                      "dim_feedforward %lld positive", new_op, (long long)c->d_model,
                      (long long)c->nhead, (long long)c->dim_feedforward);
        return false;
    }
    if (c->activation != QKV_ACT_RELU && c->activation != QKV_ACT_GELU) {
        qkv_set_error("%s: activation must be relu or gelu", new_op);
        return false;
    }
    return true;
}

static bool add_attention(qkv_module *b, const char *name, qkv_multi_head_attention **slot,
                          const qkv_transformer_config *c, qkv_generator *g) {
    *slot = qkv_module_add_module(b, name, QKV_MODULE(qkv_multi_head_attention_new(
                                               c->d_model, c->nhead, c->dropout, true, 0, 0, g)));
    return *slot != NULL;
}

static bool add_dropout(qkv_module *b, const char *name, qkv_dropout_layer **slot, double p,
                        qkv_generator *g) {
    *slot = qkv_module_add_module(b, name, QKV_MODULE(qkv_dropout_layer_new(p, g)));
    return *slot != NULL;
}

static bool add_norm(qkv_module *b, const char *name, qkv_layer_norm **slot,
                     const qkv_transformer_config *c) {
    *slot = qkv_module_add_module(
        b, name, QKV_MODULE(qkv_layer_norm_new(1, &c->d_model, c->layer_norm_eps, true)));
    return *slot != NULL;
}

qkv_transformer_decoder_layer *qkv_transformer_decoder_layer_new(
    const qkv_transformer_config *config, qkv_generator *g) {
    if (!check_config(config)) return NULL;
    qkv_transformer_config c = *config;
    if (c.layer_norm_eps == 0) c.layer_norm_eps = 1e-5;
    qkv_transformer_decoder_layer *m =
        qkv_module_new("transformer_decoder_layer", sizeof *m, NULL);
    if (!m) return NULL;
    m->config = c;
    qkv_module *b = &m->base;
    bool ok = add_attention(b, "self_attn", &m->self_attn, &c, g) &&
              add_attention(b, "multihead_attn", &m->multihead_attn, &c, g);
    m->linear1 = ok ? qkv_module_add_module(
                          b, "linear1", QKV_MODULE(qkv_linear_new(c.d_model, c.dim_feedforward,
                                                                  true, g)))
                    : NULL;
    ok = m->linear1 && add_dropout(b, "dropout", &m->dropout, c.dropout, g);
    m->linear2 = ok ? qkv_module_add_module(
                          b, "linear2", QKV_MODULE(qkv_linear_new(c.dim_feedforward, c.d_model,
                                                                  true, g)))
                    : NULL;
    ok = m->linear2 && add_norm(b, "norm1", &m->norm1, &c) &&
         add_norm(b, "norm2", &m->norm2, &c) && add_norm(b, "norm3", &m->norm3, &c) &&
         add_dropout(b, "dropout1", &m->dropout1, c.dropout, g) &&
         add_dropout(b, "dropout2", &m->dropout2, c.dropout, g) &&
         add_dropout(b, "dropout3", &m->dropout3, c.dropout, g);
    if (!ok) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

/* d's dropout over x's own values: x is a fresh result nobody reads again (qkv_dropout_) */
static qkv_tensor *dropout_over(qkv_dropout_layer *d, qkv_tensor *x) {
    return qkv_dropout_(x, d->p, d->base.training, &d->generator);
}

/* dropout1(self_attn(x, x, x)) under the target's masks */
static qkv_tensor *self_attention_block(qkv_transformer_decoder_layer *m, const qkv_tensor *x,
                                        const qkv_decoder_options *o) {
    qkv_attention_options ao = {.key_padding_mask = o->tgt_key_padding_mask,
                                .attn_mask = o->tgt_mask, .is_causal = o->tgt_is_causal};
    return dropout_over(m->dropout1,
                        qkv_multi_head_attention_forward(m->self_attn, x, x, x, &ao));
}

/* dropout2(multihead_attn(x, memory, memory)) under the memory's masks */
static qkv_tensor *cross_attention_block(qkv_transformer_decoder_layer *m, const qkv_tensor *x,
                                         const qkv_tensor *memory,
                                         const qkv_decoder_options *o) {
    qkv_attention_options ao = {.key_padding_mask = o->memory_key_padding_mask,
                                .attn_mask = o->memory_mask};
    return dropout_over(m->dropout2, qkv_multi_head_attention_forward(m->multihead_attn, x,
                                                                      memory, memory, &ao));
}

/* dropout3(linear2(dropout(activation(linear1(x))))) */
static qkv_tensor *feed_forward_block(qkv_transformer_decoder_layer *m, const qkv_tensor *x) {
    qkv_tensor *h = qkv_activate(m->config.activation, qkv_linear_forward(m->linear1, x));
    return dropout_over(m->dropout3, qkv_linear_forward(m->linear2, dropout_over(m->dropout, h)));
}

static qkv_tensor *decoder_layer(qkv_transformer_decoder_layer *m, const qkv_tensor *tgt,
                                 const qkv_tensor *memory, const qkv_decoder_options *o) {
    qkv_tensor *x = (qkv_tensor *)tgt;
    if (m->config.norm_first) {
        x = qkv_add(x, self_attention_block(m, qkv_layer_norm_forward(m->norm1, x), o));
        x = qkv_add(x, cross_attention_block(m, qkv_layer_norm_forward(m->norm2, x), memory, o));
        return qkv_add(x, feed_forward_block(m, qkv_layer_norm_forward(m->norm3, x)));
    }
    x = qkv_layer_norm_forward(m->norm1, qkv_add(x, self_attention_block(m, x, o)));
    x = qkv_layer_norm_forward(m->norm2, qkv_add(x, cross_attention_block(m, x, memory, o)));
    return qkv_layer_norm_forward(m->norm3, qkv_add(x, feed_forward_block(m, x)));
}

qkv_tensor *qkv_transformer_decoder_layer_forward(qkv_transformer_decoder_layer *m,
                                                  const qkv_tensor *tgt,
                                                  const qkv_tensor *memory,
                                                  const qkv_decoder_options *opts) {
    static const qkv_decoder_options none = {0};
    if (qkv__null_object("qkv_transformer_decoder_layer_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_transformer_decoder_layer_forward", tgt, memory))
        return NULL;
    return QKV_CALL(m, decoder_layer(m, tgt, memory, opts ? opts : &none));
}
