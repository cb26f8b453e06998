/* Indexing ops (index_select, gather, concat, stack, one_hot) against PyTorch fixtures, their
 * error messages, and dropout. Every test runs in its own scope and must leave no tensor
 * alive behind it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

#include "fixtures/index_fixtures.h"
#include "harness.h"

#define S(...) QKV_SHAPE(__VA_ARGS__)
#define N_OF(array) ((int64_t)(sizeof(array) / sizeof((array)[0])))

/* ---- Helpers ----------------------------------------------------------------------------- */

static qkv_tensor *f32(int ndim, const int64_t *shape, const float *data) {
    qkv_tensor *t = qkv_from_array(QKV_F32, ndim, shape, data);
    assert_non_null(t);
    return t;
}

static qkv_tensor *leaf(int ndim, const int64_t *shape, const float *data) {
    return qkv_requires_grad_(f32(ndim, shape, data), true);
}

static qkv_tensor *i64(int ndim, const int64_t *shape, const int64_t *data) {
    qkv_tensor *t = qkv_from_array(QKV_I64, ndim, shape, data);
    assert_non_null(t);
    return t;
}

static void assert_shape(const qkv_tensor *t, int ndim, const int64_t *shape) {
    assert_non_null(t);
    assert_int_equal(t->ndim, ndim);
    for (int i = 0; i < ndim; i++) assert_int_equal(t->shape[i], shape[i]);
}

/* t has the given shape and its values are within tol of expected. */
static void assert_close(const qkv_tensor *t, int ndim, const int64_t *shape,
                         const float *expected, double tol) {
    assert_shape(t, ndim, shape);
    double *v = malloc((size_t)t->numel * sizeof *v);
    assert_non_null(v);
    assert_true(qkv_copy_out(t, QKV_F64, v));
    for (int64_t i = 0; i < t->numel; i++) {
        if (fabs(v[i] - expected[i]) > tol)
            fail_msg("element %lld: %.9g, expected %.9g", (long long)i, v[i], expected[i]);
    }
    free(v);
}

static void assert_i64(const qkv_tensor *t, int ndim, const int64_t *shape,
                       const int64_t *expected) {
    assert_shape(t, ndim, shape);
    assert_int_equal(t->dtype, QKV_I64);
    int64_t *v = malloc((size_t)t->numel * sizeof *v);
    assert_non_null(v);
    assert_true(qkv_copy_out(t, QKV_I64, v));
    for (int64_t i = 0; i < t->numel; i++) assert_int_equal(v[i], expected[i]);
    free(v);
}

/* Backpropagates the upstream gradient w (of out's shape) through out. */
static void backward(qkv_tensor *out, const float *w) {
    assert_non_null(out);
    assert_true(qkv_backward_with(out, f32(out->ndim, out->shape, w), false));
    assert_null(qkv_error());
}

#define EXACT 0.0
#define GRAD_TOL 1e-6

/* ---- index_select ------------------------------------------------------------------------ */

static void index_select_repeated_index_accumulates_gradient(void **state) {
    (void)state;
    qkv_tensor *a = leaf(S(5, 3), sel0_in0);
    qkv_tensor *out = qkv_index_select(a, 0, i64(S(4), sel0_idx));
    assert_close(out, S(4, 3), sel0_out, EXACT);
    assert_string_equal(qkv_grad_fn_name(out), "index_select");
    backward(out, sel0_w);
    assert_close(a->grad, S(5, 3), sel0_grad0, GRAD_TOL);
}

static void index_select_2d_index_along_axis_1(void **state) {
    (void)state;
    qkv_tensor *a = leaf(S(3, 5, 2), sel1_in0);
    qkv_tensor *out = qkv_index_select(a, 1, i64(S(2, 3), sel1_idx));
    assert_close(out, S(3, 2, 3, 2), sel1_out, EXACT);
    backward(out, sel1_w);
    assert_close(a->grad, S(3, 5, 2), sel1_grad0, GRAD_TOL);
}

static void index_select_along_last_axis(void **state) {
    (void)state;
    qkv_tensor *a = leaf(S(2, 3, 4), selm1_in0);
    qkv_tensor *out = qkv_index_select(a, -1, i64(S(3), selm1_idx));
    assert_close(out, S(2, 3, 3), selm1_out, EXACT);
    backward(out, selm1_w);
    assert_close(a->grad, S(2, 3, 4), selm1_grad0, GRAD_TOL);
}

static void index_select_reads_transposed_source_in_place(void **state) {
    (void)state;
    qkv_tensor *base = leaf(S(4, 6), selt_in0);
    qkv_tensor *a = qkv_transpose(base, 0, 1);
    assert_false(qkv_is_contiguous(a));
    qkv_tensor *out = qkv_index_select(a, 0, i64(S(2, 2), selt_idx));
    assert_close(out, S(2, 2, 4), selt_out, EXACT);
    backward(out, selt_w);
    assert_close(base->grad, S(4, 6), selt_grad0, GRAD_TOL);
}

static void index_select_accepts_transposed_index(void **state) {
    (void)state;
    int64_t idx_t[6];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++) idx_t[j * 2 + i] = sel1_idx[i * 3 + j];
    qkv_tensor *idx = qkv_transpose(i64(S(3, 2), idx_t), 0, 1);
    assert_false(qkv_is_contiguous(idx));
    qkv_tensor *out = qkv_index_select(f32(S(3, 5, 2), sel1_in0), 1, idx);
    assert_close(out, S(3, 2, 3, 2), sel1_out, EXACT);
}

