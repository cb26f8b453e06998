/* The tensor core: creation, dtypes, element access, the seeded generator and printing.
 * Generator values come from tests/fixtures/gen_tensor.py, which implements the documented
 * algorithm independently; arange values and printed strings from torch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"
#include "fixtures/tensor_fixtures.h"
#include "harness.h"

static void assert_all(const qkv_tensor *t, double value) {
    assert_non_null(t);
    double *v = malloc(sizeof(double) * (size_t)(t->numel ? t->numel : 1));
    assert_true(qkv_copy_out(t, QKV_F64, v));
    for (int64_t i = 0; i < t->numel; i++) assert_true(v[i] == value);
    free(v);
}

static void assert_printed(const qkv_tensor *t, const char *expected) {
    char *s = qkv_to_string(t);
    assert_non_null(s);
    assert_string_equal(s, expected);
    free(s);
}

/* ---- dtypes ------------------------------------------------------------------------------ */

static void dtype_names_and_sizes(void **state) {
    (void)state;
    assert_string_equal(qkv_dtype_name(QKV_F32), "f32");
    assert_string_equal(qkv_dtype_name(QKV_F64), "f64");
    assert_string_equal(qkv_dtype_name(QKV_I64), "i64");
    assert_string_equal(qkv_dtype_name(QKV_BOOL), "bool");
    assert_int_equal(qkv_dtype_size(QKV_F32), 4);
    assert_int_equal(qkv_dtype_size(QKV_F64), 8);
    assert_int_equal(qkv_dtype_size(QKV_I64), 8);
    assert_int_equal(qkv_dtype_size(QKV_BOOL), 1);
}

/* ---- creation ---------------------------------------------------------------------------- */

static void empty_has_shape_contiguous_strides_and_storage(void **state) {
    (void)state;
    qkv_tensor *t = qkv_empty(QKV_F64, QKV_SHAPE(2, 3, 4));
    assert_non_null(t);
    assert_int_equal(t->dtype, QKV_F64);
    assert_int_equal(t->ndim, 3);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->shape[2], 4);
    assert_int_equal(t->strides[0], 12);
    assert_int_equal(t->strides[1], 4);
    assert_int_equal(t->strides[2], 1);
    assert_int_equal(t->offset, 0);
    assert_int_equal(t->numel, 24);
    assert_true(t->storage->nbytes >= 24 * sizeof(double));
    assert_true(qkv_is_contiguous(t));
    assert_false(t->requires_grad);
    assert_null(t->grad);
    assert_null(t->grad_fn);
}

static void zeros_ones_full_fill_every_element(void **state) {
    (void)state;
    assert_all(qkv_zeros(QKV_F32, QKV_SHAPE(3, 5)), 0);
    assert_all(qkv_ones(QKV_I64, QKV_SHAPE(4)), 1);
    assert_all(qkv_full(QKV_F64, QKV_SHAPE(2, 2, 2), -2.5), -2.5);
    assert_all(qkv_full(QKV_BOOL, QKV_SHAPE(3), 7), 1);
    assert_all(qkv_full(QKV_I64, QKV_SHAPE(3), -7.9), -7);
    qkv_tensor *big = qkv_full(QKV_F32, QKV_SHAPE(70000), 0.25);
    assert_all(big, 0.25);
}

static void zero_size_dimensions_give_empty_tensors(void **state) {
    (void)state;
    qkv_tensor *t = qkv_zeros(QKV_F32, QKV_SHAPE(3, 0, 2));
    assert_non_null(t);
    assert_int_equal(t->numel, 0);
    assert_int_equal(t->ndim, 3);
    assert_true(qkv_copy_out(t, QKV_F64, &(double){0}));
    assert_null(qkv_error());
}

