/* The nn layer: the module base (names, modes, dtype, freeing), init schemes, layers,
 * multi-head attention and transformer encoder layers against torch.nn on the same weights
 * (outputs and every parameter gradient), losses against torch.nn.functional, and gradient
 * checks of whole blocks in F64. Every test runs in its own scope and must leave no tensor
 * alive behind it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"
#include "examples/classify/model.h"

#include "fixtures/nn_fixtures.h"
#include "harness.h"
#include "nn_harness.h"

/* ---- The module base ------------------------------------------------------------------- */

static qkv_sequential *small_mlp(qkv_generator *g) {
    qkv_sequential *s = qkv_sequential_new();
    assert_non_null(qkv_sequential_add(s, QKV_MODULE(qkv_linear_new(3, 4, true, g))));
    assert_non_null(qkv_sequential_add(s, QKV_MODULE(qkv_activation_new(QKV_ACT_TANH))));
    assert_non_null(qkv_sequential_add(s, QKV_MODULE(qkv_dropout_layer_new(0.5, g))));
    assert_non_null(qkv_sequential_add(s, QKV_MODULE(qkv_linear_new(4, 2, false, g))));
    return s;
}

static void parameters_are_listed_depth_first_with_dotted_names(void **state) {
    (void)state;
    qkv_generator g = gen(1);
    qkv_sequential *s = small_mlp(&g);
    qkv_named_list *l = qkv_module_parameters(QKV_MODULE(s));
    assert_int_equal(l->n, 3);
    assert_string_equal(l->names[0], "0.weight");
    assert_string_equal(l->names[1], "0.bias");
    assert_string_equal(l->names[2], "3.weight");
    assert_ptr_equal(l->tensors[2], ((qkv_linear *)s->base.modules[3].module)->weight);
    qkv_named_list_free(l);
    assert_int_equal(qkv_module_num_parameters(QKV_MODULE(s)), 3 * 4 + 4 + 4 * 2);
    qkv_module_free(QKV_MODULE(s));
}

static void state_lists_buffers_after_each_modules_parameters(void **state) {
    (void)state;
    qkv_generator g = gen(2);
    qkv_module *m = qkv_module_new("model", sizeof(qkv_module), NULL);
    qkv_module_add_module(m, "pos", QKV_MODULE(qkv_sinusoidal_positional_encoding_new(4, 2)));
    qkv_module_add_module(m, "proj", QKV_MODULE(qkv_linear_new(2, 2, true, &g)));
    qkv_module_add_buffer(m, "step", qkv_zeros(QKV_I64, 0, NULL));
    qkv_named_list *l = qkv_module_state(m);
    assert_int_equal(l->n, 4);
    assert_string_equal(l->names[0], "step");
    assert_string_equal(l->names[1], "pos.pe");
    assert_string_equal(l->names[2], "proj.weight");
    assert_string_equal(l->names[3], "proj.bias");
    qkv_named_list_free(l);
    l = qkv_module_parameters(m);
    assert_int_equal(l->n, 2);
    qkv_named_list_free(l);
    qkv_module_free(m);
}

static void shared_parameter_is_listed_once(void **state) {
    (void)state;
    qkv_module *m = qkv_module_new("tied", sizeof(qkv_module), NULL);
    qkv_module *a = qkv_module_add_module(m, "a", qkv_module_new("a", sizeof(qkv_module), NULL));
    qkv_tensor *w = qkv_ones(QKV_F32, S(2, 2));
    assert_ptr_equal(qkv_module_add_parameter(m, "w", w), w);
    assert_ptr_equal(qkv_module_add_parameter(a, "w", w), w);
    qkv_named_list *l = qkv_module_parameters(m);
    assert_int_equal(l->n, 1);
    qkv_named_list_free(l);
    l = qkv_module_state(m);
    assert_int_equal(l->n, 2);
    assert_string_equal(l->names[1], "a.w");
    qkv_named_list_free(l);
    assert_int_equal(qkv_module_num_parameters(m), 4);
    qkv_module_free(m);
}

static void registration_rejects_duplicate_and_dotted_names(void **state) {
    (void)state;
    qkv_module *m = qkv_module_new("m", sizeof(qkv_module), NULL);
    assert_non_null(qkv_module_add_parameter(m, "w", qkv_ones(QKV_F32, S(2))));
    assert_null(qkv_module_add_buffer(m, "w", qkv_ones(QKV_F32, S(2))));
    assert_string_equal(qkv_error(), "qkv_module_add_buffer: m already has a member named \"w\"");
    qkv_clear_error();
    assert_null(qkv_module_add_parameter(m, "a.b", qkv_ones(QKV_F32, S(2))));
    assert_string_equal(qkv_error(), "qkv_module_add_parameter: bad name \"a.b\" (non-empty, "
                                     "no '.')");
    qkv_clear_error();
    /* a child that cannot be registered is freed, not leaked */
    assert_null(qkv_module_add_module(m, "w", QKV_MODULE(qkv_activation_new(QKV_ACT_RELU))));
    assert_null(qkv_module_add_parameter(m, "i", qkv_zeros(QKV_I64, S(2))));
    qkv_module_free(m);
}

static void a_parameter_is_a_leaf_that_requires_grad(void **state) {
    (void)state;
    qkv_module *m = qkv_module_new("m", sizeof(qkv_module), NULL);
    qkv_tensor *x = qkv_requires_grad_(qkv_ones(QKV_F32, S(2)), true);
    assert_null(qkv_module_add_parameter(m, "y", qkv_mul_scalar(x, 2)));
    assert_non_null(qkv_error());
    qkv_tensor *w = qkv_module_add_parameter(m, "w", qkv_ones(QKV_F32, S(2)));
    assert_true(w->requires_grad);
    assert_null(w->grad_fn);
    qkv_module_free(m);
}

static void module_free_releases_every_tensor(void **state) {
    (void)state;
    uint64_t live = qkv_memory_stats_get().live_tensors;
    size_t bytes = qkv_memory_stats_get().bytes_in_use;
    qkv_generator g = gen(3);
    qkv_scope_begin();
    qkv_transformer_encoder *enc = qkv_transformer_encoder_new(
        &(qkv_transformer_config){.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                  .dropout = 0.1, .activation = QKV_ACT_GELU},
        2, true, &g);
    assert_non_null(enc);
    qkv_scope_end();
    assert_true(qkv_memory_stats_get().live_tensors > live);
    qkv_module_free(QKV_MODULE(enc));
    assert_int_equal(qkv_memory_stats_get().live_tensors, live);
    assert_int_equal(qkv_memory_stats_get().bytes_in_use, bytes);
}

static void train_and_eval_reach_every_submodule(void **state) {
    (void)state;
    qkv_generator g = gen(4);
    qkv_transformer_encoder *enc = qkv_transformer_encoder_new(
        &(qkv_transformer_config){.d_model = 4, .nhead = 2, .dim_feedforward = 8,
                                  .activation = QKV_ACT_RELU},
        2, false, &g);
    assert_true(enc->layers[1]->dropout2->base.training);
    qkv_module_train(QKV_MODULE(enc), false);
    assert_false(enc->base.training);
    assert_false(enc->layers[0]->self_attn->base.training);
    assert_false(enc->layers[1]->dropout2->base.training);
    assert_false(enc->layers[1]->self_attn->out_proj->base.training);
    qkv_module_train(QKV_MODULE(enc), true);
    assert_true(enc->layers[1]->dropout->base.training);
    qkv_module_free(QKV_MODULE(enc));
}

static void to_dtype_converts_parameters_in_place(void **state) {
    (void)state;
    qkv_generator g = gen(5);
    qkv_linear *lin = qkv_linear_new(3, 2, true, &g);
    qkv_tensor *w = lin->weight;
    float before[6];
    assert_true(qkv_copy_out(w, QKV_F32, before));
    qkv_backward(qkv_sum_all(qkv_linear_forward(lin, qkv_ones(QKV_F32, S(1, 3)))));
    assert_non_null(w->grad);
    assert_true(qkv_module_to_dtype(QKV_MODULE(lin), QKV_F64));
    assert_ptr_equal(lin->weight, w);
    assert_int_equal(w->dtype, QKV_F64);
    assert_int_equal(lin->bias->dtype, QKV_F64);
    assert_null(w->grad);
    assert_true(w->requires_grad);
    for (int i = 0; i < 6; i++) assert_true(((double *)qkv_data(w))[i] == (double)before[i]);
    qkv_tensor *y = qkv_linear_forward(lin, qkv_ones(QKV_F64, S(1, 3)));
    assert_int_equal(y->dtype, QKV_F64);
    assert_false(qkv_module_to_dtype(QKV_MODULE(lin), QKV_I64));
    assert_string_equal(qkv_error(), "qkv_module_to_dtype: i64 is not a floating dtype");
    qkv_module_free(QKV_MODULE(lin));
}