static void index_select_copies_i64_and_bool_sources(void **state) {
    (void)state;
    qkv_tensor *ids = i64(S(2, 3), ((const int64_t[]){10, 11, 12, 20, 21, 22}));
    qkv_tensor *rows = qkv_index_select(ids, 0, i64(S(3), ((const int64_t[]){1, 1, 0})));
    assert_i64(rows, S(3, 3), (const int64_t[]){20, 21, 22, 20, 21, 22, 10, 11, 12});
    qkv_tensor *mask = qkv_from_array(QKV_BOOL, S(4), (const bool[]){true, false, false, true});
    qkv_tensor *picked = qkv_index_select(mask, 0, i64(S(2, 2), ((const int64_t[]){3, 1, 0, 2})));
    assert_shape(picked, S(2, 2));
    assert_int_equal(picked->dtype, QKV_BOOL);
    bool got[4];
    assert_true(qkv_copy_out(picked, QKV_BOOL, got));
    assert_true(got[0] && !got[1] && got[2] && !got[3]);
}

/* An embedding-sized backward (many repeated rows) gives the same bits on one thread and on
 * four, and row v's gradient is the sum of the rows of g that picked v. */
static void index_select_gradient_is_the_same_for_any_thread_count(void **state) {
    (void)state;
    enum { V = 50, D = 64, R = 1000 };
    int64_t idx[R];
    for (int r = 0; r < R; r++) idx[r] = (r * 7) % 13;
    qkv_generator gen;
    qkv_generator_init(&gen, 5);
    qkv_tensor *table = qkv_requires_grad_(qkv_zeros(QKV_F32, S(V, D)), true);
    qkv_tensor *g = qkv_rand(QKV_F32, S(R, D), &gen);
    qkv_tensor *index = i64(S(R), idx);
    float *grads[2];
    int threads[2] = {1, 4};
    for (int k = 0; k < 2; k++) {
        qkv_set_num_threads(threads[k]);
        qkv_zero_grad(table);
        assert_true(qkv_backward_with(qkv_index_select(table, 0, index), g, false));
        grads[k] = qkv_data(qkv_clone(table->grad));
    }
    qkv_set_num_threads(0);
    assert_memory_equal(grads[0], grads[1], sizeof(float) * V * D);
    const float *gd = qkv_data(g);
    for (int d = 0; d < D; d++) {
        float sum = 0;
        for (int r = 0; r < R; r++)
            if (idx[r] == 3) sum += gd[r * D + d];
        assert_true(grads[0][3 * D + d] == sum);
        assert_true(grads[0][40 * D + d] == 0);
    }
}

/* ---- gather ------------------------------------------------------------------------------ */

static void gather_along_axis_1_with_wider_index(void **state) {
    (void)state;
    qkv_tensor *a = leaf(S(3, 4), gat1_in0);
    qkv_tensor *out = qkv_gather(a, 1, i64(S(3, 5), gat1_idx));
    assert_close(out, S(3, 5), gat1_out, EXACT);
    assert_string_equal(qkv_grad_fn_name(out), "gather");
    backward(out, gat1_w);
    assert_close(a->grad, S(3, 4), gat1_grad0, GRAD_TOL);
}

static void gather_along_axis_0(void **state) {
    (void)state;
    qkv_tensor *a = leaf(S(4, 3), gat0_in0);
    qkv_tensor *out = qkv_gather(a, 0, i64(S(2, 3), gat0_idx));
    assert_close(out, S(2, 3), gat0_out, EXACT);
    backward(out, gat0_w);
    assert_close(a->grad, S(4, 3), gat0_grad0, GRAD_TOL);
}

static void gather_reads_transposed_source(void **state) {
    (void)state;
    float at[12];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++) at[j * 4 + i] = gat0_in0[i * 3 + j];
    qkv_tensor *a = qkv_transpose(f32(S(3, 4), at), 0, 1);
    assert_false(qkv_is_contiguous(a));
    qkv_tensor *out = qkv_gather(a, 0, i64(S(2, 3), gat0_idx));
    assert_close(out, S(2, 3), gat0_out, EXACT);
}

/* ---- concat, stack ----------------------------------------------------------------------- */

static void concat_three_tensors_along_axis_0(void **state) {
    (void)state;
    qkv_tensor *ts[3] = {leaf(S(2, 3), cat0_in0), leaf(S(1, 3), cat0_in1),
                         leaf(S(3, 3), cat0_in2)};
    qkv_tensor *out = qkv_concat(3, ts, 0);
    assert_close(out, S(6, 3), cat0_out, EXACT);
    assert_string_equal(qkv_grad_fn_name(out), "concat");
    backward(out, cat0_w);
    assert_close(ts[0]->grad, S(2, 3), cat0_grad0, EXACT);
    assert_close(ts[1]->grad, S(1, 3), cat0_grad1, EXACT);
    assert_close(ts[2]->grad, S(3, 3), cat0_grad2, EXACT);
}

