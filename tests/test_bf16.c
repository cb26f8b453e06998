/*
 * The BF16 dtype: its conversions against PyTorch bit for bit, storage, printing and the
 * conversions of tensors to and from the other dtypes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

#include <cmocka.h>

#include "fixtures/bf16_fixtures.h"
#include "harness.h"

static float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static bool bf16_is_nan(uint16_t h) {
    return (h & 0x7F80) == 0x7F80 && (h & 0x007F) != 0;
}

/* Every one of the 65536 patterns survives bf16 -> f32 -> bf16; a NaN stays a (quiet) NaN. */
static void every_bf16_pattern_round_trips_through_f32(void **state) {
    (void)state;
    int nans = 0;
    for (uint32_t h = 0; h <= 0xFFFF; h++) {
        float f = qkv_bf16_to_f32((uint16_t)h);
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        assert_int_equal(u, h << 16); /* exact: bf16 is the top half of an f32 */
        uint16_t back = qkv_f32_to_bf16(f);
        if (bf16_is_nan((uint16_t)h)) {
            assert_true(isnan(f));
            assert_true(bf16_is_nan(back));
            assert_int_equal(back & 0x0040, 0x0040); /* quiet */
            nans++;
        } else {
            assert_int_equal(back, h);
        }
    }
    assert_int_equal(nans, 2 * 127); /* the exponent all ones, a non-zero 7-bit mantissa */
}

/* Ties to even, subnormals, inf, NaN, the largest finite values and values that round to inf:
 * the same bits as torch's .to(torch.bfloat16), and 2000 random patterns too. */
static void f32_to_bf16_equals_torch_bit_for_bit(void **state) {
    (void)state;
    for (int i = 0; i < BF16_N_CASES; i++) {
        uint16_t got = qkv_f32_to_bf16(f32_of_bits(bf16_f32_bits[i]));
        if (got != bf16_torch[i])
            fail_msg("0x%08X: qkv gives 0x%04X, torch 0x%04X", (unsigned)bf16_f32_bits[i],
                     got, bf16_torch[i]);
    }
    /* and a tensor cast, which converts contiguous runs eight lanes at a time */
    qkv_tensor *f = qkv_empty(QKV_F32, 1, (const int64_t[]){BF16_N_CASES});
    assert_non_null(f);
    float *fd = qkv_data(f);
    for (int i = 0; i < BF16_N_CASES; i++) fd[i] = f32_of_bits(bf16_f32_bits[i]);
    qkv_tensor *h = qkv_to_dtype(f, QKV_BF16);
    assert_non_null(h);
    const uint16_t *hd = qkv_data(h);
    for (int i = 0; i < BF16_N_CASES; i++)
        if (hd[i] != bf16_torch[i])
            fail_msg("cast 0x%08X: qkv gives 0x%04X, torch 0x%04X",
                     (unsigned)bf16_f32_bits[i], hd[i], bf16_torch[i]);
}

static void rounding_edges_by_hand(void **state) {
    (void)state;
    assert_int_equal(qkv_f32_to_bf16(f32_of_bits(0x3F808000)), 0x3F80); /* tie, even below */
    assert_int_equal(qkv_f32_to_bf16(f32_of_bits(0x3F818000)), 0x3F82); /* tie, even above */
    assert_int_equal(qkv_f32_to_bf16(f32_of_bits(0x00000001)), 0x0000); /* under half */
    assert_int_equal(qkv_f32_to_bf16(f32_of_bits(0x00018000)), 0x0002); /* subnormal tie */
    assert_int_equal(qkv_f32_to_bf16(f32_of_bits(0x7F7F7FFF)), 0x7F7F); /* largest finite */
    assert_int_equal(qkv_f32_to_bf16(f32_of_bits(0x7F7F8000)), 0x7F80); /* rounds to inf */
    assert_int_equal(qkv_f32_to_bf16(-INFINITY), 0xFF80);
    assert_true(bf16_is_nan(qkv_f32_to_bf16(f32_of_bits(0x7F800001)))); /* signalling */
}

