/* qkv_matmul against torch.matmul: 1-D, 2-D and batched operands, batch dimensions broadcast
 * either way, transposed, permuted, strided and expanded views, empty and size-1 dims, huge
 * magnitudes, and the gradients of both operands. The cases live in
 * tests/fixtures/matmul_fixtures.h (written by gen_matmul.py). Also: strided operands are read
 * in place, not copied, and every mistake names the op and both shapes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "qkv.h"
#include "fixtures/matmul_fixtures.h"
#include "harness.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* Applies a fixture's operand view (recorded, so gradients reach the stored tensor). */
static qkv_tensor *apply_view(qkv_tensor *t, const fx_view *v) {
    qkv_tensor *out = t;
    int axes[8];
    switch (v->kind) {
    case 0: return t;
    case 't': out = qkv_transpose(t, -2, -1); break;
    case 's': out = qkv_slice(t, -1, 0, INT64_MAX, 2); break;
    case 'e': out = qkv_expand(t, v->n, v->args); break;
    case 'p':
        for (int i = 0; i < v->n; i++) axes[i] = (int)v->args[i];
        out = qkv_permute(t, axes);
        break;
    }
    assert_non_null(out);
    assert_false(qkv_is_contiguous(out));
    return out;
}

static void describe(char *buf, size_t size, const fx_matmul *c, const char *part) {
    snprintf(buf, size, "%s (%s @ %s): %s", c->what, qkv_dtype_name(c->dta),
             qkv_dtype_name(c->dtb), part);
}

/* Exact cases compare at the dtype's few-ulp tolerance; the rounding case at its own. */
static void assert_part(const qkv_tensor *t, qkv_dtype dtype, const fx_tensor *want,
                        const fx_matmul *c, const char *part) {
    char what[200];
    describe(what, sizeof what, c, part);
    double rtol = c->rtol > 0 ? c->rtol : fx_rtol(dtype);
    fx_assert_close(t, dtype, want, rtol, fx_atol(dtype), what);
}

static void matmul_matches_torch_in_every_case(void **state) {
    (void)state;
    for (size_t i = 0; i < N_OF(fx_matmul_cases); i++) {
        const fx_matmul *c = &fx_matmul_cases[i];
        qkv_scope_begin();
        qkv_tensor *a = apply_view(fx_make(&c->a, c->dta), &c->va);
        qkv_tensor *b = apply_view(fx_make(&c->b, c->dtb), &c->vb);
        assert_part(qkv_matmul(a, b), c->dout, &c->out, c, "out");
        qkv_scope_end();
    }
    assert_true(N_OF(fx_matmul_cases) >= 40);
    assert_null(qkv_error());
}

static void matmul_gradients_match_torch_in_every_case(void **state) {
    (void)state;
    for (size_t i = 0; i < N_OF(fx_matmul_cases); i++) {
        const fx_matmul *c = &fx_matmul_cases[i];
        qkv_scope_begin();
        qkv_tensor *a = qkv_requires_grad_(fx_make(&c->a, c->dta), true);
        qkv_tensor *b = qkv_requires_grad_(fx_make(&c->b, c->dtb), true);
        qkv_tensor *out = qkv_matmul(apply_view(a, &c->va), apply_view(b, &c->vb));
        qkv_tensor *loss = qkv_sum_all(qkv_mul(out, fx_make(&c->w, c->dout)));
        assert_non_null(loss);
        assert_true(qkv_backward(loss));
        assert_part(a->grad, c->dta, &c->da, c, "grad a");
        assert_part(b->grad, c->dtb, &c->db, c, "grad b");
        qkv_scope_end();
    }
    assert_null(qkv_error());
}

/* ---- baddbmm ----------------------------------------------------------------------------- */

static void assert_baddbmm_part(const qkv_tensor *t, const fx_tensor *want, const fx_baddbmm *c,
                                const char *part) {
    char what[200];
    snprintf(what, sizeof what, "baddbmm %s (%s): %s", c->what, qkv_dtype_name(c->dt), part);
    double rtol = c->rtol > 0 ? c->rtol : fx_rtol(c->dt);
    fx_assert_close(t, c->dt, want, rtol, fx_atol(c->dt), what);
}

