/* Errors as values: each kind of user mistake returns NULL and records the first message;
 * NULL inputs pass through silently; the error state is per thread; and every allocation of
 * a forward and backward pass, and of a small attention model's training step, can fail
 * without a crash or a leak. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "qkv.h"
#include "harness.h"

/* ---- kinds of mistakes ------------------------------------------------------------------- */

static void broadcast_mismatch_names_op_and_shapes(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)), *b = qkv_zeros(QKV_F32, QKV_SHAPE(4));
    assert_null(qkv_add(a, b));
    assert_string_equal(qkv_error(), "qkv_add: shapes do not broadcast: [2,3] and [4]");
}

static void axis_out_of_range_names_op_axis_and_shape(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_sum(a, 2, false));
    assert_string_equal(qkv_error(), "qkv_sum: axis 2 out of range for [2,3]");
    qkv_clear_error();
    assert_null(qkv_log_softmax(a, -3));
    assert_string_equal(qkv_error(), "qkv_log_softmax: axis -3 out of range for [2,3]");
    qkv_clear_error();
    assert_null(qkv_max(qkv_scalar(QKV_F32, 1), 1, false));
    assert_string_equal(qkv_error(), "qkv_max: axis 1 out of range for []");
}

static void bad_reshape_names_both_shapes(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_reshape(a, QKV_SHAPE(4, -1)));
    assert_string_equal(qkv_error(), "qkv_reshape: cannot reshape [2,3] (6 elements) to [4,-1]");
}

static void matmul_names_both_shapes_when_inner_dimensions_differ(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3)), *b = qkv_ones(QKV_F32, QKV_SHAPE(4, 5));
    assert_null(qkv_matmul(a, b));
    assert_string_equal(qkv_error(), "qkv_matmul: inner dimensions differ: [2,3] @ [4,5]");
}

static void wrong_dtype_names_op_and_dtype(void **state) {
    (void)state;
    qkv_tensor *f = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_where(f, f, f));
    assert_string_equal(qkv_error(), "qkv_where: condition must be bool, not f32");
    qkv_clear_error();
    assert_null(qkv_index_select(f, 0, f));
    assert_string_equal(qkv_error(), "qkv_index_select: index must be i64, not f32");
    qkv_clear_error();
    assert_null(qkv_requires_grad_(qkv_ones(QKV_I64, QKV_SHAPE(2)), true));
    assert_string_equal(qkv_error(), "qkv_requires_grad_: i64 tensors cannot require grad");
    qkv_clear_error();
    qkv_generator g;
    qkv_generator_init(&g, 1);
    assert_null(qkv_rand(QKV_I64, QKV_SHAPE(2), &g));
    assert_string_equal(qkv_error(), "qkv_rand: dtype must be f32, f64 or bf16, not i64");
}

static void index_out_of_range_names_index_and_shape(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_index_select(a, 0, qkv_full(QKV_I64, QKV_SHAPE(1), 5)));
    assert_string_equal(qkv_error(), "qkv_index_select: index 5 out of range for axis 0 of "
                                     "size 2 (input [2,3], index [1])");
    qkv_clear_error();
    assert_true(isnan(qkv_get(a, (const int64_t[]){0, 3})));
    assert_string_equal(qkv_error(), "qkv_get: index 3 out of range for dimension 1 of [2,3]");
    qkv_clear_error();
    assert_true(isnan(qkv_item(a)));
    assert_string_equal(qkv_error(), "qkv_item: tensor has 6 elements, not 1: [2,3]");
}

static void bad_sizes_and_arguments_name_the_op(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_full(QKV_F32, QKV_SHAPE(-1), 0));
    assert_string_equal(qkv_error(), "qkv_full: negative size -1 in dimension 0");
    qkv_clear_error();
    assert_null(qkv_zeros(QKV_F32, QKV_SHAPE(1, 1, 1, 1, 1, 1, 1, 1, 1)));
    assert_string_equal(qkv_error(), "qkv_zeros: 9 dimensions (at most 8)");
    qkv_clear_error();
    qkv_generator g;
    qkv_generator_init(&g, 1);
    assert_null(qkv_randn(QKV_F64, QKV_SHAPE(3, -2), &g));
    assert_string_equal(qkv_error(), "qkv_randn: negative size -2 in dimension 1");
    qkv_clear_error();
    assert_null(qkv_expand(a, QKV_SHAPE(4, 3)));
    assert_string_equal(qkv_error(),
                        "qkv_expand: cannot expand [2,3]: size 2 to 4 in dimension 0");
    qkv_clear_error();
    assert_null(qkv_sum_axes(a, 2, (const int[]){0, -2}, false));
    assert_string_equal(qkv_error(), "qkv_sum_axes: axis -2 appears twice");
    qkv_clear_error();
    assert_null(qkv_max_all(qkv_zeros(QKV_F32, QKV_SHAPE(0))));
    assert_string_equal(qkv_error(),
                        "qkv_max_all: cannot take max over an empty dimension of [0]");
    qkv_clear_error();
    assert_null(qkv_dropout(a, 1.5, true, NULL));
    assert_string_equal(qkv_error(), "qkv_dropout: p must be in [0, 1], not 1.5");
}

