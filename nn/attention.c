/*
 * Multi-head attention, composed from primitive ops so that its gradient comes from theirs:
 * project, split heads with reshape + permute views, scores = Q K^T / sqrt(d_head) through a
 * transposed view, masks, softmax, dropout, a weighted sum of V, merge heads, project out.
 * Grouped-query attention repeats the fewer key/value heads; a key/value cache keeps the
 * heads of earlier calls for incremental decoding.
 */
#include <math.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

/* PyTorch initialises q, k and v as one packed [3E, E] matrix when kdim == vdim == E (so the
 * fans are E and 3E), and each projection on its own otherwise (grouped-query attention too). */
static bool init_projections(qkv_multi_head_attention *m, qkv_generator *g) {
    bool packed = m->kdim == m->embed_dim && m->vdim == m->embed_dim &&
                  m->num_kv_heads == m->num_heads;
    double packed_bound = sqrt(6.0 / (double)(m->embed_dim + 3 * m->embed_dim));
    qkv_linear *proj[3] = {m->q_proj, m->k_proj, m->v_proj};
    for (int i = 0; i < 3; i++) {
        bool ok = packed ? qkv_init_uniform_(proj[i]->weight, -packed_bound, packed_bound, g)
                         : qkv_init_xavier_uniform_(proj[i]->weight, 1.0, g);
        if (!ok || (proj[i]->bias && !qkv_fill_(proj[i]->bias, 0.0))) return false;
    }
    return !m->out_proj->bias || qkv_fill_(m->out_proj->bias, 0.0);
}

