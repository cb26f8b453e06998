/* Reductions and softmax against torch: one axis (negative too), several axes, all elements,
 * keepdim, strided inputs, a wide matrix reduced over its leading axis, huge and NaN values,
 * softmax and log_softmax along each axis. Cases come from tests/fixtures/gen_reduce.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "qkv.h"
#include "fixtures/reduce_fixtures.h"
#include "harness.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static qkv_tensor *apply_view(qkv_tensor *t, char view) {
    if (view == 'p') return qkv_permute(t, (const int[]){2, 0, 1});
    if (view == 't') return qkv_transpose(t, -2, -1);
    return t;
}

/* The op a case names, called through the API that fits its axes. */
static qkv_tensor *run(const fx_reduce *c, const qkv_tensor *a) {
    const char *op = c->op;
    bool all = c->naxes < 0, one = c->naxes == 1, keep = c->keepdim;
    int ax = c->axes[0];
    if (!strcmp(op, "sum"))
        return all ? qkv_sum_all(a) : one ? qkv_sum(a, ax, keep)
                                          : qkv_sum_axes(a, c->naxes, c->axes, keep);
    if (!strcmp(op, "mean"))
        return all ? qkv_mean_all(a) : one ? qkv_mean(a, ax, keep)
                                           : qkv_mean_axes(a, c->naxes, c->axes, keep);
    if (!strncmp(op, "var", 3)) {
        double correction = op[3] == '1' ? 1 : 0;
        return one ? qkv_var(a, ax, correction, keep)
                   : qkv_var_axes(a, c->naxes, c->axes, correction, keep);
    }
    if (!strcmp(op, "max"))
        return all ? qkv_max_all(a) : one ? qkv_max(a, ax, keep)
                                          : qkv_max_axes(a, c->naxes, c->axes, keep);
    if (!strcmp(op, "min"))
        return all ? qkv_min_all(a) : one ? qkv_min(a, ax, keep)
                                          : qkv_min_axes(a, c->naxes, c->axes, keep);
    if (!strcmp(op, "argmax")) return qkv_argmax(a, ax, keep);
    if (!strcmp(op, "argmin")) return qkv_argmin(a, ax, keep);
    if (!strcmp(op, "softmax")) return qkv_softmax(a, ax);
    if (!strcmp(op, "log_softmax")) return qkv_log_softmax(a, ax);
    fail_msg("unknown op %s", op);
    return NULL;
}

/* Runs every case whose op starts with prefix. Sums accumulate in double here and in float
 * (pairwise) in torch, so float32 allows a few ulps of the summands' scale. */
static void check(const char *prefix, int at_least) {
    int n = 0;
    for (size_t i = 0; i < N_OF(fx_reduce_cases); i++) {
        const fx_reduce *c = &fx_reduce_cases[i];
        if (strncmp(c->op, prefix, strlen(prefix))) continue;
        if (!strcmp(prefix, "max") || !strcmp(prefix, "min")) {
            if (c->op[3] != '\0') continue;
        }
        qkv_tensor *a = apply_view(fx_make(&c->a, c->dtype), c->view);
        char what[160];
        snprintf(what, sizeof what, "%s, %s (%s)", c->op, c->what, qkv_dtype_name(c->dtype));
        double tol = c->dtype == QKV_F32 ? 1e-5 : 1e-12;
        fx_assert_close(run(c, a), c->dout, &c->out, tol, tol, what);
        n++;
    }
    assert_true(n >= at_least);
    assert_null(qkv_error());
}

static void sum_matches_torch(void **state) { (void)state; check("sum", 30); }
static void mean_matches_torch(void **state) { (void)state; check("mean", 25); }
static void var_matches_torch(void **state) { (void)state; check("var", 40); }
static void max_matches_torch(void **state) { (void)state; check("max", 20); }
static void min_matches_torch(void **state) { (void)state; check("min", 20); }
static void argmax_matches_torch(void **state) { (void)state; check("argmax", 20); }
static void argmin_matches_torch(void **state) { (void)state; check("argmin", 20); }
static void softmax_matches_torch(void **state) { (void)state; check("softmax", 14); }
static void log_softmax_matches_torch(void **state) { (void)state; check("log_softmax", 14); }

