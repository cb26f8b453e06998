/*
 * Vectorised float math for the hot elementwise kernels (softmax, GELU, sigmoid), written with
 * GCC/Clang vector extensions so one source serves AVX-512, AVX2, SSE and NEON. Accuracy is
 * within a few ulp of libm for exp (inputs below -87.34 give 0); erf follows Abramowitz and
 * Stegun 7.1.26 (absolute error below 1.5e-7), the same approximation PyTorch's vectorised CPU
 * kernels use. Never installed.
 */
#ifndef QKV_VMATH_H
#define QKV_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define QKV_VF_BYTES 64
#elif defined(__AVX__)
#define QKV_VF_BYTES 32
#else
#define QKV_VF_BYTES 16
#endif
#define QKV_VF_LANES (QKV_VF_BYTES / 4)

typedef float qkv_vf __attribute__((vector_size(QKV_VF_BYTES), aligned(4)));
typedef int32_t qkv_vi __attribute__((vector_size(QKV_VF_BYTES), aligned(4)));

static inline qkv_vf qkv__vf_load(const float *p) {
    qkv_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void qkv__vf_store(float *p, qkv_vf v) {
    memcpy(p, &v, sizeof v);
}

static inline qkv_vf qkv__vf_splat(float x) {
    return (qkv_vf){0} + x;
}

static inline qkv_vf qkv__vf_select(qkv_vi mask, qkv_vf a, qkv_vf b) {
    return (qkv_vf)((mask & (qkv_vi)a) | (~mask & (qkv_vi)b));
}

/* exp(xc) for xc within exp's range, as y 2^n: xc = n ln2 + r with |r| <= ln2/2, y = exp(r)
 * by a degree-6 polynomial (Cephes coefficients). n comes back through *n. */
static inline qkv_vf qkv__vexp_reduced(qkv_vf xc, qkv_vf *n) {
    const qkv_vf shifter = qkv__vf_splat(12582912.0f); /* 1.5 * 2^23: rounds to integer */
    qkv_vf t = xc * 1.44269504088896341f + shifter;
    *n = t - shifter;
    qkv_vf r = xc - *n * 0.693359375f;
    r = r - *n * -2.12194440e-4f;
    qkv_vf p = qkv__vf_splat(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    return p * r * r + r + 1.0f;
}

#define QKV__VEXP_LO (-87.3365447504f) /* below it, exp is under the smallest normal float */

/* exp(x), 2^n built in the exponent bits. exp(-inf) is 0, NaN stays NaN. Lanes out of range
 * compute exp(0) and are replaced at the end: computed at the bounds, they would make
 * subnormal intermediates, which cost a microcode assist each. */
static inline qkv_vf qkv__vexp(qkv_vf x) {
    const qkv_vf hi = qkv__vf_splat(88.7228317f), lo = qkv__vf_splat(QKV__VEXP_LO);
    qkv_vf n, y = qkv__vexp_reduced(qkv__vf_select((x > hi) | (x < lo), (qkv_vf){0}, x), &n);
    /* 2^n as two factors 2^(n/2) so that n = 128 and n = -126 stay in range. */
    qkv_vi ni = __builtin_convertvector(n, qkv_vi), n1 = ni >> 1, n2 = ni - n1;
    y = y * (qkv_vf)((n1 + 127) << 23) * (qkv_vf)((n2 + 127) << 23);
    y = qkv__vf_select(x < lo, qkv__vf_splat(0.0f), y);
    y = qkv__vf_select(x > hi, qkv__vf_splat(INFINITY), y);
    return qkv__vf_select(x != x, x, y);
}

/* exp(x) for x <= 0 or -inf: softmax's x - max. The same value as qkv__vexp bit for bit (a
 * product with a power of two is exact), with the work the full range needs left out: no
 * upper bound, and 2^n in one factor, since n >= -126 stays in range. */
static inline qkv_vf qkv__vexp_nonpos(qkv_vf x) {
    const qkv_vf lo = qkv__vf_splat(QKV__VEXP_LO);
    qkv_vf n, y = qkv__vexp_reduced(qkv__vf_select(x < lo, (qkv_vf){0}, x), &n);
    y = y * (qkv_vf)((__builtin_convertvector(n, qkv_vi) + 127) << 23);
    return qkv__vf_select(x < lo, qkv__vf_splat(0.0f), y);
}

/* exp(-a^2) for a = |x| or NaN, bit for bit qkv__vexp(-a * a) except that NaN gives 0.
 * -a^2 <= 0 needs none of qkv__vexp's range handling but the underflow to 0, which was a third
 * of GELU's work (GELU is compute-bound). */
static inline qkv_vf qkv__vexp_neg_sq(qkv_vf a) {
    qkv_vf x = -a * a, n;
    qkv_vi in = x >= QKV__VEXP_LO;
    qkv_vf y = qkv__vexp_reduced(qkv__vf_select(in, x, (qkv_vf){0}), &n);
    y = y * (qkv_vf)((__builtin_convertvector(n, qkv_vi) + 127) << 23);
    return qkv__vf_select(in, y, (qkv_vf){0});
}

/* erf(x) = sign(x) (1 - t (a1 + t (a2 + ...)) exp(-x^2)), t = 1 / (1 + p |x|); *e gets
 * exp(-x^2). */
static inline qkv_vf qkv__verf_exp(qkv_vf x, qkv_vf *e) {
    qkv_vi sign = (qkv_vi)x & (int32_t)0x80000000;
    qkv_vf ax = (qkv_vf)((qkv_vi)x & 0x7fffffff);
    qkv_vf t = 1.0f / (1.0f + 0.3275911f * ax);
    qkv_vf p = qkv__vf_splat(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    *e = qkv__vexp_neg_sq(ax);
    return (qkv_vf)((qkv_vi)(1.0f - p * t * *e) | sign);
}

static inline qkv_vf qkv__verf(qkv_vf x) {
    qkv_vf e;
    return qkv__verf_exp(x, &e);
}

/* GELU's derivative (erf form), 0.5 (1 + erf(x / sqrt2)) + x phi(x): phi(x) is
 * exp(-x^2 / 2) / sqrt(2 pi), the factor erf's formula takes for the argument x / sqrt2, so
 * one exp serves both terms. */
static inline qkv_vf qkv__vgelu_erf_grad(qkv_vf x) {
    qkv_vf e, erf = qkv__verf_exp(x * 0.70710678118654752440f, &e);
    return 0.5f * (1.0f + erf) + x * 0.39894228040143267794f * e;
}

#endif