/* Every form of input (one row per matrix, added by the GEMM; broadcast otherwise, added
 * after; none), the values and all three gradients, against torch. */
static void baddbmm_matches_torch_in_every_case(void **state) {
    (void)state;
    for (size_t i = 0; i < N_OF(fx_baddbmm_cases); i++) {
        const fx_baddbmm *c = &fx_baddbmm_cases[i];
        qkv_scope_begin();
        qkv_tensor *in = c->input.data ? qkv_requires_grad_(fx_make(&c->input, c->dt), true)
                                       : NULL;
        qkv_tensor *a = qkv_requires_grad_(fx_make(&c->a, c->dt), true);
        qkv_tensor *b = qkv_requires_grad_(fx_make(&c->b, c->dt), true);
        qkv_tensor *out = qkv_baddbmm(in, a, apply_view(b, &c->vb), c->alpha);
        assert_baddbmm_part(out, &c->out, c, "out");
        assert_true(qkv_backward(qkv_sum_all(qkv_mul(out, fx_make(&c->w, c->dt)))));
        if (in) assert_baddbmm_part(in->grad, &c->dinput, c, "grad input");
        assert_baddbmm_part(a->grad, &c->da, c, "grad a");
        assert_baddbmm_part(b->grad, &c->db, c, "grad b");
        qkv_scope_end();
    }
    assert_null(qkv_error());
}

/* The GEMM's epilogue and the add after it give one result: a key mask is added the same way
 * whether it is read as one row per matrix or, through a non-contiguous copy, after. */
static void baddbmm_row_input_equals_the_sum_after(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 7);
    qkv_tensor *a = qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 13, 8), &g);
    qkv_tensor *b = qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 8, 29), &g);
    qkv_tensor *row = qkv_randn(QKV_F32, QKV_SHAPE(2, 1, 1, 29), &g);
    /* the same values with columns two apart: not a row the GEMM can add */
    qkv_tensor *pairs = qkv_expand(qkv_unsqueeze(row, 4), QKV_SHAPE(2, 1, 1, 29, 2));
    qkv_tensor *spread = qkv_slice(qkv_reshape(qkv_contiguous(pairs), QKV_SHAPE(2, 1, 1, 58)), 3,
                                   0, 58, 2);
    assert_false(qkv_is_contiguous(spread));
    qkv_tensor *fused = qkv_baddbmm(row, a, b, 0.3);
    qkv_tensor *after = qkv_baddbmm(spread, a, b, 0.3);
    qkv_tensor *composed = qkv_add(qkv_baddbmm(NULL, a, b, 0.3), row);
    assert_non_null(fused);
    assert_true(qkv_item(qkv_max_all(qkv_abs(qkv_sub(fused, composed)))) <= 1e-5);
    assert_true(qkv_item(qkv_max_all(qkv_abs(qkv_sub(after, composed)))) == 0);
}

static void baddbmm_input_must_broadcast_to_the_product(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3, 4));
    qkv_tensor *b = qkv_zeros(QKV_F32, QKV_SHAPE(4, 5));
    assert_null(qkv_baddbmm(qkv_zeros(QKV_F32, QKV_SHAPE(2, 3, 4)), a, b, 1));
    assert_string_equal(qkv_error(), "qkv_baddbmm: input [2,3,4] does not broadcast to the "
                                     "shape of [2,3,4] @ [4,5]");
    qkv_clear_error();
    assert_null(qkv_baddbmm(qkv_zeros(QKV_F32, QKV_SHAPE(7, 2, 3, 5)), a, b, 1));
    assert_string_equal(qkv_error(), "qkv_baddbmm: input [7,2,3,5] does not broadcast to the "
                                     "shape of [2,3,4] @ [4,5]");
    qkv_clear_error();
    assert_null(qkv_baddbmm(NULL, a, b, NAN));
    assert_string_equal(qkv_error(), "qkv_baddbmm: alpha nan is not finite");
    qkv_clear_error();
    assert_null(qkv_baddbmm(NULL, NULL, b, 2));
    assert_string_equal(qkv_error(), "qkv_baddbmm: tensor argument 1 is NULL");
    qkv_clear_error();
}