/* ---- a wide matrix over its leading axis ------------------------------------------------- */

/* [300,257] with values k/64 for integers k in [-500, 500): every sum is exact in float32. */
static qkv_tensor *wide(void) {
    qkv_tensor *t = qkv_empty(QKV_F32, QKV_SHAPE(300, 257));
    float *d = qkv_data(t);
    for (int64_t i = 0; i < 300 * 257; i++) d[i] = (float)((i * 7919 % 1000) - 500) / 64;
    return t;
}

static void leading_axis_reductions_of_wide_matrix(void **state) {
    (void)state;
    qkv_tensor *w = wide();
    fx_assert_close(qkv_sum(w, 0, false), QKV_F32, &fx_wide_sum, 0, 0, "sum over axis 0");
    fx_assert_tensor(qkv_mean(w, 0, false), QKV_F32, &fx_wide_mean, "mean over axis 0");
    fx_assert_close(qkv_var(w, 0, 1, false), QKV_F32, &fx_wide_var1, 1e-5, 0, "var over axis 0");
    fx_assert_close(qkv_max(w, 0, false), QKV_F32, &fx_wide_max, 0, 0, "max over axis 0");
    fx_assert_close(qkv_argmin(w, -2, false), QKV_I64, &fx_wide_argmin, 0, 0, "argmin, axis 0");
    fx_assert_close(qkv_sum(w, 1, false), QKV_F32, &fx_wide_sum_axis1, 0, 0, "sum over axis 1");
    /* The same reduction of a transposed view reads the other way through memory. */
    qkv_tensor *wt = qkv_contiguous(qkv_transpose(w, 0, 1));
    fx_assert_close(qkv_sum(qkv_transpose(wt, 0, 1), 0, false), QKV_F32, &fx_wide_sum, 0, 0,
                    "sum over axis 0 of a transposed copy");
}

/* Over a middle axis whose kept inner run is contiguous (grouped attention's heads summed
 * back): every output is its inputs added in order in double, rounded once, as the general
 * path does, for runs in one piece and split over [2,3] outer positions. */
static void sum_over_a_middle_axis_adds_in_order(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *x = qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 5, 40), &g);
    const float *d = qkv_data(x);
    float got[2 * 3 * 40];
    assert_true(qkv_copy_out(qkv_sum(x, 2, false), QKV_F32, got));
    for (int64_t o = 0; o < 6; o++)
        for (int64_t j = 0; j < 40; j++) {
            double s = 0;
            for (int64_t k = 0; k < 5; k++) s += d[(o * 5 + k) * 40 + j];
            assert_true(got[o * 40 + j] == (float)s);
        }
    float mean[40];
    assert_true(qkv_copy_out(qkv_mean_axes(x, 3, (const int[]){0, 1, 2}, false), QKV_F32, mean));
    for (int64_t j = 0; j < 40; j++) {
        double s = 0;
        for (int64_t k = 0; k < 30; k++) s += d[k * 40 + j];
        assert_true(mean[j] == (float)(s * (1.0 / 30)));
    }
}

static void reductions_do_not_depend_on_thread_count(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 11);
    qkv_tensor *x = qkv_randn(QKV_F32, QKV_SHAPE(600, 257), &g);
    qkv_tensor *r[2][4];
    for (int k = 0; k < 2; k++) {
        qkv_set_num_threads(k + 1);
        r[k][0] = qkv_sum(x, 0, false);
        r[k][1] = qkv_var(x, 1, 1, false);
        r[k][2] = qkv_sum_all(x);
        r[k][3] = qkv_softmax(x, 0);
    }
    qkv_set_num_threads(0);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(r[0][i]->numel, r[1][i]->numel);
        assert_memory_equal(qkv_data(r[0][i]), qkv_data(r[1][i]),
                            (size_t)r[0][i]->numel * sizeof(float));
    }
}