static void scalar_is_zero_dimensional(void **state) {
    (void)state;
    qkv_tensor *s = qkv_scalar(QKV_F64, 4.25);
    assert_non_null(s);
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    assert_true(qkv_item(s) == 4.25);
    assert_true(qkv_get(s, NULL) == 4.25);
    assert_true(qkv_item(qkv_scalar(QKV_I64, -3)) == -3);
    assert_true(qkv_item(qkv_scalar(QKV_BOOL, 0.5)) == 1);
}

static void arange_with_fractional_step_matches_torch(void **state) {
    (void)state;
    fx_assert_close(qkv_arange(QKV_F32, 0, 1, 0.1), QKV_F32, &fx_arange_tenth, 0, 0,
                    "arange(0, 1, 0.1)");
    fx_assert_close(qkv_arange(QKV_F64, 2, -1, -0.75), QKV_F64, &fx_arange_negative_step, 0, 0,
                    "arange(2, -1, -0.75)");
    fx_assert_close(qkv_arange(QKV_I64, -3, 10, 4), QKV_I64, &fx_arange_i64, 0, 0,
                    "arange(-3, 10, 4)");
}

static void arange_of_empty_range_has_no_elements(void **state) {
    (void)state;
    qkv_tensor *a = qkv_arange(QKV_F32, 0, 0, 1);
    qkv_tensor *b = qkv_arange(QKV_F32, 5, 1, 1);
    qkv_tensor *c = qkv_arange(QKV_I64, 1, 5, -1);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_int_equal(a->ndim, 1);
    assert_int_equal(a->shape[0], 0);
    assert_int_equal(b->shape[0], 0);
    assert_int_equal(c->shape[0], 0);
    assert_null(qkv_error());
}

static void arange_with_zero_step_is_an_error(void **state) {
    (void)state;
    assert_null(qkv_arange(QKV_F32, 0, 1, 0));
    assert_string_equal(qkv_error(), "qkv_arange: bad range 0..1 step 0");
}

static void from_array_copies_row_major_data(void **state) {
    (void)state;
    int64_t data[6] = {1, -2, 3, -4, 5, -6};
    qkv_tensor *t = qkv_from_array(QKV_I64, QKV_SHAPE(2, 3), data);
    data[0] = 100; /* the tensor has its own copy */
    assert_non_null(t);
    assert_true(qkv_get(t, (const int64_t[]){0, 0}) == 1);
    assert_true(qkv_get(t, (const int64_t[]){1, 2}) == -6);
    assert_true(qkv_get(t, (const int64_t[]){-1, -3}) == -4);
    assert_true(qkv_get(t, (const int64_t[]){0, -1}) == 3);
    bool mask[3] = {true, false, true};
    qkv_tensor *m = qkv_from_array(QKV_BOOL, QKV_SHAPE(3), mask);
    assert_true(qkv_get(m, (const int64_t[]){1}) == 0);
    assert_true(qkv_get(m, (const int64_t[]){2}) == 1);
}

static void like_functions_copy_dtype_and_shape(void **state) {
    (void)state;
    qkv_tensor *t = qkv_transpose(qkv_full(QKV_F64, QKV_SHAPE(2, 5), 3), 0, 1);
    qkv_tensor *z = qkv_zeros_like(t), *o = qkv_ones_like(t), *e = qkv_empty_like(t);
    for (int k = 0; k < 3; k++) {
        qkv_tensor *x = k == 0 ? z : k == 1 ? o : e;
        assert_non_null(x);
        assert_int_equal(x->dtype, QKV_F64);
        assert_int_equal(x->ndim, 2);
        assert_int_equal(x->shape[0], 5);
        assert_int_equal(x->shape[1], 2);
        assert_true(qkv_is_contiguous(x));
    }
    assert_all(z, 0);
    assert_all(o, 1);
    assert_null(qkv_zeros_like(NULL));
    assert_string_equal(qkv_error(), "qkv_zeros_like: tensor argument 1 is NULL");
}

