/* Views and copies: reshape, flatten, transpose, permute, slice, narrow, select, squeeze,
 * unsqueeze, expand, contiguous, clone, to_dtype. Values, strides and storage offsets are
 * torch's, from tests/fixtures/gen_views.py, over a = arange(24) as [2,3,4] and
 * b = arange(12) as [3,4]. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "qkv.h"
#include "fixtures/views_fixtures.h"
#include "harness.h"

static qkv_tensor *arange_a(void) {
    return qkv_reshape(qkv_arange(QKV_F32, 0, 24, 1), QKV_SHAPE(2, 3, 4));
}

static qkv_tensor *arange_b(void) {
    return qkv_reshape(qkv_arange(QKV_F32, 0, 12, 1), QKV_SHAPE(3, 4));
}

/* v is a view of base with torch's values, strides (size-1 dims aside) and offset. */
static void assert_view(const qkv_tensor *v, const qkv_tensor *base, const fx_view *want,
                        const char *what) {
    fx_assert_close(v, QKV_F32, &want->t, 0, 0, what);
    assert_ptr_equal(v->storage, base->storage);
    for (int i = 0; i < v->ndim; i++)
        if (v->shape[i] != 1) assert_int_equal(v->strides[i], want->strides[i]);
    assert_int_equal(v->offset, want->offset);
}

/* ---- reshape, flatten -------------------------------------------------------------------- */

static void reshape_of_contiguous_tensor_is_a_view(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    qkv_tensor *r = qkv_reshape(a, QKV_SHAPE(4, 6));
    assert_non_null(r);
    assert_ptr_equal(r->storage, a->storage);
    assert_int_equal(r->strides[0], 6);
    assert_int_equal(r->strides[1], 1);
    assert_true(qkv_get(r, (const int64_t[]){3, 5}) == 23);
    /* Writing through the view changes the original. */
    assert_true(qkv_fill_(qkv_select(r, 0, 0), -1));
    assert_true(qkv_get(a, (const int64_t[]){0, 1, 1}) == -1);
    assert_true(qkv_get(a, (const int64_t[]){0, 1, 2}) == 6);
}

static void reshape_of_transposed_tensor_copies(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    qkv_tensor *r = qkv_reshape(qkv_transpose(a, 0, 2), QKV_SHAPE(-1));
    fx_assert_close(r, QKV_F32, &fx_transposed_flat, 0, 0, "transpose(0, 2).reshape(-1)");
    assert_ptr_not_equal(r->storage, a->storage);
    assert_true(qkv_is_contiguous(r));
}

static void reshape_keeps_view_when_strides_allow_it(void **state) {
    (void)state;
    /* A slice along the first axis keeps rows contiguous: merging the last two axes works. */
    qkv_tensor *a = arange_a();
    qkv_tensor *s = qkv_slice(a, 1, 1, 3, 1);
    qkv_tensor *r = qkv_reshape(s, QKV_SHAPE(2, 8));
    assert_non_null(r);
    assert_ptr_equal(r->storage, a->storage);
    assert_true(qkv_get(r, (const int64_t[]){1, 0}) == 16);
    /* Merging the first two axes of it does not: that must copy. */
    qkv_tensor *c = qkv_reshape(s, QKV_SHAPE(4, 4));
    assert_non_null(c);
    assert_ptr_not_equal(c->storage, a->storage);
    assert_true(qkv_get(c, (const int64_t[]){2, 0}) == 16);
}

static void reshape_infers_one_size(void **state) {
    (void)state;
    qkv_tensor *r = qkv_reshape(arange_a(), QKV_SHAPE(3, -1, 2));
    assert_non_null(r);
    assert_int_equal(r->ndim, 3);
    assert_int_equal(r->shape[1], 4);
    qkv_tensor *e = qkv_reshape(qkv_zeros(QKV_F32, QKV_SHAPE(0, 5)), QKV_SHAPE(-1, 5));
    assert_non_null(e);
    assert_int_equal(e->shape[0], 0);
    qkv_tensor *s = qkv_reshape(qkv_ones(QKV_F32, QKV_SHAPE(1, 1)), 0, NULL);
    assert_non_null(s);
    assert_int_equal(s->ndim, 0);
}

