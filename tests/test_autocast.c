/*
 * Autocast: which ops run in which dtype inside a region, nesting, per-thread state, no-grad,
 * the cache of parameters' bf16 copies, and the dtypes of gradients.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fixtures/autocast_fixtures.h"
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
        {"cross_entropy", qkv_cross_entropy(h, qkv_zeros(QKV_I64, QKV_SHAPE(4)),
                                            QKV_REDUCTION_MEAN, -100, 0), QKV_F32},
        {"mse_loss", qkv_mse_loss(h, qkv_zeros(QKV_BF16, QKV_SHAPE(4, 8)), QKV_REDUCTION_MEAN),
         QKV_F32},
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

/* softmax and log_softmax widen a bf16 input inside the kernel: the bits of the same op on an
 * explicit f32 copy, forward and backward (the input's gradient rounded to bf16 once), for
 * rows along the contiguous axis and, through the copy, along another. */
static void softmax_of_bf16_equals_softmax_of_its_f32_copy(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 11);
    qkv_tensor *h0 = qkv_to_dtype(qkv_mul_scalar(qkv_randn(QKV_F32, QKV_SHAPE(6, 37), &g), 3),
                                  QKV_BF16);
    qkv_tensor *w = qkv_randn(QKV_F32, QKV_SHAPE(6, 37), &g);
    for (int c = 0; c < 4; c++) {
        bool log = c & 1;
        int axis = c < 2 ? -1 : 0;
        qkv_tensor *h = qkv_requires_grad_(qkv_clone(h0), true);
        qkv_tensor *f = qkv_requires_grad_(qkv_clone(h0), true);
        qkv_autocast_begin(QKV_BF16);
        qkv_tensor *got = log ? qkv_log_softmax(h, axis) : qkv_softmax(h, axis);
        qkv_autocast_end();
        qkv_tensor *f32 = qkv_to_dtype(f, QKV_F32);
        qkv_tensor *want = log ? qkv_log_softmax(f32, axis) : qkv_softmax(f32, axis);
        assert_non_null(got);
        assert_int_equal(got->dtype, QKV_F32);
        assert_memory_equal(qkv_data(got), qkv_data(want), 6 * 37 * sizeof(float));
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(got, w))));
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(want, w))));
        assert_int_equal(h->grad->dtype, QKV_BF16);
        assert_memory_equal(qkv_data(h->grad), qkv_data(f->grad), 6 * 37 * sizeof(uint16_t));
    }
    /* softmax's rows sum to one */
    qkv_autocast_begin(QKV_BF16);
    qkv_tensor *rows = qkv_sum(qkv_softmax(h0, -1), -1, false);
    qkv_autocast_end();
    for (int64_t i = 0; i < 6; i++) assert_float_equal(qkv_get(rows, &i), 1.0, 1e-6);
}

/* ---- A training step against torch's autocast step --------------------------------------- */

/* The parameter of the attention ("attn.<name>") or the linear head ("head.<name>"). */
static qkv_tensor *model_param(qkv_module *attn, qkv_module *head, const char *name) {
    bool is_attn = !strncmp(name, "attn.", 5);
    qkv_named_list *l = qkv_module_parameters(is_attn ? attn : head);
    assert_non_null(l);
    qkv_tensor *t = NULL;
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->names[i], name + 5)) t = l->tensors[i];
    qkv_named_list_free(l);
    if (!t) fail_msg("no parameter %s", name);
    return t;
}

/* bf16 keeps 8 significant bits: one rounding is off by at most 2^-9 relative, and the step
 * chains about a dozen rounded ops (projections, scores, weighted sum, output projection,
 * head, and their backward products), in another order than torch, which also rounds its
 * softmax to bf16 where qkv keeps it in f32. Each value is held to 2^-9 * 16 = 2^-5 of its
 * tensor's largest magnitude: bf16 error over 16 chained roundings (the worst seen is about
 * 2^-6). That the products did run in bf16 shows in the dtypes and in the distance from
 * torch's float32 gradients, which a float32 step would meet to about 1e-6. */
#define AC_TOL 0x1p-5

/* The largest magnitude in the entry name of table. The key projection's bias adds one
 * q . b_k to a whole row of scores, which softmax ignores: its gradient is zero and both sides
 * hold rounding noise there, held to the scale of the query bias's gradient. */
static double table_scale(const autocast_fixture *table, const char *name) {
    double scale = 0;
    for (const autocast_fixture *e = table; e->name; e++)
        if (!strcmp(e->name, name))
            for (int64_t i = 0; i < e->numel; i++) scale = fmax(scale, fabs(e->data[i]));
    return scale;
}

static void assert_table_close(qkv_module *attn, qkv_module *head,
                               const autocast_fixture *table, bool grads) {
    for (const autocast_fixture *e = table; e->name; e++) {
        qkv_tensor *p = model_param(attn, head, e->name);
        qkv_tensor *t = grads ? p->grad : p;
        assert_non_null(t);
        assert_int_equal(t->dtype, QKV_F32);
        assert_int_equal(t->numel, e->numel);
        float *got = malloc((size_t)e->numel * sizeof *got);
        assert_true(qkv_copy_out(t, QKV_F32, got));
        double scale = table_scale(table, grads && !strcmp(e->name, "attn.k_proj.bias")
                                              ? "attn.q_proj.bias" : e->name);
        double worst = 0;
        for (int64_t i = 0; i < e->numel; i++) worst = fmax(worst, fabs(got[i] - e->data[i]));
        for (int64_t i = 0; i < e->numel; i++)
            if (fabs(got[i] - e->data[i]) > AC_TOL * scale)
                fail_msg("%s%s[%lld]: qkv %.6g, torch %.6g (scale %.3g)", grads ? "d " : "",
                         e->name, (long long)i, got[i], e->data[i], scale);
        free(got);
    }
}