static void concat_three_tensors_along_last_axis(void **state) {
    (void)state;
    qkv_tensor *ts[3] = {leaf(S(2, 1), catm1_in0), leaf(S(2, 3), catm1_in1),
                         leaf(S(2, 2), catm1_in2)};
    qkv_tensor *out = qkv_concat(3, ts, -1);
    assert_close(out, S(2, 6), catm1_out, EXACT);
    backward(out, catm1_w);
    assert_close(ts[0]->grad, S(2, 1), catm1_grad0, EXACT);
    assert_close(ts[1]->grad, S(2, 3), catm1_grad1, EXACT);
    assert_close(ts[2]->grad, S(2, 2), catm1_grad2, EXACT);
}

static void stack_three_tensors_along_axis_0(void **state) {
    (void)state;
    qkv_tensor *ts[3] = {leaf(S(2, 3), stk0_in0), leaf(S(2, 3), stk0_in1),
                         leaf(S(2, 3), stk0_in2)};
    qkv_tensor *out = qkv_stack(3, ts, 0);
    assert_close(out, S(3, 2, 3), stk0_out, EXACT);
    assert_string_equal(qkv_grad_fn_name(out), "stack");
    backward(out, stk0_w);
    assert_close(ts[0]->grad, S(2, 3), stk0_grad0, EXACT);
    assert_close(ts[1]->grad, S(2, 3), stk0_grad1, EXACT);
    assert_close(ts[2]->grad, S(2, 3), stk0_grad2, EXACT);
}

static void stack_three_tensors_along_last_axis(void **state) {
    (void)state;
    qkv_tensor *ts[3] = {leaf(S(2, 3), stkm1_in0), leaf(S(2, 3), stkm1_in1),
                         leaf(S(2, 3), stkm1_in2)};
    /* The middle input is a transposed view: stacking reads it through its strides. */
    qkv_tensor *mid = qkv_transpose(qkv_contiguous(qkv_transpose(ts[1], 0, 1)), 0, 1);
    qkv_tensor *out = qkv_stack(3, (qkv_tensor *[]){ts[0], mid, ts[2]}, -1);
    assert_close(out, S(2, 3, 3), stkm1_out, EXACT);
    backward(out, stkm1_w);
    assert_close(ts[0]->grad, S(2, 3), stkm1_grad0, EXACT);
    assert_close(ts[1]->grad, S(2, 3), stkm1_grad1, EXACT);
    assert_close(ts[2]->grad, S(2, 3), stkm1_grad2, EXACT);
}

/* ---- one_hot ----------------------------------------------------------------------------- */

static void one_hot_marks_each_class(void **state) {
    (void)state;
    qkv_tensor *out = qkv_one_hot(i64(S(3, 2), hot_idx), 3);
    assert_i64(out, S(3, 2, 3), hot_out);
    assert_null(qkv_grad_fn_name(out));
}

/* ---- Errors ------------------------------------------------------------------------------ */

static void index_select_rejects_index_past_the_end(void **state) {
    (void)state;
    qkv_tensor *a = f32(S(5, 3), sel0_in0);
    assert_null(qkv_index_select(a, 0, i64(S(2), ((const int64_t[]){4, 5}))));
    assert_string_equal(qkv_error(), "qkv_index_select: index 5 out of range for axis 0 of "
                                     "size 5 (input [5,3], index [2])");
}

static void index_select_rejects_negative_index(void **state) {
    (void)state;
    qkv_tensor *a = f32(S(5, 3), sel0_in0);
    assert_null(qkv_index_select(a, -1, i64(S(1, 1), ((const int64_t[]){-1}))));
    assert_string_equal(qkv_error(), "qkv_index_select: index -1 out of range for axis 1 of "
                                     "size 3 (input [5,3], index [1,1])");
}

static void index_select_rejects_float_index(void **state) {
    (void)state;
    qkv_tensor *a = f32(S(5, 3), sel0_in0);
    assert_null(qkv_index_select(a, 0, qkv_zeros(QKV_F32, S(2))));
    assert_string_equal(qkv_error(), "qkv_index_select: index must be i64, not f32");
}

static void gather_rejects_index_past_the_end(void **state) {
    (void)state;
    qkv_tensor *a = f32(S(3, 4), gat1_in0);
    assert_null(qkv_gather(a, 1, i64(S(1, 2), ((const int64_t[]){0, 4}))));
    assert_string_equal(qkv_error(), "qkv_gather: index 4 out of range for axis 1 of size 4 "
                                     "(input [3,4], index [1,2])");
}

static void gather_rejects_bool_index_and_wrong_rank(void **state) {
    (void)state;
    qkv_tensor *a = f32(S(3, 4), gat1_in0);
    assert_null(qkv_gather(a, 1, qkv_zeros(QKV_BOOL, S(3, 1))));
    assert_string_equal(qkv_error(), "qkv_gather: index must be i64, not bool");
    qkv_clear_error();
    assert_null(qkv_gather(a, 1, qkv_zeros(QKV_I64, S(4, 1))));
    assert_string_equal(qkv_error(), "qkv_gather: index [4,1] does not fit input [3,4] along "
                                     "axes other than 1");
}

static void concat_rejects_mismatched_shapes(void **state) {
    (void)state;
    qkv_tensor *ts[2] = {qkv_zeros(QKV_F32, S(2, 3)), qkv_zeros(QKV_F32, S(2, 4))};
    assert_null(qkv_concat(2, ts, 0));
    assert_string_equal(qkv_error(), "qkv_concat: tensor 1 has shape [2,4] but tensor 0 has "
                                     "[2,3]; sizes must match except along axis 0");
}