/* A NULL where an array or a generator belongs is a mistake reported like any other. */
/* ---- overflowing sizes ------------------------------------------------------------------- */

/* A view either fails with an error, or every element it addresses lies in its storage: its
 * values are written and summed (under ASan, any element outside would be caught). */
static void assert_refused_or_sound(qkv_tensor *v) {
    if (!v) {
        assert_non_null(qkv_error());
        qkv_clear_error();
        return;
    }
    bool expanded = false;
    for (int i = 0; i < v->ndim; i++) {
        assert_true(v->shape[i] >= 0);
        expanded = expanded || (v->strides[i] == 0 && v->shape[i] > 1);
    }
    assert_true(v->numel >= 0);
    /* Only a broadcast view (stride 0) may have more elements than its storage. */
    if (v->numel > 6) {
        assert_true(expanded);
        return;
    }
    assert_true(qkv_fill_(v, 1));
    assert_non_null(qkv_sum_all(v));
    assert_null(qkv_error());
}

static void views_and_creation_refuse_overflowing_sizes(void **state) {
    (void)state;
    const int64_t sizes[] = {INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1, -1, -2,
                             INT64_C(1) << 62, INT64_C(1) << 40, 0, 1, 2, 3};
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        int64_t x = sizes[i];
        for (size_t j = 0; j < sizeof sizes / sizeof *sizes; j++) {
            int64_t y = sizes[j];
            assert_refused_or_sound(qkv_narrow(a, 1, x, y));
            assert_refused_or_sound(qkv_slice(a, 1, x, y, 1));
            assert_refused_or_sound(qkv_slice(a, 1, 0, x, y));
            assert_refused_or_sound(qkv_slice(a, 1, x, 3, y));
            assert_refused_or_sound(qkv_narrow(qkv_slice(a, 1, 0, 3, 2), 1, x, y));
            assert_refused_or_sound(qkv_expand(a, QKV_SHAPE(x, 2, 3)));
            assert_refused_or_sound(qkv_reshape(a, QKV_SHAPE(x, y)));
            assert_refused_or_sound(qkv_reshape(a, QKV_SHAPE(-1, x, y)));
            qkv_tensor *e = qkv_zeros(QKV_F32, QKV_SHAPE(0, 3));
            qkv_tensor *r = qkv_reshape(e, QKV_SHAPE(0, x, y));
            if (r) assert_int_equal(r->numel, 0);
            qkv_clear_error();
            if (x == INT64_C(1) << 40 || y == INT64_C(1) << 40) continue; /* 4 TiB is valid */
            qkv_tensor *made[] = {qkv_empty(QKV_F32, QKV_SHAPE(x, y)),
                                  qkv_zeros(QKV_I64, QKV_SHAPE(2, x, y)),
                                  qkv_full(QKV_F64, QKV_SHAPE(y, x, 0), 1)};
            bool refused = false;
            for (size_t k = 0; k < sizeof made / sizeof *made; k++) {
                if (made[k]) assert_true(x >= 0 && x <= 3 && y >= 0 && y <= 3);
                refused = refused || !made[k];
            }
            assert_true(refused == (qkv_error() != NULL));
            qkv_clear_error();
        }
        assert_refused_or_sound(qkv_select(a, 1, x));
    }
}

/* A made tensor either fails with an error, or has sizes >= 0 and at most max elements. */
static void assert_refused_or_small(qkv_tensor *t, int64_t max) {
    if (!t) {
        assert_non_null(qkv_error());
        qkv_clear_error();
        return;
    }
    assert_null(qkv_error());
    for (int i = 0; i < t->ndim; i++) assert_true(t->shape[i] >= 0);
    char shape[128];
    if (t->numel > max)
        fail_msg("%s has more than %lld elements", qkv_shape_str(t, shape, sizeof shape),
                 (long long)max);
}

