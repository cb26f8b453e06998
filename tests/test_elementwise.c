/* Elementwise ops against torch: binary ops and comparisons with broadcasting, strided views,
 * empty and size-1 dims, huge and non-finite values and dtype promotion; tensor-scalar ops;
 * unary math; where and masked_fill. The cases live in tests/fixtures/elementwise_fixtures.h
 * (written by gen_elementwise.py); each test runs every case of one op. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "qkv.h"
#include "fixtures/elementwise_fixtures.h"
#include "harness.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* Applies a fixture's operand view; the result must really be strided. */
static qkv_tensor *apply_view(qkv_tensor *t, const fx_view *v) {
    qkv_tensor *out = t;
    switch (v->kind) {
    case 0: return t;
    case 't': out = qkv_transpose(t, -2, -1); break;
    case 's': out = qkv_slice(t, -1, 0, INT64_MAX, 2); break;
    case 'e': out = qkv_expand(t, v->ndim, v->shape); break;
    }
    assert_non_null(out);
    assert_false(qkv_is_contiguous(out));
    return out;
}

/* ---- binary ------------------------------------------------------------------------------ */

typedef qkv_tensor *(*binary_fn)(const qkv_tensor *, const qkv_tensor *);

static const struct { const char *name; binary_fn fn; } binary_ops[] = {
    {"add", qkv_add}, {"sub", qkv_sub}, {"mul", qkv_mul}, {"div", qkv_div}, {"pow", qkv_pow},
    {"maximum", qkv_maximum}, {"minimum", qkv_minimum}, {"eq", qkv_eq}, {"ne", qkv_ne},
    {"lt", qkv_lt}, {"le", qkv_le}, {"gt", qkv_gt}, {"ge", qkv_ge},
};

static void check_binary(const char *op) {
    binary_fn fn = NULL;
    for (size_t i = 0; i < N_OF(binary_ops); i++)
        if (!strcmp(binary_ops[i].name, op)) fn = binary_ops[i].fn;
    assert_non_null(fn);
    int n = 0;
    for (size_t i = 0; i < N_OF(fx_binary_cases); i++) {
        const fx_binary *c = &fx_binary_cases[i];
        if (strcmp(c->op, op)) continue;
        qkv_tensor *a = apply_view(fx_make(&c->a, c->da), &c->va);
        qkv_tensor *b = apply_view(fx_make(&c->b, c->db), &c->vb);
        char what[160];
        snprintf(what, sizeof what, "%s, %s (%s, %s)", op, c->what, qkv_dtype_name(c->da),
                 qkv_dtype_name(c->db));
        fx_assert_tensor(fn(a, b), c->dout, &c->out, what);
        n++;
    }
    assert_true(n >= 20);
    assert_null(qkv_error());
}

#define BINARY_TEST(op)                                                                         \
    static void op##_matches_torch_in_every_broadcast(void **state) {                           \
        (void)state;                                                                            \
        check_binary(#op);                                                                      \
    }
BINARY_TEST(add)
BINARY_TEST(sub)
BINARY_TEST(mul)
BINARY_TEST(div)
BINARY_TEST(pow)
BINARY_TEST(maximum)
BINARY_TEST(minimum)
BINARY_TEST(eq)
BINARY_TEST(ne)
BINARY_TEST(lt)
BINARY_TEST(le)
BINARY_TEST(gt)
BINARY_TEST(ge)

static void comparisons_give_bool(void **state) {
    (void)state;
    qkv_tensor *a = qkv_arange(QKV_F64, 0, 3, 1), *b = qkv_full(QKV_I64, QKV_SHAPE(1), 1);
    qkv_tensor *lt = qkv_lt(a, b);
    assert_int_equal(lt->dtype, QKV_BOOL);
    bool v[3];
    assert_true(qkv_copy_out(lt, QKV_BOOL, v));
    assert_true(v[0] && !v[1] && !v[2]);
    assert_int_equal(qkv_ge_scalar(b, 0.5)->dtype, QKV_BOOL);
}