static qkv_multi_head_attention *attention_new(const char *op, int64_t embed_dim,
                                               int64_t num_heads, int64_t num_kv_heads,
                                               double dropout, bool bias, int64_t kdim,
                                               int64_t vdim, qkv_generator *g) {
    if (embed_dim <= 0 || num_heads <= 0 || embed_dim % num_heads || kdim < 0 || vdim < 0)
        return qkv_set_error("%s: embed_dim %lld must be a positive multiple of num_heads %lld "
                             "(kdim %lld, vdim %lld)", op, (long long)embed_dim,
                             (long long)num_heads, (long long)kdim, (long long)vdim);
    if (num_kv_heads <= 0 || num_heads % num_kv_heads)
        return qkv_set_error("%s: num_kv_heads %lld must divide num_heads %lld", op,
                             (long long)num_kv_heads, (long long)num_heads);
    if (!(dropout >= 0 && dropout <= 1))
        return qkv_set_error("%s: dropout %g not in [0, 1]", op, dropout);
    if (!g) return qkv_set_error("%s: no generator", op);
    qkv_multi_head_attention *m = qkv_module_new("multi_head_attention", sizeof *m, NULL);
    if (!m) return NULL;
    m->embed_dim = embed_dim;
    m->num_heads = num_heads;
    m->num_kv_heads = num_kv_heads;
    m->head_dim = embed_dim / num_heads;
    m->kdim = kdim ? kdim : embed_dim;
    m->vdim = vdim ? vdim : embed_dim;
    m->dropout = dropout;
    int64_t kv_dim = num_kv_heads * m->head_dim;
    qkv_module *b = &m->base;
    m->q_proj = qkv_module_add_module(b, "q_proj",
                                      QKV_MODULE(qkv_linear_new(embed_dim, embed_dim, bias, g)));
    m->k_proj = qkv_module_add_module(b, "k_proj",
                                      QKV_MODULE(qkv_linear_new(m->kdim, kv_dim, bias, g)));
    m->v_proj = qkv_module_add_module(b, "v_proj",
                                      QKV_MODULE(qkv_linear_new(m->vdim, kv_dim, bias, g)));
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

qkv_multi_head_attention *qkv_multi_head_attention_new(int64_t embed_dim, int64_t num_heads,
                                                       double dropout, bool bias, int64_t kdim,
                                                       int64_t vdim, qkv_generator *g) {
    return attention_new("qkv_multi_head_attention_new", embed_dim, num_heads, num_heads,
                         dropout, bias, kdim, vdim, g);
}

qkv_multi_head_attention *qkv_grouped_query_attention_new(int64_t embed_dim, int64_t num_heads,
                                                          int64_t num_kv_heads, double dropout,
                                                          bool bias, qkv_generator *g) {
    return attention_new("qkv_grouped_query_attention_new", embed_dim, num_heads, num_kv_heads,
                         dropout, bias, 0, 0, g);
}

/* ---- Forward ----------------------------------------------------------------------------- */

static const char *const fwd_op = "qkv_multi_head_attention_forward";

static bool check_inputs(const qkv_multi_head_attention *m, const qkv_tensor *q,
                         const qkv_tensor *k, const qkv_tensor *v) {
    char sq[128], sk[128], sv[128];
    if (q->ndim == 3 && k->ndim == 3 && v->ndim == 3 && q->shape[2] == m->embed_dim &&
        k->shape[2] == m->kdim && v->shape[2] == m->vdim && k->shape[0] == q->shape[0] &&
        v->shape[0] == q->shape[0] && v->shape[1] == k->shape[1])
        return true;
    qkv_set_error("%s: query %s, key %s, value %s; expected [B,T,%lld], [B,S,%lld], [B,S,%lld]",
                  fwd_op, qkv_shape_str(q, sq, sizeof sq), qkv_shape_str(k, sk, sizeof sk),
                  qkv_shape_str(v, sv, sizeof sv), (long long)m->embed_dim, (long long)m->kdim,
                  (long long)m->vdim);
    return false;
}

/* [B,L,heads*Dh] -> [B,heads,L,Dh]: a reshape view, then a permute view. */
static qkv_tensor *split_heads(const qkv_multi_head_attention *m, const qkv_tensor *x,
                               int64_t heads) {
    if (!x) return NULL;
    qkv_tensor *r = qkv_reshape(x, QKV_SHAPE(x->shape[0], x->shape[1], heads, m->head_dim));
    return qkv_permute(r, (const int[]){0, 2, 1, 3});
}

/* [B,Hkv,S,Dh] -> [B,H,S,Dh], each key/value head repeated for its group of query heads (as
 * LLaMA's repeat_kv): an expand view, then one copy. */
static qkv_tensor *repeat_kv(const qkv_multi_head_attention *m, const qkv_tensor *x) {
    int64_t group = m->num_heads / m->num_kv_heads;
    if (!x || group == 1) return (qkv_tensor *)x;
    int64_t B = x->shape[0], S = x->shape[2], Dh = x->shape[3];
    qkv_tensor *e = qkv_expand(qkv_unsqueeze(x, 2), QKV_SHAPE(B, m->num_kv_heads, group, S, Dh));
    return qkv_reshape(e, QKV_SHAPE(B, m->num_heads, S, Dh));
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
    return qkv_set_error("%s: attn_mask %s; expected [%lld,%lld], [%lld,%lld,%lld] or "
                         "[%lld,%lld,%lld,%lld]", fwd_op, qkv_shape_str(mask, s, sizeof s),
                         (long long)T, (long long)S, (long long)(B * H), (long long)T,
                         (long long)S, (long long)B, (long long)H, (long long)T, (long long)S);
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

/* Key j is forbidden to query i when j > past + i (past: the positions cached before): a
 * [T,S] BOOL mask made from two aranges. */
static qkv_tensor *causal_mask(int64_t T, int64_t S, int64_t past) {
    qkv_tensor *rows = qkv_reshape(qkv_arange(QKV_I64, (double)past, (double)(past + T), 1),
                                   QKV_SHAPE(T, 1));
    qkv_tensor *cols = qkv_reshape(qkv_arange(QKV_I64, 0, (double)S, 1), QKV_SHAPE(1, S));
    return qkv_gt(cols, rows);
}

/* Every mask is turned into an additive term and the terms are summed while still small
 * ([B,1,1,S], [T,S]), so the scores take a single addition. *bias stays NULL for no mask;
 * false on error. */
static bool mask_bias(const qkv_multi_head_attention *m, const qkv_attention_options *o,
                      qkv_dtype dtype, int64_t B, int64_t T, int64_t S, int64_t past,
                      qkv_tensor **bias) {
    *bias = NULL;
    if (o->attn_mask) {
        qkv_tensor *mask = attn_mask_4d(m, o->attn_mask, B, T, S);
        if (!mask || !add_term(bias, additive(mask, dtype))) return false;
    }
    const qkv_tensor *kpm = o->key_padding_mask;
    if (kpm) {
        if (kpm->ndim != 2 || kpm->shape[0] != B || kpm->shape[1] != S) {
            char s[128];
            qkv_set_error("%s: key_padding_mask %s; expected [%lld,%lld]", fwd_op,
                          qkv_shape_str(kpm, s, sizeof s), (long long)B, (long long)S);
            return false;
        }
        if (!add_term(bias, additive(qkv_reshape(kpm, QKV_SHAPE(B, 1, 1, S)), dtype)))
            return false;
    }
    return !o->is_causal || add_term(bias, additive(causal_mask(T, S, past), dtype));
}

/* ---- The key/value cache ----------------------------------------------------------------- */

struct qkv_kv_cache {
    int64_t max_len, length;
    qkv_tensor *k, *v; /* [B, num_kv_heads, length, head_dim], detached; NULL when empty */
};

qkv_kv_cache *qkv_kv_cache_new(int64_t max_len) {
    if (max_len < 1) return qkv_set_error("qkv_kv_cache_new: max_len %lld < 1",
                                          (long long)max_len);
    qkv_kv_cache *c = qkv__calloc(sizeof *c);
    if (c) c->max_len = max_len;
    return c;
}

void qkv_kv_cache_reset(qkv_kv_cache *c) {
    if (!c) return;
    qkv__release(c->k);
    qkv__release(c->v);
    c->k = c->v = NULL;
    c->length = 0;
}

void qkv_kv_cache_free(qkv_kv_cache *c) {
    if (!c) return;
    qkv_kv_cache_reset(c);
    qkv__free(c, sizeof *c);
}

int64_t qkv_kv_cache_length(const qkv_kv_cache *c) {
    return c ? c->length : 0;
}

/* The cached keys (or values) followed by x's, checked against the cache's room and shape. */
static qkv_tensor *with_cached(const qkv_kv_cache *c, const qkv_tensor *cached,
                               const qkv_tensor *x) {
    if (!x) return NULL;
    if (c->length + x->shape[2] > c->max_len)
        return qkv_set_error("%s: the kv cache holds %lld of %lld positions; %lld more do not "
                             "fit", fwd_op, (long long)c->length, (long long)c->max_len,
                             (long long)x->shape[2]);
    if (!cached) return (qkv_tensor *)x;
    if (cached->shape[0] != x->shape[0] || cached->shape[1] != x->shape[1] ||
        cached->shape[3] != x->shape[3] || cached->dtype != x->dtype) {
        char sc[128], sx[128];
        return qkv_set_error("%s: the kv cache holds %s %s, the new keys are %s %s", fwd_op,
                             qkv_dtype_name(cached->dtype), qkv_shape_str(cached, sc, sizeof sc),
                             qkv_dtype_name(x->dtype), qkv_shape_str(x, sx, sizeof sx));
    }
    return qkv_concat(2, (qkv_tensor *const[]){(qkv_tensor *)cached, (qkv_tensor *)x}, 2);
}

/* Called once the forward has succeeded, so that a failed call leaves the cache as it was. */
static bool cache_store(qkv_kv_cache *c, qkv_tensor *k, qkv_tensor *v) {
    qkv_tensor *dk = qkv_detach(k), *dv = qkv_detach(v);
    if (!dk || !dv) return false;
    qkv__release(c->k);
    qkv__release(c->v);
    c->k = qkv__retain(dk);
    c->v = qkv__retain(dv);
    c->length = k->shape[2];
    return true;
}

/* ---- Attention --------------------------------------------------------------------------- */

/* q, k and v heads with rope applied at the cache's position, k and v after the cached ones. */
static bool project(qkv_multi_head_attention *m, const qkv_tensor *query, const qkv_tensor *key,
                    const qkv_tensor *value, const qkv_attention_options *o, qkv_tensor **q,
                    qkv_tensor **k, qkv_tensor **v) {
    int64_t past = qkv_kv_cache_length(o->cache);
    *q = split_heads(m, qkv_linear_forward(m->q_proj, query), m->num_heads);
    *k = split_heads(m, qkv_linear_forward(m->k_proj, key), m->num_kv_heads);
    *v = split_heads(m, qkv_linear_forward(m->v_proj, value), m->num_kv_heads);
    if (o->rope) {
        *q = qkv_rotary_embedding_forward(o->rope, *q, past);
        *k = qkv_rotary_embedding_forward(o->rope, *k, past);
    }
    if (o->cache) {
        *k = with_cached(o->cache, o->cache->k, *k);
        *v = *k ? with_cached(o->cache, o->cache->v, *v) : NULL;
    }
    return *q && *k && *v;
}

/* softmax(q k^T / sqrt(d_head) + masks) v over the heads (qkv_scaled_dot_product_attention),
 * then the output projection. */
static qkv_tensor *attention(qkv_multi_head_attention *m, const qkv_tensor *query,
                             const qkv_tensor *key, const qkv_tensor *value,
                             const qkv_attention_options *o) {
    if (!check_inputs(m, query, key, value)) return NULL;
    int64_t B = query->shape[0], T = query->shape[1], past = qkv_kv_cache_length(o->cache);
    qkv_tensor *q, *k, *v, *bias, *attn = NULL;
    if (!project(m, query, key, value, o, &q, &k, &v)) return NULL;
    /* A causal mask alone over the whole sequence is sdpa's is_causal, fused into the
     * softmax; with a cache or other masks it joins their sum. */
    bool fused_causal = o->is_causal && !past && !o->attn_mask && !o->key_padding_mask;
    qkv_attention_options masks = *o;
    masks.is_causal = o->is_causal && !fused_causal;
    if (!mask_bias(m, &masks, q->dtype, B, T, k->shape[2], past, &bias)) return NULL;
    qkv_sdpa_options so = {.attn_mask = bias, .is_causal = fused_causal, .dropout_p = m->dropout,
                           .training = m->base.training, .generator = &m->generator,
                           .weights = o->weights ? &attn : NULL};
    qkv_tensor *ctx = qkv_scaled_dot_product_attention(q, repeat_kv(m, k), repeat_kv(m, v), &so);
    ctx = qkv_permute(ctx, (const int[]){0, 2, 1, 3}); /* [B,T,H,Dh] */
    qkv_tensor *out = qkv_linear_forward(m->out_proj,
                                         qkv_reshape(ctx, QKV_SHAPE(B, T, m->embed_dim)));
    if (out && o->cache && !cache_store(o->cache, k, v)) return NULL;
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
    if (qkv__null_object("qkv_multi_head_attention_forward", "module", m) ||
        QKV__NULL_ARGS("qkv_multi_head_attention_forward", query, key, value))
        return NULL;
    return QKV_CALL(m, attention(m, query, key, value, o));
}