/* ---- softmax edge cases ------------------------------------------------------------------ */

static void softmax_of_fully_masked_row_is_zero(void **state) {
    (void)state;
    for (int k = 0; k < 2; k++) {
        qkv_dtype dt = k ? QKV_F64 : QKV_F32;
        double x[6] = {-INFINITY, -INFINITY, -INFINITY, 0, 0, 0};
        qkv_tensor *t = qkv_to_dtype(qkv_from_array(QKV_F64, QKV_SHAPE(2, 3), x), dt);
        double y[6];
        assert_true(qkv_copy_out(qkv_softmax(t, 1), QKV_F64, y));
        for (int i = 0; i < 3; i++) assert_true(y[i] == 0);
        for (int i = 3; i < 6; i++) assert_true(fx_close(y[i], 1.0 / 3, 1e-7, 0));
        assert_true(qkv_copy_out(qkv_log_softmax(t, -1), QKV_F64, y));
        for (int i = 0; i < 3; i++) assert_true(y[i] == -INFINITY);
        for (int i = 3; i < 6; i++) assert_true(fx_close(y[i], -log(3.0), 1e-7, 0));
        /* Along axis 0 each column has one finite entry: no row is fully masked. */
        assert_true(qkv_copy_out(qkv_softmax(t, 0), QKV_F64, y));
        for (int i = 0; i < 3; i++) assert_true(y[i] == 0 && y[i + 3] == 1);
    }
}

static void softmax_of_huge_inputs_stays_finite(void **state) {
    (void)state;
    float x[4] = {1e4f, 1e4f, -1e4f, 3e38f};
    qkv_tensor *t = qkv_from_array(QKV_F32, QKV_SHAPE(4), x);
    float y[4];
    assert_true(qkv_copy_out(qkv_softmax(qkv_slice(t, 0, 0, 3, 1), 0), QKV_F32, y));
    assert_true(y[0] == 0.5f && y[1] == 0.5f && y[2] == 0);
    assert_true(qkv_copy_out(qkv_softmax(t, 0), QKV_F32, y));
    assert_true(y[0] == 0 && y[3] == 1);
}

/* ---- causal softmax ---------------------------------------------------------------------- */

/* Forward and the gradient of sum(out * gout), against torch's softmax of the masked-filled
 * scores (tests/fixtures/gen_reduce.py). */
static void causal_softmax_and_its_gradient_match_torch(void **state) {
    (void)state;
    for (size_t i = 0; i < N_OF(fx_causal_cases); i++) {
        const fx_causal *c = &fx_causal_cases[i];
        char what[96];
        snprintf(what, sizeof what, "causal softmax, %s (%s)", c->what,
                 qkv_dtype_name(c->dtype));
        qkv_tensor *x = qkv_requires_grad_(fx_make(&c->x, c->dtype), true);
        qkv_tensor *out = qkv_causal_softmax(x, c->past);
        double tol = c->dtype == QKV_F32 ? 1e-5 : 1e-12;
        fx_assert_close(out, c->dtype, &c->out, tol, tol, what);
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(out, fx_make(&c->gout, c->dtype)))));
        fx_assert_close(x->grad, c->dtype, &c->gin, tol, tol, what);
    }
    assert_true(N_OF(fx_causal_cases) >= 8);
    assert_null(qkv_error());
}

/* Scores [2,3,L,S] for the causal tests: every value distinct and of both signs. */
static qkv_tensor *causal_scores(int64_t L, int64_t S) {
    qkv_generator g;
    qkv_generator_init(&g, 5);
    return qkv_mul_scalar(qkv_randn(QKV_F32, QKV_SHAPE(2, 3, L, S), &g), 4);
}

/* The fused op is softmax(scores + mask) with the -inf term added, bit for bit, for square
 * scores, more queries than keys, a cached past, rows longer than a vector and rows whose last
 * live vector lies inside the row or runs past its end; its gradient equals the composed one
 * too. */