static void zero_grad_drops_every_gradient(void **state) {
    (void)state;
    qkv_generator g = gen(6);
    qkv_sequential *s = small_mlp(&g);
    qkv_backward(qkv_sum_all(qkv_sequential_forward(s, qkv_ones(QKV_F32, S(2, 3)))));
    qkv_tensor *w0 = find_param(s, "0.weight"), *w3 = find_param(s, "3.weight");
    assert_non_null(w0->grad);
    assert_non_null(w3->grad);
    qkv_module_zero_grad(QKV_MODULE(s));
    assert_null(w0->grad);
    assert_null(w3->grad);
    qkv_module_free(QKV_MODULE(s));
}

/* ---- Init -------------------------------------------------------------------------------- */

static void range_of(const qkv_tensor *t, double *lo, double *hi, double *mean, double *sd) {
    double *v = malloc((size_t)t->numel * sizeof *v);
    assert_true(qkv_copy_out(t, QKV_F64, v));
    double s = 0, s2 = 0;
    *lo = INFINITY, *hi = -INFINITY;
    for (int64_t i = 0; i < t->numel; i++) {
        *lo = fmin(*lo, v[i]), *hi = fmax(*hi, v[i]);
        s += v[i], s2 += v[i] * v[i];
    }
    *mean = s / (double)t->numel;
    *sd = sqrt(s2 / (double)t->numel - *mean * *mean);
    free(v);
}

static void uniform_and_normal_fill_with_the_given_parameters(void **state) {
    (void)state;
    qkv_generator g = gen(7);
    qkv_tensor *t = qkv_empty(QKV_F32, S(100, 100));
    double lo, hi, mean, sd;
    assert_true(qkv_init_uniform_(t, -2, 3, &g));
    range_of(t, &lo, &hi, &mean, &sd);
    assert_true(lo >= -2 && lo < -1.99 && hi < 3 && hi > 2.99);
    assert_true(fabs(mean - 0.5) < 0.05);
    assert_true(qkv_init_normal_(t, 1, 0.5, &g));
    range_of(t, &lo, &hi, &mean, &sd);
    assert_true(fabs(mean - 1) < 0.01 && fabs(sd - 0.5) < 0.01);
}

static void xavier_and_kaiming_use_pytorch_fans_and_gains(void **state) {
    (void)state;
    qkv_generator g = gen(8);
    qkv_tensor *t = qkv_empty(QKV_F64, S(200, 50, 2)); /* fan_in 100, fan_out 400 */
    double lo, hi, mean, sd;
    assert_true(qkv_init_xavier_uniform_(t, 2.0, &g));
    range_of(t, &lo, &hi, &mean, &sd);
    double b = 2.0 * sqrt(6.0 / 500.0);
    assert_true(lo >= -b && hi < b && lo < -0.99 * b && hi > 0.99 * b);
    assert_true(qkv_init_xavier_normal_(t, 1.0, &g));
    range_of(t, &lo, &hi, &mean, &sd);
    assert_true(fabs(sd - sqrt(2.0 / 500.0)) < 0.002);
    assert_true(qkv_init_kaiming_uniform_(t, 0, QKV_FAN_OUT, QKV_NONLINEARITY_RELU, &g));
    range_of(t, &lo, &hi, &mean, &sd);
    b = sqrt(3.0) * sqrt(2.0) / sqrt(400.0);
    assert_true(lo >= -b && hi < b && hi > 0.99 * b);
    assert_true(qkv_init_kaiming_normal_(t, 0, QKV_FAN_IN, QKV_NONLINEARITY_TANH, &g));
    range_of(t, &lo, &hi, &mean, &sd);
    assert_true(fabs(sd - 5.0 / 3.0 / 10.0) < 0.003);
    assert_true(fabs(qkv_init_calculate_gain(QKV_NONLINEARITY_LEAKY_RELU, sqrt(5.0)) -
                     sqrt(1.0 / 3.0)) < 1e-15);
}

static void fan_based_init_needs_two_dims(void **state) {
    (void)state;
    qkv_generator g = gen(9);
    assert_false(qkv_init_xavier_uniform_(qkv_empty(QKV_F32, S(5)), 1, &g));
    assert_string_equal(qkv_error(), "qkv_init_xavier_uniform_: fans need 2 or more dims, "
                                     "not [5]");
}

static void same_seed_gives_the_same_model(void **state) {
    (void)state;
    qkv_generator g1 = gen(10), g2 = gen(10);
    qkv_multi_head_attention *a = qkv_multi_head_attention_new(8, 2, 0.1, true, 0, 0, &g1);
    qkv_multi_head_attention *b = qkv_multi_head_attention_new(8, 2, 0.1, true, 0, 0, &g2);
    qkv_named_list *la = qkv_module_parameters(QKV_MODULE(a));
    qkv_named_list *lb = qkv_module_parameters(QKV_MODULE(b));
    for (int i = 0; i < la->n; i++)
        assert_memory_equal(qkv_data(la->tensors[i]), qkv_data(lb->tensors[i]),
                            (size_t)la->tensors[i]->numel * sizeof(float));
    qkv_named_list_free(la);
    qkv_named_list_free(lb);
    qkv_module_free(QKV_MODULE(a));
    qkv_module_free(QKV_MODULE(b));
}

/* ---- Layers ------------------------------------------------------------------------------ */

static void linear_matches_torch_with_leading_dims(void **state) {
    (void)state;
    qkv_generator g = gen(11);
    qkv_linear *lin = qkv_linear_new(4, 3, true, &g);
    assert_param_names(lin, linear_params);
    load_params(lin, linear_params);
    qkv_tensor *x = fx_leaf(&linear_x);
    qkv_tensor *y = qkv_linear_forward(lin, x);
    assert_fixture(y, &linear_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(y, &linear_w)));
    assert_fixture(x->grad, &linear_dx, RTOL, ATOL, "dx");
    assert_grads(lin, linear_grads);
    qkv_module_free(QKV_MODULE(lin));
}

static void linear_default_init_is_within_one_over_sqrt_in(void **state) {
    (void)state;
    qkv_generator g = gen(12);
    qkv_linear *lin = qkv_linear_new(16, 300, true, &g);
    double lo, hi, mean, sd;
    range_of(lin->weight, &lo, &hi, &mean, &sd);
    assert_true(lo >= -0.25 && hi < 0.25 && lo < -0.249 && hi > 0.249);
    range_of(lin->bias, &lo, &hi, &mean, &sd);
    assert_true(lo >= -0.25 && hi < 0.25 && lo < -0.24 && hi > 0.24);
    qkv_linear *nob = qkv_linear_new(16, 3, false, &g);
    assert_null(nob->bias);
    assert_int_equal(qkv_module_num_parameters(QKV_MODULE(nob)), 48);
    qkv_module_free(QKV_MODULE(lin));
    qkv_module_free(QKV_MODULE(nob));
}

static void linear_names_the_bad_input_shape(void **state) {
    (void)state;
    qkv_generator g = gen(13);
    qkv_linear *lin = qkv_linear_new(4, 3, true, &g);
    assert_null(qkv_linear_forward(lin, qkv_ones(QKV_F32, S(2, 5))));
    assert_string_equal(qkv_error(), "qkv_linear_forward: input [2,5], expected last dim 4");
    qkv_clear_error();
    assert_null(qkv_linear_forward(lin, NULL));
    assert_string_equal(qkv_error(), "qkv_linear_forward: tensor argument 1 is NULL");
    qkv_clear_error();
    assert_null(qkv_linear_new(0, 3, true, &g));
    assert_string_equal(qkv_error(), "qkv_linear_new: bad sizes in 0, out 3");
    qkv_module_free(QKV_MODULE(lin));
}

static void embedding_matches_torch_and_padding_row_gets_no_gradient(void **state) {
    (void)state;
    qkv_generator g = gen(14);
    qkv_embedding *emb = qkv_embedding_new(6, 3, 1, &g);
    load_params(emb, embedding_params);
    qkv_tensor *y = qkv_embedding_forward(emb, fx(&embedding_ids, QKV_I64));
    assert_fixture(y, &embedding_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(y, &embedding_w)));
    assert_grads(emb, embedding_grads);
    assert_values(qkv_select(emb->weight->grad, 0, 1), 3, (const double[]){0, 0, 0}, 0);
    qkv_module_free(QKV_MODULE(emb));
}

static void embedding_padding_row_starts_at_zero(void **state) {
    (void)state;
    qkv_generator g = gen(15);
    qkv_embedding *emb = qkv_embedding_new(5, 4, 3, &g);
    assert_values(qkv_select(emb->weight, 0, 3), 4, (const double[]){0, 0, 0, 0}, 0);
    double lo, hi, mean, sd;
    range_of(qkv_select(emb->weight, 0, 0), &lo, &hi, &mean, &sd);
    assert_true(sd > 0);
    assert_null(qkv_embedding_new(5, 4, 5, &g));
    assert_string_equal(qkv_error(), "qkv_embedding_new: padding_idx 5 out of range for 5 rows");
    qkv_module_free(QKV_MODULE(emb));
}

