/*
 * BF16 GEMM: bfloat16 x bfloat16 products accumulated in float32, behind matmul on QKV_BF16
 * tensors and autocast.
 *
 * A product of two bf16 values (8-bit significands) is exact in float32, so the only rounding
 * is that of the float32 sums, as in the F32 GEMM. This path widens the operands to float32
 * and runs the F32 GEMM on them, which works on any CPU.
 */
#include <stdlib.h>
#include <string.h>

#include "tensor/tensor_internal.h"

static inline float bf16_widen(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; a NaN stays a NaN (quiet) whatever its payload. */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* dst[p * rows * cols + i * cols + j] = src[off[p] + i * rs + j * cs]: every batch entry of a
 * strided bf16 operand, widened into contiguous row-major float32. */
static void widen_operand(int64_t batch, int64_t rows, int64_t cols, const uint16_t *src,
                          const int64_t *off, int64_t rs, int64_t cs, float *dst) {
    for (int64_t p = 0; p < batch; p++) {
        const uint16_t *s = src + (off ? off[p] : 0);
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++) *dst++ = bf16_widen(s[i * rs + j * cs]);
    }
}

/* Without memory for the widened copies: plain loops, the same sums in the same order of l
 * (the F32 GEMM's k blocks aside). c32 (row-major float32) or c16 (strided bf16) is written. */
static void gemm_unpacked(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                          const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                          const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                          float beta, float *c32, uint16_t *c16, const int64_t *c_off,
                          int64_t rsc, int64_t csc) {
    for (int64_t p = 0; p < batch; p++) {
        const uint16_t *ap = a + (a_off ? a_off[p] : 0), *bp = b + (b_off ? b_off[p] : 0);
        int64_t co = c_off ? c_off[p] : 0;
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                float acc = 0;
                for (int64_t l = 0; l < k; l++)
                    acc += bf16_widen(ap[i * rsa + l * csa]) * bf16_widen(bp[l * rsb + j * csb]);
                int64_t o = co + i * rsc + j * csc;
                if (c16) {
                    c16[o] = bf16_round(alpha * acc);
                } else {
                    c32[o] = beta == 0 ? alpha * acc : alpha * acc + beta * c32[o];
                }
            }
    }
}

void qkv__gemm_bf16(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                    const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                    const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                    float beta, float *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    if (batch <= 0 || m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == 0) {
        /* A and B are not read: the F32 GEMM scales C. */
        qkv__gemm_f32(batch, m, n, 0, alpha, NULL, NULL, 0, 0, NULL, NULL, 0, 0, beta, c, c_off,
                      rsc, csc);
        return;
    }
    float *wa = malloc((size_t)(batch * m * k) * sizeof(float));
    float *wb = malloc((size_t)(batch * k * n) * sizeof(float));
    int64_t *off = malloc((size_t)(2 * batch) * sizeof(int64_t));
    if (!wa || !wb || !off) {
        gemm_unpacked(batch, m, n, k, alpha, a, a_off, rsa, csa, b, b_off, rsb, csb, beta, c,
                      NULL, c_off, rsc, csc);
        goto done;
    }
    widen_operand(batch, m, k, a, a_off, rsa, csa, wa);
    widen_operand(batch, k, n, b, b_off, rsb, csb, wb);
    for (int64_t p = 0; p < batch; p++) {
        off[p] = p * m * k;
        off[batch + p] = p * k * n;
    }
    qkv__gemm_f32(batch, m, n, k, alpha, wa, off, k, 1, wb, off + batch, n, 1, beta, c, c_off,
                  rsc, csc);
done:
    free(wa);
    free(wb);
    free(off);
}

void qkv__gemm_bf16_out(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                        const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                        const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                        uint16_t *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    if (batch <= 0 || m <= 0 || n <= 0) return;
    float *wc = malloc((size_t)(batch * m * n) * sizeof(float));
    int64_t *off = malloc((size_t)batch * sizeof(int64_t));
    if (!wc || !off) {
        gemm_unpacked(batch, m, n, k, alpha, a, a_off, rsa, csa, b, b_off, rsb, csb, 0, NULL,
                      c, c_off, rsc, csc);
        goto done;
    }
    for (int64_t p = 0; p < batch; p++) off[p] = p * m * n;
    qkv__gemm_bf16(batch, m, n, k, alpha, a, a_off, rsa, csa, b, b_off, rsb, csb, 0, wc, off, n,
                   1);
    for (int64_t p = 0; p < batch; p++) {
        uint16_t *cp = c + (c_off ? c_off[p] : 0);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++)
                cp[i * rsc + j * csc] = bf16_round(wc[p * m * n + i * n + j]);
    }
done:
    free(wc);
    free(off);
}