static void causal_softmax_is_the_masked_softmax_bit_for_bit(void **state) {
    (void)state;
    static const int64_t cases[][3] = {{7, 7, 0},   {9, 4, 0},   {3, 40, 30},
                                       {33, 33, 0}, {50, 50, 0}, {20, 70, 45}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int64_t L = cases[c][0], S = cases[c][1], past = cases[c][2];
        qkv_tensor *x = qkv_requires_grad_(causal_scores(L, S), true);
        qkv_tensor *rows = qkv_reshape(qkv_arange(QKV_I64, (double)past, (double)(past + L), 1),
                                       QKV_SHAPE(L, 1));
        qkv_tensor *cols = qkv_reshape(qkv_arange(QKV_I64, 0, (double)S, 1), QKV_SHAPE(1, S));
        qkv_tensor *term = qkv_masked_fill(qkv_zeros(QKV_F32, QKV_SHAPE(L, S)),
                                           qkv_gt(cols, rows), -INFINITY);
        qkv_tensor *want = qkv_softmax(qkv_add(x, term), -1), *got = qkv_causal_softmax(x, past);
        size_t bytes = (size_t)got->numel * sizeof(float);
        assert_memory_equal(qkv_data(got), qkv_data(want), bytes);
        qkv_tensor *w = qkv_mul_scalar(causal_scores(L, S), 0.5);
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(want, w))));
        qkv_tensor *gwant = qkv_contiguous(qkv_detach(x->grad));
        qkv_zero_grad(x);
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(got, w))));
        float *a = qkv_data(x->grad), *b = qkv_data(gwant);
        for (int64_t i = 0; i < got->numel; i++) assert_true(a[i] == b[i]);
    }
}

/* A NaN among a row's live scores makes the row NaN; one among its masked scores changes
 * nothing; live scores all -inf give zeros, as the masked softmax's fully masked row. */
static void causal_softmax_reads_no_masked_score(void **state) {
    (void)state;
    qkv_tensor *x = qkv_contiguous(causal_scores(40, 40));
    float *d = qkv_data(x);
    d[3 * 40 + 6] = NAN; /* row 3 sees keys 0..3 */
    d[20 * 40 + 7] = NAN;
    for (int j = 0; j <= 25; j++) d[25 * 40 + j] = -INFINITY;
    qkv_tensor *y = qkv_contiguous(qkv_causal_softmax(x, 0));
    const float *o = qkv_data(y);
    for (int j = 0; j < 40; j++) {
        assert_true(o[20 * 40 + j] != o[20 * 40 + j]);
        assert_true(o[25 * 40 + j] == 0);
    }
    float sum = 0;
    for (int j = 0; j < 40; j++) sum += o[3 * 40 + j];
    assert_true(fabsf(sum - 1) < 1e-6f && o[3 * 40 + 4] == 0 && o[3 * 40 + 6] == 0);
    assert_null(qkv_error());
}

/* bf16 scores give the f32 result rounded once, and under autocast the f32 result itself,
 * with the gradient rounded to bf16 for the bf16 input. */
static void causal_softmax_of_bf16_computes_in_f32(void **state) {
    (void)state;
    qkv_tensor *x = qkv_requires_grad_(qkv_to_dtype(causal_scores(20, 20), QKV_BF16), true);
    qkv_tensor *w = qkv_to_dtype(causal_scores(20, 20), QKV_BF16);
    qkv_tensor *wide = qkv_requires_grad_(qkv_to_dtype(qkv_detach(x), QKV_F32), true);
    qkv_tensor *want = qkv_causal_softmax(wide, 0);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(want, qkv_to_dtype(w, QKV_F32)))));
    qkv_tensor *y = qkv_causal_softmax(x, 0);
    assert_int_equal(y->dtype, QKV_BF16);
    size_t bf16_bytes = (size_t)x->numel * 2, f32_bytes = (size_t)x->numel * 4;
    assert_memory_equal(qkv_data(y), qkv_data(qkv_to_dtype(want, QKV_BF16)), bf16_bytes);
    assert_true(qkv_autocast_begin(QKV_BF16));
    qkv_tensor *z = qkv_causal_softmax(x, 0);
    qkv_autocast_end();
    assert_int_equal(z->dtype, QKV_F32);
    assert_memory_equal(qkv_data(z), qkv_data(want), f32_bytes);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(z, qkv_to_dtype(w, QKV_F32)))));
    assert_int_equal(x->grad->dtype, QKV_BF16);
    assert_memory_equal(qkv_data(x->grad), qkv_data(qkv_to_dtype(wide->grad, QKV_BF16)),
                        bf16_bytes);
    assert_null(qkv_error());
}

