/*
 * BF16 GEMM kernel: qkv__gemm_bf16 and qkv__gemm_bf16_out against a float64 reference computed
 * from the same bf16 inputs, over odd shapes, transposed and strided operands, batches with
 * offset arrays, alpha/beta, and bitwise determinism across thread counts; each on both paths,
 * the VDPBF16PS one (where the CPU has AVX512_BF16) and the converting one.
 *
 * Tolerance: the inputs are exact bf16 values, and the product of two bf16 values (8-bit
 * significands) is exact in float32, so the only error is float32 accumulation: a k-term sum
 * is within (k - 1) u sum |a b| of the exact one (u = 2^-24, the float32 unit roundoff), and
 * alpha and beta C add a rounding each; the bound used is (k + 3) u (|alpha| sum |a b| +
 * |beta C|). The bf16 output adds one rounding to 8 significant bits: 2^-8 |result|.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tensor/tensor_internal.h"

#define U32 (1.0 / 16777216.0) /* 2^-24 */
#define U16 (1.0 / 256.0)      /* 2^-8 */

/* How an operand of rows x cols is stored. */
typedef enum layout {
    ROW_MAJOR,  /* rs = cols, cs = 1 */
    TRANSPOSED, /* stored cols x rows: rs = 1, cs = rows */
    STRIDED,    /* every other column, rows padded: rs = 2 * cols + 3, cs = 2 */
} layout;

typedef struct operand {
    int64_t rows, cols, rs, cs, span; /* span: elements one matrix occupies */
} operand;

static operand operand_make(int64_t rows, int64_t cols, layout lay) {
    operand o = {.rows = rows, .cols = cols, .rs = cols, .cs = 1};
    if (lay == TRANSPOSED) {
        o.rs = 1;
        o.cs = rows;
    } else if (lay == STRIDED) {
        o.rs = 2 * cols + 3;
        o.cs = 2;
    }
    o.span = rows == 0 || cols == 0 ? 1 : (rows - 1) * o.rs + (cols - 1) * o.cs + 1;
    return o;
}

