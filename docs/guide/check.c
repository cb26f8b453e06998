/* The guide's gradient check (docs/guide.md, step 4): the mlp's analytic gradients against
 * central differences, in F64, for every parameter and the input. */
#include <stdio.h>

#include "mlp.h"

typedef struct check_ctx {
    mlp *model;
    const qkv_tensor *labels;
} check_ctx;

/* inputs: the model's parameters, then the points. The model reads its parameters in place,
 * so gradcheck's perturbations of inputs[i] reach the forward pass. */
static qkv_tensor *loss_of(qkv_tensor *const *inputs, int n, void *ctx) {
    check_ctx *c = ctx;
    qkv_tensor *logits = mlp_forward(c->model, inputs[n - 1]);
    return qkv_cross_entropy(logits, c->labels, QKV_REDUCTION_MEAN, -100, 0.0);
}

int main(void) {
    qkv_generator g;
    qkv_generator_init(&g, 7);
    mlp *model = mlp_new(2, 5, 3, &g);
    if (!model || !qkv_module_to_dtype(QKV_MODULE(model), QKV_F64))
        return fprintf(stderr, "%s\n", qkv_error()), 1;

    qkv_scope_begin();
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(model));
    qkv_tensor *inputs[8];
    if (!params || params->n >= 8) return fprintf(stderr, "no parameter list\n"), 1;
    int n = params->n;
    for (int i = 0; i < n; i++) inputs[i] = params->tensors[i];
    inputs[n++] = qkv_requires_grad_(qkv_randn(QKV_F64, QKV_SHAPE(4, 2), &g), true);
    check_ctx ctx = {model, qkv_randint(0, 3, QKV_SHAPE(4), &g)};
    bool ok = qkv_gradcheck(loss_of, inputs, n, &ctx, 1e-6, 1e-8, 1e-6);
    printf("gradcheck of %d inputs: %s\n", n, ok ? "passed" : qkv_error());
    qkv_named_list_free(params);
    qkv_scope_end();

    qkv_module_free(QKV_MODULE(model));
    return ok ? 0 : 1;
}