static void bf16_tensor_stores_two_bytes_and_converts_each_way(void **state) {
    (void)state;
    assert_string_equal(qkv_dtype_name(QKV_BF16), "bf16");
    assert_int_equal(qkv_dtype_size(QKV_BF16), 2);
    float src[5] = {1.0f, 0.1f, -3.0f, 65504.0f, 1e-40f};
    qkv_tensor *f = qkv_from_array(QKV_F32, QKV_SHAPE(5), src);
    qkv_tensor *h = qkv_to_dtype(f, QKV_BF16);
    assert_non_null(h);
    assert_int_equal(h->storage->nbytes, 10);
    const uint16_t *bits = qkv_data(h);
    for (int i = 0; i < 5; i++) assert_int_equal(bits[i], qkv_f32_to_bf16(src[i]));
    /* 0.1 is 0x3DCCCCCD: rounds to 0x3DCD, 0.10009765625 */
    assert_true(qkv_get(h, (int64_t[]){1}) == 0.10009765625);
    double d[5];
    assert_true(qkv_copy_out(h, QKV_F64, d));
    assert_true(d[3] == 65536.0); /* 65504 has 11 significant bits: rounds up */
    qkv_tensor *i = qkv_to_dtype(h, QKV_I64), *b = qkv_to_dtype(h, QKV_BOOL);
    assert_int_equal(((const int64_t *)qkv_data(i))[2], -3);
    assert_true(((const bool *)qkv_data(b))[4]); /* a subnormal is non-zero */
    qkv_tensor *back = qkv_to_dtype(qkv_to_dtype(qkv_arange(QKV_I64, 250, 260, 1), QKV_BF16),
                                    QKV_I64);
    const int64_t *v = qkv_data(back);
    /* 8 significant bits: from 256 on, only even integers; 257 ties to 256, 259 to 260 */
    int64_t want[10] = {250, 251, 252, 253, 254, 255, 256, 256, 258, 260};
    for (int k = 0; k < 10; k++) assert_int_equal(v[k], want[k]);
    assert_null(qkv_error());
}

static void bf16_fill_full_and_strided_copy(void **state) {
    (void)state;
    qkv_tensor *t = qkv_full(QKV_BF16, QKV_SHAPE(2, 3), 0.1);
    assert_non_null(t);
    for (int k = 0; k < 6; k++) assert_int_equal(((const uint16_t *)qkv_data(t))[k], 0x3DCD);
    qkv_tensor *src = qkv_to_dtype(qkv_arange(QKV_F32, 0, 6, 1), QKV_BF16);
    qkv_tensor *tt = qkv_contiguous(qkv_transpose(qkv_reshape(src, QKV_SHAPE(2, 3)), 0, 1));
    float out[6];
    assert_true(qkv_copy_out(tt, QKV_F32, out));
    float want[6] = {0, 3, 1, 4, 2, 5};
    for (int k = 0; k < 6; k++) assert_true(out[k] == want[k]);
}

static void bf16_prints_like_torch(void **state) {
    (void)state;
    float src[3] = {1.0f, 0.1f, -2.5f};
    char *s = qkv_to_string(qkv_to_dtype(qkv_from_array(QKV_F32, QKV_SHAPE(3), src), QKV_BF16));
    assert_non_null(s);
    /* torch: tensor([ 1.0000,  0.1001, -2.5000], dtype=torch.bfloat16) */
    assert_non_null(strstr(s, "0.1001"));
    assert_non_null(strstr(s, "bf16"));
    free(s);
}

/* ---- Element-wise ops, reductions and products against torch ----------------------------- */

static qkv_tensor *bf16_of(const uint16_t *bits, int ndim, const int64_t *shape) {
    return qkv_from_array(QKV_BF16, ndim, shape, bits);
}

/* Distance in units of the last place between two finite bf16 values of one sign. */
static int ulps(uint16_t x, uint16_t y) {
    int d = (int)(x & 0x7FFF) - (int)(y & 0x7FFF);
    return ((x ^ y) & 0x8000) && (x & 0x7FFF) + (y & 0x7FFF) ? 1000 : abs(d);
}

/* Element-wise ops compute in f32 and round once: the same bits as torch. Reductions and
 * products accumulate in f32 in another order than torch: within one bf16 unit (2^-8
 * relative), rounding being the only error left at bf16's precision. */