static void mismatched_shapes_do_not_broadcast(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)), *b = qkv_zeros(QKV_F32, QKV_SHAPE(4));
    assert_null(qkv_mul(a, b));
    assert_string_equal(qkv_error(), "qkv_mul: shapes do not broadcast: [2,3] and [4]");
    qkv_clear_error();
    qkv_tensor *c = qkv_zeros(QKV_F32, QKV_SHAPE(3, 1, 2));
    qkv_tensor *d = qkv_zeros(QKV_F32, QKV_SHAPE(4, 3));
    assert_null(qkv_gt(c, d));
    assert_string_equal(qkv_error(), "qkv_gt: shapes do not broadcast: [3,1,2] and [4,3]");
}

/* ---- tensor-scalar ----------------------------------------------------------------------- */

static qkv_tensor *rsub(const qkv_tensor *a, double s) { return qkv_rsub_scalar(s, a); }
static qkv_tensor *rdiv(const qkv_tensor *a, double s) { return qkv_rdiv_scalar(s, a); }

typedef qkv_tensor *(*scalar_fn)(const qkv_tensor *, double);

static const struct { const char *name; scalar_fn fn; } scalar_ops[] = {
    {"add_scalar", qkv_add_scalar}, {"sub_scalar", qkv_sub_scalar}, {"rsub_scalar", rsub},
    {"mul_scalar", qkv_mul_scalar}, {"div_scalar", qkv_div_scalar}, {"rdiv_scalar", rdiv},
    {"pow_scalar", qkv_pow_scalar}, {"maximum_scalar", qkv_maximum_scalar},
    {"minimum_scalar", qkv_minimum_scalar}, {"eq_scalar", qkv_eq_scalar},
    {"ne_scalar", qkv_ne_scalar}, {"lt_scalar", qkv_lt_scalar}, {"le_scalar", qkv_le_scalar},
    {"gt_scalar", qkv_gt_scalar}, {"ge_scalar", qkv_ge_scalar},
};

static void scalar_ops_match_torch(void **state) {
    (void)state;
    for (size_t k = 0; k < N_OF(scalar_ops); k++) {
        int n = 0;
        for (size_t i = 0; i < N_OF(fx_scalar_cases); i++) {
            const fx_scalar *c = &fx_scalar_cases[i];
            if (strcmp(c->op, scalar_ops[k].name)) continue;
            char what[160];
            snprintf(what, sizeof what, "%s, %s (%s)", c->op, c->what, qkv_dtype_name(c->da));
            fx_assert_tensor(scalar_ops[k].fn(fx_make(&c->a, c->da), c->s), c->dout, &c->out,
                             what);
            n++;
        }
        assert_true(n >= 4);
    }
    assert_null(qkv_error());
}

/* ---- unary ------------------------------------------------------------------------------- */

static qkv_tensor *gelu_erf(const qkv_tensor *a) { return qkv_gelu(a, false); }
static qkv_tensor *gelu_tanh(const qkv_tensor *a) { return qkv_gelu(a, true); }

typedef qkv_tensor *(*unary_fn)(const qkv_tensor *);

static const struct { const char *name; unary_fn fn; } unary_ops[] = {
    {"neg", qkv_neg}, {"exp", qkv_exp}, {"log", qkv_log}, {"sqrt", qkv_sqrt},
    {"rsqrt", qkv_rsqrt}, {"abs", qkv_abs}, {"tanh", qkv_tanh}, {"sigmoid", qkv_sigmoid},
    {"relu", qkv_relu}, {"gelu", gelu_erf}, {"gelu_tanh", gelu_tanh},
};

static void check_unary(const char *op) {
    unary_fn fn = NULL;
    for (size_t i = 0; i < N_OF(unary_ops); i++)
        if (!strcmp(unary_ops[i].name, op)) fn = unary_ops[i].fn;
    assert_non_null(fn);
    int n = 0;
    for (size_t i = 0; i < N_OF(fx_unary_cases); i++) {
        const fx_unary *c = &fx_unary_cases[i];
        if (strcmp(c->op, op)) continue;
        char what[160];
        snprintf(what, sizeof what, "%s, %s (%s)", op, c->what, qkv_dtype_name(c->dtype));
        qkv_tensor *a = apply_view(fx_make(&c->a, c->dtype), &c->va);
        /* GELU's 1 + erf(x) cancels in the negative tail: float32 results there (|y| < 0.01)
         * carry absolute, not relative, errors of a few float32 ulps of 1. */
        bool tail = !strncmp(op, "gelu", 4) && c->dtype == QKV_F32;
        fx_assert_close(fn(a), c->dtype, &c->out, fx_rtol(c->dtype),
                        tail ? 1e-6 : fx_atol(c->dtype), what);
        n++;
    }
    assert_int_equal(n, 6);
    assert_null(qkv_error());
}