/* As torch.cat: f32 and f64 give f64, i64 and f32 give f32; each input's gradient comes
 * back in its own dtype. */
static void concat_promotes_mixed_dtypes(void **state) {
    (void)state;
    qkv_tensor *a = qkv_requires_grad_(qkv_full(QKV_F32, S(1, 2), 0.5), true);
    qkv_tensor *b = qkv_requires_grad_(qkv_full(QKV_F64, S(1, 2), 0.25), true);
    qkv_tensor *c = qkv_concat(2, (qkv_tensor *[]){a, b}, 0);
    assert_non_null(c);
    assert_int_equal(c->dtype, QKV_F64);
    assert_true(qkv_item(qkv_sum_all(c)) == 1.5);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(c, 3))));
    assert_int_equal(a->grad->dtype, QKV_F32);
    assert_int_equal(b->grad->dtype, QKV_F64);
    assert_true(qkv_item(qkv_sum_all(a->grad)) == 6 && qkv_item(qkv_sum_all(b->grad)) == 6);
    qkv_tensor *i = qkv_concat(2, (qkv_tensor *[]){qkv_ones(QKV_I64, S(2)),
                                                   qkv_full(QKV_F32, S(1), 0.5)}, 0);
    assert_int_equal(i->dtype, QKV_F32);
    assert_true(qkv_item(qkv_sum_all(i)) == 2.5);
}

static void stack_rejects_mismatched_shapes(void **state) {
    (void)state;
    qkv_tensor *ts[3] = {qkv_zeros(QKV_F32, S(2, 3)), qkv_zeros(QKV_F32, S(2, 3)),
                         qkv_zeros(QKV_F32, S(3, 2))};
    assert_null(qkv_stack(3, ts, 0));
    assert_string_equal(qkv_error(), "qkv_stack: tensor 2 has shape [3,2] but tensor 0 has "
                                     "[2,3]");
}

static void one_hot_rejects_index_out_of_range(void **state) {
    (void)state;
    assert_null(qkv_one_hot(i64(S(2), ((const int64_t[]){1, 3})), 3));
    assert_string_equal(qkv_error(), "qkv_one_hot: index 3 out of range [0, 3) (index [2])");
    qkv_clear_error();
    assert_null(qkv_one_hot(qkv_zeros(QKV_F32, S(2)), 3));
    assert_string_equal(qkv_error(), "qkv_one_hot: index must be i64, not f32");
}

/* NULL gives NULL, naming the op when no error is pending (then the first stays). */
static void null_inputs_give_null_naming_the_op(void **state) {
    (void)state;
    qkv_tensor *idx = i64(S(1), ((const int64_t[]){0}));
    assert_null(qkv_index_select(NULL, 0, idx));
    assert_string_equal(qkv_error(), "qkv_index_select: tensor argument 1 is NULL");
    qkv_clear_error();
    assert_null(qkv_gather(NULL, 0, idx));
    assert_string_equal(qkv_error(), "qkv_gather: tensor argument 1 is NULL");
    qkv_clear_error();
    assert_null(qkv_concat(2, (qkv_tensor *[]){idx, NULL}, 0));
    assert_string_equal(qkv_error(), "qkv_concat: tensors[1] is NULL");
    qkv_clear_error();
    assert_null(qkv_stack(2, (qkv_tensor *[]){NULL, idx}, 0));
    assert_string_equal(qkv_error(), "qkv_stack: tensors[0] is NULL");
    assert_null(qkv_one_hot(NULL, 3));
    assert_null(qkv_dropout(NULL, 0.5, true, NULL));
    assert_string_equal(qkv_error(), "qkv_stack: tensors[0] is NULL");
    qkv_clear_error();
}

/* ---- Dropout ----------------------------------------------------------------------------- */

enum { DROP_N = 100000 };

static qkv_tensor *dropout_input(qkv_dtype dtype) {
    qkv_generator g;
    qkv_generator_init(&g, 11);
    /* Uniform in [1, 2): no input is zero, so a zero in the output is a dropped element. */
    return qkv_requires_grad_(qkv_add_scalar(qkv_rand(dtype, S(DROP_N), &g), 1), true);
}

static void dropout_p0_is_an_identity_view(void **state) {
    (void)state;
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_tensor *out = qkv_dropout(a, 0.0, true, NULL);
    assert_non_null(out);
    assert_ptr_equal(qkv_data(out), qkv_data(a));
    assert_string_equal(qkv_grad_fn_name(out), "dropout");
    qkv_tensor *g = qkv_mul_scalar(qkv_detach(a), 3);
    assert_true(qkv_backward_with(out, g, false));
    assert_memory_equal(qkv_data(a->grad), qkv_data(g), sizeof(float) * DROP_N);
}

static void dropout_in_evaluation_is_the_identity(void **state) {
    (void)state;
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_generator gen;
    qkv_generator_init(&gen, 1);
    qkv_generator before = gen;
    qkv_tensor *out = qkv_dropout(a, 0.5, false, &gen);
    assert_ptr_equal(qkv_data(out), qkv_data(a));
    assert_int_equal(gen.state, before.state); /* nothing drawn */
    assert_true(qkv_backward(qkv_sum_all(out)));
    qkv_tensor *ones = qkv_ones(QKV_F32, S(DROP_N));
    assert_memory_equal(qkv_data(a->grad), qkv_data(ones), sizeof(float) * DROP_N);
}