/* Axes far out of range, for every op that takes one. */
static void ops_taking_an_axis_refuse_any_int(void) {
    const int axes[] = {INT_MAX, INT_MIN, INT_MAX - 1, INT_MIN + 1, -4, -3, -1, 0, 1, 2, 3, 8};
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    qkv_tensor *pair[] = {a, a};
    qkv_tensor *ix = qkv_zeros(QKV_I64, QKV_SHAPE(1));
    qkv_tensor *ix2 = qkv_zeros(QKV_I64, QKV_SHAPE(1, 1));
    for (size_t i = 0; i < sizeof axes / sizeof *axes; i++) {
        int x = axes[i];
        assert_refused_or_sound(qkv_select(a, x, 1));
        assert_refused_or_sound(qkv_permute(a, (const int[]){x, 0}));
        assert_refused_or_sound(qkv_permute(a, (const int[]){1, x}));
        assert_refused_or_sound(qkv_transpose(a, x, 0));
        assert_refused_or_sound(qkv_transpose(a, 1, x));
        assert_refused_or_sound(qkv_squeeze(a, x));
        assert_refused_or_sound(qkv_unsqueeze(a, x));
        assert_refused_or_sound(qkv_flatten(a, x, -1));
        assert_refused_or_sound(qkv_flatten(a, 0, x));
        assert_refused_or_sound(qkv_narrow(a, x, 0, 1));
        assert_refused_or_sound(qkv_slice(a, x, 0, 1, 1));
        assert_refused_or_small(qkv_concat(2, pair, x), 12);
        assert_refused_or_small(qkv_stack(2, pair, x), 12);
        assert_refused_or_small(qkv_index_select(a, x, ix), 3);
        assert_refused_or_small(qkv_gather(a, x, ix2), 1);
        assert_refused_or_small(qkv_sum(a, x, false), 3);
        assert_refused_or_small(qkv_softmax(a, x), 6);
    }
}

/* Every view and creation op, with sizes, indices and ranges at and past the ends of int64:
 * each is refused with an error or makes a small, sound tensor, and none overflows (UBSan
 * checks the arithmetic in the sanitizer build). Accepted shapes stay tiny: a size of 2^57
 * appears only beside a 0, so that nothing huge is allocated. */
static void every_view_and_creation_op_refuses_overflowing_sizes(void **state) {
    (void)state;
    ops_taking_an_axis_refuse_any_int();
    const int64_t sizes[] = {INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1, -1, -2,
                             INT64_C(1) << 62, (INT64_C(1) << 58) + 1, 0, 1, 3};
    const float buf[16] = {0};
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        int64_t x = sizes[i];
        qkv_tensor *at_x = qkv_from_array(QKV_I64, QKV_SHAPE(1), &x);
        assert_refused_or_sound(qkv_select(a, 0, x));
        assert_refused_or_small(qkv_index_select(a, 1, at_x), 2);
        assert_refused_or_small(qkv_gather(a, 1, qkv_reshape(at_x, QKV_SHAPE(1, 1))), 1);
        assert_refused_or_small(qkv_one_hot(at_x, 3), 3);
        assert_refused_or_small(qkv_one_hot(qkv_zeros(QKV_I64, QKV_SHAPE(1)), x), 3);
        assert_refused_or_small(qkv_one_hot(qkv_zeros(QKV_I64, QKV_SHAPE(0)), x), 0);
        for (size_t j = 0; j < sizeof sizes / sizeof *sizes; j++) {
            int64_t y = sizes[j];
            assert_refused_or_small(qkv_ones(QKV_F32, QKV_SHAPE(x, y)), 9);
            assert_refused_or_small(qkv_rand(QKV_F32, QKV_SHAPE(y, x), &g), 9);
            assert_refused_or_small(qkv_randn(QKV_F64, QKV_SHAPE(x, 1, y), &g), 9);
            assert_refused_or_small(qkv_randint(0, 5, QKV_SHAPE(x, y), &g), 9);
            assert_refused_or_small(qkv_randint(x, y, QKV_SHAPE(2), &g), 2);
            assert_refused_or_small(qkv_from_array(QKV_F32, QKV_SHAPE(x, y), buf), 9);
            assert_refused_or_small(qkv_empty_like(qkv_zeros(QKV_BOOL, QKV_SHAPE(x, y))), 9);
            assert_refused_or_small(qkv_arange(QKV_I64, (double)x, (double)y, 1), 5);
            /* 2^63 by steps of 2^58 + 1 is 32 elements */
            assert_refused_or_small(qkv_arange(QKV_F32, 0, (double)x, (double)y), 32);
        }
    }
    /* Empty tensors may be long: their lengths along the axis of a concat add up past int64,
     * and a stack of them is too large. */
    qkv_tensor *longs[64];
    for (int k = 0; k < 64; k++) longs[k] = qkv_zeros(QKV_F32, QKV_SHAPE(0, INT64_C(1) << 57));
    assert_refused_or_small(qkv_concat(2, longs, 1), 0);
    assert_refused_or_small(qkv_concat(4, longs, 1), 0);
    assert_refused_or_small(qkv_concat(64, longs, 1), 0);
    assert_refused_or_small(qkv_stack(64, longs, 0), 0);
    assert_refused_or_small(qkv_stack(2, longs, 2), 0);
    /* An index that would make a result too large, on an empty source. */
    qkv_tensor *e = qkv_zeros(QKV_F32, QKV_SHAPE(2, 0, INT64_C(1) << 56));
    assert_refused_or_small(qkv_index_select(e, 0, qkv_zeros(QKV_I64, QKV_SHAPE(64))), 0);
    /* Ranges whose length does not fit, or whose values do not fit an I64. */
    const double ranges[][3] = {{0, 1e30, 1}, {-1e30, 1e30, 1}, {0, 0x1p63, 1},
                                {-0x1p63, 0x1p63, 1e3}, {-1e308, 1e308, 1}, {0, 1, 1e-320},
                                {1e30, 2e30, 5e29}, {-2e30, -1e30, 5e29}, {0, 1, NAN}};
    for (size_t i = 0; i < sizeof ranges / sizeof *ranges; i++)
        for (qkv_dtype dt = QKV_F32; dt <= QKV_I64; dt++)
            assert_refused_or_small(qkv_arange(dt, ranges[i][0], ranges[i][1], ranges[i][2]),
                                    2);
}

