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

#include "tensor/gemm_plan.h"
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
                       c, c_off, rsc, csc, NULL, NULL, QKV_TRI_NONE, NULL};
    gemm_f32(batch, &g);
}

void qkv__gemm_f64(int64_t batch, int64_t m, int64_t n, int64_t k, double alpha,
                   const double *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                   const double *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                   double beta, double *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    gemm_args_f64 g = {m, n, k, alpha, beta, a, a_off, rsa, csa, b, b_off, rsb, csb,
                       c, c_off, rsc, csc, NULL, NULL, QKV_TRI_NONE, NULL};
    gemm_f64(batch, &g);
}

void qkv__gemm_tri_f32(qkv_tri tri, int64_t batch, int64_t m, int64_t n, int64_t k,
                       float alpha, const float *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                       const float *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                       const float *bias, const int64_t *bias_off, float *c,
                       const int64_t *c_off, int64_t rsc, int64_t csc) {
    gemm_args_f32 g = {m, n, k, alpha, 0.0f, a, a_off, rsa, csa, b, b_off, rsb, csb,
                       c, c_off, rsc, csc, bias, bias_off, tri, NULL};
    gemm_f32(batch, &g);
}

void qkv__gemm_tri_f64(qkv_tri tri, int64_t batch, int64_t m, int64_t n, int64_t k,
                       double alpha, const double *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                       const double *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                       const double *bias, const int64_t *bias_off, double *c,
                       const int64_t *c_off, int64_t rsc, int64_t csc) {
    gemm_args_f64 g = {m, n, k, alpha, 0.0, a, a_off, rsa, csa, b, b_off, rsb, csb,
                       c, c_off, rsc, csc, bias, bias_off, tri, NULL};
    gemm_f64(batch, &g);
}

void qkv__gemm_rowsum_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                          int64_t csa, const float *b, int64_t rsb, int64_t csb, float *c,
                          int64_t rsc, float *asum) {
    gemm_args_f32 g = {m, n, k, 1.0f, 0.0f, a, NULL, rsa, csa, b, NULL, rsb, csb,
                       c, NULL, rsc, 1, NULL, NULL, QKV_TRI_NONE, asum};
    gemm_f32(1, &g);
}

void qkv__gemm_rowsum_f64(int64_t m, int64_t n, int64_t k, const double *a, int64_t rsa,
                          int64_t csa, const double *b, int64_t rsb, int64_t csb, double *c,
                          int64_t rsc, double *asum) {
    gemm_args_f64 g = {m, n, k, 1.0, 0.0, a, NULL, rsa, csa, b, NULL, rsb, csb,
                       c, NULL, rsc, 1, NULL, NULL, QKV_TRI_NONE, asum};
    gemm_f64(1, &g);
}

void qkv__gemm_bias_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                        int64_t csa, const float *b, int64_t rsb, int64_t csb,
                        const float *bias, float *c, int64_t rsc) {
    gemm_args_f32 g = {m, n, k, 1.0f, 0.0f, a, NULL, rsa, csa, b, NULL, rsb, csb,
                       c, NULL, rsc, 1, bias, NULL, QKV_TRI_NONE, NULL};
    gemm_f32(1, &g);
}

void qkv__gemm_bias_f64(int64_t m, int64_t n, int64_t k, const double *a, int64_t rsa,
                        int64_t csa, const double *b, int64_t rsb, int64_t csb,
                        const double *bias, double *c, int64_t rsc) {
    gemm_args_f64 g = {m, n, k, 1.0, 0.0, a, NULL, rsa, csa, b, NULL, rsb, csb,
                       c, NULL, rsc, 1, bias, NULL, QKV_TRI_NONE, NULL};
    gemm_f64(1, &g);
}