static int64_t count_zeros(const float *v, int64_t n) {
    int64_t zeros = 0;
    for (int64_t i = 0; i < n; i++) zeros += v[i] == 0;
    return zeros;
}

/* The number dropped is Binomial(n, p): within 5 standard deviations of n p. */
static void dropout_drops_a_fraction_near_p(void **state) {
    (void)state;
    const double ps[3] = {0.1, 0.5, 0.9};
    qkv_generator gen;
    qkv_generator_init(&gen, 2024);
    for (int k = 0; k < 3; k++) {
        qkv_tensor *out = qkv_dropout(dropout_input(QKV_F32), ps[k], true, &gen);
        assert_non_null(out);
        double expected = DROP_N * ps[k], sd = sqrt(DROP_N * ps[k] * (1 - ps[k]));
        double zeros = (double)count_zeros(qkv_data(out), DROP_N);
        if (fabs(zeros - expected) > 5 * sd)
            fail_msg("p=%g: %g zeros, expected %g +- %g", ps[k], zeros, expected, 5 * sd);
    }
}

static void dropout_scales_kept_values_by_one_over_keep_probability(void **state) {
    (void)state;
    qkv_generator gen;
    qkv_generator_init(&gen, 3);
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_tensor *out = qkv_dropout(a, 0.3, true, &gen);
    assert_non_null(out);
    const float *x = qkv_data(a), *y = qkv_data(out);
    float scale = (float)(1.0 / 0.7);
    for (int64_t i = 0; i < DROP_N; i++) assert_true(y[i] == 0 || y[i] == x[i] * scale);

    qkv_tensor *a64 = dropout_input(QKV_F64);
    qkv_tensor *out64 = qkv_dropout(a64, 0.3, true, &gen);
    const double *x64 = qkv_data(a64), *y64 = qkv_data(out64);
    for (int64_t i = 0; i < DROP_N; i++)
        assert_true(y64[i] == 0 || y64[i] == x64[i] * (1.0 / 0.7));
}

static void dropout_gradient_is_mask_over_keep_probability(void **state) {
    (void)state;
    qkv_generator gen;
    qkv_generator_init(&gen, 4);
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_tensor *out = qkv_dropout(a, 0.25, true, &gen);
    assert_true(qkv_backward(qkv_sum_all(out)));
    const float *y = qkv_data(out), *grad = qkv_data(a->grad);
    for (int64_t i = 0; i < DROP_N; i++)
        assert_true(grad[i] == (y[i] == 0 ? 0.0f : (float)(1.0 / 0.75)));
}

/* The mask is qkv_rand's F32 uniform stream compared with p: kept where u >= p. */
static void dropout_mask_is_uniform_draws_at_least_p(void **state) {
    (void)state;
    qkv_generator g1, g2;
    qkv_generator_init(&g1, 9);
    qkv_generator_init(&g2, 9);
    qkv_tensor *out = qkv_dropout(dropout_input(QKV_F32), 0.4, true, &g1);
    const float *u = qkv_data(qkv_rand(QKV_F32, S(DROP_N), &g2));
    const float *y = qkv_data(out);
    for (int64_t i = 0; i < DROP_N; i++) assert_true((y[i] != 0) == ((double)u[i] >= 0.4));
    assert_int_equal(g1.state, g2.state);
}

static void dropout_same_seed_gives_same_mask(void **state) {
    (void)state;
    qkv_generator g1, g2, g3;
    qkv_generator_init(&g1, 77);
    qkv_generator_init(&g2, 77);
    qkv_generator_init(&g3, 78);
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_tensor *o1 = qkv_dropout(a, 0.5, true, &g1), *o2 = qkv_dropout(a, 0.5, true, &g2);
    qkv_tensor *o3 = qkv_dropout(a, 0.5, true, &g3);
    assert_memory_equal(qkv_data(o1), qkv_data(o2), sizeof(float) * DROP_N);
    assert_memory_not_equal(qkv_data(o1), qkv_data(o3), sizeof(float) * DROP_N);
}

/* qkv_dropout_ overwrites a fresh, unshared input and gives qkv_dropout's values and
 * gradient; anything else can still read its input, so it is not overwritten. */
static void dropout_in_place_only_over_a_tensor_nothing_else_reads(void **state) {
    (void)state;
    qkv_generator g1, g2;
    qkv_generator_init(&g1, 77);
    qkv_generator_init(&g2, 77);
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_tensor *fresh = qkv_mul_scalar(a, 2);
    void *fresh_data = qkv_data(fresh);
    qkv_tensor *in_place = qkv_dropout_(fresh, 0.5, true, &g1);
    qkv_tensor *copied = qkv_dropout(qkv_mul_scalar(a, 2), 0.5, true, &g2);
    assert_ptr_equal(qkv_data(in_place), fresh_data);
    assert_memory_equal(qkv_data(in_place), qkv_data(copied), sizeof(float) * DROP_N);
    assert_true(qkv_backward(qkv_sum_all(qkv_add(in_place, copied))));
    float *grad = qkv_data(a->grad);
    const float *out = qkv_data(copied);
    for (int i = 0; i < DROP_N; i++) assert_true(grad[i] == (out[i] == 0 ? 0.0f : 8.0f));
    /* held twice, viewed, or a leaf parameter: left alone */
    qkv_tensor *held = qkv_retain(qkv_mul_scalar(a, 2));
    qkv_tensor *viewed = qkv_mul_scalar(a, 2);
    qkv_tensor *view = qkv_reshape(viewed, S(DROP_N / 10, 10));
    qkv_tensor *inputs[] = {held, viewed, a};
    for (int k = 0; k < 3; k++) {
        qkv_tensor *before = qkv_clone(inputs[k]);
        qkv_tensor *out_k = qkv_dropout_(inputs[k], 0.5, true, &g1);
        assert_non_null(out_k);
        assert_ptr_not_equal(qkv_data(out_k), qkv_data(inputs[k]));
        assert_memory_equal(qkv_data(before), qkv_data(inputs[k]), sizeof(float) * DROP_N);
    }
    assert_non_null(view);
    qkv_release(held);
}

