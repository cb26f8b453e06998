/* Whole graphs built from qkv primitives against the same computation in PyTorch
 * (tests/fixtures/gen_agreement.py): the loss and the gradient of every input, in F32 and F64.
 * (1) scaled dot-product attention with projections, head split, a key padding mask, a causal
 * mask, softmax, dropout p=0, head merge and an output projection; (2) a two-layer MLP with
 * cross-entropy written as log_softmax and gather. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>

#include "qkv.h"
#include "fixtures/agreement_fixtures.h"
#include "harness.h"

/* Tolerances relative to each value plus the same fraction of the tensor's largest magnitude,
 * so that entries which cancel to near zero are held to the tensor's scale. */
#define RTOL_F32 1e-5
#define RTOL_F64 1e-10

/* A leaf parameter in dtype holding the fixture's values. */
static qkv_tensor *param(qkv_dtype dtype, int ndim, const int64_t *shape, const double *data) {
    qkv_tensor *t = qkv_to_dtype(qkv_from_array(QKV_F64, ndim, shape, data), dtype);
    assert_non_null(t);
    return qkv_requires_grad_(t, true);
}

static void assert_close(const char *what, const qkv_tensor *t, const double *want, int64_t n,
                         double rtol) {
    assert_non_null(t);
    assert_int_equal(t->numel, n);
    double got[128], scale = 0;
    assert_true(n <= 128);
    assert_true(qkv_copy_out(t, QKV_F64, got));
    for (int64_t i = 0; i < n; i++) scale = fmax(scale, fabs(want[i]));
    for (int64_t i = 0; i < n; i++) {
        double err = fabs(got[i] - want[i]);
        if (!(err <= rtol * (fabs(want[i]) + scale)))
            fail_msg("%s[%lld]: got %.17g, PyTorch %.17g (error %.3g)", what, (long long)i,
                     got[i], want[i], err);
    }
}

#define ASSERT_CLOSE(what, t, want, rtol) \
    assert_close(what, t, want, (int64_t)(sizeof want / sizeof *want), rtol)

static void assert_near_zero(const char *what, const qkv_tensor *t, double atol) {
    assert_non_null(t);
    for (int64_t i = 0; i < t->numel; i++) {
        double v = qkv_get(t, (const int64_t[]){i});
        if (!(fabs(v) <= atol)) fail_msg("%s[%lld]: got %.17g, want 0", what, (long long)i, v);
    }
}

/* x @ w^T + b, as torch.nn.functional.linear */
static qkv_tensor *linear(const qkv_tensor *x, const qkv_tensor *w, const qkv_tensor *b) {
    return qkv_add(qkv_matmul(x, qkv_transpose(w, 0, 1)), b);
}

/* ---- Attention --------------------------------------------------------------------------- */

enum { B = ATTN_B, T = ATTN_T, E = ATTN_E, H = ATTN_H, DH = ATTN_E / ATTN_H };

typedef struct attention_params {
    qkv_tensor *x, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
} attention_params;

static attention_params attention_inputs(qkv_dtype dt) {
    return (attention_params){
        .x = param(dt, QKV_SHAPE(B, T, E), attn_x),
        .wq = param(dt, QKV_SHAPE(E, E), attn_wq), .bq = param(dt, QKV_SHAPE(E), attn_bq),
        .wk = param(dt, QKV_SHAPE(E, E), attn_wk), .bk = param(dt, QKV_SHAPE(E), attn_bk),
        .wv = param(dt, QKV_SHAPE(E, E), attn_wv), .bv = param(dt, QKV_SHAPE(E), attn_bv),
        .wo = param(dt, QKV_SHAPE(E, E), attn_wo), .bo = param(dt, QKV_SHAPE(E), attn_bo),
    };
}

/* [B,T,E] -> [B,H,T,DH] */
static qkv_tensor *split_heads(const qkv_tensor *t) {
    return qkv_permute(qkv_reshape(t, QKV_SHAPE(B, T, H, DH)), (const int[]){0, 2, 1, 3});
}

/* [B,1,1,T]: -1e9 on the keys past each sequence's length, 0 elsewhere. */
static qkv_tensor *key_padding_mask(qkv_dtype dt) {
    qkv_tensor *positions = qkv_reshape(qkv_arange(QKV_I64, 0, T, 1), QKV_SHAPE(1, T));
    qkv_tensor *lengths = qkv_from_array(QKV_I64, QKV_SHAPE(B, 1), attn_lengths);
    qkv_tensor *padded = qkv_ge(positions, lengths);
    return qkv_reshape(qkv_masked_fill(qkv_zeros(dt, QKV_SHAPE(B, T)), padded, -1e9),
                       QKV_SHAPE(B, 1, 1, T));
}

/* [T,T]: -inf where the key comes after the query. */
static qkv_tensor *causal_mask(qkv_dtype dt) {
    qkv_tensor *keys = qkv_reshape(qkv_arange(QKV_I64, 0, T, 1), QKV_SHAPE(1, T));
    qkv_tensor *queries = qkv_reshape(qkv_arange(QKV_I64, 0, T, 1), QKV_SHAPE(T, 1));
    return qkv_masked_fill(qkv_zeros(dt, QKV_SHAPE(T, T)), qkv_gt(keys, queries), -INFINITY);
}