/* ---- operands read in place -------------------------------------------------------------- */

/* Allocations made by one product (the result and the kernel's own buffers). */
static uint64_t allocations_of(const qkv_tensor *a, const qkv_tensor *b) {
    uint64_t before = qkv_memory_stats_get().allocs;
    assert_non_null(qkv_matmul(a, b));
    return qkv_memory_stats_get().allocs - before;
}

static void transposed_and_permuted_operands_are_not_copied(void **state) {
    (void)state;
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3, 16, 8));
    qkv_tensor *b = qkv_ones(QKV_F32, QKV_SHAPE(2, 3, 8, 16));
    uint64_t plain = allocations_of(a, b);
    /* the same product with both operands as views whose layout forbids a plain reshape */
    qkv_tensor *at = qkv_transpose(qkv_ones(QKV_F32, QKV_SHAPE(2, 3, 8, 16)), -1, -2);
    qkv_tensor *bp = qkv_permute(qkv_ones(QKV_F32, QKV_SHAPE(2, 16, 3, 8)),
                                 (const int[]){0, 2, 3, 1});
    assert_false(qkv_is_contiguous(at));
    assert_false(qkv_is_contiguous(bp));
    assert_int_equal(allocations_of(at, bp), plain);
    /* a strided slice and an expanded batch likewise */
    qkv_tensor *as = qkv_slice(qkv_ones(QKV_F32, QKV_SHAPE(2, 3, 16, 16)), -1, 0, 16, 2);
    qkv_tensor *be = qkv_expand(qkv_ones(QKV_F32, QKV_SHAPE(1, 1, 8, 16)),
                                QKV_SHAPE(2, 3, 8, 16));
    assert_int_equal(allocations_of(as, be), plain);
}

/* sum((q K^T)^2) over heads split from [B, T, H * D] leaves as attention splits them, or over
 * leaves already split; backpropagated. */
static void head_product_backward(qkv_tensor *x, qkv_tensor *y, bool split) {
    enum { B = 2, T = 64, H = 4, D = 32 };
    qkv_tensor *q = x, *k = y;
    if (split) {
        q = qkv_permute(qkv_reshape(x, QKV_SHAPE(B, T, H, D)), (const int[]){0, 2, 1, 3});
        k = qkv_permute(qkv_reshape(y, QKV_SHAPE(B, T, H, D)), (const int[]){0, 2, 1, 3});
    }
    qkv_tensor *s = qkv_matmul(q, qkv_transpose(k, -1, -2));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(s, s))));
}

/* The gradients of head-split and transposed operands are computed in their base's layout
 * (the product's transpose where the base's rows are the operand's columns): the same sums,
 * so they equal those of leaves already split into heads bit for bit. */
static void gradients_of_head_split_operands_equal_those_of_split_leaves(void **state) {
    (void)state;
    enum { B = 2, T = 64, H = 4, D = 32 };
    qkv_generator g;
    qkv_generator_init(&g, 5);
    qkv_tensor *x = qkv_randn(QKV_F32, QKV_SHAPE(B, T, H * D), &g);
    qkv_tensor *y = qkv_randn(QKV_F32, QKV_SHAPE(B, T, H * D), &g);
    qkv_tensor *xh = qkv_requires_grad_(qkv_contiguous(qkv_permute(
        qkv_reshape(x, QKV_SHAPE(B, T, H, D)), (const int[]){0, 2, 1, 3})), true);
    qkv_tensor *yh = qkv_requires_grad_(qkv_contiguous(qkv_permute(
        qkv_reshape(y, QKV_SHAPE(B, T, H, D)), (const int[]){0, 2, 1, 3})), true);
    qkv_requires_grad_(x, true);
    qkv_requires_grad_(y, true);
    head_product_backward(x, y, true);
    head_product_backward(xh, yh, false);
    static float a[B * T * H * D], b[B * T * H * D];
    qkv_tensor *pairs[2][2] = {{x->grad, xh->grad}, {y->grad, yh->grad}};
    for (int i = 0; i < 2; i++) {
        qkv_tensor *back = qkv_permute(qkv_reshape(pairs[i][0], QKV_SHAPE(B, T, H, D)),
                                       (const int[]){0, 2, 1, 3});
        assert_true(qkv_is_contiguous(pairs[i][0]));
        assert_true(qkv_copy_out(back, QKV_F32, a));
        assert_true(qkv_copy_out(pairs[i][1], QKV_F32, b));
        assert_memory_equal(a, b, sizeof a);
    }
}