/* The backward multiplies its incoming gradient in place only when the dropout's node alone
 * holds it: in dropout(x1) * c + dropout(x2), the product's backward hands the first a
 * gradient of its own (seed * c), the sum's hands the second the caller's seed, which must
 * come out unchanged. Each input's gradient is what it receives times its factors. */
static void dropout_backward_overwrites_only_a_gradient_nothing_else_holds(void **state) {
    (void)state;
    qkv_generator g1, g2, gen;
    qkv_generator_init(&g1, 21);
    qkv_generator_init(&g2, 22);
    qkv_generator_init(&gen, 23);
    qkv_tensor *x1 = dropout_input(QKV_F32), *x2 = dropout_input(QKV_F32);
    qkv_tensor *c = qkv_rand(QKV_F32, S(DROP_N), &gen), *seed = qkv_rand(QKV_F32, S(DROP_N), &gen);
    qkv_tensor *seed_before = qkv_clone(seed);
    qkv_tensor *d1 = qkv_dropout(x1, 0.5, true, &g1), *d2 = qkv_dropout(x2, 0.5, true, &g2);
    assert_true(qkv_backward_with(qkv_add(qkv_mul(d1, c), d2), seed, false));
    assert_memory_equal(qkv_data(seed), qkv_data(seed_before), sizeof(float) * DROP_N);
    const float *y1 = qkv_data(d1), *y2 = qkv_data(d2), *cv = qkv_data(c), *sv = qkv_data(seed);
    const float *grad1 = qkv_data(x1->grad), *grad2 = qkv_data(x2->grad);
    for (int64_t i = 0; i < DROP_N; i++) {
        assert_true(grad1[i] == sv[i] * cv[i] * (y1[i] == 0 ? 0.0f : 2.0f));
        assert_true(grad2[i] == sv[i] * (y2[i] == 0 ? 0.0f : 2.0f));
    }
}

static void dropout_p1_gives_zeros_and_zero_gradient(void **state) {
    (void)state;
    qkv_generator gen;
    qkv_generator_init(&gen, 6);
    qkv_tensor *a = dropout_input(QKV_F32);
    qkv_tensor *out = qkv_dropout(a, 1.0, true, &gen);
    assert_int_equal(count_zeros(qkv_data(out), DROP_N), DROP_N);
    assert_true(qkv_backward(qkv_sum_all(out)));
    assert_int_equal(count_zeros(qkv_data(a->grad), DROP_N), DROP_N);
}

static void dropout_reads_transposed_input_in_row_major_order(void **state) {
    (void)state;
    qkv_generator g1, g2;
    qkv_generator_init(&g1, 8);
    qkv_generator_init(&g2, 8);
    qkv_tensor *a = qkv_transpose(qkv_reshape(dropout_input(QKV_F32), S(100, 1000)), 0, 1);
    qkv_tensor *strided = qkv_dropout(a, 0.5, true, &g1);
    qkv_tensor *packed = qkv_dropout(qkv_contiguous(a), 0.5, true, &g2);
    assert_memory_equal(qkv_data(strided), qkv_data(packed), sizeof(float) * DROP_N);
}

/* x * factor in dtype's arithmetic into out[i]: bf16 multiplied in f32 and rounded. */
static void scaled_element(qkv_dtype dtype, const void *x, int64_t i, double factor, void *out) {
    if (dtype == QKV_F32)
        ((float *)out)[i] = ((const float *)x)[i] * (float)factor;
    else if (dtype == QKV_F64)
        ((double *)out)[i] = ((const double *)x)[i] * factor;
    else
        ((uint16_t *)out)[i] =
            qkv_f32_to_bf16(qkv_bf16_to_f32(((const uint16_t *)x)[i]) * (float)factor);
}

/* Normal values with a -0, an infinity and a NaN among them, in dtype. */
static qkv_tensor *dropout_values(qkv_dtype dtype, int64_t n, qkv_generator *g) {
    qkv_tensor *v = qkv_randn(QKV_F32, S(n), g);
    float *d = qkv_data(v);
    const float special[3] = {-0.0f, -INFINITY, NAN};
    for (int k = 0; k < 3; k++) d[(k * 5 + 3) % n] = special[k];
    return qkv_to_dtype(v, dtype);
}