static void overflowing_views_name_the_op(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_narrow(a, 1, 2, INT64_MAX));
    assert_string_equal(qkv_error(),
                        "qkv_narrow: 9223372036854775807 elements from 2 are outside axis 1 of "
                        "[2,3]");
    qkv_clear_error();
    qkv_tensor *s = qkv_slice(a, 1, 0, INT64_MAX, INT64_MAX);
    assert_non_null(s);
    assert_int_equal(s->shape[1], 1);
    assert_null(qkv_expand(qkv_zeros(QKV_F32, QKV_SHAPE(1, 1)),
                           QKV_SHAPE(INT64_C(1) << 40, INT64_C(1) << 40)));
    assert_string_equal(qkv_error(), "qkv_expand: shape too large (dimension 1)");
    qkv_clear_error();
    assert_null(qkv_reshape(qkv_zeros(QKV_F32, QKV_SHAPE(0, 3)),
                            QKV_SHAPE(0, INT64_C(1) << 62, INT64_C(1) << 62)));
    assert_string_equal(qkv_error(), "qkv_reshape: shape too large (dimension 1)");
}

/* The call gave NULL with exactly this message; the error is then cleared. */
static void assert_refused_with(const qkv_tensor *t, const char *message) {
    assert_null(t);
    assert_string_equal(qkv_error(), message);
    qkv_clear_error();
}

static void overflowing_creation_and_indexing_name_the_op(void **state) {
    (void)state;
    qkv_tensor *longs[64];
    for (int k = 0; k < 64; k++) longs[k] = qkv_zeros(QKV_F32, QKV_SHAPE(0, INT64_C(1) << 57));
    assert_refused_with(qkv_concat(64, longs, 1),
                        "qkv_concat: 9079256848778919936 + 144115188075855872 overflows");
    assert_refused_with(qkv_concat(4, longs, 1), "qkv_concat: shape too large (dimension 1)");
    assert_refused_with(qkv_stack(64, longs, 0), "qkv_stack: shape too large (dimension 2)");
    qkv_tensor *e = qkv_zeros(QKV_F32, QKV_SHAPE(2, 0, INT64_C(1) << 56));
    assert_refused_with(qkv_index_select(e, 0, qkv_zeros(QKV_I64, QKV_SHAPE(64))),
                        "qkv_index_select: shape too large (dimension 2)");
    assert_refused_with(qkv_one_hot(qkv_zeros(QKV_I64, QKV_SHAPE(2)), INT64_MAX),
                        "qkv_one_hot: shape too large (dimension 1)");
    int64_t big = INT64_MAX;
    qkv_tensor *at_big = qkv_from_array(QKV_I64, QKV_SHAPE(1), &big);
    assert_refused_with(qkv_one_hot(at_big, 3),
                        "qkv_one_hot: index 9223372036854775807 out of range [0, 3) (index [1])");
    assert_refused_with(qkv_arange(QKV_F32, -1e308, 1e308, 1), "qkv_arange: range too long");
    qkv_generator g;
    qkv_generator_init(&g, 1);
    assert_refused_with(qkv_randint(0, 5, QKV_SHAPE(INT64_C(1) << 62, 4), &g),
                        "qkv_randint: shape too large (dimension 0)");
    assert_refused_with(qkv_unsqueeze(qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)), INT_MIN),
                        "qkv_unsqueeze: axis -2147483648 out of range for [2,3]");
    /* values past int64 saturate (tensor.h) */
    int64_t v[2];
    assert_true(qkv_copy_out(qkv_arange(QKV_I64, 1e30, 2e30, 5e29), QKV_I64, v));
    assert_true(v[0] == INT64_MAX && v[1] == INT64_MAX);
}

/* A write into an expanded view would store into one element several times, in an order that
 * decides the result: refused, as torch refuses it, with nothing written. */