static void creation_rejects_bad_shapes(void **state) {
    (void)state;
    assert_null(qkv_zeros(QKV_F32, QKV_SHAPE(2, -1)));
    assert_string_equal(qkv_error(), "qkv_zeros: negative size -1 in dimension 1");
    qkv_clear_error();
    assert_null(qkv_zeros(QKV_F32, 9, (const int64_t[]){1, 1, 1, 1, 1, 1, 1, 1, 1}));
    assert_string_equal(qkv_error(), "qkv_zeros: 9 dimensions (at most 8)");
    qkv_clear_error();
    assert_null(qkv_empty(QKV_F32, QKV_SHAPE(INT64_C(1) << 40, INT64_C(1) << 40)));
    assert_string_equal(qkv_error(), "qkv_empty: shape too large (dimension 1)");
}

/* ---- access ------------------------------------------------------------------------------ */

static void item_of_one_element_tensor(void **state) {
    (void)state;
    assert_true(qkv_item(qkv_full(QKV_F32, QKV_SHAPE(1, 1, 1), 0.5)) == 0.5);
    assert_true(isnan(qkv_item(qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)))));
    assert_string_equal(qkv_error(), "qkv_item: tensor has 6 elements, not 1: [2,3]");
}

static void get_reads_through_strides_and_checks_range(void **state) {
    (void)state;
    qkv_tensor *t = qkv_transpose(qkv_reshape(qkv_arange(QKV_F32, 0, 6, 1), QKV_SHAPE(2, 3)),
                                  0, 1);
    assert_true(qkv_get(t, (const int64_t[]){0, 1}) == 3);
    assert_true(qkv_get(t, (const int64_t[]){2, 0}) == 2);
    assert_true(qkv_get(t, (const int64_t[]){-1, -1}) == 5);
    assert_true(isnan(qkv_get(t, (const int64_t[]){3, 0})));
    assert_string_equal(qkv_error(), "qkv_get: index 3 out of range for dimension 0 of [3,2]");
}

static void copy_out_converts_in_row_major_order(void **state) {
    (void)state;
    qkv_tensor *t = qkv_transpose(qkv_reshape(qkv_arange(QKV_F64, -1.5, 4, 1), QKV_SHAPE(2, 3)),
                                  0, 1);
    double d[6];
    assert_true(qkv_copy_out(t, QKV_F64, d));
    const double want_d[6] = {-1.5, 1.5, -0.5, 2.5, 0.5, 3.5};
    assert_memory_equal(d, want_d, sizeof d);
    float f[6];
    assert_true(qkv_copy_out(t, QKV_F32, f));
    assert_true(f[1] == 1.5f && f[5] == 3.5f);
    int64_t i[6];
    assert_true(qkv_copy_out(t, QKV_I64, i));
    const int64_t want_i[6] = {-1, 1, 0, 2, 0, 3}; /* truncation toward zero, as C casts */
    assert_memory_equal(i, want_i, sizeof i);
    bool b[6];
    assert_true(qkv_copy_out(t, QKV_BOOL, b));
    for (int k = 0; k < 6; k++) assert_true(b[k]);
    assert_false(qkv_copy_out(NULL, QKV_F64, d));
    assert_false(qkv_copy_out(t, QKV_F64, NULL));
}

/* ---- random numbers ---------------------------------------------------------------------- */

/* Float to I64 is defined for every value (the C cast is not): truncation toward zero, NaN to
 * 0, and the ends saturate, through every path that converts: to_dtype, copy_, copy_out,
 * full and scalar. */