#define UNARY_TEST(op)                                                                          \
    static void op##_matches_torch(void **state) {                                             \
        (void)state;                                                                            \
        check_unary(#op);                                                                       \
    }
UNARY_TEST(neg)
UNARY_TEST(exp)
UNARY_TEST(log)
UNARY_TEST(sqrt)
UNARY_TEST(rsqrt)
UNARY_TEST(abs)
UNARY_TEST(tanh)
UNARY_TEST(sigmoid)
UNARY_TEST(relu)
UNARY_TEST(gelu)
UNARY_TEST(gelu_tanh)

/* GELU's F32 backward (erf form), the vectorised one-pass kernel, against its derivative
 * 0.5 (1 + erf(x / sqrt2)) + x exp(-x^2 / 2) / sqrt(2 pi) in double, times an upstream
 * gradient w, over [-10, 10] in 4001 steps (not a multiple of a vector: the tail too). The
 * bound: the erf approximation's absolute error (1.5e-7, halved by the 0.5) plus a few float32
 * ulps of values up to 1.13, all times w. */
static void gelu_f32_backward_matches_its_derivative(void **state) {
    (void)state;
    enum { N = 4001 };
    static float xs[N], ws[N], got[N];
    for (int i = 0; i < N; i++) {
        xs[i] = (float)(-10.0 + 0.005 * i);
        ws[i] = 1.0f + 0.25f * (float)(i % 3);
    }
    qkv_tensor *x = qkv_requires_grad_(qkv_from_array(QKV_F32, QKV_SHAPE(N), xs), true);
    qkv_tensor *w = qkv_from_array(QKV_F32, QKV_SHAPE(N), ws);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(qkv_gelu(x, false), w))));
    assert_true(qkv_copy_out(x->grad, QKV_F32, got));
    double worst = 0;
    for (int i = 0; i < N; i++) {
        double v = xs[i];
        double want = ws[i] * (0.5 * (1 + erf(v * 0.70710678118654752440)) +
                               v * exp(-0.5 * v * v) * 0.39894228040143267794);
        double err = fabs(got[i] - want) / ws[i];
        if (err > worst) worst = err;
        if (err > 6e-7) fail_msg("x = %.9g: got %.9g, want %.9g", v, got[i], want);
    }
    assert_true(worst > 0); /* float32 arithmetic: not the double formula itself */
    assert_null(qkv_error());
}

static void sigmoid_is_stable_at_large_magnitudes(void **state) {
    (void)state;
    for (int k = 0; k < 2; k++) {
        qkv_dtype dt = k ? QKV_F64 : QKV_F32;
        qkv_tensor *x = qkv_from_array(QKV_F64, QKV_SHAPE(4), (const double[]){-100, 100,
                                                                               -1000, 1000});
        double y[4];
        assert_true(qkv_copy_out(qkv_sigmoid(qkv_to_dtype(x, dt)), QKV_F64, y));
        /* exp(-100) = 3.7e-44 (a float32 denormal, which may flush to 0), never NaN */
        assert_true(y[0] >= 0 && y[0] < 1e-43);
        assert_true(y[1] == 1);
        assert_true(y[2] == 0);
        assert_true(y[3] == 1);
    }
}

static void integer_inputs_of_float_ops_compute_in_f32(void **state) {
    (void)state;
    qkv_tensor *x = qkv_from_array(QKV_I64, QKV_SHAPE(3), (const int64_t[]){1, 4, 9});
    qkv_tensor *r = qkv_sqrt(x);
    assert_int_equal(r->dtype, QKV_F32);
    float v[3];
    assert_true(qkv_copy_out(r, QKV_F32, v));
    assert_true(v[0] == 1 && v[1] == 2 && v[2] == 3);
    assert_int_equal(qkv_neg(x)->dtype, QKV_I64); /* as torch.neg on int64 */
    assert_int_equal(qkv_abs(x)->dtype, QKV_I64);
}