static void copy_and_fill_refuse_a_destination_whose_elements_share_memory(void **state) {
    (void)state;
    qkv_tensor *row = qkv_from_array(QKV_F32, QKV_SHAPE(1, 3), (const float[]){1, 2, 3});
    qkv_tensor *wide = qkv_expand(row, QKV_SHAPE(2, 3));
    uint64_t version = qkv_version(row);
    assert_false(qkv_fill_(wide, 7));
    assert_string_equal(qkv_error(), "qkv_fill_: more than one element of the written-to tensor "
                                     "[2,3] refers to a single memory location (dimension 0 has "
                                     "stride 0); write into a copy (qkv_clone) instead");
    qkv_clear_error();
    assert_false(qkv_copy_(wide, qkv_arange(QKV_F32, 0, 6, 1)));
    assert_string_equal(qkv_error(), "qkv_copy_: more than one element of the written-to tensor "
                                     "[2,3] refers to a single memory location (dimension 0 has "
                                     "stride 0); write into a copy (qkv_clone) instead");
    qkv_clear_error();
    assert_int_equal(qkv_version(row), version);
    assert_true(qkv_get(row, (const int64_t[]){0, 0}) == 1);
    /* stride 0 on an axis of size 1, or on an empty view, shares nothing */
    assert_true(qkv_fill_(qkv_expand(row, QKV_SHAPE(1, 3)), 5));
    assert_true(qkv_fill_(qkv_expand(qkv_zeros(QKV_F32, QKV_SHAPE(1, 0)), QKV_SHAPE(4, 0)), 5));
    /* the source may broadcast; the copy of an expanded view is writable */
    qkv_tensor *copy = qkv_clone(wide);
    assert_true(qkv_copy_(copy, row));
    assert_true(qkv_fill_(copy, 2));
    assert_true(qkv_item(qkv_sum_all(copy)) == 12);
}

static qkv_tensor *sum_of_first(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return qkv_sum_all(in[0]);
}

/* The call failed and recorded exactly this message; the error is then cleared. */
static void expect_error(bool failed, const char *message) {
    assert_true(failed);
    assert_string_equal(qkv_error(), message);
    qkv_clear_error();
}

static void missing_pointer_arguments_are_errors_not_crashes(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    qkv_tensor *x = qkv_requires_grad_(qkv_ones(QKV_F64, QKV_SHAPE(2)), true);
    expect_error(!qkv_randn(QKV_F32, QKV_SHAPE(2), NULL), "qkv_randn: no generator");
    expect_error(!qkv_rand(QKV_F64, QKV_SHAPE(2), NULL), "qkv_rand: no generator");
    expect_error(!qkv_randint(0, 5, QKV_SHAPE(2), NULL), "qkv_randint: no generator");
    uint64_t live = qkv_memory_stats_get().live_tensors;
    expect_error(!qkv_from_array(QKV_F32, QKV_SHAPE(2), NULL), "qkv_from_array: data is NULL");
    assert_int_equal(qkv_memory_stats_get().live_tensors, live); /* refused before allocating */
    expect_error(!qkv_zeros(QKV_F32, 2, NULL), "qkv_zeros: shape is NULL");
    expect_error(!qkv_permute(a, NULL), "qkv_permute: axes is NULL");
    expect_error(!qkv_mean_axes(a, 1, NULL, false), "qkv_mean_axes: axes is NULL");
    expect_error(!qkv_copy_out(a, QKV_F32, NULL), "qkv_copy_out: dst is NULL");
    expect_error(isnan(qkv_get(a, NULL)), "qkv_get: index is NULL");
    expect_error(!qkv_gradcheck(NULL, &x, 1, NULL, 1e-6, 1e-6, 1e-6),
                 "qkv_gradcheck: fn is NULL");
    expect_error(!qkv_gradcheck(sum_of_first, NULL, 1, NULL, 1e-6, 1e-6, 1e-6),
                 "qkv_gradcheck: bad input list (1 inputs)");
}

/* A NULL argument gives NULL (false, NaN) and, with no error pending, an error naming the
 * function and the argument; with one pending (the NULL most likely comes from the op that
 * failed), the first error stays. */
#define NULL_GIVES(call, message)                                                           \
    do {                                                                                    \
        qkv_clear_error();                                                                  \
        assert_true(call);                                                                  \
        assert_string_equal(qkv_error(), message);                                          \
        qkv_clear_error();                                                                  \
        qkv_set_error("earlier");                                                           \
        assert_true(call);                                                                  \
        assert_string_equal(qkv_error(), "earlier");                                        \
    } while (0)

