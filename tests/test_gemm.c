/*
 * GEMM kernel: qkv__gemm_f32 / qkv__gemm_f64 against a plain triple loop in double precision,
 * over edge shapes, transposed and strided operands, batches with offset arrays, alpha/beta
 * (beta == 0 ignores NaN in C), k == 0, and bitwise determinism across thread counts; the
 * triangular products (qkv__gemm_tri_*) against the full product of the masked operands.
 */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "qkv.h"
#include "tensor/tensor_internal.h"

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
    operand o = {rows, cols, cols, 1, 0};
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
    bool nan_c;          /* fill C with NaN (only meaningful with beta == 0) */
    bool broadcast_ab;   /* batch entries share A (all) and B (pairs) through equal offsets */
} gemm_case;

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static double uniform(void) { /* in [-1, 1) */
    rng_state = rng_state * 6364136223846793005u + 1442695040888963407u;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

/* Runs one case in the given precision and checks every element against the reference,
 * within the rounding bound of a k-term dot product. Elements of C outside the operand
 * (the gaps of a strided C) must be left alone. */
#define DEFINE_CHECK(T, SUFFIX, EPS)                                                          \
    static void check_##SUFFIX(const gemm_case *gc) {                                        \
        operand A = operand_make(gc->m, gc->k, gc->la), B = operand_make(gc->k, gc->n, gc->lb); \
        operand C = operand_make(gc->m, gc->n, gc->lc);                                      \
        int64_t bt = gc->batch;                                                              \
        T *a = malloc((size_t)(A.span * bt) * sizeof(T));                                    \
        T *b = malloc((size_t)(B.span * bt) * sizeof(T));                                    \
        T *c = malloc((size_t)(C.span * bt) * sizeof(T));                                    \
        T *c0 = malloc((size_t)(C.span * bt) * sizeof(T));                                   \
        int64_t *off = malloc((size_t)(3 * bt) * sizeof(int64_t));                           \
        assert_non_null(a); assert_non_null(b); assert_non_null(c); assert_non_null(c0);    \
        assert_non_null(off);                                                                \
        int64_t *ao = off, *bo = off + bt, *co = off + 2 * bt;                               \
        for (int64_t i = 0; i < A.span * bt; i++) a[i] = (T)uniform();                       \
        for (int64_t i = 0; i < B.span * bt; i++) b[i] = (T)uniform();                       \
        for (int64_t i = 0; i < C.span * bt; i++) c0[i] = gc->nan_c ? (T)NAN : (T)uniform(); \
        memcpy(c, c0, (size_t)(C.span * bt) * sizeof(T));                                    \
        for (int64_t p = 0; p < bt; p++) {                                                   \
            ao[p] = gc->broadcast_ab ? 0 : p * A.span;                                       \
            bo[p] = gc->broadcast_ab ? (p / 2) * B.span : p * B.span;                        \
            co[p] = p * C.span;                                                              \
        }                                                                                    \
        qkv__gemm_##SUFFIX(bt, gc->m, gc->n, gc->k, (T)gc->alpha, a, ao, A.rs, A.cs,        \
                           b, bo, B.rs, B.cs, (T)gc->beta, c, co, C.rs, C.cs);               \
        bool *touched = calloc((size_t)(C.span * bt), 1);                                    \
        assert_non_null(touched);                                                            \
        for (int64_t p = 0; p < bt; p++)                                                     \
            for (int64_t i = 0; i < gc->m; i++)                                              \
                for (int64_t j = 0; j < gc->n; j++) {                                        \
                    double sum = 0, mag = 0;                                                 \
                    for (int64_t l = 0; l < gc->k; l++) {                                    \
                        double x = a[ao[p] + i * A.rs + l * A.cs];                           \
                        double y = b[bo[p] + l * B.rs + j * B.cs];                           \
                        sum += x * y;                                                        \
                        mag += fabs(x * y);                                                  \
                    }                                                                        \
                    int64_t ci = co[p] + i * C.rs + j * C.cs;                                \
                    double want = gc->alpha * sum, bound = fabs(gc->alpha) * mag;            \
                    if (gc->beta != 0) {                                                     \
                        want += gc->beta * (double)c0[ci];                                   \
                        bound += fabs(gc->beta * (double)c0[ci]);                            \
                    }                                                                        \
                    double tol = (double)(gc->k + 3) * (EPS) * bound + 1e-300;               \
                    double got = (double)c[ci];                                              \
                    if (!(fabs(got - want) <= tol))                                          \
                        fail_msg("batch %lld C[%lld,%lld] = %.17g, want %.17g (tol %.3g)",   \
                                 (long long)p, (long long)i, (long long)j, got, want, tol);  \
                    touched[ci] = true;                                                      \
                }                                                                            \
        for (int64_t i = 0; i < C.span * bt; i++)                                            \
            if (!touched[i] && memcmp(&c[i], &c0[i], sizeof(T)) != 0)                        \
                fail_msg("C[%lld] outside the output was written", (long long)i);            \
        free(touched); free(a); free(b); free(c); free(c0); free(off);                       \
    }

