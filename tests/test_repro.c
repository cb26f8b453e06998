/* Reproducibility: the example classifier trained a few AdamW steps with dropout on gives
 * bitwise-identical losses and weights for the same seed, run after run and on one or two
 * threads; another seed gives other numbers. The model is sized so that the GEMMs and the
 * element-wise kernels are large enough to be split across threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "qkv.h"
#include "examples/classify/model.h"

#define STEPS 3
#define BATCH 16
#define SEQ 32

static const classifier_config config = {
    .vocab_size = 50, .n_classes = 4, .max_len = SEQ, .dim = 64, .heads = 4, .layers = 2,
    .ffn = 256, .dropout = 0.1,
};

/* The losses of every step and the bytes of every parameter after the last one. */
typedef struct run_result {
    double losses[STEPS];
    unsigned char *weights;
    size_t weight_bytes;
} run_result;

/* A fixed batch, the same for every seed: random ids, rows of different lengths padded. */
static void make_batch(qkv_tensor **ids, qkv_tensor **pad, qkv_tensor **labels) {
    qkv_generator g;
    qkv_generator_init(&g, 1234);
    *ids = qkv_randint(2, config.vocab_size, QKV_SHAPE(BATCH, SEQ), &g);
    *labels = qkv_randint(0, config.n_classes, QKV_SHAPE(BATCH), &g);
    bool mask[BATCH * SEQ];
    for (int b = 0; b < BATCH; b++)
        for (int t = 0; t < SEQ; t++) mask[b * SEQ + t] = t >= SEQ - 2 * b;
    *pad = qkv_from_array(QKV_BOOL, QKV_SHAPE(BATCH, SEQ), mask);
    assert_non_null(*ids);
    assert_non_null(*pad);
    assert_non_null(*labels);
}

static unsigned char *parameter_bytes(const classifier *m, size_t *size) {
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    assert_non_null(params);
    size_t total = 0;
    for (int i = 0; i < params->n; i++)
        total += (size_t)params->tensors[i]->numel * qkv_dtype_size(params->tensors[i]->dtype);
    unsigned char *bytes = malloc(total), *at = bytes;
    assert_non_null(bytes);
    for (int i = 0; i < params->n; i++) {
        const qkv_tensor *p = params->tensors[i];
        assert_true(qkv_is_contiguous(p));
        size_t n = (size_t)p->numel * qkv_dtype_size(p->dtype);
        memcpy(at, qkv_data(p), n);
        at += n;
    }
    qkv_named_list_free(params);
    *size = total;
    return bytes;
}

static run_result train(uint64_t seed, int threads) {
    int threads_before = qkv_get_num_threads();
    qkv_set_num_threads(threads);
    qkv_generator g;
    qkv_generator_init(&g, seed);
    classifier *m = classifier_new(&config, &g);
    assert_non_null(m);
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    qkv_optimizer *opt = qkv_adamw_new();
    assert_true(qkv_optimizer_add_decay_groups(opt, params, qkv_adamw_config(1e-3)));
    qkv_tensor *ids, *pad, *labels;
    make_batch(&ids, &pad, &labels);
    run_result r = {0};
    for (int s = 0; s < STEPS; s++) {
        qkv_scope_begin();
        qkv_tensor *logits = classifier_forward(m, ids, pad);
        qkv_tensor *loss = qkv_cross_entropy(logits, labels, QKV_REDUCTION_MEAN, -100, 0.0);
        if (!loss || !qkv_backward(loss) || !qkv_optimizer_step(opt)) fail_msg("%s", qkv_error());
        r.losses[s] = qkv_item(loss);
        qkv_optimizer_zero_grad(opt);
        qkv_scope_end();
    }
    r.weights = parameter_bytes(m, &r.weight_bytes);
    qkv_release(ids);
    qkv_release(pad);
    qkv_release(labels);
    qkv_optimizer_free(opt);
    qkv_named_list_free(params);
    qkv_module_free(QKV_MODULE(m));
    qkv_set_num_threads(threads_before);
    return r;
}

static void assert_identical(const run_result *a, const run_result *b) {
    assert_memory_equal(a->losses, b->losses, sizeof a->losses);
    assert_int_equal(a->weight_bytes, b->weight_bytes);
    assert_memory_equal(a->weights, b->weights, a->weight_bytes);
}

static void same_seed_gives_identical_losses_and_weights(void **state) {
    (void)state;
    run_result a = train(7, 1), b = train(7, 1);
    assert_identical(&a, &b);
    free(a.weights);
    free(b.weights);
}

static void one_and_two_threads_give_identical_losses_and_weights(void **state) {
    (void)state;
    run_result one = train(7, 1), two = train(7, 2);
    assert_identical(&one, &two);
    free(one.weights);
    free(two.weights);
}

static void another_seed_gives_other_losses_and_weights(void **state) {
    (void)state;
    run_result a = train(7, 1), b = train(8, 1);
    for (int s = 0; s < STEPS; s++) assert_true(a.losses[s] != b.losses[s]);
    assert_int_equal(a.weight_bytes, b.weight_bytes);
    assert_true(memcmp(a.weights, b.weights, a.weight_bytes) != 0);
    free(a.weights);
    free(b.weights);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(same_seed_gives_identical_losses_and_weights),
        cmocka_unit_test(one_and_two_threads_give_identical_losses_and_weights),
        cmocka_unit_test(another_seed_gives_other_losses_and_weights),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