static void causal_softmax_does_not_depend_on_thread_count(void **state) {
    (void)state;
    qkv_tensor *x = qkv_requires_grad_(causal_scores(64, 64), true), *r[2], *gr[2];
    for (int k = 0; k < 2; k++) {
        qkv_set_num_threads(k + 1);
        r[k] = qkv_causal_softmax(x, 0);
        qkv_zero_grad(x);
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(r[k], causal_scores(64, 64)))));
        gr[k] = qkv_detach(x->grad);
    }
    qkv_set_num_threads(0);
    size_t bytes = (size_t)x->numel * sizeof(float);
    assert_memory_equal(qkv_data(r[0]), qkv_data(r[1]), bytes);
    assert_memory_equal(qkv_data(gr[0]), qkv_data(gr[1]), bytes);
}

static void causal_softmax_refuses_bad_input(void **state) {
    (void)state;
    assert_null(qkv_causal_softmax(NULL, 0));
    assert_non_null(qkv_error());
    qkv_clear_error();
    assert_null(qkv_causal_softmax(qkv_zeros(QKV_F32, QKV_SHAPE(5)), 0));
    assert_string_equal(qkv_error(), "qkv_causal_softmax: expected scores [..., L, S], got [5]");
    qkv_clear_error();
    assert_null(qkv_causal_softmax(qkv_zeros(QKV_F32, QKV_SHAPE(2, 2)), -1));
    assert_string_equal(qkv_error(), "qkv_causal_softmax: past -1 < 0");
}

/* ---- empty inputs and errors ------------------------------------------------------------- */

static void reductions_of_empty_tensors(void **state) {
    (void)state;
    qkv_tensor *e = qkv_zeros(QKV_F32, QKV_SHAPE(0, 3));
    qkv_tensor *s = qkv_sum(e, 0, false);
    assert_int_equal(s->ndim, 1);
    assert_int_equal(s->shape[0], 3);
    assert_true(qkv_get(s, (const int64_t[]){2}) == 0);
    assert_true(isnan(qkv_get(qkv_mean(e, 0, false), (const int64_t[]){0}))); /* as torch */
    qkv_tensor *r = qkv_sum(e, 1, true);
    assert_int_equal(r->shape[0], 0);
    assert_int_equal(r->shape[1], 1);
    assert_null(qkv_error());
    assert_null(qkv_max(e, 0, false));
    assert_string_equal(qkv_error(), "qkv_max: cannot take max over an empty dimension of [0,3]");
}

static void reduction_axis_errors_name_op_and_shape(void **state) {
    (void)state;
    qkv_tensor *x = qkv_zeros(QKV_F32, QKV_SHAPE(3, 4, 5));
    assert_null(qkv_sum(x, 3, false));
    assert_string_equal(qkv_error(), "qkv_sum: axis 3 out of range for [3,4,5]");
    qkv_clear_error();
    assert_null(qkv_mean(x, -4, true));
    assert_string_equal(qkv_error(), "qkv_mean: axis -4 out of range for [3,4,5]");
    qkv_clear_error();
    assert_null(qkv_sum_axes(x, 2, (const int[]){0, -3}, false));
    assert_string_equal(qkv_error(), "qkv_sum_axes: axis -3 appears twice");
    qkv_clear_error();
    assert_null(qkv_argmax(x, 5, false));
    assert_string_equal(qkv_error(), "qkv_argmax: axis 5 out of range for [3,4,5]");
    qkv_clear_error();
    assert_null(qkv_softmax(x, -4));
    assert_string_equal(qkv_error(), "qkv_softmax: axis -4 out of range for [3,4,5]");
}