static void assert_bf16_matches(const qkv_tensor *t, const uint16_t *want, int64_t n,
                                int max_ulps, const char *what) {
    assert_non_null(t);
    assert_int_equal(t->dtype, QKV_BF16);
    assert_int_equal(t->numel, n);
    qkv_tensor *c = qkv_contiguous((qkv_tensor *)t);
    const uint16_t *got = qkv_data(c);
    for (int64_t i = 0; i < n; i++)
        if (ulps(got[i], want[i]) > max_ulps)
            fail_msg("%s[%lld]: qkv 0x%04X, torch 0x%04X", what, (long long)i, got[i], want[i]);
}

static void bf16_ops_match_torch(void **state) {
    (void)state;
    qkv_tensor *a = bf16_of(bf16_a, QKV_SHAPE(6, 10)), *b = bf16_of(bf16_b, QKV_SHAPE(6, 10));
    qkv_tensor *w = bf16_of(bf16_w, QKV_SHAPE(4, 10)), *bias = bf16_of(bf16_bias, QKV_SHAPE(4));
    assert_bf16_matches(qkv_add(a, b), bf16_add, 60, 0, "add");
    assert_bf16_matches(qkv_mul(a, b), bf16_mul, 60, 0, "mul");
    assert_bf16_matches(qkv_div(a, b), bf16_div, 60, 0, "div");
    assert_bf16_matches(qkv_mul_scalar(a, 0.3), bf16_mul_scalar, 60, 0, "mul_scalar");
    assert_bf16_matches(qkv_exp(a), bf16_exp, 60, 1, "exp"); /* vector exp vs libm's */
    assert_bf16_matches(qkv_gelu(a, false), bf16_gelu, 60, 1, "gelu");
    assert_bf16_matches(qkv_softmax(a, -1), bf16_softmax, 60, 1, "softmax");
    assert_bf16_matches(qkv_sum(a, -1, false), bf16_sum, 6, 1, "sum");
    assert_bf16_matches(qkv_mean(a, 0, false), bf16_mean, 10, 1, "mean");
    assert_bf16_matches(qkv_max(a, -1, false), bf16_max, 6, 0, "max");
    assert_bf16_matches(qkv_matmul(a, qkv_transpose(b, 0, 1)), bf16_matmul, 36, 1, "matmul");
    assert_bf16_matches(qkv_affine(a, w, bias), bf16_linear, 24, 1, "linear");
    assert_null(qkv_error());
}

/* bf16 with f32 promotes to f32, with i64 or bool stays bf16, as torch's result_type. */
static void bf16_promotion_follows_torch(void **state) {
    (void)state;
    qkv_tensor *h = qkv_full(QKV_BF16, QKV_SHAPE(3), 1.5);
    assert_int_equal(qkv_add(h, qkv_full(QKV_F32, QKV_SHAPE(3), 1))->dtype, QKV_F32);
    assert_int_equal(qkv_add(h, qkv_full(QKV_F64, QKV_SHAPE(3), 1))->dtype, QKV_F64);
    assert_int_equal(qkv_add(h, qkv_full(QKV_I64, QKV_SHAPE(3), 1))->dtype, QKV_BF16);
    assert_int_equal(qkv_add(h, qkv_scalar(QKV_F32, 1))->dtype, QKV_BF16); /* 0-d f32 */
    assert_int_equal(qkv_lt(h, qkv_full(QKV_F32, QKV_SHAPE(3), 2))->dtype, QKV_BOOL);
    assert_int_equal(qkv_argmax(h, 0, false)->dtype, QKV_I64);
}

/* f32 with bf16 computes in f32 reading the bf16 operand widened, without a copy: the bits of
 * the op on an explicit f32 copy, for either operand order, a broadcast bf16 row, a
 * transposed bf16 operand, a 0-d one and a comparison. */
