/* The text classifier's model, composed from qkv's nn layers. */
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