static void embedding_names_an_id_out_of_range_and_ids_that_are_not_i64(void **state) {
    (void)state;
    qkv_generator g = gen(16);
    qkv_embedding *emb = qkv_embedding_new(5, 4, -1, &g);
    assert_null(qkv_embedding_forward(emb, qkv_from_array(QKV_I64, S(2),
                                                          (const int64_t[]){1, 7})));
    assert_string_equal(qkv_error(), "qkv_index_select: index 7 out of range for axis 0 of "
                                     "size 5 (input [5,4], index [2])");
    qkv_clear_error();
    assert_null(qkv_embedding_forward(emb, qkv_ones(QKV_F32, S(2))));
    assert_string_equal(qkv_error(), "qkv_embedding_forward: ids must be i64, not f32");
    qkv_module_free(QKV_MODULE(emb));
}

static void dropout_layer_drops_in_training_only(void **state) {
    (void)state;
    qkv_generator g = gen(16);
    qkv_dropout_layer *d = qkv_dropout_layer_new(0.5, &g);
    qkv_tensor *x = qkv_ones(QKV_F32, S(1000));
    double lo, hi, mean, sd;
    range_of(qkv_dropout_layer_forward(d, x), &lo, &hi, &mean, &sd);
    assert_true(lo == 0 && hi == 2 && fabs(mean - 1) < 0.1);
    qkv_module_train(QKV_MODULE(d), false);
    range_of(qkv_dropout_layer_forward(d, x), &lo, &hi, &mean, &sd);
    assert_true(lo == 1 && hi == 1);
    qkv_module_free(QKV_MODULE(d));
}

static void layer_norm_matches_torch_over_two_dims(void **state) {
    (void)state;
    qkv_layer_norm *ln = qkv_layer_norm_new(2, (const int64_t[]){3, 5}, 1e-5, true);
    assert_param_names(ln, layer_norm_params);
    load_params(ln, layer_norm_params);
    qkv_tensor *x = fx_leaf(&layer_norm_x);
    qkv_tensor *y = qkv_layer_norm_forward(ln, x);
    assert_fixture(y, &layer_norm_out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(y, &layer_norm_w)));
    assert_fixture(x->grad, &layer_norm_dx, RTOL, ATOL, "dx");
    assert_grads(ln, layer_norm_grads);
    qkv_module_free(QKV_MODULE(ln));
}

static void layer_norm_without_affine_has_no_parameters(void **state) {
    (void)state;
    qkv_layer_norm *ln = qkv_layer_norm_new(1, (const int64_t[]){4}, 0.0, false);
    assert_int_equal(qkv_module_num_parameters(QKV_MODULE(ln)), 0);
    qkv_tensor *y = qkv_layer_norm_forward(ln, qkv_from_array(QKV_F32, S(1, 4),
                                                              (const float[]){1, 2, 3, 4}));
    double s = 1 / sqrt(1.25);
    assert_values(y, 4, (const double[]){-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s}, 1e-6);
    assert_null(qkv_layer_norm_forward(ln, qkv_ones(QKV_F32, S(4, 3))));
    assert_string_equal(qkv_error(), "qkv_layer_norm_forward: input [4,3] does not end with "
                                     "the normalized shape (1 dims, last 4)");
    qkv_module_free(QKV_MODULE(ln));
}

