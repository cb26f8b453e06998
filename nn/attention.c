/*
 * Multi-head attention, composed from primitive ops so that its gradient comes from theirs:
 * project, split heads with reshape + permute views, scores = Q K^T / sqrt(d_head) through a
 * transposed view, masks, softmax, dropout, a weighted sum of V, merge heads, project out.
 */
#include <math.h>

#include "nn/nn.h"

/* PyTorch initialises q, k and v as one packed [3E, E] matrix when kdim == vdim == E (so the
 * fans are E and 3E), and each projection on its own otherwise. */
static bool init_projections(qkv_multi_head_attention *m, qkv_generator *g) {
    bool packed = m->kdim == m->embed_dim && m->vdim == m->embed_dim;
    double packed_bound = sqrt(6.0 / (double)(m->embed_dim + 3 * m->embed_dim));
    qkv_linear *proj[3] = {m->q_proj, m->k_proj, m->v_proj};
    for (int i = 0; i < 3; i++) {
        bool ok = packed ? qkv_init_uniform_(proj[i]->weight, -packed_bound, packed_bound, g)
                         : qkv_init_xavier_uniform_(proj[i]->weight, 1.0, g);
        if (!ok || (proj[i]->bias && !qkv_fill_(proj[i]->bias, 0.0))) return false;
    }
    return !m->out_proj->bias || qkv_fill_(m->out_proj->bias, 0.0);
}