DEFINE_CHECK(float, f32, FLT_EPSILON)
DEFINE_CHECK(double, f64, DBL_EPSILON)

static void check_both(gemm_case gc) {
    check_f32(&gc);
    check_f64(&gc);
}

static gemm_case plain(int64_t m, int64_t n, int64_t k) {
    return (gemm_case){1, m, n, k, ROW_MAJOR, ROW_MAJOR, ROW_MAJOR, 1.0, 0.0, false, false};
}

static const int64_t edge_shapes[][3] = {
    {1, 1, 1}, {7, 13, 5}, {17, 33, 65}, {128, 257, 67}, {1, 1000, 3}, {1000, 1, 3},
    {2, 3, 4}, {12, 32, 16}, {13, 33, 17}, {25, 47, 300}, {64, 64, 64}, {5, 7, 600},
    {1600, 20, 10}, {10, 1100, 10}, {31, 17, 1},
};
#define N_EDGE_SHAPES (sizeof(edge_shapes) / sizeof(edge_shapes[0]))

static void matches_reference_on_edge_shapes(void **state) {
    (void)state;
    for (size_t s = 0; s < N_EDGE_SHAPES; s++)
        check_both(plain(edge_shapes[s][0], edge_shapes[s][1], edge_shapes[s][2]));
}

static void reads_transposed_operands(void **state) {
    (void)state;
    for (size_t s = 0; s < N_EDGE_SHAPES; s++) {
        gemm_case gc = plain(edge_shapes[s][0], edge_shapes[s][1], edge_shapes[s][2]);
        gc.la = TRANSPOSED; /* A^T B, as in a weight gradient */
        check_both(gc);
        gc.la = ROW_MAJOR;
        gc.lb = TRANSPOSED; /* A B^T, as in an input gradient */
        check_both(gc);
        gc.la = TRANSPOSED;
        check_both(gc);
        gc.lc = TRANSPOSED; /* column-major output */
        check_both(gc);
    }
}

static void reads_and_writes_strided_operands(void **state) {
    (void)state;
    for (size_t s = 0; s < N_EDGE_SHAPES; s++) {
        gemm_case gc = plain(edge_shapes[s][0], edge_shapes[s][1], edge_shapes[s][2]);
        gc.la = gc.lb = gc.lc = STRIDED;
        gc.beta = 0.5;
        check_both(gc);
        gc.la = TRANSPOSED;
        gc.lb = STRIDED;
        gc.lc = ROW_MAJOR;
        check_both(gc);
    }
}