static void float_to_integer_conversion_saturates_and_maps_nan_to_zero(void **state) {
    (void)state;
    enum { N = 11 };
    const double in[N] = {NAN, INFINITY, -INFINITY, 1e30, -1e30, 0x1p63, -0x1p63,
                          0x1.fffffffffffffp62, 2.9, -2.9, -0.0};
    const int64_t want[N] = {0, INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN, INT64_MAX,
                             INT64_MIN, INT64_C(9223372036854774784), 2, -2, 0};
    float in32[N];
    for (int i = 0; i < N; i++) in32[i] = (float)in[i]; /* all within float's range */
    qkv_tensor *srcs[] = {qkv_from_array(QKV_F64, QKV_SHAPE(N), in),
                          qkv_from_array(QKV_F32, QKV_SHAPE(N), in32)};
    for (int k = 0; k < 2; k++) {
        int64_t got[N];
        assert_true(qkv_copy_out(qkv_to_dtype(srcs[k], QKV_I64), QKV_I64, got));
        qkv_tensor *dst = qkv_zeros(QKV_I64, QKV_SHAPE(N));
        assert_true(qkv_copy_(dst, srcs[k]));
        int64_t copied[N], out[N];
        assert_true(qkv_copy_out(dst, QKV_I64, copied));
        assert_true(qkv_copy_out(srcs[k], QKV_I64, out));
        for (int i = 0; i < N; i++) {
            /* float rounds 0x1.fffffffffffffp62 up to 2^63 */
            int64_t w = k == 1 && i == 7 ? INT64_MAX : want[i];
            if (got[i] != w || copied[i] != w || out[i] != w)
                fail_msg("%s %g: %lld, %lld, %lld; expected %lld", k ? "f32" : "f64", in[i],
                         (long long)got[i], (long long)copied[i], (long long)out[i],
                         (long long)w);
        }
    }
    for (int i = 0; i < N; i++) {
        int64_t full, scalar;
        assert_true(qkv_copy_out(qkv_full(QKV_I64, QKV_SHAPE(1), in[i]), QKV_I64, &full));
        assert_true(qkv_copy_out(qkv_scalar(QKV_I64, in[i]), QKV_I64, &scalar));
        assert_true(full == want[i] && scalar == want[i]);
    }
}

/* As torch: any non-zero value is true, NaN included; -0.0 is false. */
static void conversion_to_bool_is_nonzero(void **state) {
    (void)state;
    bool got[5];
    qkv_tensor *f = qkv_from_array(QKV_F64, QKV_SHAPE(5),
                                   (const double[]){NAN, -0.0, INFINITY, 1e-300, 0});
    assert_true(qkv_copy_out(qkv_to_dtype(f, QKV_BOOL), QKV_BOOL, got));
    assert_true(got[0] && !got[1] && got[2] && got[3] && !got[4]);
    qkv_tensor *i = qkv_from_array(QKV_I64, QKV_SHAPE(3), (const int64_t[]){INT64_MIN, 0, 1});
    assert_true(qkv_copy_out(qkv_to_dtype(i, QKV_BOOL), QKV_BOOL, got));
    assert_true(got[0] && !got[1] && got[2]);
}

static void generator_first_outputs_follow_pcg32_seeded_by_splitmix64(void **state) {
    (void)state;
    const uint64_t seeds[3] = {0, 42, UINT64_MAX};
    const uint32_t *expected[3] = {fx_u32_seed0, fx_u32_seed42, fx_u32_seed_max};
    for (int s = 0; s < 3; s++) {
        qkv_generator g;
        qkv_generator_init(&g, seeds[s]);
        for (int i = 0; i < 8; i++) assert_int_equal(qkv_generator_next_u32(&g), expected[s][i]);
    }
}

static void generator_uniform_takes_53_bits_from_two_draws(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 42);
    for (int i = 0; i < 6; i++) assert_true(qkv_generator_uniform(&g) == fx_uniform_seed42[i]);
}

static void rand_f32_takes_24_bits_per_element(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 7);
    qkv_tensor *t = qkv_rand(QKV_F32, QKV_SHAPE(2, 3), &g);
    assert_non_null(t);
    const float *v = qkv_data(t);
    for (int i = 0; i < 6; i++) assert_true(v[i] == (float)fx_rand_f32_seed7[i]);
}

