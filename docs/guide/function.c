/* Ops with a backward of their own (docs/guide.md, step 5): SiLU as one function that saves
 * its input, and a gradient reversal layer whose argument travels in its context. SiLU is
 * checked with qkv_gradcheck and against the same function composed from qkv's ops. */
#include <stdio.h>

#include <qkv.h>

/* d silu(x) = s (1 + x (1 - s)) with s = sigmoid(x), from the saved input alone */
static void silu_backward(qkv_ctx *ctx, const qkv_tensor *grad, qkv_tensor **grads) {
    qkv_tensor *x = qkv_saved(ctx, 0), *s = qkv_sigmoid(x);
    grads[0] = qkv_mul(grad, qkv_mul(s, qkv_add_scalar(qkv_mul(x, qkv_rsub_scalar(1, s)), 1)));
}

static const qkv_function silu_fn = {.name = "silu", .backward = silu_backward};

/* x sigmoid(x), keeping x alone for the backward */
qkv_tensor *silu(const qkv_tensor *x) {
    qkv_ctx *ctx = qkv_function_begin(&silu_fn, 1, &x, NULL);
    qkv_save(ctx, 0, x);
    return qkv_function_end(ctx, qkv_mul(x, qkv_sigmoid(x)));
}

typedef struct reversal_args {
    double lambda;
} reversal_args;

/* the identity forward, -lambda g backward */
static void reversal_backward(qkv_ctx *ctx, const qkv_tensor *grad, qkv_tensor **grads) {
    const reversal_args *args = qkv_ctx_args(ctx);
    grads[0] = qkv_mul_scalar(grad, -args->lambda);
}

static const qkv_function reversal_fn = {.name = "gradient_reversal",
                                         .backward = reversal_backward,
                                         .args_size = sizeof(reversal_args)};

qkv_tensor *gradient_reversal(const qkv_tensor *x, double lambda) {
    qkv_ctx *ctx = qkv_function_begin(&reversal_fn, 1, &x, &(reversal_args){lambda});
    return qkv_function_end(ctx, qkv_detach(x));
}

static qkv_tensor *silu_of(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return silu(in[0]);
}

int main(void) {
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_scope_begin();
    qkv_tensor *x = qkv_requires_grad_(qkv_randn(QKV_F64, QKV_SHAPE(3, 4), &g), true);
    bool silu_ok = qkv_gradcheck(silu_of, &x, 1, NULL, 1e-6, 1e-8, 1e-6);
    printf("gradcheck of silu: %s\n", silu_ok ? "passed" : qkv_error());
    /* d/dx of reversal(x) * x: -0.5 x through the reversed factor, x through the other */
    qkv_backward(qkv_sum_all(qkv_mul(gradient_reversal(x, 0.5), x)));
    double dr = qkv_item(qkv_max_all(qkv_abs(qkv_sub(x->grad, qkv_mul_scalar(x, 0.5)))));
    printf("gradient_reversal: gradient %.1e from 0.5 x\n", dr);
    qkv_zero_grad(x);
    /* The same values and gradient as x * sigmoid(x) composed from qkv's ops. */
    qkv_tensor *ours = silu(x);
    qkv_backward(qkv_sum_all(ours));
    qkv_tensor *g_ours = qkv_clone(x->grad);
    qkv_zero_grad(x);
    qkv_backward(qkv_sum_all(qkv_mul(x, qkv_sigmoid(x))));
    double dv = qkv_item(qkv_max_all(qkv_abs(qkv_sub(ours, qkv_mul(x, qkv_sigmoid(x))))));
    double dg = qkv_item(qkv_max_all(qkv_abs(qkv_sub(g_ours, x->grad))));
    printf("silu against the composed function: values %.1e, gradients %.1e apart\n", dv, dg);
    bool ok = silu_ok && dr == 0 && dv == 0 && dg < 1e-15 && !qkv_error();
    qkv_scope_end();
    return ok ? 0 : 1;
}