static void activation_modules_apply_their_function(void **state) {
    (void)state;
    qkv_tensor *x = qkv_from_array(QKV_F32, S(3), (const float[]){-1, 0, 2});
    const struct { qkv_activation_kind kind; const char *type; double y[3]; } cases[] = {
        {QKV_ACT_RELU, "relu", {0, 0, 2}},
        {QKV_ACT_GELU, "gelu", {-0.158655253931457, 0, 1.95449973610364}},
        {QKV_ACT_GELU_TANH, "gelu_tanh", {-0.158808009, 0, 1.954597694}},
        {QKV_ACT_TANH, "tanh", {-0.761594155955765, 0, 0.964027580075817}},
        {QKV_ACT_SIGMOID, "sigmoid", {0.268941421369995, 0.5, 0.880797077977882}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        qkv_activation *a = qkv_activation_new(cases[i].kind);
        assert_string_equal(a->base.type, cases[i].type);
        assert_values(qkv_activation_forward(a, x), 3, cases[i].y, 1e-6);
        qkv_module_free(QKV_MODULE(a));
    }
}

/* A user's own module in a sequential chain: y = 2x. */
static qkv_tensor *doubling_forward(qkv_module *m, const qkv_tensor *x) {
    (void)m;
    return qkv_mul_scalar(x, 2);
}

static qkv_module *doubling_new(void) {
    qkv_module *m = qkv_module_new("doubling", sizeof(qkv_module), NULL);
    if (m) m->forward = doubling_forward;
    return m;
}

static void sequential_chains_builtin_and_user_modules(void **state) {
    (void)state;
    qkv_generator g = gen(17);
    qkv_sequential *s = qkv_sequential_new();
    qkv_linear *lin = qkv_sequential_add(s, QKV_MODULE(qkv_linear_new(2, 2, true, &g)));
    qkv_sequential_add(s, QKV_MODULE(qkv_activation_new(QKV_ACT_RELU)));
    qkv_sequential_add(s, doubling_new());
    assert_true(qkv_fill_(lin->weight, 0) && qkv_fill_(lin->bias, 0));
    qkv_fill_(qkv_select(lin->bias, 0, 0), 1.5);
    qkv_fill_(qkv_select(lin->bias, 0, 1), -1);
    qkv_tensor *y = qkv_sequential_forward(s, qkv_ones(QKV_F32, S(1, 2)));
    assert_values(y, 2, (const double[]){3, 0}, 0);
    assert_null(qkv_sequential_add(s, qkv_module_new("mine", sizeof(qkv_module), NULL)));
    assert_string_equal(qkv_error(), "qkv_sequential_add: a mine module has no one-input "
                                     "forward");
    assert_int_equal(s->n, 3);
    qkv_module_free(QKV_MODULE(s));
}

/* ---- Multi-head attention ---------------------------------------------------------------- */

typedef struct mha_case {
    int64_t E, H, kdim, vdim;
    const nn_fixture *query, *key, *value, *key_padding_mask, *attn_mask;
    bool float_mask; /* a 2-D attn_mask is BOOL unless this is set; 3-D and 4-D are float */
    bool per_head;
    const nn_fixture *out, *weights, *w, *w_weights, *dquery, *dkey, *dvalue;
    const nn_named_fixture *params, *grads;
} mha_case;

static void check_mha(const mha_case *c) {
    qkv_generator g = gen(20);
    qkv_multi_head_attention *m =
        qkv_multi_head_attention_new(c->E, c->H, 0.0, true, c->kdim, c->vdim, &g);
    assert_param_names(m, c->params);
    load_params(m, c->params);
    qkv_tensor *q = fx_leaf(c->query);
    qkv_tensor *k = c->key ? fx_leaf(c->key) : q, *v = c->value ? fx_leaf(c->value) : q;
    qkv_tensor *weights = NULL;
    qkv_attention_options o = {
        .key_padding_mask = c->key_padding_mask ? fx(c->key_padding_mask, QKV_BOOL) : NULL,
        .weights = &weights,
        .per_head_weights = c->per_head,
    };
    if (c->attn_mask)
        o.attn_mask = fx(c->attn_mask,
                         c->attn_mask->ndim == 2 && !c->float_mask ? QKV_BOOL : QKV_F32);
    qkv_tensor *out = qkv_multi_head_attention_forward(m, q, k, v, &o);
    assert_fixture(out, c->out, RTOL, ATOL, "out");
    assert_fixture(weights, c->weights, RTOL, ATOL, "weights");
    assert_true(qkv_backward(qkv_add(weighted(out, c->w), weighted(weights, c->w_weights))));
    assert_fixture(q->grad, c->dquery, RTOL, ATOL, "dquery");
    if (c->dkey) assert_fixture(k->grad, c->dkey, RTOL, ATOL, "dkey");
    if (c->dvalue) assert_fixture(v->grad, c->dvalue, RTOL, ATOL, "dvalue");
    assert_grads(m, c->grads);
    qkv_module_free(QKV_MODULE(m));
}

static void attention_self_with_key_padding_mask_matches_torch(void **state) {
    (void)state;
    check_mha(&(mha_case){
        .E = 8, .H = 2, .query = &mha_self_padding_query,
        .key_padding_mask = &mha_self_padding_key_padding_mask, .out = &mha_self_padding_out,
        .weights = &mha_self_padding_weights, .w = &mha_self_padding_w,
        .w_weights = &mha_self_padding_w_weights, .dquery = &mha_self_padding_dquery,
        .params = mha_self_padding_params, .grads = mha_self_padding_grads});
}

static void attention_causal_mask_per_head_weights_match_torch(void **state) {
    (void)state;
    check_mha(&(mha_case){
        .E = 8, .H = 4, .query = &mha_causal_query, .attn_mask = &mha_causal_attn_mask,
        .per_head = true, .out = &mha_causal_out, .weights = &mha_causal_weights,
        .w = &mha_causal_w, .w_weights = &mha_causal_w_weights, .dquery = &mha_causal_dquery,
        .params = mha_causal_params, .grads = mha_causal_grads});
}

static void attention_cross_with_kdim_vdim_matches_torch(void **state) {
    (void)state;
    check_mha(&(mha_case){
        .E = 8, .H = 2, .kdim = 5, .vdim = 6, .query = &mha_cross_query, .key = &mha_cross_key,
        .value = &mha_cross_value, .out = &mha_cross_out, .weights = &mha_cross_weights,
        .w = &mha_cross_w, .w_weights = &mha_cross_w_weights, .dquery = &mha_cross_dquery,
        .dkey = &mha_cross_dkey, .dvalue = &mha_cross_dvalue, .params = mha_cross_params,
        .grads = mha_cross_grads});
}

static void attention_float_mask_per_batch_and_head_matches_torch(void **state) {
    (void)state;
    check_mha(&(mha_case){
        .E = 6, .H = 2, .query = &mha_float_mask_query, .key = &mha_float_mask_key,
        .value = &mha_float_mask_value, .key_padding_mask = &mha_float_mask_key_padding_mask,
        .attn_mask = &mha_float_mask_attn_mask, .per_head = true, .out = &mha_float_mask_out,
        .weights = &mha_float_mask_weights, .w = &mha_float_mask_w,
        .w_weights = &mha_float_mask_w_weights, .dquery = &mha_float_mask_dquery,
        .dkey = &mha_float_mask_dkey, .dvalue = &mha_float_mask_dvalue,
        .params = mha_float_mask_params, .grads = mha_float_mask_grads});
}

static void attention_additive_2d_mask_matches_torch(void **state) {
    (void)state;
    check_mha(&(mha_case){
        .E = 8, .H = 2, .query = &mha_float_mask_2d_query, .key = &mha_float_mask_2d_key,
        .value = &mha_float_mask_2d_value, .attn_mask = &mha_float_mask_2d_attn_mask,
        .float_mask = true, .out = &mha_float_mask_2d_out,
        .weights = &mha_float_mask_2d_weights, .w = &mha_float_mask_2d_w,
        .w_weights = &mha_float_mask_2d_w_weights, .dquery = &mha_float_mask_2d_dquery,
        .dkey = &mha_float_mask_2d_dkey, .dvalue = &mha_float_mask_2d_dvalue,
        .params = mha_float_mask_2d_params, .grads = mha_float_mask_2d_grads});
}

static void attention_causal_flag_equals_the_explicit_mask(void **state) {
    (void)state;
    qkv_generator g = gen(21);
    qkv_multi_head_attention *m = qkv_multi_head_attention_new(8, 4, 0.0, true, 0, 0, &g);
    load_params(m, mha_causal_params);
    qkv_tensor *q = fx(&mha_causal_query, QKV_F32);
    qkv_tensor *w = NULL;
    qkv_tensor *out = qkv_multi_head_attention_forward(
        m, q, q, q, &(qkv_attention_options){.is_causal = true, .weights = &w,
                                             .per_head_weights = true});
    assert_fixture(out, &mha_causal_out, RTOL, ATOL, "out");
    assert_fixture(w, &mha_causal_weights, RTOL, ATOL, "weights");
    qkv_module_free(QKV_MODULE(m));
}

static void attention_query_with_every_key_masked_outputs_the_out_proj_bias(void **state) {
    (void)state;
    qkv_generator g = gen(22);
    qkv_multi_head_attention *m = qkv_multi_head_attention_new(4, 2, 0.0, true, 0, 0, &g);
    qkv_tensor *bias = qkv_from_array(QKV_F32, S(4), (const float[]){0.5f, -1, 2, 0.25f});
    assert_true(qkv_copy_(m->out_proj->bias, bias));
    qkv_tensor *x = qkv_requires_grad_(qkv_randn(QKV_F32, S(2, 3, 4), &g), true);
    qkv_tensor *pad = qkv_from_array(QKV_BOOL, S(2, 3),
                                     (const bool[]){false, true, false, true, true, true});
    qkv_tensor *w = NULL;
    qkv_tensor *out = qkv_multi_head_attention_forward(
        m, x, x, x, &(qkv_attention_options){.key_padding_mask = pad, .weights = &w});
    assert_values(qkv_select(qkv_select(out, 0, 1), 0, 2), 4,
                  (const double[]){0.5, -1, 2, 0.25}, 0);
    assert_values(qkv_select(w, 0, 1), 9, (const double[]){0, 0, 0, 0, 0, 0, 0, 0, 0}, 0);
    assert_true(qkv_backward(qkv_sum_all(out)));
    /* the second batch sees only masked keys: its output is constant, its gradient zero */
    double dx[24];
    assert_true(qkv_copy_out(x->grad, QKV_F64, dx));
    for (int i = 0; i < 12; i++) assert_true(isfinite(dx[i]));
    for (int i = 12; i < 24; i++) assert_true(dx[i] == 0);
    qkv_module_free(QKV_MODULE(m));
}

static void attention_init_is_xavier_with_zero_biases(void **state) {
    (void)state;
    qkv_generator g = gen(23);
    qkv_multi_head_attention *m = qkv_multi_head_attention_new(32, 4, 0.0, true, 0, 0, &g);
    double lo, hi, mean, sd, b = sqrt(6.0 / (32 + 96));
    range_of(m->k_proj->weight, &lo, &hi, &mean, &sd);
    assert_true(lo >= -b && hi < b && hi > 0.95 * b);
    range_of(m->q_proj->bias, &lo, &hi, &mean, &sd);
    assert_true(lo == 0 && hi == 0);
    range_of(m->out_proj->bias, &lo, &hi, &mean, &sd);
    assert_true(lo == 0 && hi == 0);
    range_of(m->out_proj->weight, &lo, &hi, &mean, &sd);
    assert_true(hi < 1 / sqrt(32.0) && hi > 0.95 / sqrt(32.0));
    qkv_module_free(QKV_MODULE(m));
}

/* lo and hi lie in [-bound, bound) and come within 5% of both ends. */
static void assert_fills_uniform(const qkv_tensor *t, double bound, const char *what) {
    double lo, hi, mean, sd;
    range_of(t, &lo, &hi, &mean, &sd);
    if (!(lo >= -bound && hi < bound && lo < -0.95 * bound && hi > 0.95 * bound))
        fail_msg("%s: range [%g, %g], expected U(-%g, %g)", what, lo, hi, bound, bound);
}

static void assert_constant(const qkv_tensor *t, double value, const char *what) {
    double lo, hi, mean, sd;
    range_of(t, &lo, &hi, &mean, &sd);
    if (!(lo == value && hi == value)) fail_msg("%s: range [%g, %g], expected %g", what, lo, hi,
                                                value);
}

/* As torch.nn: Embedding N(0, 1); LayerNorm ones and zeros; MultiheadAttention with kdim and
 * vdim xavier-uniform on each projection's own fans, out_proj U(-1/sqrt(E), 1/sqrt(E)), zero
 * biases; TransformerEncoderLayer's linear1 and linear2 as Linear. */
static void layer_defaults_match_pytorch_init(void **state) {
    (void)state;
    qkv_generator g = gen(24);
    double lo, hi, mean, sd;
    qkv_embedding *emb = qkv_embedding_new(200, 100, -1, &g);
    range_of(emb->weight, &lo, &hi, &mean, &sd);
    assert_true(fabs(mean) < 0.01 && fabs(sd - 1) < 0.01);
    qkv_layer_norm *ln = qkv_layer_norm_new(1, (const int64_t[]){6}, 1e-5, true);
    assert_constant(ln->weight, 1, "layer_norm.weight");
    assert_constant(ln->bias, 0, "layer_norm.bias");
    qkv_multi_head_attention *m = qkv_multi_head_attention_new(64, 4, 0.0, true, 16, 40, &g);
    assert_fills_uniform(m->q_proj->weight, sqrt(6.0 / (64 + 64)), "q_proj.weight");
    assert_fills_uniform(m->k_proj->weight, sqrt(6.0 / (16 + 64)), "k_proj.weight");
    assert_fills_uniform(m->v_proj->weight, sqrt(6.0 / (40 + 64)), "v_proj.weight");
    assert_fills_uniform(m->out_proj->weight, 1 / sqrt(64.0), "out_proj.weight");
    assert_constant(m->k_proj->bias, 0, "k_proj.bias");
    assert_constant(m->out_proj->bias, 0, "out_proj.bias");
    qkv_transformer_config c = {.d_model = 32, .nhead = 4, .dim_feedforward = 128};
    qkv_transformer_encoder_layer *layer = qkv_transformer_encoder_layer_new(&c, &g);
    assert_fills_uniform(layer->linear1->weight, 1 / sqrt(32.0), "linear1.weight");
    assert_fills_uniform(layer->linear2->weight, 1 / sqrt(128.0), "linear2.weight");
    assert_constant(layer->norm2->weight, 1, "norm2.weight");
    assert_constant(layer->norm2->bias, 0, "norm2.bias");
    qkv_module_free(QKV_MODULE(emb));
    qkv_module_free(QKV_MODULE(ln));
    qkv_module_free(QKV_MODULE(m));
    qkv_module_free(QKV_MODULE(layer));
}

/* Copies every parameter of from into the parameter of the same name of to. */
static void copy_params(const void *to, const void *from) {
    qkv_named_list *l = qkv_module_parameters(from);
    assert_non_null(l);
    for (int i = 0; i < l->n; i++) assert_true(qkv_copy_(find_param(to, l->names[i]),
                                                         l->tensors[i]));
    qkv_named_list_free(l);
}

static bool same_values(const qkv_tensor *a, const qkv_tensor *b) {
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->numel, b->numel);
    double *va = malloc(2 * (size_t)a->numel * sizeof *va);
    assert_non_null(va);
    assert_true(qkv_copy_out(a, QKV_F64, va) && qkv_copy_out(b, QKV_F64, va + a->numel));
    bool same = memcmp(va, va + a->numel, (size_t)a->numel * sizeof *va) == 0;
    free(va);
    return same;
}