static void f32_with_bf16_equals_f32_with_its_copy(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 6);
    qkv_tensor *x = qkv_randn(QKV_F32, QKV_SHAPE(70, 300), &g);
    qkv_tensor *h = qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(70, 300), &g), QKV_BF16);
    qkv_tensor *row = qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(300), &g), QKV_BF16);
    qkv_tensor *ht = qkv_transpose(qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(300, 70), &g),
                                                QKV_BF16), 0, 1);
    qkv_tensor *s = qkv_to_dtype(qkv_scalar(QKV_F32, 0.3), QKV_BF16);
    qkv_tensor *f[4] = {qkv_to_dtype(h, QKV_F32), qkv_to_dtype(row, QKV_F32),
                        qkv_to_dtype(ht, QKV_F32), qkv_to_dtype(s, QKV_F32)};
    qkv_tensor *got[6] = {qkv_add(x, h), qkv_mul(h, x), qkv_sub(x, row), qkv_div(ht, x),
                          qkv_mul(x, s), qkv_lt(h, x)};
    qkv_tensor *want[6] = {qkv_add(x, f[0]), qkv_mul(f[0], x), qkv_sub(x, f[1]),
                           qkv_div(f[2], x), qkv_mul(x, f[3]), qkv_lt(f[0], x)};
    for (int i = 0; i < 6; i++) {
        assert_non_null(got[i]);
        assert_int_equal(got[i]->dtype, i < 5 ? QKV_F32 : QKV_BOOL);
        assert_int_equal(got[i]->numel, 70 * 300);
        assert_memory_equal(qkv_data(got[i]), qkv_data(want[i]),
                            (size_t)(70 * 300) * qkv_dtype_size(got[i]->dtype));
    }
    int64_t at[2] = {3, 5};
    assert_true(qkv_get(got[0], at) == qkv_get(x, at) + qkv_get(h, at)); /* exact in f32 */
}

/* A BF16 leaf gets a BF16 gradient: d sum(x * x) / dx = 2x, exact in bf16 here. */
static void bf16_leaf_gets_a_bf16_gradient(void **state) {
    (void)state;
    qkv_tensor *x = qkv_to_dtype(qkv_arange(QKV_F32, -2, 2, 0.5), QKV_BF16);
    qkv_requires_grad_(x, true);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(x, x))));
    assert_non_null(x->grad);
    assert_int_equal(x->grad->dtype, QKV_BF16);
    for (int64_t i = 0; i < 8; i++)
        assert_true(qkv_get(x->grad, &i) == 2 * qkv_get(x, &i));
}

/* bf16 dropout draws the mask f32's draws and rounds x * 1 / (1 - p) once: the bits of the
 * f32 dropout of the same values, rounded. 1000 elements: whole bytes of the mask and a tail. */
static void bf16_dropout_is_f32_dropout_rounded(void **state) {
    (void)state;
    qkv_generator g1, g2, gx;
    qkv_generator_init(&gx, 5);
    qkv_tensor *h = qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(1000), &gx), QKV_BF16);
    qkv_generator_init(&g1, 8);
    qkv_generator_init(&g2, 8);
    qkv_tensor *got = qkv_dropout(h, 0.3, true, &g1);
    qkv_tensor *want = qkv_to_dtype(qkv_dropout(qkv_to_dtype(h, QKV_F32), 0.3, true, &g2),
                                    QKV_BF16);
    assert_non_null(got);
    assert_int_equal(got->dtype, QKV_BF16);
    assert_memory_equal(qkv_data(got), qkv_data(want), 1000 * sizeof(uint16_t));
    int zeros = 0;
    for (int i = 0; i < 1000; i++) zeros += (((const uint16_t *)qkv_data(got))[i] & 0x7FFF) == 0;
    assert_true(zeros > 200 && zeros < 400); /* p = 0.3 */
}

/* A bf16 sum or mean over rows (a bias gradient under autocast) sums without an f32 copy:
 * the bits of the f32 reduction of the same values, rounded once. 300 rows of 40, and a
 * transposed view whose kept axis is not the contiguous one. */