static void reshape_to_wrong_size_is_an_error(void **state) {
    (void)state;
    assert_null(qkv_reshape(arange_b(), QKV_SHAPE(5, -1)));
    assert_string_equal(qkv_error(), "qkv_reshape: cannot reshape [3,4] (12 elements) to [5,-1]");
    qkv_clear_error();
    assert_null(qkv_reshape(arange_b(), QKV_SHAPE(4, 4)));
    assert_string_equal(qkv_error(), "qkv_reshape: cannot reshape [3,4] (12 elements) to [4,4]");
    qkv_clear_error();
    assert_null(qkv_reshape(arange_b(), QKV_SHAPE(-1, -1)));
    assert_string_equal(qkv_error(), "qkv_reshape: bad size -1");
    qkv_clear_error();
    assert_null(qkv_reshape(arange_b(), QKV_SHAPE(-2, -6)));
    assert_string_equal(qkv_error(), "qkv_reshape: bad size -2");
}

static void flatten_merges_a_range_of_axes(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    assert_view(qkv_flatten(a, 1, 2), a, &fx_flatten_1_2, "flatten(1, 2)");
    qkv_tensor *all = qkv_flatten(a, 0, -1);
    assert_int_equal(all->ndim, 1);
    assert_int_equal(all->shape[0], 24);
    assert_null(qkv_flatten(a, 2, 1));
    assert_string_equal(qkv_error(), "qkv_flatten: start axis 2 after end axis 1");
}

/* ---- transpose, permute ------------------------------------------------------------------ */

static void transpose_swaps_strides(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    assert_view(qkv_transpose(a, 0, 2), a, &fx_transpose_0_2, "transpose(0, 2)");
    assert_view(qkv_transpose(a, -1, -2), a, &fx_transpose_neg, "transpose(-1, -2)");
    assert_false(qkv_is_contiguous(qkv_transpose(a, 0, 1)));
}

static void permute_reorders_axes(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    assert_view(qkv_permute(a, (const int[]){2, 0, 1}), a, &fx_permute_2_0_1, "permute(2,0,1)");
    assert_view(qkv_permute(a, (const int[]){-1, 0, 1}), a, &fx_permute_2_0_1,
                "permute(-1,0,1)");
}

static void permute_with_repeated_axis_is_an_error(void **state) {
    (void)state;
    assert_null(qkv_permute(arange_a(), (const int[]){0, 2, 0}));
    assert_string_equal(qkv_error(), "qkv_permute: axis 0 appears twice");
}

static void transpose_with_bad_axis_is_an_error(void **state) {
    (void)state;
    assert_null(qkv_transpose(arange_b(), 0, 2));
    assert_string_equal(qkv_error(), "qkv_transpose: axis 2 out of range for [3,4]");
    qkv_clear_error();
    assert_null(qkv_transpose(arange_b(), -3, 0));
    assert_string_equal(qkv_error(), "qkv_transpose: axis -3 out of range for [3,4]");
}

/* ---- slice, narrow, select --------------------------------------------------------------- */

static void slice_follows_python_semantics(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    assert_view(qkv_slice(a, 1, 0, 3, 2), a, &fx_slice_step_2, "a[:, 0:3:2]");
    assert_view(qkv_slice(a, 2, -3, -1, 1), a, &fx_slice_negative_bounds, "a[:, :, -3:-1]");
    assert_view(qkv_slice(a, -1, 1, INT64_MAX, 3), a, &fx_slice_start_step_3, "a[:, :, 1::3]");
    assert_view(qkv_slice(a, 1, 1, 100, 1), a, &fx_slice_end_clamped, "a[:, 1:100]");
    assert_view(qkv_slice(a, 1, -100, 2, 1), a, &fx_slice_negative_start_clamped,
                "a[:, -100:2]");
    assert_view(qkv_slice(a, 1, 2, 1, 1), a, &fx_slice_empty, "a[:, 2:1]");
}