static void applies_alpha_and_beta(void **state) {
    (void)state;
    const double ab[][2] = {{1, 1}, {2.5, -0.75}, {-1, 0}, {0.5, 2}};
    for (size_t i = 0; i < sizeof(ab) / sizeof(ab[0]); i++) {
        gemm_case gc = plain(37, 71, 300); /* k over one block: beta applies once */
        gc.alpha = ab[i][0];
        gc.beta = ab[i][1];
        check_both(gc);
        gc.m = 3;
        gc.n = 5;
        gc.k = 2;
        check_both(gc);
    }
}

static void beta_zero_ignores_nan_in_c(void **state) {
    (void)state;
    gemm_case gc = plain(29, 45, 31);
    gc.nan_c = true;
    check_both(gc);
    gc.lc = STRIDED;
    check_both(gc);
    gc.k = 0; /* C = 0 * C is 0, not NaN */
    check_both(gc);
}

static void k_zero_scales_c_by_beta(void **state) {
    (void)state;
    gemm_case gc = plain(9, 11, 0);
    gc.beta = 3;
    check_both(gc);
    gc.beta = 0;
    check_both(gc);
    float c[4] = {1, 2, 3, 4};
    qkv__gemm_f32(1, 2, 2, 0, 1.0f, NULL, NULL, 0, 1, NULL, NULL, 2, 1, -2.0f, c, NULL, 2, 1);
    assert_true(c[0] == -2 && c[1] == -4 && c[2] == -6 && c[3] == -8);
}

static void computes_exact_small_product(void **state) {
    (void)state;
    /* [[1,2,3],[4,5,6]] @ [[7,8],[9,10],[11,12]] = [[58,64],[139,154]] */
    const float a[] = {1, 2, 3, 4, 5, 6}, b[] = {7, 8, 9, 10, 11, 12};
    float c[4] = {NAN, NAN, NAN, NAN};
    qkv__gemm_f32(1, 2, 2, 3, 1.0f, a, NULL, 3, 1, b, NULL, 2, 1, 0.0f, c, NULL, 2, 1);
    assert_true(c[0] == 58 && c[1] == 64 && c[2] == 139 && c[3] == 154);
    const double ad[] = {1, 2, 3, 4, 5, 6}, bd[] = {7, 8, 9, 10, 11, 12};
    /* A read transposed (rs 1, cs 3) is [[1,4],[2,5],[3,6]]; times [[7,8],[9,10]], twice */
    double ce[6] = {0};
    qkv__gemm_f64(1, 3, 2, 2, 2.0, ad, NULL, 1, 3, bd, NULL, 2, 1, 0.0, ce, NULL, 2, 1);
    assert_true(ce[0] == 86 && ce[1] == 96 && ce[2] == 118 && ce[3] == 132 && ce[4] == 150 &&
                ce[5] == 168);
}

static void batches_with_offsets_and_broadcast(void **state) {
    (void)state;
    gemm_case gc = plain(17, 23, 19);
    gc.batch = 5;
    check_both(gc);
    gc.broadcast_ab = true; /* A shared by all entries, B by pairs */
    check_both(gc);
    gc.m = 128;
    gc.n = 128;
    gc.k = 64;
    gc.batch = 6;
    gc.lb = TRANSPOSED;
    check_both(gc);
    gc.batch = 3; /* fewer entries than a split needs: parts of entries run in parallel */
    gc.broadcast_ab = false;
    gc.m = 200;
    check_both(gc);
}

/* Runs the f32 and f64 product of one shape with n threads into out32 / out64: A B^T (an
 * input gradient) when shape[4] is 0, A^T B (a weight gradient) when it is 1. */