static void null_inputs_give_null_and_name_the_function_unless_an_error_is_pending(void **s) {
    (void)s;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    qkv_tensor *m = qkv_ones(QKV_BOOL, QKV_SHAPE(2, 3));
    qkv_tensor *i = qkv_zeros(QKV_I64, QKV_SHAPE(1));
    NULL_GIVES(!qkv_add(NULL, a), "qkv_add: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_pow(a, NULL), "qkv_pow: tensor argument 2 is NULL");
    NULL_GIVES(!qkv_eq(NULL, NULL), "qkv_eq: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_mul_scalar(NULL, 2), "qkv_mul_scalar: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_rdiv_scalar(1, NULL), "qkv_rdiv_scalar: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_exp(NULL), "qkv_exp: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_gelu(NULL, true), "qkv_gelu: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_where(NULL, a, a), "qkv_where: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_where(m, a, NULL), "qkv_where: tensor argument 3 is NULL");
    NULL_GIVES(!qkv_masked_fill(NULL, m, 0), "qkv_masked_fill: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_sum(NULL, 0, false), "qkv_sum: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_sum_axes(NULL, 1, (const int[]){0}, true),
               "qkv_sum_axes: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_mean_all(NULL), "qkv_mean_all: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_var(NULL, 0, 1, false), "qkv_var: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_max_all(NULL), "qkv_max_all: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_argmin(NULL, 0, false), "qkv_argmin: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_softmax(NULL, 0), "qkv_softmax: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_log_softmax(NULL, -1), "qkv_log_softmax: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_reshape(NULL, QKV_SHAPE(6)), "qkv_reshape: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_transpose(NULL, 0, 1), "qkv_transpose: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_permute(NULL, (const int[]){1, 0}), "qkv_permute: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_slice(NULL, 0, 0, 1, 1), "qkv_slice: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_select(NULL, 0, 0), "qkv_select: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_expand(NULL, QKV_SHAPE(2, 3)), "qkv_expand: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_contiguous(NULL), "qkv_contiguous: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_clone(NULL), "qkv_clone: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_to_dtype(NULL, QKV_F64), "qkv_to_dtype: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_empty_like(NULL), "qkv_empty_like: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_matmul(NULL, a), "qkv_matmul: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_affine(a, NULL, NULL), "qkv_affine: tensor argument 2 is NULL");
    NULL_GIVES(!qkv_index_select(NULL, 0, i), "qkv_index_select: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_gather(a, 0, NULL), "qkv_gather: tensor argument 2 is NULL");
    NULL_GIVES(!qkv_concat(2, (qkv_tensor *const[]){a, NULL}, 0),
               "qkv_concat: tensors[1] is NULL");
    NULL_GIVES(!qkv_stack(2, (qkv_tensor *const[]){NULL, a}, 0), "qkv_stack: tensors[0] is NULL");
    NULL_GIVES(!qkv_one_hot(NULL, 3), "qkv_one_hot: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_dropout(NULL, 0.5, false, NULL), "qkv_dropout: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_detach(NULL), "qkv_detach: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_cross_entropy(NULL, NULL, QKV_REDUCTION_MEAN, -100, 0),
               "qkv_cross_entropy: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_mse_loss(a, NULL, QKV_REDUCTION_SUM),
               "qkv_mse_loss: tensor argument 2 is NULL");
    NULL_GIVES(!qkv_backward(NULL), "qkv_backward: tensor argument 1 is NULL");
    NULL_GIVES(isnan(qkv_item(NULL)), "qkv_item: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_fill_(NULL, 1), "qkv_fill_: tensor argument 1 is NULL");
    NULL_GIVES(!qkv_copy_(NULL, a), "qkv_copy_: tensor argument 1 is NULL");
    /* As free(NULL): releasing or keeping nothing is no mistake. */
    qkv_clear_error();
    qkv_release(NULL);
    assert_null(qkv_keep(NULL));
    assert_null(qkv_error());
}
#undef NULL_GIVES

static void a_chain_reports_its_first_failing_op(void **state) {
    (void)state;
    qkv_tensor *x = qkv_ones(QKV_F32, QKV_SHAPE(4, 3));
    qkv_tensor *w = qkv_ones(QKV_F32, QKV_SHAPE(4));
    qkv_tensor *h = qkv_relu(qkv_mul(x, w));            /* fails here */
    qkv_tensor *y = qkv_softmax(qkv_sum(h, 5, false), 9); /* and never gets further */
    assert_null(qkv_mean_all(y));
    assert_string_equal(qkv_error(), "qkv_mul: shapes do not broadcast: [4,3] and [4]");
}

static void first_error_is_kept_until_cleared(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_transpose(a, 0, 7));
    assert_null(qkv_reshape(a, QKV_SHAPE(5)));
    assert_null(qkv_sub(a, qkv_zeros(QKV_F32, QKV_SHAPE(3, 2))));
    assert_string_equal(qkv_error(), "qkv_transpose: axis 7 out of range for [2,3]");
    assert_null(qkv_set_error("user: %d", 5));
    assert_string_equal(qkv_error(), "qkv_transpose: axis 7 out of range for [2,3]");
    qkv_clear_error();
    assert_null(qkv_error());
    assert_null(qkv_reshape(a, QKV_SHAPE(5)));
    assert_string_equal(qkv_error(), "qkv_reshape: cannot reshape [2,3] (6 elements) to [5]");
}

static void successful_ops_do_not_touch_the_error(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    assert_null(qkv_select(a, 0, 2));
    assert_non_null(qkv_add(a, a));
    assert_string_equal(qkv_error(), "qkv_select: index 2 out of range for axis 0 of [2,3]");
}

/* ---- per-thread state -------------------------------------------------------------------- */

typedef struct thread_report {
    bool saw_no_error;
    char own_error[128];
} thread_report;

static void *other_thread(void *arg) {
    thread_report *r = arg;
    r->saw_no_error = qkv_error() == NULL;
    qkv_scope_begin();
    qkv_tensor *a = qkv_ones(QKV_F64, QKV_SHAPE(3));
    if (!qkv_sum(a, 1, false) && qkv_error())
        snprintf(r->own_error, sizeof r->own_error, "%s", qkv_error());
    qkv_scope_end();
    qkv_clear_error();
    return NULL;
}

static void error_state_is_per_thread(void **state) {
    (void)state;
    assert_null(qkv_reshape(qkv_ones(QKV_F32, QKV_SHAPE(2)), QKV_SHAPE(3)));
    thread_report r = {false, ""};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, other_thread, &r), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(r.saw_no_error);
    assert_string_equal(r.own_error, "qkv_sum: axis 1 out of range for [3]");
    /* This thread's error is untouched by the other thread's error and its clear. */
    assert_string_equal(qkv_error(), "qkv_reshape: cannot reshape [2] (2 elements) to [3]");
}

/* ---- allocation failure ------------------------------------------------------------------ */

/* A small training step: creation, broadcasting, a dtype promotion, a view, reductions,
 * softmax and a backward pass. Returns false if anything failed. */
static bool training_step(void) {
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *w = qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(4, 3), &g), true);
    qkv_tensor *b = qkv_requires_grad_(qkv_zeros(QKV_F32, QKV_SHAPE(3)), true);
    qkv_tensor *x = qkv_arange(QKV_I64, 0, 8, 1);
    qkv_tensor *h = qkv_add(qkv_mul(qkv_reshape(x, QKV_SHAPE(2, 4, 1)), w), b);
    qkv_tensor *p = qkv_log_softmax(qkv_transpose(qkv_tanh(h), 1, 2), -1);
    qkv_tensor *loss = qkv_neg(qkv_mean_all(qkv_max(p, 2, false)));
    if (!loss || !qkv_backward(loss)) return false;
    return w->grad && b->grad;
}