static void slice_of_a_transposed_view_composes_strides(void **state) {
    (void)state;
    qkv_tensor *b = arange_b();
    assert_view(qkv_slice(qkv_transpose(b, 0, 1), 0, 1, 4, 2), b, &fx_slice_of_transpose,
                "b.t()[1:4:2]");
}

static void slice_with_non_positive_step_is_an_error(void **state) {
    (void)state;
    assert_null(qkv_slice(arange_b(), 0, 0, 3, 0));
    assert_string_equal(qkv_error(), "qkv_slice: step must be positive, not 0");
    qkv_clear_error();
    assert_null(qkv_slice(arange_b(), 2, 0, 3, 1));
    assert_string_equal(qkv_error(), "qkv_slice: axis 2 out of range for [3,4]");
}

static void narrow_takes_a_window(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    assert_view(qkv_narrow(a, 2, 1, 2), a, &fx_narrow_2_1_2, "narrow(2, 1, 2)");
    assert_view(qkv_narrow(a, -1, -3, 2), a, &fx_narrow_2_1_2, "narrow(-1, -3, 2)");
    assert_null(qkv_narrow(a, 2, 3, 2));
    assert_string_equal(qkv_error(), "qkv_narrow: 2 elements from 3 are outside axis 2 of [2,3,4]");
}

static void select_drops_the_axis(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    assert_view(qkv_select(a, 1, -1), a, &fx_select_1_last, "select(1, -1)");
    assert_view(qkv_select(a, 0, 1), a, &fx_select_0_1, "select(0, 1)");
    qkv_tensor *s = qkv_select(qkv_select(qkv_select(a, 0, 1), 0, 2), 0, 3);
    assert_int_equal(s->ndim, 0);
    assert_true(qkv_item(s) == 23);
    assert_null(qkv_select(a, 1, 3));
    assert_string_equal(qkv_error(), "qkv_select: index 3 out of range for axis 1 of [2,3,4]");
}

/* ---- squeeze, unsqueeze, expand ---------------------------------------------------------- */

static void unsqueeze_inserts_a_size_one_axis(void **state) {
    (void)state;
    qkv_tensor *b = arange_b();
    assert_view(qkv_unsqueeze(b, 1), b, &fx_unsqueeze_1, "unsqueeze(1)");
    qkv_tensor *last = qkv_unsqueeze(b, -1);
    assert_int_equal(last->ndim, 3);
    assert_int_equal(last->shape[2], 1);
    assert_null(qkv_unsqueeze(b, 3));
    assert_string_equal(qkv_error(), "qkv_unsqueeze: axis 3 out of range for [3,4]");
}

static void squeeze_removes_size_one_axes(void **state) {
    (void)state;
    qkv_tensor *t = qkv_zeros(QKV_F32, QKV_SHAPE(1, 3, 1, 2));
    qkv_tensor *s0 = qkv_squeeze(t, 0);
    assert_int_equal(s0->ndim, 3);
    assert_int_equal(s0->shape[0], 3);
    qkv_tensor *s2 = qkv_squeeze(t, -2);
    assert_int_equal(s2->ndim, 3);
    assert_int_equal(s2->shape[2], 2);
    qkv_tensor *same = qkv_squeeze(t, 1); /* size 3: unchanged, as torch.squeeze */
    assert_int_equal(same->ndim, 4);
    qkv_tensor *all = qkv_squeeze_all(t);
    assert_int_equal(all->ndim, 2);
    assert_int_equal(all->shape[0], 3);
    assert_int_equal(all->shape[1], 2);
    assert_ptr_equal(all->storage, t->storage);
}

