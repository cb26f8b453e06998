/*
 * Autocast: which ops run in which dtype inside a region, nesting, per-thread state, no-grad,
 * the cache of parameters' bf16 copies, and the dtypes of gradients.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "harness.h"

static qkv_tensor *param(int64_t rows, int64_t cols, uint64_t seed) {
    qkv_generator g;
    qkv_generator_init(&g, seed);
    return qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(rows, cols), &g), true);
}

/* The table: products (and what follows them element-wise) in bf16; softmax, log_softmax,
 * layer norm, sum, mean, var and the losses in f32; the parameters stay f32. */
static void ops_run_in_the_dtype_of_their_autocast_list(void **state) {
    (void)state;
    qkv_tensor *x = param(4, 8, 1), *w = param(8, 8, 2), *b = qkv_zeros(QKV_F32, QKV_SHAPE(8));
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_layer_norm *ln = qkv_layer_norm_new(1, (const int64_t[]){8}, 1e-5, true);
    assert_true(qkv_autocast_begin(QKV_BF16));
    qkv_tensor *h = qkv_matmul(x, w);
    struct { const char *op; qkv_tensor *t; qkv_dtype want; } table[] = {
        {"matmul", h, QKV_BF16},
        {"affine", qkv_affine(x, w, b), QKV_BF16},
        {"gelu", qkv_gelu(h, false), QKV_BF16},
        {"add", qkv_add(h, h), QKV_BF16},
        {"dropout", qkv_dropout(h, 0.5, true, &g), QKV_BF16},
        {"add f32", qkv_add(h, x), QKV_F32}, /* promotion, as torch */
        {"softmax", qkv_softmax(h, -1), QKV_F32},
        {"log_softmax", qkv_log_softmax(h, -1), QKV_F32},
        {"layer_norm", qkv_layer_norm_forward(ln, h), QKV_F32},
        {"sum", qkv_sum(h, -1, false), QKV_F32},
        {"sum_all", qkv_sum_all(h), QKV_F32},
        {"mean", qkv_mean(h, 0, false), QKV_F32},
        {"var", qkv_var(h, 0, 1, false), QKV_F32},
        {"max", qkv_max(h, -1, false), QKV_BF16},
        {"cross_entropy", qkv_cross_entropy(h, qkv_zeros(QKV_I64, QKV_SHAPE(4)), QKV_REDUCTION_MEAN, -100,
                                            0), QKV_F32},
        {"mse_loss", qkv_mse_loss(h, qkv_zeros(QKV_BF16, QKV_SHAPE(4, 8)), QKV_REDUCTION_MEAN), QKV_F32},
        {"matmul f64", qkv_matmul(qkv_zeros(QKV_F64, QKV_SHAPE(2, 2)),
                                  qkv_zeros(QKV_F64, QKV_SHAPE(2, 2))), QKV_F64},
    };
    qkv_autocast_end();
    qkv_module_free(QKV_MODULE(ln));
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (!table[i].t) fail_msg("%s: %s", table[i].op, qkv_error());
        if (table[i].t->dtype != table[i].want)
            fail_msg("%s gives %s, not %s", table[i].op, qkv_dtype_name(table[i].t->dtype),
                     qkv_dtype_name(table[i].want));
    }
    assert_int_equal(qkv_matmul(x, w)->dtype, QKV_F32); /* off again */
    assert_int_equal(x->dtype, QKV_F32);
    assert_null(qkv_error());
}

static void regions_nest_and_only_bf16_is_accepted(void **state) {
    (void)state;
    assert_false(qkv_is_autocast_enabled());
    assert_true(qkv_autocast_begin(QKV_BF16));
    assert_true(qkv_autocast_begin(QKV_BF16));
    qkv_autocast_end();
    assert_true(qkv_is_autocast_enabled());
    qkv_autocast_end();
    assert_false(qkv_is_autocast_enabled());
    qkv_autocast_end();
    assert_string_equal(qkv_error(), "qkv_autocast_end: no autocast region is open");
    qkv_clear_error();
    assert_false(qkv_autocast_begin(QKV_F64));
    assert_string_equal(qkv_error(), "qkv_autocast_begin: dtype must be bf16, not f64");
    assert_false(qkv_is_autocast_enabled());
}