/* qkv_module_forward calls the forward each one-input module's constructor sets in its base:
 * the same values as the module's own forward function. */
static void module_forward_calls_each_modules_own_forward(void **state) {
    (void)state;
    qkv_generator g = gen(18);
    qkv_tensor *x = qkv_randn(QKV_F32, S(2, 3, 4), &g);
    qkv_tensor *ids = qkv_from_array(QKV_I64, S(2, 3), (const int64_t[]){1, 3, 0, 2, 2, 4});
    qkv_transformer_config c = {.d_model = 4, .nhead = 2, .dim_feedforward = 8,
                                .activation = QKV_ACT_RELU};
    qkv_linear *lin = qkv_linear_new(4, 5, true, &g);
    qkv_embedding *emb = qkv_embedding_new(6, 4, 0, &g);
    qkv_dropout_layer *drop = qkv_dropout_layer_new(0.5, &g);
    qkv_layer_norm *ln = qkv_layer_norm_new(S(4), 1e-5, true);
    qkv_activation *act = qkv_activation_new(QKV_ACT_GELU);
    qkv_positional_encoding *pe = qkv_sinusoidal_positional_encoding_new(8, 4);
    qkv_transformer_encoder_layer *layer = qkv_transformer_encoder_layer_new(&c, &g);
    qkv_transformer_encoder *enc = qkv_transformer_encoder_new(&c, 2, true, &g);
    qkv_module_train(QKV_MODULE(drop), false);
    assert_true(same_values(qkv_module_forward(QKV_MODULE(lin), x), qkv_linear_forward(lin, x)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(emb), ids),
                            qkv_embedding_forward(emb, ids)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(drop), x),
                            qkv_dropout_layer_forward(drop, x)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(ln), x),
                            qkv_layer_norm_forward(ln, x)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(act), x),
                            qkv_activation_forward(act, x)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(pe), x),
                            qkv_positional_encoding_forward(pe, x)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(layer), x),
                            qkv_transformer_encoder_layer_forward(layer, x, NULL)));
    assert_true(same_values(qkv_module_forward(QKV_MODULE(enc), x),
                            qkv_transformer_encoder_forward(enc, x, NULL)));
    qkv_module_free(QKV_MODULE(lin));
    qkv_module_free(QKV_MODULE(emb));
    qkv_module_free(QKV_MODULE(drop));
    qkv_module_free(QKV_MODULE(ln));
    qkv_module_free(QKV_MODULE(act));
    qkv_module_free(QKV_MODULE(pe));
    qkv_module_free(QKV_MODULE(layer));
    qkv_module_free(QKV_MODULE(enc));
}

/* A module whose forward takes more than one input has none in its base: calling it through
 * qkv_module_forward is an error naming its type, and a NULL module or input passes through. */
static void module_forward_without_one_is_an_error(void **state) {
    (void)state;
    qkv_generator g = gen(19);
    qkv_multi_head_attention *mha = qkv_multi_head_attention_new(4, 2, 0, true, 0, 0, &g);
    qkv_tensor *x = qkv_zeros(QKV_F32, S(1, 2, 4));
    assert_null(qkv_module_forward(QKV_MODULE(mha), x));
    assert_string_equal(qkv_error(), "qkv_module_forward: a multi_head_attention module has no "
                                     "one-input forward");
    qkv_clear_error();
    assert_null(qkv_module_forward(NULL, x));
    assert_string_equal(qkv_error(), "qkv_module_forward: module is NULL");
    qkv_clear_error();
    assert_null(qkv_module_forward(QKV_MODULE(mha), NULL));
    assert_string_equal(qkv_error(), "qkv_module_forward: tensor argument 1 is NULL");
    qkv_clear_error();
    qkv_module_free(QKV_MODULE(mha));
}

/* In eval mode an encoder layer with dropout is the same function as one without; in
 * training mode it is not, and each forward draws new masks. */
static void encoder_layer_dropout_acts_in_training_only(void **state) {
    (void)state;
    qkv_generator g = gen(25);
    qkv_transformer_config c = {.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                .dropout = 0.5, .activation = QKV_ACT_GELU};
    qkv_transformer_encoder_layer *dropping = qkv_transformer_encoder_layer_new(&c, &g);
    c.dropout = 0;
    qkv_transformer_encoder_layer *plain = qkv_transformer_encoder_layer_new(&c, &g);
    copy_params(plain, dropping);
    qkv_tensor *x = qkv_randn(QKV_F32, S(2, 5, 8), &g);
    qkv_tensor *reference = qkv_transformer_encoder_layer_forward(plain, x, NULL);
    qkv_tensor *first = qkv_transformer_encoder_layer_forward(dropping, x, NULL);
    qkv_tensor *second = qkv_transformer_encoder_layer_forward(dropping, x, NULL);
    assert_false(same_values(first, reference));
    assert_false(same_values(first, second));
    qkv_module_train(QKV_MODULE(dropping), false);
    assert_true(same_values(qkv_transformer_encoder_layer_forward(dropping, x, NULL),
                            reference));
    qkv_module_free(QKV_MODULE(dropping));
    qkv_module_free(QKV_MODULE(plain));
}

/* Attention dropout acts on the weights, and the weights returned are those after dropout
 * (as PyTorch's): each is 0 or its eval-mode value over 1 - p. */
static void attention_dropout_zeroes_and_rescales_the_weights(void **state) {
    (void)state;
    qkv_generator g = gen(26);
    qkv_multi_head_attention *m = qkv_multi_head_attention_new(8, 2, 0.5, true, 0, 0, &g);
    qkv_tensor *x = qkv_randn(QKV_F32, S(2, 6, 8), &g);
    qkv_tensor *dropped = NULL, *kept = NULL;
    qkv_attention_options o = {.weights = &dropped, .per_head_weights = true};
    assert_non_null(qkv_multi_head_attention_forward(m, x, x, x, &o));
    qkv_module_train(QKV_MODULE(m), false);
    o.weights = &kept;
    assert_non_null(qkv_multi_head_attention_forward(m, x, x, x, &o));
    int64_t n = kept->numel, zeros = 0;
    double *v = malloc(2 * (size_t)n * sizeof *v);
    assert_non_null(v);
    assert_true(qkv_copy_out(dropped, QKV_F64, v) && qkv_copy_out(kept, QKV_F64, v + n));
    for (int64_t i = 0; i < n; i++) {
        if (v[i] == 0) {
            zeros++;
            continue;
        }
        if (!(fabs(v[i] - 2 * v[n + i]) <= 1e-6 * v[i]))
            fail_msg("weight %lld: %g after dropout, %g without", (long long)i, v[i], v[n + i]);
    }
    free(v);
    assert_true(zeros > n / 4 && zeros < 3 * n / 4);
    qkv_module_free(QKV_MODULE(m));
}