/* ---- integer overflow -------------------------------------------------------------------- */

/* Asserts the n I64 values of t (read as integers: a double cannot hold them all). */
static void assert_i64s(const qkv_tensor *t, int n, const int64_t *want) {
    assert_non_null(t);
    assert_int_equal(t->dtype, QKV_I64);
    assert_int_equal(t->numel, n);
    int64_t got[8];
    assert_true(qkv_copy_out(t, QKV_I64, got));
    for (int i = 0; i < n; i++)
        if (got[i] != want[i])
            fail_msg("element %d: %lld, expected %lld", i, (long long)got[i], (long long)want[i]);
}
#define ASSERT_I64S(t, ...)                                                                     \
    assert_i64s(t, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),                   \
                (const int64_t[]){__VA_ARGS__})

/* As torch's int64 arithmetic: modulo 2^64, never undefined behaviour (UBSan checks it in the
 * sanitizer build). Contiguous, broadcast-scalar and strided operands take different loops. */
static void integer_arithmetic_wraps_as_twos_complement(void **state) {
    (void)state;
    qkv_tensor *a = qkv_from_array(QKV_I64, QKV_SHAPE(3),
                                   (const int64_t[]){INT64_MAX, INT64_MIN, INT64_MAX});
    qkv_tensor *b = qkv_from_array(QKV_I64, QKV_SHAPE(3), (const int64_t[]){1, -1, 2});
    ASSERT_I64S(qkv_add(a, b), INT64_MIN, INT64_MAX, INT64_MIN + 1);
    ASSERT_I64S(qkv_sub(a, b), INT64_MAX - 1, INT64_MIN + 1, INT64_MAX - 2);
    ASSERT_I64S(qkv_sub(b, a), INT64_MIN + 2, INT64_MAX, INT64_MIN + 3);
    ASSERT_I64S(qkv_mul(a, b), INT64_MAX, INT64_MIN, -2);
    ASSERT_I64S(qkv_add_scalar(a, 1), INT64_MIN, INT64_MIN + 1, INT64_MIN);
    ASSERT_I64S(qkv_mul_scalar(a, 2), -2, 0, -2);
    qkv_tensor *one = qkv_scalar(QKV_I64, 1);
    ASSERT_I64S(qkv_add(one, a), INT64_MIN, INT64_MIN + 1, INT64_MIN);
    qkv_tensor *pair = qkv_from_array(QKV_I64, QKV_SHAPE(2, 2),
                                      (const int64_t[]){INT64_MAX, 0, INT64_MIN, 0});
    qkv_tensor *column = qkv_select(pair, 1, 0); /* stride 2 */
    ASSERT_I64S(qkv_add(column, column), -2, 0);
    ASSERT_I64S(qkv_neg(a), INT64_MIN + 1, INT64_MIN, INT64_MIN + 1);
    ASSERT_I64S(qkv_neg(column), INT64_MIN + 1, INT64_MIN);
    ASSERT_I64S(qkv_abs(a), INT64_MAX, INT64_MIN, INT64_MAX);
    qkv_tensor *base = qkv_from_array(QKV_I64, QKV_SHAPE(4), (const int64_t[]){2, 2, 3, -2});
    qkv_tensor *exps = qkv_from_array(QKV_I64, QKV_SHAPE(4), (const int64_t[]){63, 64, 40, 63});
    ASSERT_I64S(qkv_pow(base, exps), INT64_MIN, 0, -6289078614652622815, INT64_MIN);
}