static void *enabled_here(void *arg) {
    *(bool *)arg = qkv_is_autocast_enabled();
    return NULL;
}

static void a_second_thread_sees_autocast_off(void **state) {
    (void)state;
    bool seen = true;
    pthread_t t;
    assert_true(qkv_autocast_begin(QKV_BF16));
    assert_int_equal(pthread_create(&t, NULL, enabled_here, &seen), 0);
    pthread_join(t, NULL);
    qkv_autocast_end();
    assert_false(seen);
}

static void under_no_grad_products_are_bf16_and_unrecorded(void **state) {
    (void)state;
    qkv_tensor *x = param(3, 4, 4), *w = param(4, 5, 5);
    qkv_no_grad_begin();
    qkv_autocast_begin(QKV_BF16);
    qkv_tensor *y = qkv_matmul(x, w);
    qkv_autocast_end();
    qkv_no_grad_end();
    assert_int_equal(y->dtype, QKV_BF16);
    assert_false(y->requires_grad);
    assert_null(y->grad_fn);
}

/* A parameter is converted once per region: two uses read one copy; an in-place write makes
 * a new copy with the new values. */
static void a_parameters_copy_is_cached_until_it_is_written(void **state) {
    (void)state;
    qkv_tensor *x = qkv_ones(QKV_F32, QKV_SHAPE(1, 2)), *w = param(2, 2, 6);
    qkv_autocast_begin(QKV_BF16);
    qkv_tensor *a = qkv_matmul(x, w), *b = qkv_matmul(x, w);
    uint64_t before = qkv_memory_stats_get().allocs;
    qkv_tensor *c = qkv_matmul(x, w);
    uint64_t per_use = qkv_memory_stats_get().allocs - before;
    qkv_no_grad_begin();
    qkv_fill_(w, 0.5);
    qkv_no_grad_end();
    qkv_tensor *d = qkv_matmul(x, w);
    qkv_autocast_end();
    assert_true(qkv_get(a, (int64_t[]){0, 0}) == qkv_get(b, (int64_t[]){0, 0}));
    assert_true(qkv_get(a, (int64_t[]){0, 1}) == qkv_get(c, (int64_t[]){0, 1}));
    assert_true(qkv_get(d, (int64_t[]){0, 0}) == 1.0); /* 0.5 + 0.5: the new values */
    /* a cached use makes x's copy, the parameter's view and the product, nothing of w's size
     * more: count the allocations of a use against a fresh region's first use */
    qkv_autocast_begin(QKV_BF16);
    before = qkv_memory_stats_get().allocs;
    qkv_matmul(x, w);
    uint64_t first_use = qkv_memory_stats_get().allocs - before;
    qkv_autocast_end();
    assert_true(per_use < first_use);
}

/* Parameters keep f32 gradients; the product's gradient flows back through the cast. For
 * y = sum(x W) with x of ones, dW[i][j] = 1 exactly in any precision. */
static void parameters_get_f32_gradients_through_the_cast(void **state) {
    (void)state;
    qkv_tensor *x = qkv_ones(QKV_F32, QKV_SHAPE(3, 4)), *w = param(4, 2, 7);
    qkv_autocast_begin(QKV_BF16);
    qkv_tensor *loss = qkv_sum_all(qkv_matmul(x, w));
    qkv_autocast_end();
    assert_int_equal(loss->dtype, QKV_F32);
    assert_true(qkv_backward(loss));
    assert_int_equal(w->grad->dtype, QKV_F32);
    for (int64_t i = 0; i < 4; i++)
        for (int64_t j = 0; j < 2; j++) assert_true(qkv_get(w->grad, (int64_t[]){i, j}) == 3.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(ops_run_in_the_dtype_of_their_autocast_list),
        T(regions_nest_and_only_bf16_is_accepted),
        T(a_second_thread_sees_autocast_off),
        T(under_no_grad_products_are_bf16_and_unrecorded),
        T(a_parameters_copy_is_cached_until_it_is_written),
        T(parameters_get_f32_gradients_through_the_cast),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