static void product_with_a_transposed_view_is_contiguous_and_exact(void **state) {
    (void)state;
    qkv_tensor *a = qkv_reshape(qkv_arange(QKV_F64, 0, 6, 1), QKV_SHAPE(2, 3));
    qkv_tensor *out = qkv_matmul(a, qkv_transpose(a, 0, 1));
    assert_non_null(out);
    assert_true(qkv_is_contiguous(out));
    /* [[0,1,2],[3,4,5]] @ [[0,3],[1,4],[2,5]] = [[5,14],[14,50]] */
    double v[4];
    assert_true(qkv_copy_out(out, QKV_F64, v));
    assert_true(v[0] == 5 && v[1] == 14 && v[2] == 14 && v[3] == 50);
}

/* ---- errors ------------------------------------------------------------------------------ */

static void matmul_inner_dimensions_must_agree(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(32, 64, 128));
    qkv_tensor *b = qkv_zeros(QKV_F32, QKV_SHAPE(64, 10));
    assert_null(qkv_matmul(a, b));
    assert_string_equal(qkv_error(),
                        "qkv_matmul: inner dimensions differ: [32,64,128] @ [64,10]");
    qkv_clear_error();
    assert_null(qkv_matmul(qkv_zeros(QKV_F32, QKV_SHAPE(3)), qkv_zeros(QKV_F32, QKV_SHAPE(4))));
    assert_string_equal(qkv_error(), "qkv_matmul: inner dimensions differ: [3] @ [4]");
}

static void matmul_batch_dimensions_must_broadcast(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3, 4));
    qkv_tensor *b = qkv_zeros(QKV_F32, QKV_SHAPE(5, 4, 2));
    assert_null(qkv_matmul(a, b));
    assert_string_equal(qkv_error(),
                        "qkv_matmul: batch dimensions do not broadcast: [2,3,4] @ [5,4,2]");
}

static void matmul_needs_float_operands_with_a_dimension(void **state) {
    (void)state;
    qkv_tensor *m = qkv_zeros(QKV_F32, QKV_SHAPE(2, 2));
    assert_null(qkv_matmul(qkv_zeros(QKV_I64, QKV_SHAPE(2, 2)), m));
    assert_string_equal(qkv_error(),
                        "qkv_matmul: operands must be f32, f64 or bf16: [2,2] @ [2,2]");
    qkv_clear_error();
    assert_null(qkv_matmul(qkv_scalar(QKV_F32, 2), m));
    assert_string_equal(qkv_error(), "qkv_matmul: both operands need a dimension: [] @ [2,2]");
}

static void matmul_of_null_is_null_naming_the_argument(void **state) {
    (void)state;
    qkv_tensor *m = qkv_zeros(QKV_F32, QKV_SHAPE(2, 2));
    assert_null(qkv_matmul(NULL, m));
    assert_string_equal(qkv_error(), "qkv_matmul: tensor argument 1 is NULL");
    qkv_clear_error();
    assert_null(qkv_matmul(m, NULL));
    assert_string_equal(qkv_error(), "qkv_matmul: tensor argument 2 is NULL");
    qkv_clear_error();
    assert_null(qkv_affine(NULL, m, NULL));
    assert_string_equal(qkv_error(), "qkv_affine: tensor argument 1 is NULL");
    qkv_clear_error();
}