qkv_multi_head_attention *qkv_multi_head_attention_new(int64_t embed_dim, int64_t num_heads,
                                                       double dropout, bool bias, int64_t kdim,
                                                       int64_t vdim, qkv_generator *g) {
    if (embed_dim <= 0 || num_heads <= 0 || embed_dim % num_heads || kdim < 0 || vdim < 0)
        return qkv_set_error("qkv_multi_head_attention_new: embed_dim %lld must be a positive "
                             "multiple of num_heads %lld (kdim %lld, vdim %lld)",
                             (long long)embed_dim, (long long)num_heads, (long long)kdim,
                             (long long)vdim);
    if (!(dropout >= 0 && dropout <= 1))
        return qkv_set_error("qkv_multi_head_attention_new: dropout %g not in [0, 1]", dropout);
    if (!g) return qkv_set_error("qkv_multi_head_attention_new: no generator");
    qkv_multi_head_attention *m = qkv_module_new("multi_head_attention", sizeof *m, NULL);
    if (!m) return NULL;
    m->embed_dim = embed_dim;
    m->num_heads = num_heads;
    m->head_dim = embed_dim / num_heads;
    m->kdim = kdim ? kdim : embed_dim;
    m->vdim = vdim ? vdim : embed_dim;
    m->dropout = dropout;
    qkv_module *b = &m->base;
    m->q_proj = qkv_module_add_module(b, "q_proj",
                                      QKV_MODULE(qkv_linear_new(embed_dim, embed_dim, bias, g)));
    m->k_proj = qkv_module_add_module(b, "k_proj",
                                      QKV_MODULE(qkv_linear_new(m->kdim, embed_dim, bias, g)));
    m->v_proj = qkv_module_add_module(b, "v_proj",
                                      QKV_MODULE(qkv_linear_new(m->vdim, embed_dim, bias, g)));
    m->out_proj = qkv_module_add_module(b, "out_proj",
                                        QKV_MODULE(qkv_linear_new(embed_dim, embed_dim, bias, g)));
    bool ok = m->q_proj && m->k_proj && m->v_proj && m->out_proj;
    if (ok) {
        qkv_scope_begin();
        ok = init_projections(m, g);
        qkv_scope_end();
    }
    if (!ok) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    uint64_t seed = (uint64_t)qkv_generator_next_u32(g) << 32;
    qkv_generator_init(&m->generator, seed | qkv_generator_next_u32(g));
    if (!qkv_module_add_generator(b, "generator", &m->generator)) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

/* ---- Forward ----------------------------------------------------------------------------- */

static bool check_inputs(const qkv_multi_head_attention *m, const qkv_tensor *q,
                         const qkv_tensor *k, const qkv_tensor *v) {
    char sq[128], sk[128], sv[128];
    if (q->ndim == 3 && k->ndim == 3 && v->ndim == 3 && q->shape[2] == m->embed_dim &&
        k->shape[2] == m->kdim && v->shape[2] == m->vdim && k->shape[0] == q->shape[0] &&
        v->shape[0] == q->shape[0] && v->shape[1] == k->shape[1])
        return true;
    qkv_set_error("qkv_multi_head_attention_forward: query %s, key %s, value %s; expected "
                  "[B,T,%lld], [B,S,%lld], [B,S,%lld]", qkv_shape_str(q, sq, sizeof sq),
                  qkv_shape_str(k, sk, sizeof sk), qkv_shape_str(v, sv, sizeof sv),
                  (long long)m->embed_dim, (long long)m->kdim, (long long)m->vdim);
    return false;
}

/* [B,L,E] -> [B,H,L,Dh]: a reshape view, then a permute view. */
static qkv_tensor *split_heads(const qkv_multi_head_attention *m, const qkv_tensor *x) {
    if (!x) return NULL;
    qkv_tensor *r = qkv_reshape(x, QKV_SHAPE(x->shape[0], x->shape[1], m->num_heads,
                                             m->head_dim));
    return qkv_permute(r, (const int[]){0, 2, 1, 3});
}

/* The mask as something that broadcasts against scores [B,H,T,S]: [T,S] and [B,H,T,S] as they
 * are, [B*H,T,S] reshaped to [B,H,T,S]. */
static qkv_tensor *attn_mask_4d(const qkv_multi_head_attention *m, const qkv_tensor *mask,
                                int64_t B, int64_t T, int64_t S) {
    int64_t H = m->num_heads;
    if (mask->ndim == 2 && mask->shape[0] == T && mask->shape[1] == S)
        return (qkv_tensor *)mask;
    if (mask->ndim == 3 && mask->shape[0] == B * H && mask->shape[1] == T && mask->shape[2] == S)
        return qkv_reshape(mask, QKV_SHAPE(B, H, T, S));
    if (mask->ndim == 4 && mask->shape[0] == B && mask->shape[1] == H && mask->shape[2] == T &&
        mask->shape[3] == S)
        return (qkv_tensor *)mask;
    char s[128];
    return qkv_set_error("qkv_multi_head_attention_forward: attn_mask %s; expected [%lld,%lld], "
                         "[%lld,%lld,%lld] or [%lld,%lld,%lld,%lld]",
                         qkv_shape_str(mask, s, sizeof s), (long long)T, (long long)S,
                         (long long)(B * H), (long long)T, (long long)S, (long long)B,
                         (long long)H, (long long)T, (long long)S);
}

/* A mask as an additive term: BOOL masks give -inf where true and 0 elsewhere (a tensor of
 * the mask's own small shape), float masks are added as they are. */
static qkv_tensor *additive(const qkv_tensor *mask, qkv_dtype dtype) {
    if (!mask || mask->dtype != QKV_BOOL) return (qkv_tensor *)mask;
    return qkv_masked_fill(qkv_zeros(dtype, mask->ndim, mask->shape), mask, -INFINITY);
}

/* Adds a requested mask's term to the running sum. False when the term or the sum failed:
 * a NULL sum would otherwise read as "no mask" and attention would run unmasked. */
static bool add_term(qkv_tensor **sum, qkv_tensor *term) {
    if (!term) return false;
    *sum = *sum ? qkv_add(*sum, term) : term;
    return *sum != NULL;
}

/* Key j > query i is forbidden: cols > rows, a [T,S] BOOL mask made from two aranges. */
static qkv_tensor *causal_mask(int64_t T, int64_t S) {
    qkv_tensor *rows = qkv_reshape(qkv_arange(QKV_I64, 0, (double)T, 1), QKV_SHAPE(T, 1));
    qkv_tensor *cols = qkv_reshape(qkv_arange(QKV_I64, 0, (double)S, 1), QKV_SHAPE(1, S));
    return qkv_gt(cols, rows);
}

/* Every mask is turned into an additive term and the terms are summed while still small
 * ([B,1,1,S], [T,S]), so the scores take a single addition. */
static qkv_tensor *masked_scores(const qkv_multi_head_attention *m, qkv_tensor *scores,
                                 const qkv_attention_options *o, int64_t B, int64_t T,
                                 int64_t S) {
    if (!scores) return NULL;
    qkv_tensor *bias = NULL;
    if (o->attn_mask) {
        qkv_tensor *mask = attn_mask_4d(m, o->attn_mask, B, T, S);
        if (!mask || !add_term(&bias, additive(mask, scores->dtype))) return NULL;
    }
    const qkv_tensor *kpm = o->key_padding_mask;
    if (kpm) {
        if (kpm->ndim != 2 || kpm->shape[0] != B || kpm->shape[1] != S) {
            char s[128];
            return qkv_set_error("qkv_multi_head_attention_forward: key_padding_mask %s; "
                                 "expected [%lld,%lld]", qkv_shape_str(kpm, s, sizeof s),
                                 (long long)B, (long long)S);
        }
        qkv_tensor *term = additive(qkv_reshape(kpm, QKV_SHAPE(B, 1, 1, S)), scores->dtype);
        if (!add_term(&bias, term)) return NULL;
    }
    if (o->is_causal && !add_term(&bias, additive(causal_mask(T, S), scores->dtype)))
        return NULL;
    return bias ? qkv_add(scores, bias) : scores;
}

/* softmax(q k^T / sqrt(d_head) + masks) v over the heads, then the output projection; q is
 * scaled before the product, as PyTorch does: [B,H,T,Dh] is half the size of the scores. */
static qkv_tensor *attention(qkv_multi_head_attention *m, const qkv_tensor *query,
                             const qkv_tensor *key, const qkv_tensor *value,
                             const qkv_attention_options *o) {
    if (!check_inputs(m, query, key, value)) return NULL;
    int64_t B = query->shape[0], T = query->shape[1], S = key->shape[1];
    double scale = 1.0 / sqrt((double)m->head_dim);
    qkv_tensor *q = qkv_mul_scalar(split_heads(m, qkv_linear_forward(m->q_proj, query)), scale);
    qkv_tensor *k = split_heads(m, qkv_linear_forward(m->k_proj, key));     /* [B,H,S,Dh] */
    qkv_tensor *v = split_heads(m, qkv_linear_forward(m->v_proj, value));   /* [B,H,S,Dh] */
    qkv_tensor *scores = masked_scores(m, qkv_matmul(q, qkv_transpose(k, -2, -1)), o, B, T, S);
    qkv_tensor *attn = qkv_dropout(qkv_softmax(scores, -1), m->dropout, m->base.training,
                                   &m->generator);                          /* [B,H,T,S] */
    qkv_tensor *ctx = qkv_permute(qkv_matmul(attn, v), (const int[]){0, 2, 1, 3}); /* [B,T,H,Dh] */
    qkv_tensor *out = qkv_linear_forward(m->out_proj,
                                         qkv_reshape(ctx, QKV_SHAPE(B, T, m->embed_dim)));
    if (out && o->weights)
        *o->weights = qkv_keep(o->per_head_weights ? attn : qkv_mean(attn, 1, false));
    return out;
}

qkv_tensor *qkv_multi_head_attention_forward(qkv_multi_head_attention *m,
                                             const qkv_tensor *query, const qkv_tensor *key,
                                             const qkv_tensor *value,
                                             const qkv_attention_options *opts) {
    static const qkv_attention_options none = {0};
    const qkv_attention_options *o = opts ? opts : &none;
    if (o->weights) *o->weights = NULL;
    if (!m || !query || !key || !value) return NULL;
    return QKV_CALL(m, attention(m, query, key, value, o));
}