static void run_for_threads(int threads, const int64_t shape[5], float *out32, double *out64,
                            const float *a32, const float *b32, const double *a64,
                            const double *b64) {
    int64_t bt = shape[0], m = shape[1], n = shape[2], k = shape[3];
    bool wgrad = shape[4];
    int64_t rsa = wgrad ? 1 : k, csa = wgrad ? m : 1, rsb = wgrad ? n : 1, csb = wgrad ? 1 : k;
    int64_t off[3][8];
    for (int64_t p = 0; p < bt; p++) {
        off[0][p] = p * m * k;
        off[1][p] = p * k * n;
        off[2][p] = p * m * n;
    }
    qkv_set_num_threads(threads);
    for (int64_t i = 0; i < bt * m * n; i++) {
        out32[i] = 0.25f * (float)(i % 7);
        out64[i] = 0.25 * (double)(i % 7);
    }
    qkv__gemm_f32(bt, m, n, k, 0.7f, a32, off[0], rsa, csa, b32, off[1], rsb, csb, 0.3f,
                  out32, off[2], n, 1);
    qkv__gemm_f64(bt, m, n, k, 0.7, a64, off[0], rsa, csa, b64, off[1], rsb, csb, 0.3, out64,
                  off[2], n, 1);
}

static void same_bits_for_any_thread_count(void **state) {
    (void)state;
    const int64_t shapes[][5] = {
        {1, 301, 203, 517, 0}, {1, 40, 700, 300, 0}, {3, 130, 70, 90, 0}, {8, 128, 128, 64, 0},
        {2, 1, 900, 1000, 0}, {1, 900, 1, 1000, 0}, {1, 100, 777, 610, 1}, {1, 53, 300, 700, 1},
    };
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int64_t bt = shapes[s][0], m = shapes[s][1], n = shapes[s][2], k = shapes[s][3];
        float *a32 = malloc((size_t)(bt * m * k) * sizeof(float));
        float *b32 = malloc((size_t)(bt * k * n) * sizeof(float));
        double *a64 = malloc((size_t)(bt * m * k) * sizeof(double));
        double *b64 = malloc((size_t)(bt * k * n) * sizeof(double));
        float *c32[2];
        double *c64[2];
        for (int t = 0; t < 2; t++) {
            c32[t] = malloc((size_t)(bt * m * n) * sizeof(float));
            c64[t] = malloc((size_t)(bt * m * n) * sizeof(double));
            assert_non_null(c32[t]);
            assert_non_null(c64[t]);
        }
        assert_non_null(a32); assert_non_null(b32); assert_non_null(a64); assert_non_null(b64);
        for (int64_t i = 0; i < bt * m * k; i++) a64[i] = a32[i] = (float)uniform();
        for (int64_t i = 0; i < bt * k * n; i++) b64[i] = b32[i] = (float)uniform();
        run_for_threads(1, shapes[s], c32[0], c64[0], a32, b32, a64, b64);
        for (int threads = 2; threads <= 3; threads++) {
            run_for_threads(threads, shapes[s], c32[1], c64[1], a32, b32, a64, b64);
            assert_memory_equal(c32[0], c32[1], (size_t)(bt * m * n) * sizeof(float));
            assert_memory_equal(c64[0], c64[1], (size_t)(bt * m * n) * sizeof(double));
        }
        /* and the values are right, not just repeatable */
        bool wgrad = shapes[s][4];
        layout la = wgrad ? TRANSPOSED : ROW_MAJOR, lb = wgrad ? ROW_MAJOR : TRANSPOSED;
        gemm_case gc = {bt, m, n, k, la, lb, ROW_MAJOR, 0.7, 0.3, false, false};
        check_both(gc);
        for (int t = 0; t < 2; t++) {
            free(c32[t]);
            free(c64[t]);
        }
        free(a32); free(b32); free(a64); free(b64);
    }
    qkv_set_num_threads(0);
}

/* Whether element (i, j) of an m x n matrix is in the triangle tri keeps (diagonal included). */
static bool kept(qkv_tri tri, int64_t i, int64_t j) {
    return (tri == QKV_TRIL_OUT || tri == QKV_TRIL_A) ? j <= i : j >= i;
}

/* One triangular product against the full GEMM of the masked operand (or the masked full
 * product): the kept sums are the same products in the same order, so the values must be
 * equal, not close; every element of C is written (C starts as NaN); 2 threads give the bits
 * of 1. */