static void integer_sums_wrap_as_twos_complement(void **state) {
    (void)state;
    ASSERT_I64S(qkv_sum_all(qkv_from_array(QKV_I64, QKV_SHAPE(2),
                                           (const int64_t[]){INT64_MAX, 1})),
                INT64_MIN);
    ASSERT_I64S(qkv_sum_all(qkv_from_array(QKV_I64, QKV_SHAPE(2),
                                           (const int64_t[]){INT64_MIN, -1})),
                INT64_MAX);
    qkv_tensor *m = qkv_from_array(QKV_I64, QKV_SHAPE(2, 2),
                                   (const int64_t[]){INT64_MAX, INT64_MIN, 1, -1});
    ASSERT_I64S(qkv_sum(m, 0, false), INT64_MIN, INT64_MAX);
    ASSERT_I64S(qkv_sum(m, 1, false), -1, 0);
    ASSERT_I64S(qkv_sum(qkv_transpose(m, 0, 1), 1, false), INT64_MIN, INT64_MAX);
}

/* ---- where, masked_fill ------------------------------------------------------------------ */

static void where_broadcasts_all_three_operands(void **state) {
    (void)state;
    for (size_t i = 0; i < N_OF(fx_where_cases); i++) {
        const fx_where *c = &fx_where_cases[i];
        qkv_tensor *out = qkv_where(fx_make(&c->cond, QKV_BOOL), fx_make(&c->a, c->da),
                                    fx_make(&c->b, c->db));
        fx_assert_tensor(out, c->dout, &c->out, c->what);
    }
}

static void masked_fill_broadcasts_the_mask(void **state) {
    (void)state;
    for (size_t i = 0; i < N_OF(fx_masked_fill_cases); i++) {
        const fx_masked_fill *c = &fx_masked_fill_cases[i];
        qkv_tensor *out = qkv_masked_fill(fx_make(&c->a, c->dtype), fx_make(&c->mask, QKV_BOOL),
                                          c->value);
        fx_assert_tensor(out, c->dtype, &c->out, c->what);
    }
}

static void where_needs_a_bool_condition(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2));
    assert_null(qkv_where(a, a, a));
    assert_string_equal(qkv_error(), "qkv_where: condition must be bool, not f32");
    qkv_clear_error();
    qkv_tensor *m = qkv_ones(QKV_BOOL, QKV_SHAPE(3));
    assert_null(qkv_where(m, a, a));
    assert_string_equal(qkv_error(), "qkv_where: shapes do not broadcast: [3], [2] and [2]");
}

static void masked_fill_mask_must_not_grow_the_input(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(3));
    assert_null(qkv_masked_fill(a, qkv_ones(QKV_BOOL, QKV_SHAPE(2, 3)), 0));
    assert_string_equal(qkv_error(), "qkv_masked_fill: mask [2,3] does not broadcast to [3]");
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(add_matches_torch_in_every_broadcast),
        T(sub_matches_torch_in_every_broadcast),
        T(mul_matches_torch_in_every_broadcast),
        T(div_matches_torch_in_every_broadcast),
        T(pow_matches_torch_in_every_broadcast),
        T(maximum_matches_torch_in_every_broadcast),
        T(minimum_matches_torch_in_every_broadcast),
        T(eq_matches_torch_in_every_broadcast),
        T(ne_matches_torch_in_every_broadcast),
        T(lt_matches_torch_in_every_broadcast),
        T(le_matches_torch_in_every_broadcast),
        T(gt_matches_torch_in_every_broadcast),
        T(ge_matches_torch_in_every_broadcast),
        T(comparisons_give_bool),
        T(mismatched_shapes_do_not_broadcast),
        T(scalar_ops_match_torch),
        T(neg_matches_torch),
        T(exp_matches_torch),
        T(log_matches_torch),
        T(sqrt_matches_torch),
        T(rsqrt_matches_torch),
        T(abs_matches_torch),
        T(tanh_matches_torch),
        T(sigmoid_matches_torch),
        T(relu_matches_torch),
        T(gelu_matches_torch),
        T(gelu_tanh_matches_torch),
        T(gelu_f32_backward_matches_its_derivative),
        T(sigmoid_is_stable_at_large_magnitudes),
        T(integer_inputs_of_float_ops_compute_in_f32),
        T(integer_arithmetic_wraps_as_twos_complement),
        T(integer_sums_wrap_as_twos_complement),
        T(where_broadcasts_all_three_operands),
        T(masked_fill_broadcasts_the_mask),
        T(where_needs_a_bool_condition),
        T(masked_fill_mask_must_not_grow_the_input),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
