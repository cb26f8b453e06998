/* Causal attention written by hand from the triangular products (docs/guide.md, step 2), checked
 * against qkv_scaled_dot_product_attention with is_causal: the same output and the same
 * gradients of q, k and v, to the bit. */
#include <stdio.h>

#include <qkv.h>

/* softmax(q k^T scale) v with query i seeing keys j <= i */
static qkv_tensor *causal_attention(const qkv_tensor *q, const qkv_tensor *k,
                                    const qkv_tensor *v, double scale) {
    qkv_tensor *scores = qkv_matmul_tri(qkv_mul_scalar(q, scale), qkv_transpose(k, -2, -1),
                                        QKV_TRIL_OUT);     /* tril(q k^T) */
    qkv_tensor *weights = qkv_causal_softmax(scores, 0);     /* ignores what is above it */
    return qkv_matmul_tri(weights, v, QKV_TRIL_A);           /* tril(weights) v */
}

/* The largest difference between the two ways, in the output and in each input's gradient. */
int main(void) {
    qkv_generator g;
    qkv_generator_init(&g, 5);
    qkv_scope_begin();
    qkv_tensor *in[3];
    for (int i = 0; i < 3; i++)
        in[i] = qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 40, 16), &g), true);
    qkv_tensor *grad = qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 40, 16), &g);
    qkv_tensor *ours = causal_attention(in[0], in[1], in[2], 0.25), *mine[3];
    qkv_backward_with(ours, grad, false);
    for (int i = 0; i < 3; i++) {
        mine[i] = qkv_clone(in[i]->grad);
        qkv_zero_grad(in[i]);
    }
    qkv_sdpa_options causal = {.is_causal = true};
    qkv_tensor *theirs = qkv_scaled_dot_product_attention(in[0], in[1], in[2], &causal);
    qkv_backward_with(theirs, grad, false);
    double d = qkv_item(qkv_max_all(qkv_abs(qkv_sub(ours, theirs))));
    for (int i = 0; i < 3; i++) {
        double di = qkv_item(qkv_max_all(qkv_abs(qkv_sub(mine[i], in[i]->grad))));
        if (di > d) d = di;
    }
    printf("causal attention by hand against the built-in one: %.1e apart\n", d);
    bool ok = d == 0 && !qkv_error();
    qkv_scope_end();
    return ok ? 0 : 1;
}
