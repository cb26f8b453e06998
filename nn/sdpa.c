/*
 * Scaled dot-product attention as PyTorch 2.x's functional form, composed from primitive ops
 * (matmul and baddbmm, softmax, dropout), so it needs no backward of its own. The masks are
 * reduced to one additive term of their own small shape before they meet the scores, which
 * the scores' product adds as it stores them (qkv_baddbmm); the causal mask takes none
 * (qkv_causal_softmax).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "nn/nn.h"

static const char *const op = "qkv_scaled_dot_product_attention";

static bool check_qkv(const qkv_tensor *q, const qkv_tensor *k, const qkv_tensor *v) {
    if (q->ndim >= 2 && k->ndim >= 2 && v->ndim >= 2 && q->shape[q->ndim - 1] ==
        k->shape[k->ndim - 1] && k->shape[k->ndim - 2] == v->shape[v->ndim - 2])
        return true;
    char sq[128], sk[128], sv[128];
    qkv_set_error("%s: q %s, k %s, v %s; expected [..., L, E], [..., S, E], [..., S, Ev]", op,
                  qkv_shape_str(q, sq, sizeof sq), qkv_shape_str(k, sk, sizeof sk),
                  qkv_shape_str(v, sv, sizeof sv));
    return false;
}

/* The scores' shape: q's and k's batch dimensions broadcast, then L x S. */
static bool scores_shape(const qkv_tensor *q, const qkv_tensor *k, int *nd, int64_t *shape) {
    int qb = q->ndim - 2, kb = k->ndim - 2;
    bool ok = true;
    *nd = qb > kb ? qb : kb;
    for (int i = 1; i <= *nd; i++) {
        int64_t x = i <= qb ? q->shape[qb - i] : 1, y = i <= kb ? k->shape[kb - i] : 1;
        ok = ok && (x == y || x == 1 || y == 1);
        shape[*nd - i] = x == 1 ? y : x;
    }
    if (!ok) {
        char sq[128], sk[128];
        qkv_set_error("%s: the batch dimensions of q %s and k %s do not broadcast", op,
                      qkv_shape_str(q, sq, sizeof sq), qkv_shape_str(k, sk, sizeof sk));
        return false;
    }
    shape[(*nd)++] = q->shape[q->ndim - 2];
    shape[(*nd)++] = k->shape[k->ndim - 2];
    return true;
}

/* The mask must broadcast to the scores: no more dims, each trailing one 1 or equal. */
static bool check_mask(const qkv_tensor *mask, int nd, const int64_t *shape) {
    bool ok = mask->ndim <= nd;
    for (int i = 1; ok && i <= mask->ndim; i++) {
        int64_t m = mask->shape[mask->ndim - i], s = shape[nd - i];
        ok = m == 1 || m == s;
    }
    if (!ok) {
        char sm[128], ss[512] = "[";
        for (int i = 0; i < nd; i++)
            snprintf(ss + strlen(ss), sizeof ss - strlen(ss), "%s%lld", i ? "," : "",
                     (long long)shape[i]);
        snprintf(ss + strlen(ss), sizeof ss - strlen(ss), "]");
        qkv_set_error("%s: attn_mask %s does not broadcast to the scores %s", op,
                      qkv_shape_str(mask, sm, sizeof sm), ss);
    }
    return ok;
}

/* 0 where allowed is true, -inf where not, in the scores' dtype. */
static qkv_tensor *allowed_to_term(const qkv_tensor *allowed, qkv_dtype dtype) {
    return qkv_where(allowed, qkv_scalar(dtype, 0), qkv_scalar(dtype, -INFINITY));
}

/* The additive term: 0 where a key takes part, -inf where not; float masks as they are.
 * *term stays NULL for no mask and for is_causal (qkv_causal_softmax masks); false on error. */
static bool mask_term(const qkv_tensor *q, const qkv_tensor *k, const qkv_sdpa_options *o,
                      qkv_tensor **term) {
    *term = NULL;
    const qkv_tensor *mask = o->attn_mask;
    if (mask && o->is_causal) {
        qkv_set_error("%s: attn_mask and is_causal are both set (torch refuses it too)", op);
        return false;
    }
    int nd;
    int64_t shape[QKV_MAX_DIMS + 2];
    if (!scores_shape(q, k, &nd, shape)) return false;
    if (!mask) return true;
    if (!check_mask(mask, nd, shape)) return false;
    *term = mask->dtype == QKV_BOOL ? allowed_to_term(mask, q->dtype) : (qkv_tensor *)mask;
    return *term != NULL;
}

static bool check_options(const qkv_sdpa_options *o) {
    if (!(o->dropout_p >= 0 && o->dropout_p <= 1)) {
        qkv_set_error("%s: dropout_p %g not in [0, 1]", op, o->dropout_p);
        return false;
    }
    if (o->training && o->dropout_p > 0 && !o->generator) {
        qkv_set_error("%s: dropout_p %g in training needs a generator", op, o->dropout_p);
        return false;
    }
    if (!isfinite(o->scale)) {
        qkv_set_error("%s: scale %g is not finite", op, o->scale);
        return false;
    }
    return true;
}

/* The scale is the product's alpha and the mask its added input (qkv_baddbmm), which a mask
 * over keys costs no pass over the scores; PyTorch's math path scales q before the product
 * instead, which rounds differently in the last bits. */
qkv_tensor *qkv_scaled_dot_product_attention(const qkv_tensor *q, const qkv_tensor *k,
                                             const qkv_tensor *v, const qkv_sdpa_options *opts) {
    static const qkv_sdpa_options none = {0};
    const qkv_sdpa_options *o = opts ? opts : &none;
    if (o->weights) *o->weights = NULL;
    if (!q || !k || !v || !check_qkv(q, k, v) || !check_options(o)) return NULL;
    double scale = o->scale ? o->scale : 1.0 / sqrt((double)q->shape[q->ndim - 1]);
    qkv_tensor *term, *scores;
    if (!mask_term(q, k, o, &term)) return NULL;
    /* Causal scores are needed on and below the diagonal only, and the weights above it are
     * zeros: both products compute half. */
    if (o->is_causal)
        scores = qkv_matmul_tri(qkv_mul_scalar(q, scale), qkv_transpose(k, -2, -1),
                                QKV_TRIL_OUT);
    else
        scores = qkv_baddbmm(term, q, qkv_transpose(k, -2, -1), scale);
    if (!scores) return NULL;
    qkv_tensor *weights = o->is_causal ? qkv_causal_softmax(scores, 0) : qkv_softmax(scores, -1);
    qkv_tensor *attn = qkv_dropout(weights, o->dropout_p, o->training, o->generator);
    qkv_tensor *out = qkv_matmul_tri(attn, v, o->is_causal ? QKV_TRIL_A : QKV_TRI_NONE);
    if (out && o->weights) *o->weights = attn;
    return out;
}