static void randn_f64_is_box_muller_of_two_uniforms(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 7);
    qkv_tensor *t = qkv_randn(QKV_F64, QKV_SHAPE(6), &g);
    assert_non_null(t);
    const double *v = qkv_data(t);
    for (int i = 0; i < 6; i++) assert_true(fx_close(v[i], fx_randn_f64_seed7[i], 1e-15, 0));
}

static void rand_lies_in_unit_interval(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    for (int k = 0; k < 2; k++) {
        qkv_tensor *t = qkv_rand(k ? QKV_F64 : QKV_F32, QKV_SHAPE(100000), &g);
        double lo = qkv_item(qkv_min_all(t)), hi = qkv_item(qkv_max_all(t));
        double mean = qkv_item(qkv_mean_all(t));
        assert_true(lo >= 0 && lo < 1e-3);
        assert_true(hi < 1 && hi > 1 - 1e-3);
        assert_true(fabs(mean - 0.5) < 0.005); /* 5 standard errors (0.289/sqrt(n)) */
    }
}

static void randn_has_zero_mean_and_unit_std(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 2024);
    for (int k = 0; k < 2; k++) {
        qkv_tensor *t = qkv_randn(k ? QKV_F64 : QKV_F32, QKV_SHAPE(100000), &g);
        double mean = qkv_item(qkv_mean_all(t));
        double std = sqrt(qkv_item(qkv_var(t, 0, 1, false)));
        /* Standard errors over 100k samples: 0.0032 for the mean, 0.0022 for the std. */
        assert_true(fabs(mean) < 0.016);
        assert_true(fabs(std - 1) < 0.011);
    }
}

static void randint_covers_its_range_and_nothing_else(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 5);
    qkv_tensor *t = qkv_randint(-3, 4, QKV_SHAPE(10000), &g);
    assert_non_null(t);
    assert_int_equal(t->dtype, QKV_I64);
    int counts[7] = {0};
    const int64_t *v = qkv_data(t);
    for (int i = 0; i < 10000; i++) {
        assert_true(v[i] >= -3 && v[i] < 4);
        counts[v[i] + 3]++;
    }
    for (int i = 0; i < 7; i++) assert_true(counts[i] > 1300 && counts[i] < 1560);
}

static void randint_draws_by_lemire_rejection(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 123);
    qkv_tensor *t = qkv_randint(-3, 7, QKV_SHAPE(3, 4), &g);
    assert_non_null(t);
    assert_memory_equal(qkv_data(t), fx_randint_seed123, sizeof fx_randint_seed123);
}

static void randint_of_empty_range_is_an_error(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 5);
    assert_null(qkv_randint(4, 4, QKV_SHAPE(2), &g));
    assert_string_equal(qkv_error(), "qkv_randint: empty range [4, 4)");
}

static void same_seed_gives_same_numbers(void **state) {
    (void)state;
    qkv_generator g1, g2;
    qkv_generator_init(&g1, 99);
    qkv_generator_init(&g2, 99);
    qkv_tensor *a = qkv_randint(0, 1000000, QKV_SHAPE(500), &g1);
    qkv_tensor *b = qkv_randint(0, 1000000, QKV_SHAPE(500), &g2);
    assert_memory_equal(qkv_data(a), qkv_data(b), 500 * sizeof(int64_t));
    qkv_tensor *c = qkv_randn(QKV_F32, QKV_SHAPE(500), &g1);
    qkv_tensor *d = qkv_randn(QKV_F32, QKV_SHAPE(500), &g2);
    assert_memory_equal(qkv_data(c), qkv_data(d), 500 * sizeof(float));
    qkv_generator_init(&g2, 100);
    qkv_tensor *e = qkv_randn(QKV_F32, QKV_SHAPE(500), &g2);
    assert_true(memcmp(qkv_data(c), qkv_data(e), 500 * sizeof(float)) != 0);
}