static void attention_names_bad_shapes(void **state) {
    (void)state;
    qkv_generator g = gen(24);
    qkv_multi_head_attention *m = qkv_multi_head_attention_new(4, 2, 0.0, true, 0, 0, &g);
    qkv_tensor *x = qkv_ones(QKV_F32, S(2, 3, 4));
    assert_null(qkv_multi_head_attention_forward(m, x, qkv_ones(QKV_F32, S(2, 3, 5)), x, NULL));
    assert_string_equal(qkv_error(), "qkv_multi_head_attention_forward: query [2,3,4], key "
                                     "[2,3,5], value [2,3,4]; expected [B,T,4], [B,S,4], "
                                     "[B,S,4]");
    qkv_clear_error();
    qkv_tensor *mask = qkv_zeros(QKV_BOOL, S(3, 4));
    assert_null(qkv_multi_head_attention_forward(m, x, x, x,
                                                 &(qkv_attention_options){.attn_mask = mask}));
    assert_string_equal(qkv_error(), "qkv_multi_head_attention_forward: attn_mask [3,4]; "
                                     "expected [3,3], [4,3,3] or [2,2,3,3]");
    qkv_clear_error();
    assert_null(qkv_multi_head_attention_new(6, 4, 0.0, true, 0, 0, &g));
    assert_non_null(qkv_error());
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Transformer encoder ----------------------------------------------------------------- */

typedef struct encoder_case {
    bool norm_first, causal;
    qkv_activation_kind activation;
    const nn_fixture *src, *padding, *out, *w, *dsrc;
    const nn_named_fixture *params, *grads;
} encoder_case;

static void check_encoder(const encoder_case *c) {
    qkv_generator g = gen(30);
    qkv_transformer_encoder_layer *m = qkv_transformer_encoder_layer_new(
        &(qkv_transformer_config){.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                  .dropout = 0.0, .activation = c->activation,
                                  .norm_first = c->norm_first},
        &g);
    assert_param_names(m, c->params);
    load_params(m, c->params);
    qkv_tensor *src = fx_leaf(c->src);
    qkv_encoder_options o = {.src_key_padding_mask = fx(c->padding, QKV_BOOL),
                             .is_causal = c->causal};
    qkv_tensor *out = qkv_transformer_encoder_layer_forward(m, src, &o);
    assert_fixture(out, c->out, RTOL, ATOL, "out");
    assert_true(qkv_backward(weighted(out, c->w)));
    assert_fixture(src->grad, c->dsrc, RTOL, ATOL, "dsrc");
    assert_grads(m, c->grads);
    qkv_module_free(QKV_MODULE(m));
}

static void encoder_layer_post_norm_relu_matches_torch(void **state) {
    (void)state;
    check_encoder(&(encoder_case){
        false, false, QKV_ACT_RELU, &encoder_post_relu_src, &encoder_post_relu_padding,
        &encoder_post_relu_out, &encoder_post_relu_w, &encoder_post_relu_dsrc,
        encoder_post_relu_params, encoder_post_relu_grads});
}

static void encoder_layer_post_norm_gelu_matches_torch(void **state) {
    (void)state;
    check_encoder(&(encoder_case){
        false, false, QKV_ACT_GELU, &encoder_post_gelu_src, &encoder_post_gelu_padding,
        &encoder_post_gelu_out, &encoder_post_gelu_w, &encoder_post_gelu_dsrc,
        encoder_post_gelu_params, encoder_post_gelu_grads});
}

static void encoder_layer_pre_norm_relu_matches_torch(void **state) {
    (void)state;
    check_encoder(&(encoder_case){
        true, false, QKV_ACT_RELU, &encoder_pre_relu_src, &encoder_pre_relu_padding,
        &encoder_pre_relu_out, &encoder_pre_relu_w, &encoder_pre_relu_dsrc,
        encoder_pre_relu_params, encoder_pre_relu_grads});
}

static void encoder_layer_pre_norm_gelu_causal_matches_torch(void **state) {
    (void)state;
    check_encoder(&(encoder_case){
        true, true, QKV_ACT_GELU, &encoder_pre_gelu_causal_src, &encoder_pre_gelu_causal_padding,
        &encoder_pre_gelu_causal_out, &encoder_pre_gelu_causal_w,
        &encoder_pre_gelu_causal_dsrc, encoder_pre_gelu_causal_params,
        encoder_pre_gelu_causal_grads});
}

/* PyTorch's key with self_attn.in_proj_* split into q, k and v projections. */
static int expand_torch_key(const char *key, char out[3][96]) {
    const char *p = strstr(key, "in_proj_");
    if (!p) {
        snprintf(out[0], 96, "%s", key);
        return 1;
    }
    for (int i = 0; i < 3; i++)
        snprintf(out[i], 96, "%.*s%c_proj.%s", (int)(p - key), key, "qkv"[i], p + 8);
    return 3;
}

/* Every PyTorch state_dict key (q/k/v split) names one of our parameters, and nothing more. */
static void assert_names_match_torch(const void *m, const char *const *keys) {
    qkv_named_list *l = qkv_module_parameters(m);
    int n = 0;
    for (const char *const *k = keys; *k; k++) {
        char names[3][96];
        int c = expand_torch_key(*k, names);
        for (int i = 0; i < c; i++, n++) {
            bool found = false;
            for (int j = 0; j < l->n; j++) found |= strcmp(l->names[j], names[i]) == 0;
            if (!found) fail_msg("no parameter %s", names[i]);
        }
    }
    assert_int_equal(l->n, n);
    qkv_named_list_free(l);
}

static void encoder_layer_parameters_are_pytorch_state_dict_keys(void **state) {
    (void)state;
    qkv_generator g = gen(31);
    qkv_transformer_config c = {.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                .activation = QKV_ACT_RELU};
    qkv_transformer_encoder_layer *m = qkv_transformer_encoder_layer_new(&c, &g);
    assert_names_match_torch(m, encoder_torch_keys);
    assert_int_equal(qkv_module_num_parameters(QKV_MODULE(m)), encoder_torch_numel);
    const char *subs[] = {"self_attn", "linear1", "dropout", "linear2", "norm1", "norm2",
                          "dropout1", "dropout2"};
    assert_int_equal(m->base.n_modules, 8);
    for (int i = 0; i < 8; i++) assert_string_equal(m->base.modules[i].name, subs[i]);
    qkv_transformer_encoder *enc = qkv_transformer_encoder_new(&c, 2, true, &g);
    assert_names_match_torch(enc, encoder_stack_torch_keys);
    assert_int_equal(qkv_module_num_parameters(QKV_MODULE(enc)), 2 * encoder_torch_numel + 16);
    qkv_module_free(QKV_MODULE(m));
    qkv_module_free(QKV_MODULE(enc));
}

static void encoder_layer_names_a_key_padding_mask_of_the_wrong_shape(void **state) {
    (void)state;
    qkv_generator g = gen(34);
    qkv_transformer_config c = {.d_model = 4, .nhead = 2, .dim_feedforward = 8,
                                .activation = QKV_ACT_GELU};
    qkv_transformer_encoder_layer *layer = qkv_transformer_encoder_layer_new(&c, &g);
    qkv_encoder_options opts = {.src_key_padding_mask = qkv_zeros(QKV_BOOL, S(2, 4))};
    assert_null(qkv_transformer_encoder_layer_forward(layer, qkv_ones(QKV_F32, S(2, 3, 4)),
                                                      &opts));
    assert_string_equal(qkv_error(), "qkv_multi_head_attention_forward: key_padding_mask "
                                     "[2,4]; expected [2,3]");
    qkv_module_free(QKV_MODULE(layer));
}

static void anomaly_mode_names_the_layer_op_that_meets_a_nan_weight(void **state) {
    (void)state;
    qkv_generator g = gen(35);
    qkv_linear *lin = qkv_linear_new(4, 3, true, &g);
    assert_true(qkv_fill_(qkv_select(lin->weight, 0, 1), NAN));
    qkv_set_detect_anomaly(true);
    qkv_tensor *y = qkv_linear_forward(lin, qkv_ones(QKV_F32, S(2, 4)));
    qkv_set_detect_anomaly(false);
    assert_null(y);
    assert_string_equal(qkv_error(), "qkv anomaly: affine produced NaN in its forward");
    qkv_module_free(QKV_MODULE(lin));
}

static void encoder_stack_applies_its_layers_then_the_final_norm(void **state) {
    (void)state;
    qkv_generator g = gen(32);
    qkv_transformer_config c = {.d_model = 8, .nhead = 2, .dim_feedforward = 16,
                                .activation = QKV_ACT_GELU};
    qkv_transformer_encoder *enc = qkv_transformer_encoder_new(&c, 2, true, &g);
    qkv_tensor *x = qkv_randn(QKV_F32, S(2, 5, 8), &g);
    qkv_tensor *by_hand = qkv_layer_norm_forward(
        enc->norm, qkv_transformer_encoder_layer_forward(
                       enc->layers[1], qkv_transformer_encoder_layer_forward(enc->layers[0], x,
                                                                             NULL), NULL));
    qkv_tensor *y = qkv_transformer_encoder_forward(enc, x, NULL);
    double expected[80];
    assert_true(qkv_copy_out(by_hand, QKV_F64, expected));
    assert_values(y, 80, expected, 0);
    qkv_module_free(QKV_MODULE(enc));
}

/* ---- Positional encodings ---------------------------------------------------------------- */

static void sinusoidal_encoding_is_the_tutorial_table(void **state) {
    (void)state;
    qkv_positional_encoding *pe = qkv_sinusoidal_positional_encoding_new(12, 6);
    assert_fixture(pe->table, &sinusoidal_pe, 0, 1e-6, "pe");
    assert_int_equal(qkv_module_num_parameters(QKV_MODULE(pe)), 0);
    qkv_tensor *y = qkv_positional_encoding_forward(pe, qkv_zeros(QKV_F32, S(2, 3, 6)));
    assert_fixture(qkv_select(y, 0, 1), &(nn_fixture){2, {3, 6}, sinusoidal_pe_data}, 0, 1e-6,
                   "first rows");
    assert_null(qkv_positional_encoding_forward(pe, qkv_zeros(QKV_F32, S(1, 13, 6))));
    assert_string_equal(qkv_error(), "qkv_positional_encoding_forward: input [1,13,6]; "
                                     "expected [B,T,6] with T <= 12");
    qkv_module_free(QKV_MODULE(pe));
}

static void learned_encoding_adds_rows_and_trains_only_those_used(void **state) {
    (void)state;
    qkv_generator g = gen(33);
    qkv_positional_encoding *pe = qkv_learned_positional_encoding_new(8, 2, &g);
    qkv_named_list *l = qkv_module_parameters(QKV_MODULE(pe));
    assert_string_equal(l->names[0], "weight");
    qkv_named_list_free(l);
    qkv_tensor *y = qkv_positional_encoding_forward(pe, qkv_ones(QKV_F32, S(3, 2, 2)));
    double w[16];
    assert_true(qkv_copy_out(pe->table, QKV_F64, w));
    assert_values(qkv_select(y, 0, 2), 4, (const double[]){1 + w[0], 1 + w[1], 1 + w[2],
                                                          1 + w[3]}, 1e-6);
    assert_true(qkv_backward(qkv_sum_all(y)));
    assert_values(pe->table->grad, 16, (const double[]){3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                        0, 0, 0}, 0);
    qkv_module_free(QKV_MODULE(pe));
}

/* ---- Losses ------------------------------------------------------------------------------ */

static void check_cross_entropy(qkv_reduction reduction, int64_t ignore_index, double smoothing,
                                const nn_fixture *w, const nn_fixture *out,
                                const nn_fixture *dlogits) {
    qkv_tensor *logits = fx_leaf(&loss_logits);
    qkv_tensor *loss = qkv_cross_entropy(logits, fx(&loss_targets, QKV_I64), reduction,
                                         ignore_index, smoothing);
    assert_fixture(loss, out, RTOL, ATOL, "loss");
    assert_true(qkv_backward(weighted(loss, w)));
    assert_fixture(logits->grad, dlogits, RTOL, ATOL, "dlogits");
}

static void cross_entropy_reductions_match_torch(void **state) {
    (void)state;
    check_cross_entropy(QKV_REDUCTION_MEAN, -100, 0, &ce_mean_w, &ce_mean_out, &ce_mean_dlogits);
    check_cross_entropy(QKV_REDUCTION_SUM, -100, 0, &ce_sum_w, &ce_sum_out, &ce_sum_dlogits);
    check_cross_entropy(QKV_REDUCTION_NONE, -100, 0, &ce_none_w, &ce_none_out, &ce_none_dlogits);
}

static void cross_entropy_ignore_index_averages_over_the_rest(void **state) {
    (void)state;
    check_cross_entropy(QKV_REDUCTION_MEAN, 2, 0, &ce_ignore_w, &ce_ignore_out,
                        &ce_ignore_dlogits);
}

static void cross_entropy_label_smoothing_matches_torch(void **state) {
    (void)state;
    check_cross_entropy(QKV_REDUCTION_MEAN, -100, 0.1, &ce_smooth_w, &ce_smooth_out,
                        &ce_smooth_dlogits);
    check_cross_entropy(QKV_REDUCTION_MEAN, 2, 0.2, &ce_smooth_ignore_w, &ce_smooth_ignore_out,
                        &ce_smooth_ignore_dlogits);
    check_cross_entropy(QKV_REDUCTION_SUM, 2, 0.2, &ce_smooth_ignore_sum_w,
                        &ce_smooth_ignore_sum_out, &ce_smooth_ignore_sum_dlogits);
    check_cross_entropy(QKV_REDUCTION_NONE, 2, 0.2, &ce_smooth_ignore_none_w,
                        &ce_smooth_ignore_none_out, &ce_smooth_ignore_none_dlogits);
}

static void cross_entropy_names_a_target_out_of_range(void **state) {
    (void)state;
    qkv_tensor *logits = qkv_zeros(QKV_F32, S(2, 3));
    qkv_tensor *targets = qkv_from_array(QKV_I64, S(2), (const int64_t[]){0, 3});
    assert_null(qkv_cross_entropy(logits, targets, QKV_REDUCTION_MEAN, -100, 0));
    assert_string_equal(qkv_error(), "qkv_cross_entropy: target 3 at 1 out of range for 3 "
                                     "classes");
    qkv_clear_error();
    assert_null(qkv_cross_entropy(logits, qkv_zeros(QKV_F32, S(2)), QKV_REDUCTION_MEAN, -100, 0));
    assert_string_equal(qkv_error(), "qkv_cross_entropy: input [2,3] f32 and targets [2] f32; "
                                     "expected float [N,C] and i64 [N]");
}

static void nll_loss_matches_torch(void **state) {
    (void)state;
    qkv_tensor *lp = fx_leaf(&nll_log_probs);
    qkv_tensor *loss = qkv_nll_loss(lp, fx(&loss_targets, QKV_I64), QKV_REDUCTION_MEAN, 4);
    assert_fixture(loss, &nll_out, RTOL, ATOL, "loss");
    assert_true(qkv_backward(loss));
    assert_fixture(lp->grad, &nll_dlog_probs, RTOL, ATOL, "dlog_probs");
    const struct {
        qkv_reduction reduction;
        const nn_fixture *w, *out, *dlog_probs;
    } more[] = {
        {QKV_REDUCTION_SUM, &nll_sum_w, &nll_sum_out, &nll_sum_dlog_probs},
        {QKV_REDUCTION_NONE, &nll_none_w, &nll_none_out, &nll_none_dlog_probs},
    };
    for (int i = 0; i < 2; i++) {
        qkv_zero_grad(lp);
        loss = qkv_nll_loss(lp, fx(&loss_targets, QKV_I64), more[i].reduction, 4);
        assert_fixture(loss, more[i].out, RTOL, ATOL, "loss");
        assert_true(qkv_backward(weighted(loss, more[i].w)));
        assert_fixture(lp->grad, more[i].dlog_probs, RTOL, ATOL, "dlog_probs");
    }
}

static void mse_loss_matches_torch(void **state) {
    (void)state;
    qkv_tensor *x = fx_leaf(&mse_x);
    qkv_tensor *loss = qkv_mse_loss(x, fx(&mse_y, QKV_F32), QKV_REDUCTION_MEAN);
    assert_fixture(loss, &mse_out, RTOL, ATOL, "loss");
    assert_true(qkv_backward(loss));
    assert_fixture(x->grad, &mse_dx, RTOL, ATOL, "dx");
    assert_values(qkv_mse_loss(x, x, QKV_REDUCTION_SUM), 1, (const double[]){0}, 0);
    const struct {
        qkv_reduction reduction;
        const nn_fixture *w, *out, *dx;
    } more[] = {
        {QKV_REDUCTION_SUM, &mse_sum_w, &mse_sum_out, &mse_sum_dx},
        {QKV_REDUCTION_NONE, &mse_none_w, &mse_none_out, &mse_none_dx},
    };
    for (int i = 0; i < 2; i++) {
        qkv_zero_grad(x);
        loss = qkv_mse_loss(x, fx(&mse_y, QKV_F32), more[i].reduction);
        assert_fixture(loss, more[i].out, RTOL, ATOL, "loss");
        assert_true(qkv_backward(weighted(loss, more[i].w)));
        assert_fixture(x->grad, more[i].dx, RTOL, ATOL, "dx");
    }
}

static void bce_with_logits_is_stable_for_large_logits(void **state) {
    (void)state;
    qkv_tensor *x = fx_leaf(&bce_x);
    qkv_tensor *loss = qkv_binary_cross_entropy_with_logits(x, fx(&bce_y, QKV_F32),
                                                            QKV_REDUCTION_MEAN);
    assert_fixture(loss, &bce_out, RTOL, ATOL, "loss");
    assert_true(qkv_backward(loss));
    assert_fixture(x->grad, &bce_dx, RTOL, ATOL, "dx");
    qkv_zero_grad(x);
    loss = qkv_binary_cross_entropy_with_logits(x, fx(&bce_y, QKV_F32), QKV_REDUCTION_NONE);
    assert_fixture(loss, &bce_none_out, RTOL, ATOL, "loss none");
    assert_true(qkv_backward(weighted(loss, &bce_none_w)));
    assert_fixture(x->grad, &bce_none_dx, RTOL, ATOL, "dx none");
}

/* ---- Gradient checks in F64 -------------------------------------------------------------- */

typedef struct block_ctx {
    void *module;
    const qkv_tensor *key_padding_mask;
    bool encoder;
} block_ctx;

/* The input is the last of inputs; the others are the module's parameters, read in place. */
static qkv_tensor *block_forward(qkv_tensor *const *inputs, int n, void *ctx) {
    block_ctx *c = ctx;
    qkv_tensor *x = inputs[n - 1];
    if (c->encoder)
        return qkv_transformer_encoder_layer_forward(
            c->module, x, &(qkv_encoder_options){.src_key_padding_mask = c->key_padding_mask,
                                                 .is_causal = true});
    qkv_tensor *w = NULL;
    qkv_tensor *out = qkv_multi_head_attention_forward(
        c->module, x, x, x, &(qkv_attention_options){.key_padding_mask = c->key_padding_mask,
                                                     .is_causal = true, .weights = &w});
    return qkv_add(qkv_sum_all(out), qkv_sum_all(qkv_mul(w, w)));
}

static void gradcheck_module(void *module, bool encoder, int64_t E) {
    qkv_generator g = gen(40);
    assert_true(qkv_module_to_dtype(module, QKV_F64));
    qkv_named_list *l = qkv_module_parameters(module);
    qkv_tensor *inputs[32];
    assert_true(l->n < 31);
    for (int i = 0; i < l->n; i++) inputs[i] = l->tensors[i];
    inputs[l->n] = qkv_requires_grad_(qkv_randn(QKV_F64, S(2, 3, E), &g), true);
    block_ctx ctx = {module, qkv_from_array(QKV_BOOL, S(2, 3), (const bool[]){0, 0, 0, 0, 0, 1}),
                     encoder};
    bool ok = qkv_gradcheck(block_forward, inputs, l->n + 1, &ctx, 1e-6, 1e-7, 1e-5);
    if (!ok) fail_msg("%s", qkv_error());
    qkv_named_list_free(l);
    qkv_module_free(module);
}

static void attention_block_passes_gradcheck(void **state) {
    (void)state;
    qkv_generator g = gen(41);
    gradcheck_module(qkv_multi_head_attention_new(4, 2, 0.0, true, 0, 0, &g), false, 4);
}

static void encoder_layer_passes_gradcheck(void **state) {
    (void)state;
    qkv_generator g = gen(42);
    for (int norm_first = 0; norm_first < 2; norm_first++) {
        qkv_transformer_config c = {.d_model = 4, .nhead = 2, .dim_feedforward = 6,
                                    .activation = QKV_ACT_GELU, .norm_first = norm_first};
        gradcheck_module(qkv_transformer_encoder_layer_new(&c, &g), true, 4);
    }
}

/* ---- Allocation failure ------------------------------------------------------------------ */

/* Builds a two-layer encoder, lists its state, runs forward, a loss and backward, frees it. */
static bool encoder_lifecycle(void) {
    qkv_generator g = gen(50);
    qkv_transformer_config c = {.d_model = 4, .nhead = 2, .dim_feedforward = 4, .dropout = 0.1,
                                .activation = QKV_ACT_RELU};
    qkv_transformer_encoder *enc = qkv_transformer_encoder_new(&c, 2, true, &g);
    qkv_named_list *l = qkv_module_state(QKV_MODULE(enc));
    qkv_tensor *x = qkv_randn(QKV_F32, S(2, 3, 4), &g);
    qkv_tensor *targets = qkv_from_array(QKV_I64, S(2), (const int64_t[]){1, 3});
    qkv_tensor *logits = qkv_select(qkv_transformer_encoder_forward(enc, x, NULL), 1, 0);
    qkv_tensor *loss = qkv_cross_entropy(logits, targets, QKV_REDUCTION_MEAN, -100, 0.1);
    bool ok = enc && l && qkv_backward(loss) && qkv_module_to_dtype(QKV_MODULE(enc), QKV_F64);
    qkv_named_list_free(l);
    qkv_module_free(QKV_MODULE(enc));
    return ok;
}

static void modules_survive_every_allocation_failure(void **state) {
    (void)state;
    assert_every_allocation_failure_is_clean_in_a_scope(encoder_lifecycle());
}

#define T(name) cmocka_unit_test_setup_teardown(name, open_scope, close_scope)

/* ---- Anomaly mode ------------------------------------------------------------------------ */

/* The example classifier's loss and backward on a batch whose second row is padded, so its
 * attention scores hold the -inf of the key padding mask. */
static bool classifier_step(classifier *m) {
    int64_t ids[] = {3, 4, 5, 6, 7, 8, 9, 0, 0, 0}, labels[] = {1, 2};
    bool pad[] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1};
    qkv_tensor *logits = classifier_forward(m, qkv_from_array(QKV_I64, QKV_SHAPE(2, 5), ids),
                                            qkv_from_array(QKV_BOOL, QKV_SHAPE(2, 5), pad));
    return qkv_backward(qkv_cross_entropy(logits, qkv_from_array(QKV_I64, QKV_SHAPE(2), labels),
                                          QKV_REDUCTION_MEAN, -100, 0));
}