static void expand_broadcasts_with_zero_strides(void **state) {
    (void)state;
    qkv_tensor *b = arange_b();
    qkv_tensor *col = qkv_slice(b, 1, 0, 1, 1);
    assert_view(qkv_expand(col, QKV_SHAPE(2, 3, 4)), b, &fx_expand_column, "expand(2, 3, 4)");
    qkv_tensor *keep = qkv_expand(col, QKV_SHAPE(2, -1, 5));
    assert_int_equal(keep->shape[1], 3);
    assert_int_equal(keep->strides[0], 0);
    assert_int_equal(keep->strides[2], 0);
    assert_null(qkv_expand(b, QKV_SHAPE(3, 5)));
    assert_string_equal(qkv_error(),
                        "qkv_expand: cannot expand [3,4]: size 4 to 5 in dimension 1");
}

/* ---- contiguous, clone, to_dtype --------------------------------------------------------- */

static void contiguous_copies_only_when_needed(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    qkv_tensor *same = qkv_contiguous(a);
    assert_ptr_equal(same->storage, a->storage);
    qkv_tensor *c = qkv_contiguous(qkv_permute(a, (const int[]){1, 2, 0}));
    fx_assert_close(c, QKV_F32, &fx_permuted_contiguous, 0, 0, "permute(1,2,0).contiguous()");
    assert_ptr_not_equal(c->storage, a->storage);
    assert_true(qkv_is_contiguous(c));
    assert_int_equal(c->strides[0], 8);
    assert_int_equal(c->strides[1], 2);
    assert_int_equal(c->strides[2], 1);
}

static void clone_always_copies(void **state) {
    (void)state;
    qkv_tensor *a = arange_a();
    qkv_tensor *c = qkv_clone(a);
    assert_ptr_not_equal(c->storage, a->storage);
    assert_true(qkv_fill_(c, 0));
    assert_true(qkv_get(a, (const int64_t[]){1, 2, 3}) == 23);
    qkv_tensor *e = qkv_clone(qkv_expand(qkv_scalar(QKV_F64, 2), QKV_SHAPE(3, 2)));
    assert_int_equal(e->strides[0], 2);
    assert_true(qkv_get(e, (const int64_t[]){2, 1}) == 2);
}

static void to_dtype_converts_like_torch(void **state) {
    (void)state;
    qkv_tensor *x = fx_make(&fx_to_convert, QKV_F64);
    fx_assert_close(qkv_to_dtype(qkv_slice(x, 1, 0, 2, 1), QKV_I64), QKV_I64, &fx_to_i64, 0, 0,
                    "to(int64)");
    fx_assert_close(qkv_to_dtype(x, QKV_BOOL), QKV_BOOL, &fx_to_bool, 0, 0, "to(bool)");
    fx_assert_close(qkv_to_dtype(x, QKV_F32), QKV_F32, &fx_to_f32, 0, 0, "to(float32)");
    qkv_tensor *same = qkv_to_dtype(x, QKV_F64);
    assert_ptr_not_equal(same->storage, x->storage);
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(reshape_of_contiguous_tensor_is_a_view),
        T(reshape_of_transposed_tensor_copies),
        T(reshape_keeps_view_when_strides_allow_it),
        T(reshape_infers_one_size),
        T(reshape_to_wrong_size_is_an_error),
        T(flatten_merges_a_range_of_axes),
        T(transpose_swaps_strides),
        T(permute_reorders_axes),
        T(permute_with_repeated_axis_is_an_error),
        T(transpose_with_bad_axis_is_an_error),
        T(slice_follows_python_semantics),
        T(slice_of_a_transposed_view_composes_strides),
        T(slice_with_non_positive_step_is_an_error),
        T(narrow_takes_a_window),
        T(select_drops_the_axis),
        T(unsqueeze_inserts_a_size_one_axis),
        T(squeeze_removes_size_one_axes),
        T(expand_broadcasts_with_zero_strides),
        T(contiguous_copies_only_when_needed),
        T(clone_always_copies),
        T(to_dtype_converts_like_torch),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