static void random_numbers_do_not_depend_on_thread_count(void **state) {
    (void)state;
    const int64_t n = 200000;
    qkv_tensor *r[2][3];
    for (int k = 0; k < 2; k++) {
        qkv_set_num_threads(k + 1);
        qkv_generator g;
        qkv_generator_init(&g, 31337);
        r[k][0] = qkv_rand(QKV_F32, 1, &n, &g);
        r[k][1] = qkv_randn(QKV_F64, 1, &n, &g);
        r[k][2] = qkv_randint(-50, 50, 1, &n, &g);
    }
    qkv_set_num_threads(0);
    assert_memory_equal(qkv_data(r[0][0]), qkv_data(r[1][0]), (size_t)n * sizeof(float));
    assert_memory_equal(qkv_data(r[0][1]), qkv_data(r[1][1]), (size_t)n * sizeof(double));
    assert_memory_equal(qkv_data(r[0][2]), qkv_data(r[1][2]), (size_t)n * sizeof(int64_t));
}

static void rand_of_integer_dtype_is_an_error(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 5);
    assert_null(qkv_rand(QKV_I64, QKV_SHAPE(2), &g));
    assert_string_equal(qkv_error(), "qkv_rand: dtype must be f32, f64 or bf16, not i64");
}

/* ---- printing ---------------------------------------------------------------------------- */

static void prints_like_torch_repr(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof fx_print_cases / sizeof fx_print_cases[0]; i++) {
        const fx_print *c = &fx_print_cases[i];
        qkv_tensor *t = fx_make(&c->values, c->dtype);
        if (c->requires_grad) qkv_requires_grad_(t, true);
        assert_printed(t, c->repr);
    }
}

static void prints_empty_tensors(void **state) {
    (void)state;
    assert_printed(qkv_zeros(QKV_F32, QKV_SHAPE(0)), "tensor([], dtype=f32, shape=[0])");
    assert_printed(qkv_zeros(QKV_I64, QKV_SHAPE(2, 0)),
                   "tensor([[],\n        []], dtype=i64, shape=[2,0])");
}

static void prints_through_strides(void **state) {
    (void)state;
    qkv_tensor *t = qkv_reshape(qkv_arange(QKV_F32, 0, 6, 1), QKV_SHAPE(2, 3));
    assert_printed(qkv_transpose(t, 0, 1),
                   "tensor([[0., 3.],\n"
                   "        [1., 4.],\n"
                   "        [2., 5.]], dtype=f32, shape=[3,2])");
    assert_printed(NULL, "tensor(NULL)");
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(dtype_names_and_sizes),
        T(empty_has_shape_contiguous_strides_and_storage),
        T(zeros_ones_full_fill_every_element),
        T(zero_size_dimensions_give_empty_tensors),
        T(scalar_is_zero_dimensional),
        T(arange_with_fractional_step_matches_torch),
        T(arange_of_empty_range_has_no_elements),
        T(arange_with_zero_step_is_an_error),
        T(from_array_copies_row_major_data),
        T(like_functions_copy_dtype_and_shape),
        T(creation_rejects_bad_shapes),
        T(item_of_one_element_tensor),
        T(get_reads_through_strides_and_checks_range),
        T(copy_out_converts_in_row_major_order),
        T(float_to_integer_conversion_saturates_and_maps_nan_to_zero),
        T(conversion_to_bool_is_nonzero),
        T(generator_first_outputs_follow_pcg32_seeded_by_splitmix64),
        T(generator_uniform_takes_53_bits_from_two_draws),
        T(rand_f32_takes_24_bits_per_element),
        T(randn_f64_is_box_muller_of_two_uniforms),
        T(rand_lies_in_unit_interval),
        T(randn_has_zero_mean_and_unit_std),
        T(randint_covers_its_range_and_nothing_else),
        T(randint_draws_by_lemire_rejection),
        T(randint_of_empty_range_is_an_error),
        T(same_seed_gives_same_numbers),
        T(random_numbers_do_not_depend_on_thread_count),
        T(rand_of_integer_dtype_is_an_error),
        T(prints_like_torch_repr),
        T(prints_empty_tensors),
        T(prints_through_strides),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