/* No false alarm on a padded batch (an infinity in a forward is no error); a NaN planted in
 * one layer's weight is named with that layer's path. */
static void anomaly_mode_names_the_layer_of_a_planted_nan(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 7);
    classifier_config c = {.vocab_size = 12, .n_classes = 3, .max_len = 5, .dim = 8,
                           .heads = 2, .layers = 2, .ffn = 16, .dropout = 0.1};
    classifier *m = classifier_new(&c, &g);
    assert_non_null(m);
    qkv_set_detect_anomaly(true);
    bool clean = classifier_step(m);
    const char *e = qkv_error();
    if (!clean) fail_msg("false alarm: %s", e ? e : "(no error)");
    qkv_tensor *w = m->encoder->layers[1]->linear2->weight;
    assert_true(qkv_fill_(qkv_narrow(qkv_narrow(w, 0, 2, 1), 1, 3, 1), NAN));
    assert_false(classifier_step(m));
    qkv_set_detect_anomaly(false);
    assert_string_equal(qkv_error(), "qkv anomaly: affine produced NaN in its forward (in "
                                     "encoder.layers.1.linear2)");
    qkv_module_free(QKV_MODULE(m));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        T(anomaly_mode_names_the_layer_of_a_planted_nan),
        T(parameters_are_listed_depth_first_with_dotted_names),
        T(state_lists_buffers_after_each_modules_parameters),
        T(shared_parameter_is_listed_once),
        T(registration_rejects_duplicate_and_dotted_names),
        T(a_parameter_is_a_leaf_that_requires_grad),
        T(module_free_releases_every_tensor),
        T(train_and_eval_reach_every_submodule),
        T(to_dtype_converts_parameters_in_place),
        T(zero_grad_drops_every_gradient),
        T(uniform_and_normal_fill_with_the_given_parameters),
        T(xavier_and_kaiming_use_pytorch_fans_and_gains),
        T(fan_based_init_needs_two_dims),
        T(same_seed_gives_the_same_model),
        T(linear_matches_torch_with_leading_dims),
        T(linear_default_init_is_within_one_over_sqrt_in),
        T(linear_names_the_bad_input_shape),
        T(embedding_matches_torch_and_padding_row_gets_no_gradient),
        T(embedding_padding_row_starts_at_zero),
        T(embedding_names_an_id_out_of_range_and_ids_that_are_not_i64),
        T(dropout_layer_drops_in_training_only),
        T(layer_norm_matches_torch_over_two_dims),
        T(layer_norm_without_affine_has_no_parameters),
        T(activation_modules_apply_their_function),
        T(sequential_chains_builtin_and_user_modules),
        T(module_forward_calls_each_modules_own_forward),
        T(module_forward_without_one_is_an_error),
        T(attention_self_with_key_padding_mask_matches_torch),
        T(attention_causal_mask_per_head_weights_match_torch),
        T(attention_cross_with_kdim_vdim_matches_torch),
        T(attention_float_mask_per_batch_and_head_matches_torch),
        T(attention_additive_2d_mask_matches_torch),
        T(attention_causal_flag_equals_the_explicit_mask),
        T(attention_query_with_every_key_masked_outputs_the_out_proj_bias),
        T(attention_init_is_xavier_with_zero_biases),
        T(layer_defaults_match_pytorch_init),
        T(encoder_layer_dropout_acts_in_training_only),
        T(attention_dropout_zeroes_and_rescales_the_weights),
        T(attention_names_bad_shapes),
        T(encoder_layer_post_norm_relu_matches_torch),
        T(encoder_layer_post_norm_gelu_matches_torch),
        T(encoder_layer_pre_norm_relu_matches_torch),
        T(encoder_layer_pre_norm_gelu_causal_matches_torch),
        T(encoder_layer_parameters_are_pytorch_state_dict_keys),
        T(encoder_layer_names_a_key_padding_mask_of_the_wrong_shape),
        T(anomaly_mode_names_the_layer_op_that_meets_a_nan_weight),
        T(encoder_stack_applies_its_layers_then_the_final_norm),
        T(sinusoidal_encoding_is_the_tutorial_table),
        T(learned_encoding_adds_rows_and_trains_only_those_used),
        T(cross_entropy_reductions_match_torch),
        T(cross_entropy_ignore_index_averages_over_the_rest),
        T(cross_entropy_label_smoothing_matches_torch),
        T(cross_entropy_names_a_target_out_of_range),
        T(nll_loss_matches_torch),
        T(mse_loss_matches_torch),
        T(bce_with_logits_is_stable_for_large_logits),
        T(attention_block_passes_gradcheck),
        T(encoder_layer_passes_gradcheck),
        T(modules_survive_every_allocation_failure),
    };
    return cmocka_run_group_tests_name("nn", tests, NULL, NULL);
}