static void every_allocation_failure_is_reported_and_leaks_nothing(void **state) {
    (void)state;
    qkv_memory_stats start = qkv_memory_stats_get();
    qkv_scope_begin();
    qkv_debug_fail_alloc_at(UINT64_MAX); /* count the allocations of one good run */
    if (!training_step()) fail_msg("%s", qkv_error());
    uint64_t total = qkv_debug_alloc_count();
    qkv_debug_fail_alloc_at(0);
    qkv_scope_end();
    assert_true(total > 20);
    int failed = 0;
    for (uint64_t n = 1; n <= total; n++) {
        qkv_clear_error();
        qkv_scope_begin();
        qkv_debug_fail_alloc_at(n);
        bool ok = training_step();
        qkv_debug_fail_alloc_at(0);
        const char *err = qkv_error();
        if (!ok) {
            assert_non_null(err);
            failed++;
        }
        if (err && strncmp(err, HARNESS_OOM, strlen(HARNESS_OOM)) != 0)
            fail_msg("allocation %llu: unexpected error: %s", (unsigned long long)n, err);
        qkv_scope_end();
        qkv_memory_stats now = qkv_memory_stats_get();
        if (now.live_tensors != start.live_tensors || now.bytes_in_use != start.bytes_in_use)
            fail_msg("allocation %llu failing leaks %lld tensors, %lld bytes",
                     (unsigned long long)n,
                     (long long)(now.live_tensors - start.live_tensors),
                     (long long)(now.bytes_in_use - start.bytes_in_use));
    }
    assert_true(failed > (int)total / 2);
    qkv_clear_error();
}

/* A small attention classifier: token embedding, one pre-norm encoder layer with dropout over
 * a key padding mask, the first position through a linear head. */
typedef struct tiny_attention_model {
    qkv_module base;
    qkv_embedding *embed;
    qkv_transformer_encoder_layer *layer;
    qkv_linear *head;
} tiny_attention_model;