/* Asserts t's shape and exact values (row-major). */
static void assert_exact(const qkv_tensor *t, int ndim, const int64_t *shape, int64_t n,
                         const double *want) {
    assert_non_null(t);
    assert_int_equal(t->ndim, ndim);
    for (int i = 0; i < ndim; i++) assert_int_equal(t->shape[i], shape[i]);
    double got[16];
    assert_true(n <= 16 && t->numel == n);
    assert_true(qkv_copy_out(t, QKV_F64, got));
    for (int64_t i = 0; i < n; i++)
        if (got[i] != want[i]) fail_msg("element %lld: got %g, want %g", (long long)i, got[i],
                                        want[i]);
}

/* x = arange(6).reshape(2,1,3,1).transpose(2,3): [2,1,1,3] whose size-1 axes have strides
 * 3 and 1. Rows are 3 apart, not 1 (torch: [210, 543]; dx = w per row, dW = [6, 9, 12]). */
static void rows_behind_size_one_axes_with_odd_strides_are_read_in_place(void **state) {
    (void)state;
    qkv_tensor *leaf = qkv_requires_grad_(qkv_arange(QKV_F64, 0, 6, 1), true);
    qkv_tensor *x = qkv_transpose(qkv_reshape(leaf, QKV_SHAPE(2, 1, 3, 1)), 2, 3);
    qkv_tensor *w = qkv_requires_grad_(
        qkv_from_array(QKV_F64, QKV_SHAPE(1, 3), (const double[]){1, 10, 100}), true);
    const int64_t shape[] = {2, 1, 1, 1};
    qkv_tensor *y = qkv_affine(x, w, NULL);
    assert_exact(y, 4, shape, 2, (const double[]){210, 543});
    assert_exact(qkv_matmul(x, qkv_transpose(w, 0, 1)), 4, shape, 2,
                 (const double[]){210, 543});
    qkv_tensor *seed = qkv_from_array(QKV_F64, 4, shape, (const double[]){1, 2});
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(y, seed))));
    assert_exact(leaf->grad, QKV_SHAPE(6), 6, (const double[]){1, 10, 100, 2, 20, 200});
    assert_exact(w->grad, QKV_SHAPE(1, 3), 3, (const double[]){6, 9, 12});
}

/* ones([1,4,3]).transpose(0,1) is [4,1,3] with stride 12 on its size-1 axis: contiguous, as
 * in torch, so the affine reads it in place (it used to recurse without end). */
static void affine_of_a_contiguous_view_with_an_odd_size_one_stride(void **state) {
    (void)state;
    qkv_tensor *x = qkv_transpose(qkv_ones(QKV_F32, QKV_SHAPE(1, 4, 3)), 0, 1);
    assert_true(qkv_is_contiguous(x));
    qkv_tensor *y = qkv_affine(x, qkv_ones(QKV_F32, QKV_SHAPE(2, 3)), NULL);
    assert_exact(y, QKV_SHAPE(4, 1, 2), 8, (const double[]){3, 3, 3, 3, 3, 3, 3, 3});
    assert_exact(qkv_matmul(x, qkv_ones(QKV_F32, QKV_SHAPE(3, 2))), QKV_SHAPE(4, 1, 2), 8,
                 (const double[]){3, 3, 3, 3, 3, 3, 3, 3});
}

#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)

int main(void) {
    const struct CMUnitTest tests[] = {
        T(matmul_matches_torch_in_every_case),
        T(matmul_gradients_match_torch_in_every_case),
        T(transposed_and_permuted_operands_are_not_copied),
        T(gradients_of_head_split_operands_equal_those_of_split_leaves),
        T(product_with_a_transposed_view_is_contiguous_and_exact),
        T(matmul_inner_dimensions_must_agree),
        T(matmul_batch_dimensions_must_broadcast),
        T(matmul_needs_float_operands_with_a_dimension),
        T(matmul_of_null_is_null_naming_the_argument),
        T(rows_behind_size_one_axes_with_odd_strides_are_read_in_place),
        T(affine_of_a_contiguous_view_with_an_odd_size_one_stride),
        T(baddbmm_matches_torch_in_every_case),
        T(baddbmm_row_input_equals_the_sum_after),
        T(baddbmm_input_must_broadcast_to_the_product),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
