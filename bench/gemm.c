/*
 * GEMM throughput of qkv against OpenBLAS's cblas_sgemm, side by side in one run, then qkv's
 * bf16 GEMM against its own F32 GEMM.
 *
 * Row-major, on square sizes and on the shapes a transformer layer runs: projections forward,
 * the per-head attention products, and the transposed products of the backward pass. Each
 * figure is the median of several timed repetitions, at 1 and 2 threads, and is also given as
 * a share of the measured peak of as many cores (bench/peak.h): F32 figures of the F32 FMA
 * peak, bf16 figures of the VDPBF16PS peak. The bf16 rows (square sizes from 512, and the
 * transformer shapes) time qkv__gemm_bf16_out, bf16 in and out as under autocast, against
 * qkv__gemm_f32 on the same shape, alternating. Built without OpenBLAS, the first table has
 * the qkv figures only.
 *
 * Usage: bench/gemm [threads...]   (default: 1 2)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "peak.h"
#include "tensor/tensor_internal.h"

#ifdef QKV_HAVE_OPENBLAS
#include <cblas.h>
#endif

typedef struct shape {
    const char *name;
    int64_t batch, m, n, k;
    bool trans_a; /* A stored k x m: the product reads A^T, as in a weight gradient */
    bool trans_b; /* B stored n x k: the product reads B^T, as in an input gradient */
} shape;

