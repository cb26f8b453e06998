/* The guide's training program (docs/guide.md, step 3): trains the mlp on the quadrant data
 * and fails unless no tensor leaks and it classifies 90% of new points correctly; then saves it
 * and checks that a loaded copy predicts the same (step 5). */
#include <stdio.h>

#include "mlp.h"

/* n points of [-1, 1)^2 into *x [n,2], and into *labels [n] (I64) 1 where x * y > 0. */
static void quadrant_batch(int64_t n, qkv_generator *g, qkv_tensor **x, qkv_tensor **labels) {
    *x = qkv_sub_scalar(qkv_mul_scalar(qkv_rand(QKV_F32, QKV_SHAPE(n, 2), g), 2), 1);
    qkv_tensor *product = qkv_mul(qkv_select(*x, 1, 0), qkv_select(*x, 1, 1));
    *labels = qkv_to_dtype(qkv_gt_scalar(product, 0), QKV_I64);
}

static double accuracy(mlp *m, qkv_generator *g) {
    qkv_module_train(QKV_MODULE(m), false);
    qkv_no_grad_begin();
    qkv_scope_begin();
    qkv_tensor *x, *labels;
    quadrant_batch(1000, g, &x, &labels);
    qkv_tensor *predicted = qkv_argmax(mlp_forward(m, x), 1, false);
    double right = qkv_item(qkv_sum_all(qkv_eq(predicted, labels)));
    qkv_scope_end();
    qkv_no_grad_end();
    qkv_module_train(QKV_MODULE(m), true);
    return right / 1000;
}

int main(void) {
    qkv_generator g;
    qkv_generator_init(&g, 42);
    mlp *model = mlp_new(2, 16, 2, &g);
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(model));
    qkv_optimizer *opt = qkv_adam_new();
    if (!model || !params || !opt ||
        !qkv_optimizer_add_group(opt, params, qkv_adam_config(0.03)))
        return fprintf(stderr, "%s\n", qkv_error()), 1;

    uint64_t live_after_first_step = 0;
    for (int step = 1; step <= 300; step++) {
        qkv_scope_begin();
        qkv_tensor *x, *labels;
        quadrant_batch(64, &g, &x, &labels);
        qkv_tensor *loss = qkv_cross_entropy(mlp_forward(model, x), labels,
                                             QKV_REDUCTION_MEAN, -100, 0.0);
        bool ok = qkv_backward(loss) && qkv_optimizer_step(opt);
        qkv_optimizer_zero_grad(opt);
        if (ok && step % 100 == 0) printf("step %d: loss %.4f\n", step, qkv_item(loss));
        qkv_scope_end(); /* frees the batch, the graph and every intermediate tensor */
        if (!ok) return fprintf(stderr, "step %d: %s\n", step, qkv_error()), 1;
        if (step == 1) live_after_first_step = qkv_memory_stats_get().live_tensors;
    }
    if (qkv_memory_stats_get().live_tensors != live_after_first_step)
        return fprintf(stderr, "tensors leaked during training\n"), 1;

    qkv_generator eval_points;
    qkv_generator_init(&eval_points, 7);
    double acc = accuracy(model, &eval_points);
    printf("accuracy on new points: %.3f\n", acc);

    /* The weights, the optimizer's moments and a note of our own, in one file. */
    qkv_meta_pair note[] = {{"task", "quadrants"}};
    qkv_checkpoint_contents extras = {.n_meta = 1, .meta = note};
    if (!qkv_checkpoint_save(QKV_MODULE(model), opt, "guide-mlp.safetensors", &extras))
        return fprintf(stderr, "%s\n", qkv_error()), 1;

    /* A fresh model of the same shape takes the saved weights and predicts the same. */
    mlp *copy = mlp_new(2, 16, 2, &g);
    if (!copy || !qkv_module_load(QKV_MODULE(copy), "guide-mlp.safetensors", NULL))
        return fprintf(stderr, "%s\n", qkv_error()), 1;
    qkv_generator_init(&eval_points, 7);
    double copy_acc = accuracy(copy, &eval_points);
    printf("accuracy of the loaded copy: %.3f\n", copy_acc);
    qkv_module_free(QKV_MODULE(copy));
    remove("guide-mlp.safetensors");
    if (copy_acc != acc) return fprintf(stderr, "the loaded copy predicts differently\n"), 1;

    qkv_optimizer_free(opt);
    qkv_named_list_free(params);
    qkv_module_free(QKV_MODULE(model));
    return acc >= 0.9 ? 0 : 1;
}