static qkv_tensor *attention_loss(const attention_params *p, qkv_generator *g) {
    qkv_dtype dt = p->x->dtype;
    qkv_tensor *q = split_heads(linear(p->x, p->wq, p->bq));
    qkv_tensor *k = split_heads(linear(p->x, p->wk, p->bk));
    qkv_tensor *v = split_heads(linear(p->x, p->wv, p->bv));
    qkv_tensor *scores = qkv_div_scalar(qkv_matmul(q, qkv_transpose(k, -1, -2)), sqrt(DH));
    scores = qkv_add(qkv_add(scores, key_padding_mask(dt)), causal_mask(dt));
    qkv_tensor *weights = qkv_dropout(qkv_softmax(scores, -1), 0.0, true, g);
    qkv_tensor *heads = qkv_permute(qkv_matmul(weights, v), (const int[]){0, 2, 1, 3});
    qkv_tensor *merged = qkv_reshape(heads, QKV_SHAPE(B, T, E));
    return qkv_mean_all(linear(merged, p->wo, p->bo));
}

static void check_attention(qkv_dtype dt, double rtol) {
    qkv_generator g;
    qkv_generator_init(&g, 1);
    attention_params p = attention_inputs(dt);
    qkv_tensor *loss = attention_loss(&p, &g);
    assert_non_null(loss);
    assert_int_equal(loss->dtype, dt);
    assert_true(qkv_backward(loss));
    ASSERT_CLOSE("loss", loss, attn_loss, rtol);
    ASSERT_CLOSE("grad x", p.x->grad, attn_grad_x, rtol);
    ASSERT_CLOSE("grad wq", p.wq->grad, attn_grad_wq, rtol);
    ASSERT_CLOSE("grad bq", p.bq->grad, attn_grad_bq, rtol);
    ASSERT_CLOSE("grad wk", p.wk->grad, attn_grad_wk, rtol);
    /* The key bias adds q . bk to a whole row of scores, which softmax ignores: its gradient
     * is zero, and both sides hold rounding noise there. */
    double bias_scale = 0;
    for (int i = 0; i < E; i++) {
        bias_scale = fmax(bias_scale, fabs(attn_grad_bq[i]));
        assert_true(fabs(attn_grad_bk[i]) < 1e-15);
    }
    assert_near_zero("grad bk", p.bk->grad, rtol * bias_scale);
    ASSERT_CLOSE("grad wv", p.wv->grad, attn_grad_wv, rtol);
    ASSERT_CLOSE("grad bv", p.bv->grad, attn_grad_bv, rtol);
    ASSERT_CLOSE("grad wo", p.wo->grad, attn_grad_wo, rtol);
    ASSERT_CLOSE("grad bo", p.bo->grad, attn_grad_bo, rtol);
}

static void attention_agrees_with_torch_in_f32(void **state) {
    (void)state;
    check_attention(QKV_F32, RTOL_F32);
}

static void attention_agrees_with_torch_in_f64(void **state) {
    (void)state;
    check_attention(QKV_F64, RTOL_F64);
}

/* ---- MLP with cross-entropy -------------------------------------------------------------- */

enum { N = MLP_N, D = MLP_D, HIDDEN = MLP_HIDDEN, C = MLP_C };

/* -mean over rows of log_softmax(logits)[row, label], the label's entry picked by gather */
static qkv_tensor *cross_entropy(const qkv_tensor *logits, const qkv_tensor *labels) {
    qkv_tensor *picked = qkv_gather(qkv_log_softmax(logits, 1), 1,
                                    qkv_reshape(labels, QKV_SHAPE(N, 1)));
    return qkv_neg(qkv_mean_all(picked));
}

static void check_mlp(qkv_dtype dt, double rtol) {
    qkv_tensor *x = param(dt, QKV_SHAPE(N, D), mlp_x);
    qkv_tensor *w1 = param(dt, QKV_SHAPE(HIDDEN, D), mlp_w1);
    qkv_tensor *b1 = param(dt, QKV_SHAPE(HIDDEN), mlp_b1);
    qkv_tensor *w2 = param(dt, QKV_SHAPE(C, HIDDEN), mlp_w2);
    qkv_tensor *b2 = param(dt, QKV_SHAPE(C), mlp_b2);
    qkv_tensor *labels = qkv_from_array(QKV_I64, QKV_SHAPE(N), mlp_labels);
    qkv_tensor *logits = linear(qkv_relu(linear(x, w1, b1)), w2, b2);
    qkv_tensor *loss = cross_entropy(logits, labels);
    assert_non_null(loss);
    assert_true(qkv_backward(loss));
    ASSERT_CLOSE("loss", loss, mlp_loss, rtol);
    ASSERT_CLOSE("grad x", x->grad, mlp_grad_x, rtol);
    ASSERT_CLOSE("grad w1", w1->grad, mlp_grad_w1, rtol);
    ASSERT_CLOSE("grad b1", b1->grad, mlp_grad_b1, rtol);
    ASSERT_CLOSE("grad w2", w2->grad, mlp_grad_w2, rtol);
    ASSERT_CLOSE("grad b2", b2->grad, mlp_grad_b2, rtol);
}

static void mlp_cross_entropy_agrees_with_torch_in_f32(void **state) {
    (void)state;
    check_mlp(QKV_F32, RTOL_F32);
}

static void mlp_cross_entropy_agrees_with_torch_in_f64(void **state) {
    (void)state;
    check_mlp(QKV_F64, RTOL_F64);
}

#define TEST(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)

int main(void) {
    const struct CMUnitTest tests[] = {
        TEST(attention_agrees_with_torch_in_f32),
        TEST(attention_agrees_with_torch_in_f64),
        TEST(mlp_cross_entropy_agrees_with_torch_in_f32),
        TEST(mlp_cross_entropy_agrees_with_torch_in_f64),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