#define DEFINE_TRI_CHECK(T, SUFFIX)                                                          \
    static void check_tri_##SUFFIX(qkv_tri tri, int64_t bt, int64_t m, int64_t n, int64_t k, \
                                   layout la, layout lb, layout lc) {                        \
        operand A = operand_make(m, k, la), B = operand_make(k, n, lb);                      \
        operand C = operand_make(m, n, lc);                                                  \
        size_t na = (size_t)(A.span * bt), nb = (size_t)(B.span * bt);                       \
        size_t nc = (size_t)(C.span * bt);                                                   \
        T *a = malloc(na * sizeof(T)), *am = malloc(na * sizeof(T));                         \
        T *b = malloc(nb * sizeof(T)), *want = malloc(nc * sizeof(T));                       \
        T *got[2] = {malloc(nc * sizeof(T)), malloc(nc * sizeof(T))};                        \
        int64_t off[3][4];                                                                   \
        assert_true(a && am && b && want && got[0] && got[1] && bt <= 4);                    \
        for (size_t i = 0; i < na; i++) am[i] = a[i] = (T)uniform();                         \
        for (size_t i = 0; i < nb; i++) b[i] = (T)uniform();                                 \
        for (int64_t p = 0; p < bt; p++) {                                                   \
            off[0][p] = p * A.span;                                                          \
            off[1][p] = p * B.span;                                                          \
            off[2][p] = p * C.span;                                                          \
        }                                                                                    \
        bool out_kind = tri == QKV_TRIL_OUT || tri == QKV_TRIU_OUT;                          \
        for (int64_t p = 0; !out_kind && p < bt; p++)                                        \
            for (int64_t i = 0; i < m; i++)                                                  \
                for (int64_t l = 0; l < k; l++)                                              \
                    if (!kept(tri, i, l)) am[off[0][p] + i * A.rs + l * A.cs] = 0;           \
        for (size_t i = 0; i < nc; i++) want[i] = 0;                                         \
        qkv__gemm_##SUFFIX(bt, m, n, k, 1, am, off[0], A.rs, A.cs, b, off[1], B.rs, B.cs, 0, \
                           want, off[2], C.rs, C.cs);                                        \
        for (int t = 0; t < 2; t++) {                                                        \
            for (size_t i = 0; i < nc; i++) got[t][i] = (T)NAN;                              \
            qkv_set_num_threads(t + 1);                                                      \
            qkv__gemm_tri_##SUFFIX(tri, bt, m, n, k, 1, a, off[0], A.rs, A.cs, b, off[1],     \
                                   B.rs, B.cs, NULL, NULL, got[t], off[2], C.rs, C.cs);      \
        }                                                                                    \
        qkv_set_num_threads(0);                                                              \
        for (int64_t p = 0; p < bt; p++)                                                     \
            for (int64_t i = 0; i < m; i++)                                                  \
                for (int64_t j = 0; j < n; j++) {                                            \
                    int64_t ci = off[2][p] + i * C.rs + j * C.cs;                            \
                    T w = out_kind && !kept(tri, i, j) ? 0 : want[ci];                       \
                    if (!(got[0][ci] == w))                                                  \
                        fail_msg("tri %d [%lld] %lldx%lldx%lld C[%lld,%lld] = %.9g, want %.9g", \
                                 (int)tri, (long long)bt, (long long)m, (long long)n,        \
                                 (long long)k, (long long)i, (long long)j, (double)got[0][ci], \
                                 (double)w);                                                 \
                    assert_memory_equal(&got[0][ci], &got[1][ci], sizeof(T));                \
                }                                                                            \
        /* A already zero outside its triangle (as attention's weights are) is read in       \
         * place: the same values. */                                                        \
        for (int64_t p = 0; !out_kind && p < bt; p++)                                        \
            for (int64_t i = 0; i < m; i++)                                                  \
                for (int64_t j = 0; j < n; j++) got[0][off[2][p] + i * C.rs + j * C.cs] = (T)NAN; \
        if (!out_kind)                                                                       \
            qkv__gemm_tri_##SUFFIX(tri, bt, m, n, k, 1, am, off[0], A.rs, A.cs, b, off[1],    \
                                   B.rs, B.cs, NULL, NULL, got[0], off[2], C.rs, C.cs);      \
        for (int64_t p = 0; !out_kind && p < bt; p++)                                        \
            for (int64_t i = 0; i < m; i++)                                                  \
                for (int64_t j = 0; j < n; j++) {                                            \
                    int64_t ci = off[2][p] + i * C.rs + j * C.cs;                            \
                    if (!(got[0][ci] == want[ci]))                                           \
                        fail_msg("tri %d, A zero outside: C[%lld,%lld] = %.9g, want %.9g",   \
                                 (int)tri, (long long)i, (long long)j, (double)got[0][ci],   \
                                 (double)want[ci]);                                          \
                }                                                                            \
        free(a); free(am); free(b); free(want); free(got[0]); free(got[1]);                  \
    }