/* One dropout of n elements of dtype and its gradient, against the documented rule applied one
 * draw at a time: element i is kept when (draw_i >> 8) >= ceil(p 2^24), draw_i being the i-th
 * qkv_generator_next_u32 of the generator; the output is x_i * (1 / (1 - p)) for a kept
 * element and x_i * 0 for a dropped one (-0 for a negative x_i, NaN for an infinite one), and
 * the gradient g_i times the same factor. Bit for bit, and the generator left n draws on. */
static void check_dropout_against_draws(qkv_dtype dtype, int64_t n, double p, uint64_t seed) {
    qkv_generator gen, ref;
    qkv_generator_init(&gen, seed);
    qkv_tensor *x = qkv_requires_grad_(dropout_values(dtype, n, &gen), true);
    qkv_tensor *grad_out = dropout_values(dtype, n, &gen);
    ref = gen;
    qkv_tensor *out = qkv_dropout(x, p, true, &gen);
    assert_true(qkv_backward_with(out, grad_out, false));
    size_t bytes = (size_t)n * qkv_dtype_size(dtype);
    char *want_out = malloc(bytes), *want_grad = malloc(bytes);
    uint32_t threshold = (uint32_t)ceil(p * 16777216.0);
    double scale = 1.0 / (1.0 - p);
    for (int64_t i = 0; i < n; i++) {
        bool kept = qkv_generator_next_u32(&ref) >> 8 >= threshold;
        scaled_element(dtype, qkv_data(x), i, kept ? scale : 0.0, want_out);
        scaled_element(dtype, qkv_data(grad_out), i, kept ? scale : 0.0, want_grad);
    }
    if (memcmp(qkv_data(out), want_out, bytes) != 0 ||
        memcmp(qkv_data(x->grad), want_grad, bytes) != 0)
        fail_msg("dtype %d, n=%lld, p=%g: not the reference's bits", (int)dtype, (long long)n, p);
    assert_memory_equal(&gen, &ref, sizeof gen);
    free(want_out);
    free(want_grad);
}

/* Lengths around the kernel's vectors (8 and 16 elements), the words of its saved mask (64)
 * and its blocks (16384), in f32, f64 and bf16, on 1 and 4 threads. */
static void dropout_is_the_documented_rule_for_every_length_and_dtype(void **state) {
    (void)state;
    const int64_t lengths[] = {1, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 100, 1000, 16383,
                               16385, 4 * 16384 + 37};
    const qkv_dtype dtypes[3] = {QKV_F32, QKV_F64, QKV_BF16};
    const double ps[2] = {0.1, 0.5};
    const int threads[2] = {1, 4};
    for (int t = 0; t < 2; t++) {
        qkv_set_num_threads(threads[t]);
        for (int d = 0; d < 3; d++)
            for (int k = 0; k < N_OF(lengths); k++)
                for (int q = 0; q < 2; q++) {
                    qkv_scope_begin();
                    check_dropout_against_draws(dtypes[d], lengths[k], ps[q], 100 + (uint64_t)k);
                    qkv_scope_end();
                }
    }
    qkv_set_num_threads(0);
}

static void dropout_rejects_p_outside_unit_interval(void **state) {
    (void)state;
    qkv_generator gen;
    qkv_generator_init(&gen, 1);
    qkv_tensor *a = dropout_input(QKV_F32);
    assert_null(qkv_dropout(a, 1.5, true, &gen));
    assert_string_equal(qkv_error(), "qkv_dropout: p must be in [0, 1], not 1.5");
    qkv_clear_error();
    assert_null(qkv_dropout(a, -0.25, false, &gen));
    assert_string_equal(qkv_error(), "qkv_dropout: p must be in [0, 1], not -0.25");
    qkv_clear_error();
    assert_null(qkv_dropout(a, NAN, true, &gen));
    assert_string_equal(qkv_error(), "qkv_dropout: p must be in [0, 1], not nan");
}

/* ---- Gradient checks (F64, central differences) ------------------------------------------ */

typedef struct index_args {
    int axis;
    const qkv_tensor *index;
} index_args;

static qkv_tensor *select_fn(qkv_tensor *const *in, int n, void *ctx) {
    const index_args *c = ctx;
    return qkv_index_select(in[0], c->axis, c->index);
}

static qkv_tensor *select_transposed_fn(qkv_tensor *const *in, int n, void *ctx) {
    const index_args *c = ctx;
    return qkv_index_select(qkv_transpose(in[0], 0, 1), c->axis, c->index);
}

static qkv_tensor *gather_fn(qkv_tensor *const *in, int n, void *ctx) {
    const index_args *c = ctx;
    return qkv_gather(in[0], c->axis, c->index);
}

static qkv_tensor *concat_fn(qkv_tensor *const *in, int n, void *ctx) {
    return qkv_concat(n, in, *(const int *)ctx);
}

static qkv_tensor *stack_fn(qkv_tensor *const *in, int n, void *ctx) {
    return qkv_stack(n, in, *(const int *)ctx);
}

static qkv_tensor *randn64(qkv_generator *g, int ndim, const int64_t *shape) {
    return qkv_requires_grad_(qkv_randn(QKV_F64, ndim, shape, g), true);
}

static void gradcheck(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx) {
    if (!qkv_gradcheck(fn, inputs, n, ctx, 1e-6, 1e-8, 1e-6)) fail_msg("%s", qkv_error());
}

