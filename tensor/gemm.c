/* GEMM: the batched strided matrix product behind qkv_matmul. */
#include "tensor/tensor_internal.h"

#define GEMM_NAIVE(T, NAME)                                                                     \
    void NAME(int64_t batch, int64_t m, int64_t n, int64_t k, T alpha,                         \
              const T *a, const int64_t *a_off, int64_t rsa, int64_t csa,                      \
              const T *b, const int64_t *b_off, int64_t rsb, int64_t csb,                      \
              T beta, T *c, const int64_t *c_off, int64_t rsc, int64_t csc) {                  \
        for (int64_t p = 0; p < batch; p++) {                                                  \
            const T *ap = a + (a_off ? a_off[p] : 0);                                          \
            const T *bp = b + (b_off ? b_off[p] : 0);                                          \
            T *cp = c + (c_off ? c_off[p] : 0);                                                \
            for (int64_t i = 0; i < m; i++)                                                    \
                for (int64_t j = 0; j < n; j++) {                                              \
                    T acc = 0;                                                                 \
                    for (int64_t l = 0; l < k; l++) acc += ap[i * rsa + l * csa] * bp[l * rsb + j * csb]; \
                    T *o = &cp[i * rsc + j * csc];                                             \
                    *o = beta == 0 ? alpha * acc : alpha * acc + beta * *o;                    \
                }                                                                              \
        }                                                                                      \
    }

GEMM_NAIVE(float, qkv__gemm_f32)
GEMM_NAIVE(double, qkv__gemm_f64)