DEFINE_TRI_CHECK(float, f32)
DEFINE_TRI_CHECK(double, f64)

static void triangular_products_equal_masked_full_ones(void **state) {
    (void)state;
    /* m > MC, k over several k blocks, and the rectangles either way round. */
    static const int64_t shapes[][4] = {
        {1, 1, 1, 1}, {2, 7, 13, 5}, {1, 13, 33, 17}, {3, 40, 40, 40}, {1, 128, 257, 67},
        {2, 300, 290, 300}, {1, 1600, 40, 300}, {1, 5, 300, 700}, {1, 300, 5, 700},
        {4, 256, 256, 32}, {4, 256, 32, 256}, {1, 600, 600, 600},
    };
    static const qkv_tri tris[] = {QKV_TRIL_OUT, QKV_TRIU_OUT, QKV_TRIL_A, QKV_TRIU_A};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (size_t t = 0; t < 4; t++) {
            const int64_t *sh = shapes[s];
            layout la = (layout)((s + t) % 3), lb = (layout)((s + 2 * t + 1) % 3);
            layout lc = s % 4 == 3 ? STRIDED : ROW_MAJOR;
            check_tri_f32(tris[t], sh[0], sh[1], sh[2], sh[3], la, lb, lc);
            if (sh[1] * sh[2] * sh[3] <= 2000000)
                check_tri_f64(tris[t], sh[0], sh[1], sh[2], sh[3], la, lb, lc);
        }
}

/* An A whose rows (or, transposed, whose steps of k) lie a multiple of 4 KiB apart is packed
 * rather than read in place, as every such read falls in one set of L1: the product has the
 * bits of the same A stored with a stride that is read in place, for both layouts, full and
 * edge tiles, and two k blocks. */
