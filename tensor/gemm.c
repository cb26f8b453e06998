/*
 * GEMM: the batched strided matrix product behind qkv_matmul and its backward.
 *
 * The classic blocked scheme: A and B are packed into panels laid out for the micro-kernel
 * (reading through any strides, so transposed operands cost nothing extra), blocked so that
 * one A panel sits in L1 and one B block in L2, and multiplied by a register-blocked kernel
 * written with GCC/Clang vector extensions: one source serves AVX-512, AVX2, SSE and NEON.
 * The precision-specific code is tensor/gemm_template.h, included once for float and once for
 * double.
 *
 * Threads split the output (batch entries, then row or column ranges), never k, and the k
 * blocking does not depend on the split, so results are bitwise the same for any thread count.
 */

/* ISO C mode turns off the contraction of a*b + c into one fused multiply-add, which is what
 * the micro-kernel is made of. Set before any include so every function agrees on it (GCC
 * refuses to inline across differing optimize settings). Clang contracts by default. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <stdlib.h>
#include <string.h>
#include <threads.h>

#include "tensor/tensor_internal.h"

/* Vector width and register tile (MR rows x NV vectors of columns), from the registers the
 * target has: 32 vector registers on AVX-512 and AArch64 hold 24 accumulators, the 16 of
 * AVX2/SSE hold 12. Without any vector unit the compiler lowers the vectors to scalars. */
#if defined(__AVX512F__)
#define GEMM_VBYTES 64
#define MR 12
#define NV 2
#elif defined(__AVX__)
#define GEMM_VBYTES 32
#define MR 6
#define NV 2
#elif defined(__aarch64__)
#define GEMM_VBYTES 16
#define MR 8
#define NV 3
#else
#define GEMM_VBYTES 16
#define MR 6
#define NV 2
#endif

/* __builtin_shufflevector (Clang, GCC 12+) makes the transposing pack fast; older compilers
 * get an element-wise loop. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define GEMM_HAVE_SHUFFLE 1
#endif
#endif
#ifndef GEMM_HAVE_SHUFFLE
#define GEMM_HAVE_SHUFFLE 0
#endif

typedef float gemm_vf __attribute__((vector_size(GEMM_VBYTES)));
typedef double gemm_vd __attribute__((vector_size(GEMM_VBYTES)));

/* How the work is cut for threads: tasks = batch * parts, each part a range of rows (or
 * columns) of one batch entry. Only the cut depends on the thread count; the arithmetic
 * for one element does not. */
typedef struct gemm_plan {
    int threads;
    int64_t parts, tasks;
    bool split_m;
} gemm_plan;

static int64_t gemm_gcd(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* A part smaller than this many rows (or columns) is not worth its own task unless the
 * threads need it: every part packs all of the other operand again, one packed element per
 * row (or column) of the part's multiply-adds. Parts of 128 columns made a weight gradient
 * (256 x 768, k = 4096) a tenth slower on 2 threads than parts of 384. */
#define GEMM_MIN_PART 256

static gemm_plan gemm_plan_make(int64_t batch, int64_t m, int64_t n, int64_t k, int mr,
                                int nr) {
    gemm_plan plan = {.threads = 1, .parts = 1, .tasks = batch, .split_m = true};
    /* A GEMM does about 16 multiply-adds per cycle against a few for element-wise kernels,
     * so scale its work down before asking how many threads it is worth. */
    double fmas = (double)batch * (double)m * (double)n * (double)k;
    int threads = qkv__threads_for(fmas / 16 > 1e15 ? (int64_t)1e15 : (int64_t)(fmas / 16));
    if (threads <= 1) return plan;
    /* Splitting rows repacks all of B in every part, splitting columns all of A: split the
     * larger side. */
    int64_t m_panels = (m + mr - 1) / mr, n_panels = (n + nr - 1) / nr;
    plan.split_m = m >= n;
    int64_t len = plan.split_m ? m : n, panels = plan.split_m ? m_panels : n_panels;
    /* Parts per entry: at least enough that the tasks divide evenly among the threads, and
     * up to a few tasks per thread, which are handed out as threads free up, so a thread
     * slowed by other load on the machine does not hold back the rest. */
    int64_t even = threads / gemm_gcd(batch, threads), parts = even;
    while (batch * parts < 4 * threads) parts *= 2;
    /* The cap keeps the parts a multiple of even: of 3 tasks on 2 threads, one thread
     * idles while the other runs the third. */
    int64_t most = len / GEMM_MIN_PART / even * even;
    if (parts > most) parts = most;
    if (parts < even) parts = even;
    if (parts > panels) {
        int64_t other = plan.split_m ? n_panels : m_panels;
        if (other > panels) {
            plan.split_m = !plan.split_m;
            panels = other;
        }
        if (parts > panels) parts = panels;
    }
    plan.parts = parts;
    plan.tasks = batch * parts;
    plan.threads = plan.tasks < threads ? (int)plan.tasks : threads;
    return plan;
}

/* Rows (or columns) of part `part` of `parts`, cut on panel boundaries of `step`. */
static void gemm_part_range(int64_t len, int64_t step, int64_t parts, int64_t part,
                            int64_t *lo, int64_t *hi) {
    int64_t panels = (len + step - 1) / step;
    int64_t p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
    *lo = p0 * step;
    *hi = p1 * step < len ? p1 * step : len;
}

/* Blocking, in elements. KC x MR of A (L1) and KC x NC of B (L2) per thread; MC bounds the
 * packed A block so B is repacked rarely. */
#define T float
#define V gemm_vf
#define SFX _f32
#define KC 256
#define MC 1536
#define NC 512
#include "tensor/gemm_template.h"
#undef T
#undef V
#undef SFX
#undef KC
#undef MC
#undef NC

#define T double
#define V gemm_vd
#define SFX _f64
#define KC 192
#define MC 768
#define NC 256
#include "tensor/gemm_template.h"
#undef T
#undef V
#undef SFX
#undef KC
#undef MC
#undef NC

void qkv__gemm_f32(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                   const float *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                   const float *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                   float beta, float *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    gemm_args_f32 g = {m, n, k, alpha, beta, a, a_off, rsa, csa, b, b_off, rsb, csb,
                       c, c_off, rsc, csc, NULL};
    gemm_f32(batch, &g);
}

void qkv__gemm_f64(int64_t batch, int64_t m, int64_t n, int64_t k, double alpha,
                   const double *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                   const double *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                   double beta, double *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    gemm_args_f64 g = {m, n, k, alpha, beta, a, a_off, rsa, csa, b, b_off, rsb, csb,
                       c, c_off, rsc, csc, NULL};
    gemm_f64(batch, &g);
}

void qkv__gemm_bias_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                        int64_t csa, const float *b, int64_t rsb, int64_t csb,
                        const float *bias, float *c, int64_t rsc) {
    gemm_args_f32 g = {m, n, k, 1.0f, 0.0f, a, NULL, rsa, csa, b, NULL, rsb, csb,
                       c, NULL, rsc, 1, bias};
    gemm_f32(1, &g);
}

void qkv__gemm_bias_f64(int64_t m, int64_t n, int64_t k, const double *a, int64_t rsa,
                        int64_t csa, const double *b, int64_t rsb, int64_t csb,
                        const double *bias, double *c, int64_t rsc) {
    gemm_args_f64 g = {m, n, k, 1.0, 0.0, a, NULL, rsa, csa, b, NULL, rsb, csb,
                       c, NULL, rsc, 1, bias};
    gemm_f64(1, &g);
}