typedef struct gemm_case {
    int64_t batch, m, n, k;
    layout la, lb, lc;
    double alpha, beta;
    bool nan_c;        /* fill C with NaN (only meaningful with beta == 0) */
    bool broadcast_ab; /* batch entries share A (all) and B (pairs) through equal offsets */
} gemm_case;

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static double uniform(void) { /* in [-1, 1) */
    rng_state = rng_state * 6364136223846793005u + 1442695040888963407u;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

static double widen(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Truncation to bf16: a bf16 value either way, which is all the inputs need to be. */
static uint16_t to_bf16(double x) {
    float f = (float)x;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

static uint16_t *bf16_fill(int64_t count) {
    uint16_t *p = malloc((size_t)count * sizeof(uint16_t));
    assert_non_null(p);
    for (int64_t i = 0; i < count; i++) p[i] = to_bf16(uniform());
    return p;
}

/* Runs one case and checks every element of both outputs against the reference. The bf16
 * output must also be exactly the float32 output (with beta 0) rounded to nearest even: the
 * two share their kernel. Elements of C outside the operand must be left alone. */
static void check(const gemm_case *gc) {
    operand A = operand_make(gc->m, gc->k, gc->la), B = operand_make(gc->k, gc->n, gc->lb);
    operand C = operand_make(gc->m, gc->n, gc->lc);
    int64_t bt = gc->batch, cn = C.span * bt;
    uint16_t *a = bf16_fill(A.span * bt), *b = bf16_fill(B.span * bt);
    float *c = malloc((size_t)cn * sizeof(float)), *c0 = malloc((size_t)cn * sizeof(float));
    float *cz = malloc((size_t)cn * sizeof(float));
    uint16_t *h = bf16_fill(cn), *h0 = malloc((size_t)cn * sizeof(uint16_t));
    int64_t *off = malloc((size_t)(3 * bt) * sizeof(int64_t));
    bool *touched = calloc((size_t)cn, 1);
    assert_non_null(c); assert_non_null(c0); assert_non_null(cz); assert_non_null(h0);
    assert_non_null(off); assert_non_null(touched);
    int64_t *ao = off, *bo = off + bt, *co = off + 2 * bt;
    for (int64_t i = 0; i < cn; i++) c0[i] = gc->nan_c ? NAN : (float)uniform();
    memcpy(c, c0, (size_t)cn * sizeof(float));
    memcpy(cz, c0, (size_t)cn * sizeof(float));
    memcpy(h0, h, (size_t)cn * sizeof(uint16_t));
    for (int64_t p = 0; p < bt; p++) {
        ao[p] = gc->broadcast_ab ? 0 : p * A.span;
        bo[p] = gc->broadcast_ab ? (p / 2) * B.span : p * B.span;
        co[p] = p * C.span;
    }
    float alpha = (float)gc->alpha, beta = (float)gc->beta;
    qkv__gemm_bf16(bt, gc->m, gc->n, gc->k, alpha, a, ao, A.rs, A.cs, b, bo, B.rs, B.cs, beta,
                   c, co, C.rs, C.cs);
    qkv__gemm_bf16(bt, gc->m, gc->n, gc->k, alpha, a, ao, A.rs, A.cs, b, bo, B.rs, B.cs, 0, cz,
                   co, C.rs, C.cs);
    qkv__gemm_bf16_out(bt, gc->m, gc->n, gc->k, alpha, a, ao, A.rs, A.cs, b, bo, B.rs, B.cs, h,
                       co, C.rs, C.cs);
    for (int64_t p = 0; p < bt; p++)
        for (int64_t i = 0; i < gc->m; i++)
            for (int64_t j = 0; j < gc->n; j++) {
                double sum = 0, mag = 0;
                for (int64_t l = 0; l < gc->k; l++) {
                    double x = widen(a[ao[p] + i * A.rs + l * A.cs]);
                    double y = widen(b[bo[p] + l * B.rs + j * B.cs]);
                    sum += x * y;
                    mag += fabs(x * y);
                }
                int64_t ci = co[p] + i * C.rs + j * C.cs;
                double want = gc->alpha * sum, bound = fabs(gc->alpha) * mag;
                double tol0 = (double)(gc->k + 3) * U32 * bound + 1e-300;
                if (gc->beta != 0) {
                    want += gc->beta * (double)c0[ci];
                    bound += fabs(gc->beta * (double)c0[ci]);
                }
                double tol = (double)(gc->k + 3) * U32 * bound + 1e-300;
                if (!(fabs(c[ci] - want) <= tol))
                    fail_msg("batch %lld C[%lld,%lld] = %.9g, want %.9g (tol %.3g)",
                             (long long)p, (long long)i, (long long)j, (double)c[ci], want, tol);
                double want0 = gc->alpha * sum, got16 = widen(h[ci]);
                if (!(fabs(got16 - want0) <= tol0 + U16 * fabs(want0)))
                    fail_msg("batch %lld bf16 C[%lld,%lld] = %.9g, want %.9g", (long long)p,
                             (long long)i, (long long)j, got16, want0);
                /* round to nearest even of the float32 result, by hand */
                uint32_t u;
                memcpy(&u, &cz[ci], sizeof u);
                uint16_t rne = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
                if (h[ci] != rne)
                    fail_msg("bf16 C[%lld] = 0x%04x, the float32 result %.9g rounds to 0x%04x",
                             (long long)ci, h[ci], (double)cz[ci], rne);
                touched[ci] = true;
            }
    for (int64_t i = 0; i < cn; i++) {
        if (touched[i]) continue;
        if (memcmp(&c[i], &c0[i], sizeof(float)) != 0 || h[i] != h0[i])
            fail_msg("C[%lld] outside the output was written", (long long)i);
    }
    free(a); free(b); free(c); free(c0); free(cz); free(h); free(h0); free(off); free(touched);
}

static bool cpu_has_bf16(void) {
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 12)
    return __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

/* Runs fn on every path this CPU can run. A CPU with AVX512_BF16 must get the native one. */
static void on_each_path(void (*fn)(void)) {
    for (int path = QKV_BF16_GEMM_CONVERT; path <= QKV_BF16_GEMM_NATIVE; path++) {
        if (!qkv__gemm_bf16_use((qkv_bf16_gemm_path)path)) continue;
        assert_int_equal(qkv__gemm_bf16_path(), path);
        fn();
    }
    if (cpu_has_bf16()) assert_true(qkv__gemm_bf16_use(QKV_BF16_GEMM_NATIVE));
    if (!qkv__gemm_bf16_use(QKV_BF16_GEMM_NATIVE)) qkv__gemm_bf16_use(QKV_BF16_GEMM_CONVERT);
}

#define ON_EACH_PATH(name)                                                                    \
    static void name(void **state) {                                                         \
        (void)state;                                                                         \
        on_each_path(name##_run);                                                            \
    }

static gemm_case plain(int64_t m, int64_t n, int64_t k) {
    return (gemm_case){.batch = 1, .m = m, .n = n, .k = k, .alpha = 1.0};
}

static const int64_t sizes[] = {1, 3, 17, 31, 64, 65, 130};
#define N_SIZES (sizeof(sizes) / sizeof(sizes[0]))

/* Every combination of m, n and k from the sizes: full tiles, edges, odd k. */
static void matches_reference_on_odd_shapes_run(void) {
    for (size_t x = 0; x < N_SIZES; x++)
        for (size_t y = 0; y < N_SIZES; y++)
            for (size_t z = 0; z < N_SIZES; z++) check(&(gemm_case){
                .batch = 1, .m = sizes[x], .n = sizes[y], .k = sizes[z], .alpha = 1.0});
}
ON_EACH_PATH(matches_reference_on_odd_shapes)

static void reads_transposed_and_strided_operands_run(void) {
    const int64_t shapes[][3] = {{17, 31, 65}, {130, 64, 31}, {3, 130, 17}, {65, 65, 130}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int la = ROW_MAJOR; la <= STRIDED; la++)
            for (int lb = ROW_MAJOR; lb <= STRIDED; lb++)
                for (int lc = ROW_MAJOR; lc <= STRIDED; lc++) {
                    gemm_case gc = plain(shapes[s][0], shapes[s][1], shapes[s][2]);
                    gc.la = (layout)la;
                    gc.lb = (layout)lb;
                    gc.lc = (layout)lc;
                    check(&gc);
                }
}
ON_EACH_PATH(reads_transposed_and_strided_operands)

static void applies_alpha_and_beta_run(void) {
    gemm_case gc = plain(31, 65, 17);
    gc.alpha = -0.5;
    gc.beta = 2.0;
    check(&gc);
    gc.beta = 0;
    gc.nan_c = true; /* beta == 0 ignores C */
    check(&gc);
    gc.k = 0; /* C = beta C, A and B unread */
    gc.beta = 0.25;
    gc.nan_c = false;
    check(&gc);
}
ON_EACH_PATH(applies_alpha_and_beta)

static void batches_with_offsets_and_broadcast_run(void) {
    gemm_case gc = {.batch = 5, .m = 17, .n = 65, .k = 31, .la = TRANSPOSED, .alpha = 1.0,
                    .beta = 0.5};
    check(&gc);
    gc.broadcast_ab = true;
    gc.lb = TRANSPOSED;
    check(&gc);
    gc = (gemm_case){.batch = 12, .m = 64, .n = 64, .k = 3, .lb = TRANSPOSED, .alpha = 0.125};
    check(&gc);
}
ON_EACH_PATH(batches_with_offsets_and_broadcast)

/* Several k blocks (the bf16 output then sums them in float32 before rounding), an odd k in
 * the last one, and more rows than one packed A block. */
static void sums_over_k_blocks_run(void) {
    const int64_t shapes[][3] = {{40, 40, 1100}, {33, 70, 1025}, {17, 3, 2049}, {1600, 20, 10},
                                 {13, 1100, 11}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        gemm_case gc = plain(shapes[s][0], shapes[s][1], shapes[s][2]);
        check(&gc);
        gc.la = TRANSPOSED;
        gc.beta = 0.5;
        check(&gc);
        gc.lb = TRANSPOSED;
        gc.lc = STRIDED;
        check(&gc);
    }
}
ON_EACH_PATH(sums_over_k_blocks)

/* Runs one product at a thread count into c (float32) and h (bf16). */
static void run_threads(int threads, const int64_t *shape, bool wgrad, const uint16_t *a,
                        const uint16_t *b, float *c, uint16_t *h) {
    qkv_set_num_threads(threads);
    int64_t bt = shape[0], m = shape[1], n = shape[2], k = shape[3];
    int64_t *off = malloc((size_t)(3 * bt) * sizeof(int64_t));
    assert_non_null(off);
    for (int64_t p = 0; p < bt; p++) {
        off[p] = p * m * k;
        off[bt + p] = p * k * n;
        off[2 * bt + p] = p * m * n;
    }
    /* a weight gradient reads A transposed; otherwise B is a transposed weight */
    int64_t rsa = wgrad ? 1 : k, csa = wgrad ? m : 1, rsb = wgrad ? n : 1, csb = wgrad ? 1 : k;
    qkv__gemm_bf16(bt, m, n, k, 1.0f, a, off, rsa, csa, b, off + bt, rsb, csb, 0.0f, c,
                   off + 2 * bt, n, 1);
    qkv__gemm_bf16_out(bt, m, n, k, 1.0f, a, off, rsa, csa, b, off + bt, rsb, csb, h,
                       off + 2 * bt, n, 1);
    free(off);
}

static void same_bits_for_any_thread_count_run(void) {
    const int64_t shapes[][5] = {
        {1, 301, 203, 517, 0}, {1, 40, 700, 300, 0}, {3, 130, 70, 90, 0}, {8, 128, 128, 64, 0},
        {1, 100, 777, 611, 1}, {1, 53, 300, 1100, 1},
    };
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int64_t bt = shapes[s][0], m = shapes[s][1], n = shapes[s][2], k = shapes[s][3];
        uint16_t *a = bf16_fill(bt * m * k), *b = bf16_fill(bt * k * n);
        float *c[2];
        uint16_t *h[2];
        for (int t = 0; t < 2; t++) {
            c[t] = malloc((size_t)(bt * m * n) * sizeof(float));
            h[t] = malloc((size_t)(bt * m * n) * sizeof(uint16_t));
            assert_non_null(c[t]);
            assert_non_null(h[t]);
        }
        run_threads(1, shapes[s], shapes[s][4], a, b, c[0], h[0]);
        for (int threads = 2; threads <= 3; threads++) {
            run_threads(threads, shapes[s], shapes[s][4], a, b, c[1], h[1]);
            assert_memory_equal(c[0], c[1], (size_t)(bt * m * n) * sizeof(float));
            assert_memory_equal(h[0], h[1], (size_t)(bt * m * n) * sizeof(uint16_t));
        }
        for (int t = 0; t < 2; t++) {
            free(c[t]);
            free(h[t]);
        }
        free(a);
        free(b);
        /* and the values are right, not just repeatable */
        gemm_case gc = {.batch = bt, .m = m, .n = n, .k = k, .alpha = 0.7, .beta = 0.3,
                        .la = shapes[s][4] ? TRANSPOSED : ROW_MAJOR,
                        .lb = shapes[s][4] ? ROW_MAJOR : TRANSPOSED};
        check(&gc);
    }
    qkv_set_num_threads(0);
}
ON_EACH_PATH(same_bits_for_any_thread_count)

/* A bias in the bf16-output GEMM: each element is alpha A B + bias rounded once, the same bits
 * as the float32 GEMM onto C = bias (beta 1) rounded afterwards, at 1 and 2 threads. The
 * shapes give edge tiles, a transposed B, and k = 1100, which sums several k blocks before
 * the rounding. */
static void adds_bias_before_rounding_run(void) {
    static const int64_t shapes[][3] = {{37, 45, 19}, {13, 33, 1100}, {1, 16, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        uint16_t *a = bf16_fill(m * k), *b = bf16_fill(k * n);
        float *bias = malloc((size_t)n * sizeof *bias), *c = malloc((size_t)(m * n) * 4);
        uint16_t *h = malloc((size_t)(m * n) * 2);
        assert_true(bias && c && h);
        for (int64_t j = 0; j < n; j++) bias[j] = (float)(4 * uniform());
        for (int64_t i = 0; i < m; i++) memcpy(c + i * n, bias, (size_t)n * sizeof *c);
        /* B stored n x k, read transposed */
        qkv__gemm_bf16(1, m, n, k, 0.5f, a, NULL, k, 1, b, NULL, 1, k, 1.0f, c, NULL, n, 1);
        for (int threads = 1; threads <= 2; threads++) {
            qkv_set_num_threads(threads);
            memset(h, 0xAB, (size_t)(m * n) * 2);
            qkv__gemm_bf16_bias_out(1, m, n, k, 0.5f, a, NULL, k, 1, b, NULL, 1, k, bias, h,
                                    NULL, n, 1);
            for (int64_t i = 0; i < m * n; i++) assert_int_equal(h[i], qkv__f32_to_bf16(c[i]));
        }
        qkv_set_num_threads(0);
        /* and the bias is really there: A B alone differs */
        uint16_t *h0 = malloc((size_t)(m * n) * 2);
        assert_non_null(h0);
        qkv__gemm_bf16_out(1, m, n, k, 0.5f, a, NULL, k, 1, b, NULL, 1, k, h0, NULL, n, 1);
        assert_true(memcmp(h0, h, (size_t)(m * n) * 2) != 0);
        free(h0);
        free(a);
        free(b);
        free(bias);
        free(c);
        free(h);
    }
}
ON_EACH_PATH(adds_bias_before_rounding)

/* The eight-lane rounding the bf16 kernels store with gives qkv__f32_to_bf16's bits: ties
 * both ways, the carry into the exponent, infinities, NaNs of either sign and payload (0xFFFF),
 * subnormals, -0 and 4096 random patterns, at every offset of the scalar tail. */
static void vector_rounding_equals_scalar(void **state) {
    (void)state;
    enum { N = 4096 + 64 };
    static const uint32_t edges[] = {0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x3f7fffffu,
                                     0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                     0xffc00001u, 0x7f800001u, 0x00000001u, 0x807fffffu,
                                     0x80000000u, 0x00000000u, 0x7fff8000u, 0x4effffffu};
    uint32_t bits[N];
    for (int i = 0; i < N; i++) {
        rng_state = rng_state * 6364136223846793005u + 1442695040888963407u;
        bits[i] = i < 64 ? edges[i % 16] : (uint32_t)(rng_state >> 32);
    }
    float f[N];
    memcpy(f, bits, sizeof f);
    uint16_t h[N];
    for (int start = 0; start < 9; start++) {
        qkv__bf16_round_n(h, f + start, N - start);
        for (int i = 0; i < N - start; i++)
            assert_int_equal(h[i], qkv__f32_to_bf16(f[start + i]));
    }
}

/* Infinities and NaN go through as in float32: a row of A holding an infinity gives
 * infinities of the sign of the product (B has no zeros), one holding a NaN gives NaN, and a
 * bf16 output keeps both. k is odd, so the infinity sits in the zero-padded last pair. */
static void propagates_infinity_and_nan_run(void) {
    enum { M = 3, N = 20, K = 5 };
    uint16_t a[M * K], b[K * N], h[M * N];
    float c[M * N];
    for (int i = 0; i < M * K; i++) a[i] = to_bf16(0.25 * (i % 3 + 1));
    for (int i = 0; i < K * N; i++) b[i] = to_bf16(i % 2 ? 0.5 : -0.75);
    a[0 * K + 4] = to_bf16(INFINITY);
    a[1 * K + 2] = to_bf16(NAN);
    qkv__gemm_bf16(1, M, N, K, 1.0f, a, NULL, K, 1, b, NULL, N, 1, 0.0f, c, NULL, N, 1);
    qkv__gemm_bf16_out(1, M, N, K, 1.0f, a, NULL, K, 1, b, NULL, N, 1, h, NULL, N, 1);
    for (int j = 0; j < N; j++) {
        double sign = widen(b[4 * N + j]) > 0 ? 1 : -1;
        assert_true(isinf(c[j]) && c[j] * sign > 0);
        assert_true(widen(h[j]) == (double)c[j]);
        assert_true(isnan(c[N + j]) && isnan(widen(h[N + j])));
        assert_true(isfinite(c[2 * N + j]) && isfinite(widen(h[2 * N + j])));
    }
}
ON_EACH_PATH(propagates_infinity_and_nan)

/* Subnormals: 2^-127 (a subnormal bf16) times 1, and 2^-126 times 0.5 (a subnormal
 * product). The converting path gives 2^-127 exactly; VDPBF16PS flushes both to zero, as
 * documented in tensor_internal.h. */
static void subnormals_by_path_run(void) {
    uint16_t a[2] = {0x0040, 0x0080}, b[2] = {0x3f80, 0x3f00};
    float c[2];
    qkv__gemm_bf16(2, 1, 1, 1, 1.0f, a, (int64_t[]){0, 1}, 1, 1, b, (int64_t[]){0, 1}, 1, 1,
                   0.0f, c, (int64_t[]){0, 1}, 1, 1);
    float want = qkv__gemm_bf16_path() == QKV_BF16_GEMM_NATIVE ? 0.0f : ldexpf(1.0f, -127);
    assert_true(c[0] == want && c[1] == want);
}
ON_EACH_PATH(subnormals_by_path)

/* Exact small product: integers, so every sum is exact. [[1 2 3] [4 5 6]] x [[1 2] [3 4]
 * [5 6]] = [[22 28] [49 64]]. */
static void computes_exact_small_product_run(void) {
    uint16_t a[6], b[6], h[4];
    for (int i = 0; i < 6; i++) {
        a[i] = to_bf16(i + 1);
        b[i] = to_bf16(i + 1);
    }
    float c[4];
    qkv__gemm_bf16(1, 2, 2, 3, 1.0f, a, NULL, 3, 1, b, NULL, 2, 1, 0.0f, c, NULL, 2, 1);
    assert_true(c[0] == 22 && c[1] == 28 && c[2] == 49 && c[3] == 64);
    qkv__gemm_bf16_out(1, 2, 2, 3, 1.0f, a, NULL, 3, 1, b, NULL, 2, 1, h, NULL, 2, 1);
    assert_true(h[0] == to_bf16(22) && h[1] == to_bf16(28) && h[2] == to_bf16(49) &&
                h[3] == to_bf16(64));
}
ON_EACH_PATH(computes_exact_small_product)

/* Before any product forces a path: the first choice follows QKV_BF16_GEMM (the suite runs
 * once without it and once with QKV_BF16_GEMM=convert), else the CPU. */
static void path_follows_environment(void **state) {
    (void)state;
    const char *env = getenv("QKV_BF16_GEMM");
    bool convert = env && strcmp(env, "convert") == 0;
    assert_int_equal(qkv__gemm_bf16_path(),
                     !convert && cpu_has_bf16() ? QKV_BF16_GEMM_NATIVE : QKV_BF16_GEMM_CONVERT);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(path_follows_environment),
        cmocka_unit_test(computes_exact_small_product),
        cmocka_unit_test(matches_reference_on_odd_shapes),
        cmocka_unit_test(reads_transposed_and_strided_operands),
        cmocka_unit_test(applies_alpha_and_beta),
        cmocka_unit_test(batches_with_offsets_and_broadcast),
        cmocka_unit_test(sums_over_k_blocks),
        cmocka_unit_test(same_bits_for_any_thread_count),
        cmocka_unit_test(adds_bias_before_rounding),
        cmocka_unit_test(vector_rounding_equals_scalar),
        cmocka_unit_test(propagates_infinity_and_nan),
        cmocka_unit_test(subnormals_by_path),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