#define DEFINE_ALIASED(T, SUFFIX)                                                             \
    static void aliased_same_bits_##SUFFIX(void) {                                            \
        enum { M = 50, N = 70, K = 300 };                                                     \
        const int64_t aliased = 4096 / (int64_t)sizeof(T), plain_ld = aliased + 3;           \
        T *a1 = calloc((size_t)(M > K ? M : K) * (size_t)aliased, sizeof(T));                \
        T *a2 = calloc((size_t)(M > K ? M : K) * (size_t)plain_ld, sizeof(T));               \
        T *b = malloc((size_t)(K * N) * sizeof(T));                                          \
        T *c1 = malloc((size_t)(M * N) * sizeof(T)), *c2 = malloc((size_t)(M * N) * sizeof(T)); \
        assert_true(a1 && a2 && b && c1 && c2);                                              \
        for (int64_t i = 0; i < K * N; i++) b[i] = (T)uniform();                             \
        for (int transposed = 0; transposed < 2; transposed++) {                             \
            int64_t outer = transposed ? K : M, inner = transposed ? M : K;                  \
            for (int64_t i = 0; i < outer; i++)                                              \
                for (int64_t j = 0; j < inner; j++)                                          \
                    a1[i * aliased + j] = a2[i * plain_ld + j] = (T)uniform();               \
            int64_t rs1 = transposed ? 1 : aliased, cs1 = transposed ? aliased : 1;          \
            int64_t rs2 = transposed ? 1 : plain_ld, cs2 = transposed ? plain_ld : 1;        \
            qkv__gemm_##SUFFIX(1, M, N, K, 1, a1, NULL, rs1, cs1, b, NULL, N, 1, 0, c1, NULL, \
                               N, 1);                                                        \
            qkv__gemm_##SUFFIX(1, M, N, K, 1, a2, NULL, rs2, cs2, b, NULL, N, 1, 0, c2, NULL, \
                               N, 1);                                                        \
            assert_memory_equal(c1, c2, (size_t)(M * N) * sizeof(T));                        \
        }                                                                                    \
        free(a1); free(a2); free(b); free(c1); free(c2);                                     \
    }

DEFINE_ALIASED(float, f32)
DEFINE_ALIASED(double, f64)

static void packs_a_whose_reads_alias_in_l1(void **state) {
    (void)state;
    aliased_same_bits_f32();
    aliased_same_bits_f64();
}

/* qkv__matmul_like lays the product out as like when like is a dense permutation with one
 * of its last two dimensions innermost, with the bits of the contiguous product; any other
 * like gets the contiguous product. */
static void products_take_the_layout_they_are_asked_for(void **state) {
    (void)state;
    qkv_scope_begin();
    enum { B = 3, T = 40, H = 2, D = 24, K = 17 };
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *a = qkv_randn(QKV_F32, QKV_SHAPE(B, H, T, K), &g);
    qkv_tensor *b = qkv_randn(QKV_F32, QKV_SHAPE(B, H, K, D), &g);
    qkv_tensor *head_split = qkv_permute(qkv_empty(QKV_F32, QKV_SHAPE(B, T, H, D)),
                                         (const int[]){0, 2, 1, 3});
    qkv_tensor *rows_inner = qkv_transpose(qkv_permute(qkv_empty(QKV_F32,
                                                                 QKV_SHAPE(B, D, H, T)),
                                                       (const int[]){0, 2, 1, 3}), -1, -2);
    qkv_tensor *gappy = qkv_slice(qkv_empty(QKV_F32, QKV_SHAPE(B, H, T, 2 * D)), -1, 0, 2 * D, 2);
    qkv_tensor *batch_inner = qkv_permute(qkv_empty(QKV_F32, QKV_SHAPE(T, D, B, H)),
                                          (const int[]){2, 3, 0, 1});
    const qkv_tensor *likes[] = {head_split, rows_inner, gappy, batch_inner};
    const bool laid[] = {true, true, false, false};
    const qkv_tensor *operands[][2] = {{a, b}, {a, qkv_transpose(qkv_randn(QKV_F32,
                                                        QKV_SHAPE(B, H, D, K), &g), -1, -2)}};
    static float want[B * H * T * D], got[B * H * T * D];
    for (size_t o = 0; o < 2; o++) {
        qkv_tensor *plain = qkv__matmul(operands[o][0], operands[o][1], "test");
        assert_non_null(plain);
        assert_true(qkv_copy_out(plain, QKV_F32, want));
        for (size_t i = 0; i < 4; i++) {
            qkv_tensor *out = qkv__matmul_like(operands[o][0], operands[o][1], 0.5, likes[i],
                                               "test");
            assert_non_null(out);
            if (laid[i])
                assert_memory_equal(out->strides, likes[i]->strides, 4 * sizeof(int64_t));
            else
                assert_true(qkv_is_contiguous(out));
            assert_true(qkv_copy_out(out, QKV_F32, got));
            for (size_t e = 0; e < sizeof got / sizeof *got; e++)
                assert_true(got[e] == 0.5f * want[e]);
        }
    }
    qkv_scope_end();
}