static void attention_step_under_autocast_matches_torch(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_multi_head_attention *attn =
        qkv_multi_head_attention_new(AC_E, AC_H, 0.0, true, 0, 0, &g);
    qkv_linear *head = qkv_linear_new(AC_E, AC_C, true, &g);
    qkv_module *ma = QKV_MODULE(attn), *mh = QKV_MODULE(head);
    for (const autocast_fixture *e = ac_weights; e->name; e++) {
        qkv_tensor *p = model_param(ma, mh, e->name);
        assert_int_equal(p->numel, e->numel);
        assert_true(qkv_copy_(p, qkv_reshape(qkv_from_array(QKV_F64, QKV_SHAPE(e->numel),
                                                            e->data), p->ndim, p->shape)));
    }
    qkv_optimizer *opt = qkv_sgd_new();
    qkv_named_list *pa = qkv_module_parameters(ma), *ph = qkv_module_parameters(mh);
    assert_true(qkv_optimizer_add_group(opt, pa, qkv_sgd_config(AC_LR)));
    assert_true(qkv_optimizer_add_group(opt, ph, qkv_sgd_config(AC_LR)));
    qkv_named_list_free(pa);
    qkv_named_list_free(ph);

    qkv_tensor *x = qkv_to_dtype(qkv_from_array(QKV_F64, QKV_SHAPE(AC_B, AC_T, AC_E), ac_x),
                                 QKV_F32);
    qkv_tensor *targets = qkv_from_array(QKV_I64, QKV_SHAPE(AC_B * AC_T), ac_targets);
    assert_true(qkv_autocast_begin(QKV_BF16));
    qkv_tensor *out = qkv_multi_head_attention_forward(attn, x, x, x, NULL);
    qkv_tensor *logits = qkv_linear_forward(head, out);
    qkv_tensor *loss = qkv_cross_entropy(qkv_reshape(logits, QKV_SHAPE(AC_B * AC_T, AC_C)),
                                         targets, QKV_REDUCTION_MEAN, -100, 0);
    qkv_autocast_end();
    assert_non_null(loss);
    assert_int_equal(out->dtype, QKV_BF16);
    assert_int_equal(logits->dtype, QKV_BF16);
    assert_int_equal(loss->dtype, QKV_F32);
    assert_true(fabs(qkv_item(loss) - AC_LOSS) <= AC_TOL * AC_LOSS);
    assert_true(qkv_backward(loss));
    assert_table_close(ma, mh, ac_grads, true);
    double from_f32 = 0;
    for (const autocast_fixture *e = ac_grads_f32; e->name; e++) {
        qkv_tensor *d = qkv_sub(qkv_to_dtype(model_param(ma, mh, e->name)->grad, QKV_F64),
                                qkv_reshape(qkv_from_array(QKV_F64, QKV_SHAPE(e->numel),
                                                           e->data),
                                            model_param(ma, mh, e->name)->ndim,
                                            model_param(ma, mh, e->name)->shape));
        bool noise = !strcmp(e->name, "attn.k_proj.bias"); /* zero; see table_scale */
        from_f32 = fmax(from_f32, qkv_item(qkv_max_all(qkv_abs(d))) /
                                      table_scale(ac_grads_f32, noise ? "attn.q_proj.bias"
                                                                      : e->name));
    }
    assert_true(from_f32 > 1e-3); /* bf16's rounding, not float32's */
    assert_true(qkv_optimizer_step(opt));
    assert_table_close(ma, mh, ac_updated, false);
    qkv_optimizer_free(opt);
    qkv_module_free(ma);
    qkv_module_free(mh);
    assert_null(qkv_error());
}

/* Gradient checks are F64 and autocast leaves F64 alone: a product and softmax still pass
 * after a region has been open and closed. */
static qkv_tensor *softmax_of_product(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return qkv_softmax(qkv_matmul(in[0], in[1]), -1);
}

static void gradcheck_passes_in_f64_with_autocast_off(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 9);
    qkv_tensor *in[2] = {qkv_requires_grad_(qkv_randn(QKV_F64, QKV_SHAPE(3, 4), &g), true),
                         qkv_requires_grad_(qkv_randn(QKV_F64, QKV_SHAPE(4, 5), &g), true)};
    qkv_autocast_begin(QKV_BF16);
    qkv_autocast_end();
    assert_true(qkv_gradcheck(softmax_of_product, in, 2, NULL, 1e-6, 1e-7, 1e-5));
    assert_null(qkv_error());
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
        T(softmax_of_bf16_equals_softmax_of_its_f32_copy),
        T(attention_step_under_autocast_matches_torch),
        T(gradcheck_passes_in_f64_with_autocast_off),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