static tiny_attention_model *tiny_attention_model_new(qkv_generator *g) {
    qkv_transformer_config c = {.d_model = 4, .nhead = 2, .dim_feedforward = 8, .dropout = 0.1,
                                .activation = QKV_ACT_GELU, .norm_first = true};
    tiny_attention_model *m = qkv_module_new("tiny_attention", sizeof *m, NULL);
    if (!m) return NULL;
    m->embed = qkv_module_add_module(&m->base, "embed",
                                     QKV_MODULE(qkv_embedding_new(10, 4, 0, g)));
    m->layer = qkv_module_add_module(&m->base, "layer",
                                     QKV_MODULE(qkv_transformer_encoder_layer_new(&c, g)));
    m->head = qkv_module_add_module(&m->base, "head", QKV_MODULE(qkv_linear_new(4, 3, true, g)));
    if (!m->embed || !m->layer || !m->head) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

/* Builds the model and an Adam optimizer, runs forward, cross entropy, backward and one step,
 * and frees it all. Writes the loss to *loss_out; false if anything failed. */
static bool attention_training_step(double *loss_out) {
    qkv_generator g;
    qkv_generator_init(&g, 7);
    tiny_attention_model *m = tiny_attention_model_new(&g);
    qkv_named_list *params = m ? qkv_module_parameters(QKV_MODULE(m)) : NULL;
    qkv_optimizer *opt = qkv_adam_new();
    bool ok = params && opt && qkv_optimizer_add_group(opt, params, qkv_adam_config(1e-2));
    if (ok) {
        qkv_scope_begin();
        qkv_tensor *ids = qkv_from_array(QKV_I64, QKV_SHAPE(2, 3),
                                         (const int64_t[]){4, 7, 0, 2, 9, 5});
        qkv_tensor *pad = qkv_from_array(QKV_BOOL, QKV_SHAPE(2, 3),
                                         (const bool[]){0, 0, 1, 0, 0, 0});
        qkv_tensor *targets = qkv_from_array(QKV_I64, QKV_SHAPE(2), (const int64_t[]){2, 0});
        qkv_encoder_options opts = {.src_key_padding_mask = pad};
        /* A NULL mask means no mask, so a mask that failed to be made must stop the step. */
        qkv_tensor *x = !pad ? NULL : qkv_transformer_encoder_layer_forward(
            m->layer, qkv_embedding_forward(m->embed, ids), &opts);
        qkv_tensor *logits = qkv_linear_forward(m->head, qkv_select(x, 1, 0));
        qkv_tensor *loss = qkv_cross_entropy(logits, targets, QKV_REDUCTION_MEAN, -100, 0.0);
        ok = loss && qkv_backward(loss) && qkv_optimizer_step(opt);
        if (ok) *loss_out = qkv_item(loss);
        qkv_scope_end();
    }
    qkv_optimizer_free(opt);
    qkv_named_list_free(params);
    qkv_module_free(QKV_MODULE(m));
    return ok;
}

static void attention_training_step_survives_every_allocation_failure(void **state) {
    (void)state;
    double expected = 0, loss = 0;
    qkv_clear_error();
    if (!attention_training_step(&expected)) fail_msg("%s", qkv_error());
    allocation_sweep sweep = {0};
    while (allocation_sweep_arm(&sweep))
        allocation_sweep_check(&sweep, attention_training_step(&loss));
    assert_true(sweep.failures > 100);
    /* The step after the sweep is the undisturbed step, bit for bit. */
    assert_memory_equal(&loss, &expected, sizeof loss);
}

static void opening_a_scope_allocates_nothing(void **state) {
    (void)state;
    qkv_debug_fail_alloc_at(UINT64_MAX);
    qkv_scope_begin();
    qkv_scope_begin();
    uint64_t count = qkv_debug_alloc_count();
    qkv_scope_end();
    qkv_scope_end();
    qkv_debug_fail_alloc_at(0);
    assert_int_equal(count, 0);
}

static void failed_allocation_message_names_the_size(void **state) {
    (void)state;
    qkv_debug_fail_alloc_at(2); /* the storage's data, after its header */
    qkv_tensor *t = qkv_empty(QKV_F64, QKV_SHAPE(1000));
    qkv_debug_fail_alloc_at(0);
    assert_null(t);
    assert_string_equal(qkv_error(), "qkv: out of memory allocating 8000 bytes");
    qkv_clear_error();
    assert_non_null(qkv_empty(QKV_F64, QKV_SHAPE(1000))); /* the switch is off again */
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(broadcast_mismatch_names_op_and_shapes),
        T(axis_out_of_range_names_op_axis_and_shape),
        T(bad_reshape_names_both_shapes),
        T(matmul_names_both_shapes_when_inner_dimensions_differ),
        T(wrong_dtype_names_op_and_dtype),
        T(index_out_of_range_names_index_and_shape),
        T(bad_sizes_and_arguments_name_the_op),
        T(views_and_creation_refuse_overflowing_sizes),
        T(every_view_and_creation_op_refuses_overflowing_sizes),
        T(overflowing_views_name_the_op),
        T(overflowing_creation_and_indexing_name_the_op),
        T(copy_and_fill_refuse_a_destination_whose_elements_share_memory),
        T(missing_pointer_arguments_are_errors_not_crashes),
        T(null_inputs_give_null_and_name_the_function_unless_an_error_is_pending),
        T(a_chain_reports_its_first_failing_op),
        T(first_error_is_kept_until_cleared),
        T(successful_ops_do_not_touch_the_error),
        T(error_state_is_per_thread),
        T(failed_allocation_message_names_the_size),
#undef T
        cmocka_unit_test_setup_teardown(every_allocation_failure_is_reported_and_leaks_nothing,
                                        NULL, NULL),
        cmocka_unit_test(opening_a_scope_allocates_nothing),
        cmocka_unit_test(attention_training_step_survives_every_allocation_failure),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
