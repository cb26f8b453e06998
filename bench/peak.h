/*
 * The arithmetic peak of this machine's cores, measured: every thread runs a loop of
 * independent vector multiply-adds (16 accumulators, more than latency times throughput on
 * current x86 cores), all threads at once, and the figure is the best of several runs: other
 * work on the machine can only slow a run down, and a peak is what the cores can do.
 *  - F32: FMA on 512-bit vectors where the CPU has AVX-512, else 256-bit FMA; a lane of an FMA
 *    counts 2 flops.
 *  - BF16: VDPBF16PS (AVX512_BF16); a float32 lane of it does 2 multiply-adds: 4 flops.
 * Included by bench/peak.c, which prints them, and bench/gemm.c, which states its figures as
 * a share of them. A figure of 0 means the CPU (or compiler) lacks the instruction.
 */
#ifndef QKV_BENCH_PEAK_H
#define QKV_BENCH_PEAK_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 12)
#define PEAK_X86 1
#include <immintrin.h>
#else
#define PEAK_X86 0
#endif

enum { PEAK_ACC = 16, PEAK_ITERS = 1 << 23, PEAK_RUNS = 7 };

typedef enum peak_kind { PEAK_F32, PEAK_BF16 } peak_kind;

static volatile float peak_sink;

#if PEAK_X86
__attribute__((target("avx512f"))) static void peak_loop_avx512(int64_t iters) {
    __m512 acc[PEAK_ACC];
    for (int i = 0; i < PEAK_ACC; i++) acc[i] = _mm512_set1_ps((float)i);
    __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-7f);
    for (int64_t n = 0; n < iters; n++) {
        for (int i = 0; i < PEAK_ACC; i++) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
        __asm__ volatile("" : "+v"(x)); /* keep the loop a loop */
    }
    for (int i = 1; i < PEAK_ACC; i++) acc[0] = _mm512_add_ps(acc[0], acc[i]);
    peak_sink = _mm512_reduce_add_ps(acc[0]);
}

__attribute__((target("avx2,fma"))) static void peak_loop_avx2(int64_t iters) {
    __m256 acc[PEAK_ACC];
    for (int i = 0; i < PEAK_ACC; i++) acc[i] = _mm256_set1_ps((float)i);
    __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-7f);
    for (int64_t n = 0; n < iters; n++) {
        for (int i = 0; i < PEAK_ACC; i++) acc[i] = _mm256_fmadd_ps(acc[i], x, y);
        __asm__ volatile("" : "+x"(x));
    }
    for (int i = 1; i < PEAK_ACC; i++) acc[0] = _mm256_add_ps(acc[0], acc[i]);
    float out[8];
    _mm256_storeu_ps(out, acc[0]);
    peak_sink = out[0];
}

__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) static void
peak_loop_bf16(int64_t iters) {
    __m512 acc[PEAK_ACC];
    for (int i = 0; i < PEAK_ACC; i++) acc[i] = _mm512_set1_ps((float)i);
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f), y = x;
    for (int64_t n = 0; n < iters; n++) {
        for (int i = 0; i < PEAK_ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
        __asm__ volatile("" : "+v"(x));
    }
    for (int i = 1; i < PEAK_ACC; i++) acc[0] = _mm512_add_ps(acc[0], acc[i]);
    peak_sink = _mm512_reduce_add_ps(acc[0]);
}
#endif

/* Flops of one loop iteration, 0 when the CPU cannot run the kernel. */
static double peak_flops_per_iter(peak_kind kind) {
#if PEAK_X86
    if (kind == PEAK_BF16)
        return __builtin_cpu_supports("avx512bf16") ? PEAK_ACC * 16.0 * 4 : 0;
    if (__builtin_cpu_supports("avx512f")) return PEAK_ACC * 16.0 * 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return PEAK_ACC * 8.0 * 2;
#else
    (void)kind;
#endif
    return 0;
}

static void *peak_thread(void *arg) {
#if PEAK_X86
    peak_kind kind = *(const peak_kind *)arg;
    if (kind == PEAK_BF16)
        peak_loop_bf16(PEAK_ITERS);
    else if (__builtin_cpu_supports("avx512f"))
        peak_loop_avx512(PEAK_ITERS);
    else
        peak_loop_avx2(PEAK_ITERS);
#else
    (void)arg;
#endif
    return NULL;
}

static double peak_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int peak_cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* GFLOP/s of `threads` cores together (at most 64 threads), the best of PEAK_RUNS runs. */
static double peak_gflops(peak_kind kind, int threads) {
    double per_iter = peak_flops_per_iter(kind);
    if (per_iter == 0 || threads < 1 || threads > 64) return 0;
    double rates[PEAK_RUNS];
    for (int r = 0; r < PEAK_RUNS; r++) {
        pthread_t tid[64];
        int started = 0;
        double t0 = peak_now();
        for (int t = 1; t < threads; t++)
            if (pthread_create(&tid[started], NULL, peak_thread, &kind) == 0) started++;
        peak_thread(&kind);
        for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
        rates[r] = per_iter * PEAK_ITERS * (started + 1) / (peak_now() - t0) * 1e-9;
    }
    qsort(rates, PEAK_RUNS, sizeof(double), peak_cmp);
    return rates[PEAK_RUNS - 1];
}

#endif