static const shape shapes[] = {
    {"square 128", 1, 128, 128, 128, false, false},
    {"square 256", 1, 256, 256, 256, false, false},
    {"square 512", 1, 512, 512, 512, false, false},
    {"square 1024", 1, 1024, 1024, 1024, false, false},
    {"square 2048", 1, 2048, 2048, 2048, false, false},
    {"qkv proj 4096x768x256", 1, 4096, 768, 256, false, false},
    {"proj 4096x256x256", 1, 4096, 256, 256, false, false},
    {"ffn up 4096x1024x256", 1, 4096, 1024, 256, false, false},
    {"ffn down 4096x256x1024", 1, 4096, 256, 1024, false, false},
    {"attn QK^T 128x(128x128x64)", 128, 128, 128, 64, false, false},
    {"attn PV 128x(128x64x128)", 128, 128, 64, 128, false, false},
    {"A^T B 256x256x4096", 1, 256, 256, 4096, true, false},
    {"A^T B 256x768x4096", 1, 256, 768, 4096, true, false},
    {"A B^T 4096x256x1024", 1, 4096, 256, 1024, false, true},
    {"A B^T 4096x256x768", 1, 4096, 256, 768, false, true},
    {"attn A B^T 128x(128x128x64)", 128, 128, 128, 64, false, true},
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct operands {
    const shape *s;
    float *a, *b, *c;
    uint16_t *ah, *bh, *ch; /* the same as bf16 (the bf16 rows only) */
    int64_t *a_off, *b_off, *c_off;
    int64_t lda, ldb, ldc; /* leading dimensions of the stored (row-major) matrices */
} operands;

static void run_qkv(const operands *o) {
    const shape *s = o->s;
    int64_t rsa = s->trans_a ? 1 : o->lda, csa = s->trans_a ? o->lda : 1;
    int64_t rsb = s->trans_b ? 1 : o->ldb, csb = s->trans_b ? o->ldb : 1;
    qkv__gemm_f32(s->batch, s->m, s->n, s->k, 1.0f, o->a, o->a_off, rsa, csa, o->b, o->b_off,
                  rsb, csb, 0.0f, o->c, o->c_off, o->ldc, 1);
}

static void run_qkv_bf16(const operands *o) {
    const shape *s = o->s;
    int64_t rsa = s->trans_a ? 1 : o->lda, csa = s->trans_a ? o->lda : 1;
    int64_t rsb = s->trans_b ? 1 : o->ldb, csb = s->trans_b ? o->ldb : 1;
    qkv__gemm_bf16_out(s->batch, s->m, s->n, s->k, 1.0f, o->ah, o->a_off, rsa, csa, o->bh,
                       o->b_off, rsb, csb, o->ch, o->c_off, o->ldc, 1);
}

#ifdef QKV_HAVE_OPENBLAS
static void run_openblas(const operands *o) {
    const shape *s = o->s;
    /* OpenBLAS 0.3.21 has no batched call: one product per entry, as a caller would write. */
    for (int64_t p = 0; p < s->batch; p++)
        cblas_sgemm(CblasRowMajor, s->trans_a ? CblasTrans : CblasNoTrans,
                    s->trans_b ? CblasTrans : CblasNoTrans, (int)s->m, (int)s->n, (int)s->k,
                    1.0f, o->a + o->a_off[p], (int)o->lda, o->b + o->b_off[p], (int)o->ldb,
                    0.0f, o->c + o->c_off[p], (int)o->ldc);
}
#endif

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* Calls per timed repetition so that one repetition lasts about 20 ms. */
static int calibrate(void (*fn)(const operands *), const operands *o) {
    fn(o); /* warm caches, thread pools and packing buffers */
    double t0 = now();
    fn(o);
    double once = now() - t0;
    return once > 0.02 ? 1 : (int)(0.02 / (once > 1e-7 ? once : 1e-7)) + 1;
}

static double seconds_per_call(void (*fn)(const operands *), const operands *o, int inner) {
    double t0 = now();
    for (int i = 0; i < inner; i++) fn(o);
    return (now() - t0) / inner;
}

/* Median seconds per call of each function. Repetitions run in rounds, each library in turn,
 * so a burst of load from elsewhere on the machine slows both rather than one. Between turns
 * the machine idles briefly: both libraries keep their worker threads spinning for a while
 * after a call, and those must not compete with the other library's threads. */
enum { rounds = 3, reps_per_round = 3, reps = rounds * reps_per_round };

static void idle(void) {
    struct timespec ts = {0, 250 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static void median_times(void (*const fns[])(const operands *), int n_fns, const operands *o,
                         double *out) {
    int inner[2];
    double times[2][reps];
    for (int f = 0; f < n_fns; f++) inner[f] = calibrate(fns[f], o);
    for (int r = 0; r < rounds; r++)
        for (int f = 0; f < n_fns; f++) {
            if (n_fns > 1) idle();
            fns[f](o);
            for (int i = 0; i < reps_per_round; i++)
                times[f][r * reps_per_round + i] = seconds_per_call(fns[f], o, inner[f]);
        }
    for (int f = 0; f < n_fns; f++) {
        qsort(times[f], reps, sizeof(double), cmp_double);
        out[f] = times[f][reps / 2];
    }
}

static float *random_floats(int64_t count, unsigned *seed) {
    float *p = malloc((size_t)count * sizeof(float));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (int64_t i = 0; i < count; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        p[i] = (float)(*seed >> 8) / 16777216.0f - 0.5f;
    }
    return p;
}

/* bf16 values of x, truncated: the bench needs bf16 data, not a particular rounding. */
static uint16_t *to_bf16(const float *x, int64_t count) {
    uint16_t *p = malloc((size_t)count * sizeof(uint16_t));
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (int64_t i = 0; i < count; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        p[i] = (uint16_t)(u >> 16);
    }
    return p;
}

/* Measured peaks per thread count, F32 and BF16: the denominators of the shares. */
typedef struct peaks {
    double f32[8], bf16[8];
} peaks;

static double share(double gflops, double peak) {
    return peak > 0 ? 100 * gflops / peak : 0;
}

/* bf16: the second table (qkv bf16 against qkv F32) instead of the first. */
static void bench_shape(const shape *s, const int *threads, int n_threads, const peaks *pk,
                        bool bf16) {
    operands o = {.s = s};
    unsigned seed = 12345;
    o.lda = s->trans_a ? s->m : s->k;
    o.ldb = s->trans_b ? s->k : s->n;
    o.ldc = s->n;
    int64_t sa = s->m * s->k, sb = s->k * s->n, sc = s->m * s->n;
    o.a = random_floats(sa * s->batch, &seed);
    o.b = random_floats(sb * s->batch, &seed);
    o.c = random_floats(sc * s->batch, &seed);
    if (bf16) {
        o.ah = to_bf16(o.a, sa * s->batch);
        o.bh = to_bf16(o.b, sb * s->batch);
        o.ch = to_bf16(o.c, sc * s->batch);
    }
    o.a_off = malloc((size_t)s->batch * 3 * sizeof(int64_t));
    if (!o.a_off) exit(1);
    o.b_off = o.a_off + s->batch;
    o.c_off = o.b_off + s->batch;
    for (int64_t p = 0; p < s->batch; p++) {
        o.a_off[p] = p * sa;
        o.b_off[p] = p * sb;
        o.c_off[p] = p * sc;
    }
    double flops = 2.0 * (double)s->batch * (double)s->m * (double)s->n * (double)s->k;
    for (int t = 0; t < n_threads; t++) {
        qkv_set_num_threads(threads[t]);
        double secs[2];
        if (bf16) {
            void (*const fns[])(const operands *) = {run_qkv, run_qkv_bf16};
            median_times(fns, 2, &o, secs);
            double f = flops / secs[0] * 1e-9, h = flops / secs[1] * 1e-9;
            char label[64];
            snprintf(label, sizeof label, "bf16 %s", s->name);
            printf("%-33s %3d %9.1f %5.0f%% %9.1f %5.0f%% %7.2f\n", label, threads[t], f,
                   share(f, pk->f32[t]), h, share(h, pk->bf16[t]), secs[0] / secs[1]);
            fflush(stdout);
            continue;
        }
#ifdef QKV_HAVE_OPENBLAS
        openblas_set_num_threads(threads[t]);
        void (*const fns[])(const operands *) = {run_qkv, run_openblas};
#else
        void (*const fns[])(const operands *) = {run_qkv};
#endif
        enum { n_fns = sizeof(fns) / sizeof(fns[0]) };
        median_times(fns, n_fns, &o, secs);
        double q = flops / secs[0] * 1e-9;
        printf("%-28s %3d %9.1f %5.0f%%", s->name, threads[t], q, share(q, pk->f32[t]));
        if (n_fns > 1) {
            double r = flops / secs[1] * 1e-9;
            printf(" %9.1f %5.0f%% %7.2f", r, share(r, pk->f32[t]), secs[1] / secs[0]);
        }
        printf("\n");
        fflush(stdout);
    }
    free(o.a);
    free(o.b);
    free(o.c);
    free(o.ah);
    free(o.bh);
    free(o.ch);
    free(o.a_off);
}

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, n_threads = 2;
    if (argc > 1) {
        n_threads = 0;
        for (int i = 1; i < argc && n_threads < 8; i++) threads[n_threads++] = atoi(argv[i]);
    }
    const char *only = getenv("QKV_BENCH_ONLY"); /* substring of the shape names to run */
    peaks pk = {{0}, {0}};
    for (int t = 0; t < n_threads; t++) {
        pk.f32[t] = peak_gflops(PEAK_F32, threads[t]);
        pk.bf16[t] = peak_gflops(PEAK_BF16, threads[t]);
        printf("measured peak, %d thread(s): F32 FMA %.1f GFLOP/s, BF16 VDPBF16PS %.1f GFLOP/s\n",
               threads[t], pk.f32[t], pk.bf16[t]);
    }
#ifdef QKV_HAVE_OPENBLAS
    printf("OpenBLAS %s, core %s\n", openblas_get_config(), openblas_get_corename());
    printf("%-28s %3s %9s %6s %9s %6s %7s\n", "sgemm (GFLOP/s, % of peak)", "thr", "qkv", "%pk",
           "OpenBLAS", "%pk", "ratio");
#else
    printf("%-28s %3s %9s %6s\n", "sgemm (GFLOP/s, % of peak)", "thr", "qkv", "%pk");
#endif
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        if (!only || strstr(shapes[i].name, only))
            bench_shape(&shapes[i], threads, n_threads, &pk, false);
    printf("\nbf16 GEMM, bf16 in and out, f32 sums (path: %s)\n",
           qkv__gemm_bf16_path() == QKV_BF16_GEMM_NATIVE ? "VDPBF16PS" : "widened to F32");
    printf("%-33s %3s %9s %6s %9s %6s %7s\n", "qkv bf16 vs F32 (GFLOP/s, % of pk)", "thr",
           "F32", "%pk", "bf16", "%pk", "ratio");
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        bool small = shapes[i].batch == 1 && shapes[i].m == shapes[i].n &&
                     shapes[i].n == shapes[i].k && shapes[i].m < 512;
        if (!small && (!only || strstr(shapes[i].name, only)))
            bench_shape(&shapes[i], threads, n_threads, &pk, true);
    }
    return 0;
}