static void bf16_row_sums_are_f32_row_sums_rounded(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *h = qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(300, 40), &g), QKV_BF16);
    qkv_tensor *f = qkv_to_dtype(h, QKV_F32);
    qkv_tensor *got[3] = {qkv_sum(h, 0, false), qkv_mean(h, 0, true),
                          qkv_sum(qkv_transpose(h, 0, 1), 1, false)};
    qkv_tensor *want[3] = {qkv_sum(f, 0, false), qkv_mean(f, 0, true),
                           qkv_sum(qkv_transpose(f, 0, 1), 1, false)};
    for (int i = 0; i < 3; i++) {
        assert_non_null(got[i]);
        assert_int_equal(got[i]->dtype, QKV_BF16);
        assert_int_equal(got[i]->numel, 40);
        qkv_tensor *w = qkv_contiguous(qkv_to_dtype(want[i], QKV_BF16));
        assert_memory_equal(qkv_data(qkv_contiguous(got[i])), qkv_data(w), 40 * sizeof(uint16_t));
    }
    /* the sums are of 300 values of unit variance: not all zero, not rounded away */
    float s0 = qkv_bf16_to_f32(((const uint16_t *)qkv_data(got[0]))[0]);
    assert_true(s0 != 0 && fabsf(s0) < 100);
}

/* The gradient of bf16 GELU is g * GELU'(x) computed in f32 and rounded once, as torch's
 * bf16 GeluBackward: the bits of the f32 backward of the same values, rounded. */
static void bf16_gelu_backward_rounds_once(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 4);
    qkv_tensor *x32 = qkv_to_dtype(qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(1000), &g),
                                                QKV_BF16), QKV_F32);
    qkv_tensor *w32 = qkv_to_dtype(qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(1000), &g),
                                                QKV_BF16), QKV_F32);
    qkv_tensor *x16 = qkv_to_dtype(x32, QKV_BF16), *w16 = qkv_to_dtype(w32, QKV_BF16);
    qkv_requires_grad_(x32, true);
    qkv_requires_grad_(x16, true);
    /* d sum(gelu(x) * w) / dx = w * GELU'(x) */
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(qkv_gelu(x32, false), w32))));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(qkv_gelu(x16, false), w16))));
    assert_int_equal(x16->grad->dtype, QKV_BF16);
    qkv_tensor *want = qkv_to_dtype(x32->grad, QKV_BF16);
    assert_memory_equal(qkv_data(x16->grad), qkv_data(want), 1000 * sizeof(uint16_t));
    /* and the first element by hand: GELU'(x) = Phi(x) + x phi(x) */
    int64_t i = 0;
    double xi = qkv_get(x32, &i), want0 = qkv_get(w32, &i) *
        (0.5 * (1 + erf(xi / sqrt(2))) + xi * exp(-xi * xi / 2) / sqrt(2 * M_PI));
    assert_float_equal(qkv_get(x16->grad, &i), want0, 0.01 * fabs(want0) + 1e-6);
}

static void bf16_safetensors_round_trip_keeps_the_bits(void **state) {
    (void)state;
    char path[] = "/tmp/qkv_bf16_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    qkv_tensor *t = bf16_of(bf16_a, QKV_SHAPE(6, 10));
    char *names[1] = {"a"};
    qkv_named_list list = {1, names, &t};
    assert_true(qkv_safetensors_write(path, &list, NULL));
    qkv_safetensors *f = qkv_safetensors_read(path);
    assert_non_null(f);
    qkv_tensor *back = qkv_safetensors_tensor(f, "a");
    assert_bf16_matches(back, bf16_a, 60, 0, "read back");
    qkv_safetensors_free(f);
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(every_bf16_pattern_round_trips_through_f32),
        T(f32_to_bf16_equals_torch_bit_for_bit),
        T(rounding_edges_by_hand),
        T(bf16_tensor_stores_two_bytes_and_converts_each_way),
        T(bf16_fill_full_and_strided_copy),
        T(bf16_prints_like_torch),
        T(bf16_ops_match_torch),
        T(bf16_promotion_follows_torch),
        T(f32_with_bf16_equals_f32_with_its_copy),
        T(bf16_leaf_gets_a_bf16_gradient),
        T(bf16_dropout_is_f32_dropout_rounded),
        T(bf16_row_sums_are_f32_row_sums_rounded),
        T(bf16_gelu_backward_rounds_once),
        T(bf16_safetensors_round_trip_keeps_the_bits),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
