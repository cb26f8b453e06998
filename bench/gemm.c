/*
 * GEMM throughput of qkv against OpenBLAS's cblas_sgemm, side by side in one run.
 *
 * Single precision, row-major, on square sizes and on the shapes a transformer layer runs:
 * projections forward, the per-head attention products, and the transposed products of the
 * backward pass. Each figure is the median of several timed repetitions, at 1 and 2 threads.
 * Built without OpenBLAS, it prints the qkv figures only.
 *
 * Usage: bench/gemm [threads...]   (default: 1 2)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static void bench_shape(const shape *s, const int *threads, int n_threads) {
    operands o = {.s = s};
    unsigned seed = 12345;
    o.lda = s->trans_a ? s->m : s->k;
    o.ldb = s->trans_b ? s->k : s->n;
    o.ldc = s->n;
    int64_t sa = s->m * s->k, sb = s->k * s->n, sc = s->m * s->n;
    o.a = random_floats(sa * s->batch, &seed);
    o.b = random_floats(sb * s->batch, &seed);
    o.c = random_floats(sc * s->batch, &seed);
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
#ifdef QKV_HAVE_OPENBLAS
        openblas_set_num_threads(threads[t]);
        void (*const fns[])(const operands *) = {run_qkv, run_openblas};
#else
        void (*const fns[])(const operands *) = {run_qkv};
#endif
        enum { n_fns = sizeof(fns) / sizeof(fns[0]) };
        double secs[2];
        median_times(fns, n_fns, &o, secs);
        printf("%-28s %3d %9.1f", s->name, threads[t], flops / secs[0] * 1e-9);
        if (n_fns > 1)
            printf(" %9.1f %7.2f", flops / secs[1] * 1e-9, secs[1] / secs[0]);
        printf("\n");
        fflush(stdout);
    }
    free(o.a);
    free(o.b);
    free(o.c);
    free(o.a_off);
}

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, n_threads = 2;
    if (argc > 1) {
        n_threads = 0;
        for (int i = 1; i < argc && n_threads < 8; i++) threads[n_threads++] = atoi(argv[i]);
    }
    const char *only = getenv("QKV_BENCH_ONLY"); /* substring of the shape names to run */
#ifdef QKV_HAVE_OPENBLAS
    printf("OpenBLAS %s, core %s\n", openblas_get_config(), openblas_get_corename());
    printf("%-28s %3s %9s %9s %7s\n", "sgemm (GFLOP/s)", "thr", "qkv", "OpenBLAS", "ratio");
#else
    printf("%-28s %3s %9s\n", "sgemm (GFLOP/s)", "thr", "qkv");
#endif
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        if (!only || strstr(shapes[i].name, only)) bench_shape(&shapes[i], threads, n_threads);
    return 0;
}