/* qkv__matmul_rowsum's product is qkv__matmul's and its sums are each row of A added in order
 * in double and rounded once: for A = g^T (a weight gradient's) the bits of qkv_sum over g's
 * rows, on edge panels, several k blocks and any thread count. */
static void row_sums_come_with_the_product(void **state) {
    (void)state;
    qkv_scope_begin();
    static const int64_t shapes[][3] = {{256, 256, 700}, {37, 70, 9}, {1025, 33, 300},
                                        {13, 1, 1}, {300, 40, 1000}, {1600, 20, 300}};
    qkv_generator g;
    qkv_generator_init(&g, 9);
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int64_t m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        qkv_tensor *gt = qkv_randn(QKV_F32, QKV_SHAPE(k, m), &g);
        qkv_tensor *a[2] = {qkv_transpose(gt, 0, 1), qkv_randn(QKV_F32, QKV_SHAPE(m, k), &g)};
        qkv_tensor *b = qkv_randn(QKV_F32, QKV_SHAPE(k, n), &g);
        for (int layout = 0; layout < 2; layout++) {
            qkv_tensor *want = qkv__matmul(a[layout], b, "test");
            float sums[1600];
            for (int64_t i = 0; i < m; i++) {
                double acc = 0;
                for (int64_t l = 0; l < k; l++)
                    acc += ((const float *)qkv_data(a[layout]))[i * a[layout]->strides[0] +
                                                                 l * a[layout]->strides[1]];
                sums[i] = (float)acc;
            }
            for (int threads = 1; threads <= 2; threads++) {
                qkv_set_num_threads(threads);
                qkv_tensor *rowsum;
                qkv_tensor *got = qkv__matmul_rowsum(a[layout], b, &rowsum, "test");
                assert_non_null(got);
                assert_non_null(rowsum);
                assert_memory_equal(qkv_data(got), qkv_data(want),
                                    (size_t)(m * n) * sizeof(float));
                assert_memory_equal(qkv_data(rowsum), sums, (size_t)m * sizeof(float));
                if (layout == 0)
                    assert_memory_equal(qkv_data(rowsum), qkv_data(qkv_sum(gt, 0, false)),
                                        (size_t)m * sizeof(float));
            }
        }
    }
    qkv_set_num_threads(0);
    assert_false(qkv__matmul_rowsum_fits(qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)),
                                         qkv_zeros(QKV_F32, QKV_SHAPE(2, 3))));
    qkv_tensor *none;
    assert_null(qkv__matmul_rowsum(qkv_zeros(QKV_F32, QKV_SHAPE(2, 3, 4)),
                                   qkv_zeros(QKV_F32, QKV_SHAPE(4, 3)), &none, "test"));
    assert_null(none);
    qkv_clear_error();
    qkv_scope_end();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(computes_exact_small_product),
        cmocka_unit_test(matches_reference_on_edge_shapes),
        cmocka_unit_test(reads_transposed_operands),
        cmocka_unit_test(reads_and_writes_strided_operands),
        cmocka_unit_test(applies_alpha_and_beta),
        cmocka_unit_test(beta_zero_ignores_nan_in_c),
        cmocka_unit_test(k_zero_scales_c_by_beta),
        cmocka_unit_test(batches_with_offsets_and_broadcast),
        cmocka_unit_test(same_bits_for_any_thread_count),
        cmocka_unit_test(packs_a_whose_reads_alias_in_l1),
        cmocka_unit_test(products_take_the_layout_they_are_asked_for),
        cmocka_unit_test(row_sums_come_with_the_product),
        cmocka_unit_test(triangular_products_equal_masked_full_ones),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