static void full_reductions_give_zero_dimensional_tensors(void **state) {
    (void)state;
    qkv_tensor *x = qkv_reshape(qkv_arange(QKV_F64, 1, 7, 1), QKV_SHAPE(2, 3));
    qkv_tensor *s = qkv_sum_all(x);
    assert_int_equal(s->ndim, 0);
    assert_true(qkv_item(s) == 21);
    assert_true(qkv_item(qkv_mean_all(x)) == 3.5);
    assert_true(qkv_item(qkv_max_all(x)) == 6);
    assert_true(qkv_item(qkv_min_all(qkv_neg(x))) == -6);
    qkv_tensor *k = qkv_sum_axes(x, 2, (const int[]){0, 1}, true);
    assert_int_equal(k->ndim, 2);
    assert_int_equal(k->shape[0], 1);
    assert_int_equal(k->shape[1], 1);
    assert_int_equal(qkv_sum_all(qkv_ones(QKV_BOOL, QKV_SHAPE(4)))->dtype, QKV_I64);
}

/* A 0-d tensor has one axis for reductions, 0 or -1, as in torch (sum(-1), max(0) and its
 * gradient, softmax(-1)); axis 1 is out of range. */
static void zero_dimensional_tensors_reduce_over_axis_0_or_minus_1(void **state) {
    (void)state;
    qkv_tensor *z = qkv_requires_grad_(qkv_scalar(QKV_F64, 3), true);
    for (int axis = -1; axis <= 0; axis++) {
        qkv_tensor *s = qkv_sum(z, axis, false), *k = qkv_mean(z, axis, true);
        assert_non_null(s);
        assert_non_null(k);
        assert_int_equal(s->ndim, 0);
        assert_int_equal(k->ndim, 0);
        assert_true(qkv_item(s) == 3 && qkv_item(k) == 3);
        assert_true(qkv_item(qkv_argmax(z, axis, false)) == 0);
        assert_true(qkv_item(qkv_softmax(z, axis)) == 1);
        qkv_tensor *m = qkv_max(z, axis, axis == 0);
        assert_non_null(m);
        assert_int_equal(m->ndim, 0);
        assert_true(qkv_item(m) == 3);
        qkv_zero_grad(z);
        assert_true(qkv_backward(qkv_mul_scalar(m, 2)));
        assert_true(qkv_item(z->grad) == 2);
    }
    assert_null(qkv_sum(z, 1, false));
    assert_string_equal(qkv_error(), "qkv_sum: axis 1 out of range for []");
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(sum_matches_torch),
        T(zero_dimensional_tensors_reduce_over_axis_0_or_minus_1),
        T(mean_matches_torch),
        T(var_matches_torch),
        T(max_matches_torch),
        T(min_matches_torch),
        T(argmax_matches_torch),
        T(argmin_matches_torch),
        T(softmax_matches_torch),
        T(log_softmax_matches_torch),
        T(leading_axis_reductions_of_wide_matrix),
        T(sum_over_a_middle_axis_adds_in_order),
        T(reductions_do_not_depend_on_thread_count),
        T(softmax_of_fully_masked_row_is_zero),
        T(softmax_of_huge_inputs_stays_finite),
        T(causal_softmax_and_its_gradient_match_torch),
        T(causal_softmax_is_the_masked_softmax_bit_for_bit),
        T(causal_softmax_reads_no_masked_score),
        T(causal_softmax_of_bf16_computes_in_f32),
        T(causal_softmax_does_not_depend_on_thread_count),
        T(causal_softmax_refuses_bad_input),
        T(reductions_of_empty_tensors),
        T(reduction_axis_errors_name_op_and_shape),
        T(full_reductions_give_zero_dimensional_tensors),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