static void index_select_passes_gradcheck(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 21);
    qkv_tensor *a = randn64(&g, S(5, 3));
    index_args rows = {0, i64(S(2, 3), ((const int64_t[]){4, 0, 4, 2, 0, 4}))};
    gradcheck(select_fn, &a, 1, &rows);
    index_args cols = {-1, i64(S(4), ((const int64_t[]){2, 2, 0, 1}))};
    gradcheck(select_fn, &a, 1, &cols);
    gradcheck(select_transposed_fn, &a, 1, &cols);
}

static void gather_passes_gradcheck(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 22);
    qkv_tensor *a = randn64(&g, S(3, 4));
    index_args along1 = {1, i64(S(3, 5), gat1_idx)};
    gradcheck(gather_fn, &a, 1, &along1);
    qkv_tensor *b = randn64(&g, S(4, 3));
    index_args along0 = {0, i64(S(2, 3), gat0_idx)};
    gradcheck(gather_fn, &b, 1, &along0);
}

static void concat_and_stack_pass_gradcheck(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 23);
    qkv_tensor *cat[3] = {randn64(&g, S(2, 1)), randn64(&g, S(2, 3)), randn64(&g, S(2, 2))};
    int last = -1, first = 0;
    gradcheck(concat_fn, cat, 3, &last);
    qkv_tensor *stk[3] = {randn64(&g, S(2, 3)), randn64(&g, S(2, 3)), randn64(&g, S(2, 3))};
    gradcheck(stack_fn, stk, 3, &first);
    gradcheck(stack_fn, stk, 3, &last);
}

/* ---- Allocation failure ------------------------------------------------------------------ */

/* Forward and backward of every op of this suite on small inputs. */
static bool index_ops_with_backward(void) {
    qkv_tensor *a = qkv_requires_grad_(qkv_ones(QKV_F32, S(4, 3)), true);
    qkv_tensor *idx = qkv_from_array(QKV_I64, S(2, 2), (const int64_t[]){3, 0, 3, 1});
    qkv_tensor *sel = qkv_sum_all(qkv_index_select(qkv_transpose(a, 0, 1), 1, idx));
    qkv_tensor *gat = qkv_sum_all(qkv_gather(a, 0, idx));
    qkv_tensor *parts[3] = {a, a, a};
    qkv_tensor *cat = qkv_sum_all(qkv_concat(3, parts, 1));
    qkv_tensor *stk = qkv_sum_all(qkv_stack(3, parts, 0));
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_tensor *drop = qkv_sum_all(qkv_dropout(a, 0.5, true, &g));
    qkv_tensor *hot = qkv_one_hot(idx, 4);
    qkv_tensor *loss = qkv_add(qkv_add(qkv_add(sel, gat), qkv_add(cat, stk)), drop);
    bool ok = hot && qkv_backward(loss);
    qkv_zero_grad(a);
    return ok;
}

static void index_ops_survive_every_allocation_failure(void **state) {
    (void)state;
    assert_every_allocation_failure_is_clean_in_a_scope(index_ops_with_backward());
}

#define T(name) cmocka_unit_test_setup_teardown(name, open_scope, close_scope)

int main(void) {
    const struct CMUnitTest tests[] = {
        T(index_select_repeated_index_accumulates_gradient),
        T(index_select_2d_index_along_axis_1),
        T(index_select_along_last_axis),
        T(index_select_reads_transposed_source_in_place),
        T(index_select_accepts_transposed_index),
        T(index_select_copies_i64_and_bool_sources),
        T(index_select_gradient_is_the_same_for_any_thread_count),
        T(gather_along_axis_1_with_wider_index),
        T(gather_along_axis_0),
        T(gather_reads_transposed_source),
        T(concat_three_tensors_along_axis_0),
        T(concat_three_tensors_along_last_axis),
        T(stack_three_tensors_along_axis_0),
        T(stack_three_tensors_along_last_axis),
        T(one_hot_marks_each_class),
        T(index_select_rejects_index_past_the_end),
        T(index_select_rejects_negative_index),
        T(index_select_rejects_float_index),
        T(gather_rejects_index_past_the_end),
        T(gather_rejects_bool_index_and_wrong_rank),
        T(concat_rejects_mismatched_shapes),
        T(concat_promotes_mixed_dtypes),
        T(stack_rejects_mismatched_shapes),
        T(one_hot_rejects_index_out_of_range),
        T(null_inputs_give_null_naming_the_op),
        T(dropout_p0_is_an_identity_view),
        T(dropout_in_evaluation_is_the_identity),
        T(dropout_drops_a_fraction_near_p),
        T(dropout_scales_kept_values_by_one_over_keep_probability),
        T(dropout_gradient_is_mask_over_keep_probability),
        T(dropout_mask_is_uniform_draws_at_least_p),
        T(dropout_same_seed_gives_same_mask),
        T(dropout_in_place_only_over_a_tensor_nothing_else_reads),
        T(dropout_backward_overwrites_only_a_gradient_nothing_else_holds),
        T(dropout_p1_gives_zeros_and_zero_gradient),
        T(dropout_reads_transposed_input_in_row_major_order),
        T(dropout_is_the_documented_rule_for_every_length_and_dtype),
        T(dropout_rejects_p_outside_unit_interval),
        T(index_select_passes_gradcheck),
        T(gather_passes_gradcheck),
        T(concat_and_stack_pass_gradcheck),
        T(index_ops_survive_every_allocation_failure),
    };
    return cmocka_run_group_tests_name("index", tests, NULL, NULL);
}
