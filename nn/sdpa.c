/*
 * Scaled dot-product attention as PyTorch 2.x's functional form, composed from primitive ops
 * (matmul, an added mask, softmax, dropout), so it needs no backward of its own. The masks are
 * reduced to one additive term of their own small shape before they meet the scores, so the
 * scores take a single addition; the causal mask takes none (qkv_causal_softmax).
 */
#include <math.h>

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

/* The mask must broadcast to the scores: no more dims, each trailing one 1 or equal. */
static bool check_mask(const qkv_tensor *mask, const qkv_tensor *scores) {
    bool ok = mask->ndim <= scores->ndim;
    for (int i = 1; ok && i <= mask->ndim; i++) {
        int64_t m = mask->shape[mask->ndim - i], s = scores->shape[scores->ndim - i];
        ok = m == 1 || m == s;
    }
    if (!ok) {
        char sm[128], ss[128];
        qkv_set_error("%s: attn_mask %s does not broadcast to the scores %s", op,
                      qkv_shape_str(mask, sm, sizeof sm), qkv_shape_str(scores, ss, sizeof ss));
    }
    return ok;
}

/* 0 where allowed is true, -inf where not, in the scores' dtype. */
static qkv_tensor *allowed_to_term(const qkv_tensor *allowed, qkv_dtype dtype) {
    return qkv_where(allowed, qkv_scalar(dtype, 0), qkv_scalar(dtype, -INFINITY));
}

/* The additive term: 0 where a key takes part, -inf where not; float masks as they are.
 * *term stays NULL for no mask and for is_causal (qkv_causal_softmax masks); false on error. */
static bool mask_term(const qkv_tensor *scores, const qkv_sdpa_options *o, qkv_tensor **term) {
    *term = NULL;
    const qkv_tensor *mask = o->attn_mask;
    if (mask && o->is_causal) {
        qkv_set_error("%s: attn_mask and is_causal are both set (torch refuses it too)", op);
        return false;
    }
    if (!mask) return true;
    if (!check_mask(mask, scores)) return false;
    *term = mask->dtype == QKV_BOOL ? allowed_to_term(mask, scores->dtype) : (qkv_tensor *)mask;
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

/* q is scaled before the product, as PyTorch's MultiheadAttention does: [..., L, E] is
 * usually smaller than the scores. */
qkv_tensor *qkv_scaled_dot_product_attention(const qkv_tensor *q, const qkv_tensor *k,
                                             const qkv_tensor *v, const qkv_sdpa_options *opts) {
    static const qkv_sdpa_options none = {0};
    const qkv_sdpa_options *o = opts ? opts : &none;
    if (o->weights) *o->weights = NULL;
    if (!q || !k || !v || !check_qkv(q, k, v) || !check_options(o)) return NULL;
    double scale = o->scale ? o->scale : 1.0 / sqrt((double)q->shape[q->ndim - 1]);
    /* Causal scores are needed on and below the diagonal only, and the weights above it are
     * zeros: both products compute half. */
    qkv_tensor *scores = qkv_matmul_tri(qkv_mul_scalar(q, scale), qkv_transpose(k, -2, -1),
                                        o->is_causal ? QKV_TRIL_OUT : QKV_TRI_NONE);
    qkv_tensor *term;
    if (!scores || !mask_term(scores, o, &term)) return NULL;
    if (term) scores = qkv_add(scores, term);
    qkv_tensor *weights = o->is_causal ? qkv_causal_softmax(scores, 0) : qkv_softmax(scores, -1);
    qkv_tensor *attn = qkv_dropout(weights, o->dropout_p, o->training, o->generator);
    qkv_tensor *out = qkv_matmul_tri(attn, v, o->is_causal ? QKV_TRIL_A : QKV_TRI_NONE);
    if (out && o->weights) *o->weights = attn;
    return out;
}
