/*
 * torch.nn.Embedding: rows of a weight table picked by I64 ids. The padding row is looked up
 * like any other but receives no gradient, so training never moves it.
 */
#include "nn/nn.h"
#include "tensor/tensor_internal.h"

static qkv_tensor *embedding_forward(qkv_embedding *m, const qkv_tensor *ids);

/* The one-input forward in the module base: qkv_module_forward makes it one call. */
static qkv_tensor *embedding_module_forward(qkv_module *m, const qkv_tensor *x) {
    return embedding_forward((qkv_embedding *)m, x);
}

qkv_embedding *qkv_embedding_new(int64_t num_embeddings, int64_t embedding_dim,
                                 int64_t padding_idx, qkv_generator *g) {
    if (num_embeddings <= 0 || embedding_dim <= 0)
        return qkv_set_error("qkv_embedding_new: bad sizes %lld x %lld",
                             (long long)num_embeddings, (long long)embedding_dim);
    if (padding_idx < -1 || padding_idx >= num_embeddings)
        return qkv_set_error("qkv_embedding_new: padding_idx %lld out of range for %lld rows",
                             (long long)padding_idx, (long long)num_embeddings);
    if (!g) return qkv_set_error("qkv_embedding_new: no generator");
    qkv_embedding *m = qkv_module_new("embedding", sizeof *m, NULL);
    if (!m) return NULL;
    m->base.forward = embedding_module_forward;
    m->num_embeddings = num_embeddings;
    m->embedding_dim = embedding_dim;
    m->padding_idx = padding_idx;
    qkv_scope_begin();
    qkv_tensor *w = qkv_empty(QKV_F32, QKV_SHAPE(num_embeddings, embedding_dim));
    m->weight = qkv_module_add_parameter(&m->base, "weight", w);
    bool ok = qkv_init_normal_(m->weight, 0.0, 1.0, g);
    if (ok && padding_idx >= 0) ok = qkv_fill_(qkv_select(m->weight, 0, padding_idx), 0.0);
    qkv_scope_end();
    if (!ok) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static qkv_tensor *embedding_forward(qkv_embedding *m, const qkv_tensor *ids) {
    if (!m || !ids) return NULL;
    if (ids->dtype != QKV_I64)
        return qkv_set_error("qkv_embedding_forward: ids must be i64, not %s",
                             qkv_dtype_name(ids->dtype));
    qkv_tensor *rows = qkv_index_select(m->weight, 0, ids);
    if (m->padding_idx < 0 || !rows) return rows;
    /* Where the id is the padding index, take the same values through a detached view: the
     * forward result is unchanged and that row's gradient is zero. */
    qkv_tensor *keep = qkv_unsqueeze(qkv_ne_scalar(ids, (double)m->padding_idx), -1);
    return qkv_where(keep, rows, qkv_detach(rows));
}

qkv_tensor *qkv_embedding_forward(qkv_embedding *m, const qkv_tensor *ids) {
    if (qkv__null_object("qkv_embedding_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_embedding_forward", ids))
        return NULL;
    return QKV_CALL(m, embedding_forward(m, ids));
}
