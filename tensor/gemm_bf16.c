/*
 * BF16 GEMM: bfloat16 x bfloat16 products accumulated in float32, behind matmul on QKV_BF16
 * tensors and autocast.
 *
 * A product of two bf16 values (8-bit significands) is exact in float32, so the only rounding
 * is that of the float32 sums, as in the F32 GEMM. Two paths compute it:
 *  - native, on CPUs with AVX512_BF16: VDPBF16PS multiplies 16 pairs of bf16 by 16 pairs and
 *    adds each pair's two products to a float32 lane, twice the multiply-adds of a float32
 *    FMA in one instruction. Blocked and packed like the F32 GEMM (tensor/gemm_template.h),
 *    with the operands packed in pairs of k: a step of the micro-kernel consumes two k steps.
 *    The instruction treats subnormal inputs and results as zero (it ignores MXCSR), so
 *    values below 2^-126 in magnitude are flushed inside the products and sums of this path;
 *  - converting, on any CPU: the operands are widened to float32 and run through the F32
 *    GEMM. It needs memory for the widened copies.
 * The native path is taken where the CPU has the instruction; the environment variable
 * QKV_BF16_GEMM=convert|native (read once) or qkv__gemm_bf16_use force one.
 *
 * Threads split the output exactly as the F32 GEMM does (tensor/gemm_plan.h) and the k blocks
 * do not depend on the split, so results are bitwise the same for any thread count.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <threads.h>

#include "tensor/gemm_plan.h"
#include "tensor/tensor_internal.h"

#if (defined(__x86_64__) || defined(__i386__)) &&                                             \
    ((defined(__clang__) && __clang_major__ >= 14) ||                                         \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
#define GEMM_BF16_NATIVE 1
#include <immintrin.h>
#else
#define GEMM_BF16_NATIVE 0
#endif

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

/* ---- Path choice ------------------------------------------------------------------------- */

static bool cpu_has_native(void) {
#if GEMM_BF16_NATIVE
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
}

static atomic_int gemm_path = QKV_BF16_GEMM_CONVERT;
static once_flag gemm_path_once = ONCE_FLAG_INIT;

static void gemm_path_init(void) {
    bool native = cpu_has_native();
    const char *env = getenv("QKV_BF16_GEMM");
    if (env && strcmp(env, "convert") == 0) native = false;
    atomic_store(&gemm_path, native ? QKV_BF16_GEMM_NATIVE : QKV_BF16_GEMM_CONVERT);
}

qkv_bf16_gemm_path qkv__gemm_bf16_path(void) {
    call_once(&gemm_path_once, gemm_path_init);
    return (qkv_bf16_gemm_path)atomic_load(&gemm_path);
}

bool qkv__gemm_bf16_use(qkv_bf16_gemm_path path) {
    call_once(&gemm_path_once, gemm_path_init);
    if (path == QKV_BF16_GEMM_NATIVE && !cpu_has_native()) return false;
    atomic_store(&gemm_path, path);
    return true;
}

/* ---- Unpacked loops ---------------------------------------------------------------------- */

typedef struct bf16_args {
    int64_t m, n, k;
    float alpha, beta;
    const uint16_t *a; const int64_t *a_off; int64_t rsa, csa;
    const uint16_t *b; const int64_t *b_off; int64_t rsb, csb;
    float *c;    /* float32 output, or NULL */
    uint16_t *h; /* bf16 output (beta 0), when c is NULL */
    const float *bias; /* with h: n values added to every row before rounding, or NULL */
    const int64_t *c_off; int64_t rsc, csc;
} bf16_args;

/* For when no memory can be had for packing or widening (the functions cannot fail): the
 * sums run in the same order of l, but without the k blocks the last bits may differ. */
static void gemm_unpacked(const bf16_args *g, int64_t p, int64_t m0, int64_t m1, int64_t n0,
                          int64_t n1) {
    const uint16_t *a = g->a + (g->a_off ? g->a_off[p] : 0);
    const uint16_t *b = g->b + (g->b_off ? g->b_off[p] : 0);
    int64_t co = g->c_off ? g->c_off[p] : 0;
    for (int64_t i = m0; i < m1; i++)
        for (int64_t j = n0; j < n1; j++) {
            float acc = 0;
            for (int64_t l = 0; l < g->k; l++)
                acc += bf16_widen(a[i * g->rsa + l * g->csa]) *
                       bf16_widen(b[l * g->rsb + j * g->csb]);
            int64_t o = co + i * g->rsc + j * g->csc;
            if (g->h)
                g->h[o] = bf16_round(g->bias ? g->alpha * acc + g->bias[j] : g->alpha * acc);
            else
                g->c[o] = g->beta == 0 ? g->alpha * acc : g->alpha * acc + g->beta * g->c[o];
        }
}

/* ---- Converting path --------------------------------------------------------------------- */

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

static void gemm_convert(int64_t batch, const bf16_args *g) {
    int64_t m = g->m, n = g->n, k = g->k;
    float *wa = malloc((size_t)(batch * m * k) * sizeof(float));
    float *wb = malloc((size_t)(batch * k * n) * sizeof(float));
    float *wc = g->h ? malloc((size_t)(batch * m * n) * sizeof(float)) : NULL;
    int64_t *off = malloc((size_t)(3 * batch) * sizeof(int64_t));
    if (!wa || !wb || !off || (g->h && !wc)) {
        for (int64_t p = 0; p < batch; p++) gemm_unpacked(g, p, 0, m, 0, n);
        goto done;
    }
    widen_operand(batch, m, k, g->a, g->a_off, g->rsa, g->csa, wa);
    widen_operand(batch, k, n, g->b, g->b_off, g->rsb, g->csb, wb);
    for (int64_t p = 0; p < batch; p++) {
        off[p] = p * m * k;
        off[batch + p] = p * k * n;
        off[2 * batch + p] = p * m * n;
    }
    if (!g->h) {
        qkv__gemm_f32(batch, m, n, k, g->alpha, wa, off, k, 1, wb, off + batch, n, 1, g->beta,
                      g->c, g->c_off, g->rsc, g->csc);
        goto done;
    }
    if (g->bias)
        for (int64_t r = 0; r < batch * m; r++)
            memcpy(wc + r * n, g->bias, (size_t)n * sizeof *wc);
    qkv__gemm_f32(batch, m, n, k, g->alpha, wa, off, k, 1, wb, off + batch, n, 1,
                  g->bias ? 1.0f : 0.0f, wc, off + 2 * batch, n, 1);
    for (int64_t p = 0; p < batch; p++) {
        uint16_t *hp = g->h + (g->c_off ? g->c_off[p] : 0);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++)
                hp[i * g->rsc + j * g->csc] = bf16_round(wc[p * m * n + i * n + j]);
    }
done:
    free(wa);
    free(wb);
    free(wc);
    free(off);
}

/* ---- Native path ------------------------------------------------------------------------- */

#if GEMM_BF16_NATIVE

#define TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))

/* Register tile: MR rows x NV vectors of 16 float32 columns, 24 accumulators of the 32
 * registers. Blocking in pairs of k: KCP pairs x MR of A (L1) and KCP x NC of B (L2), the
 * same bytes as the F32 GEMM's KC = 256 floats. */
#define MR 12
#define NV 2
#define VL 16
#define NR (NV * VL)
#define KCP 256
#define MC 1536
#define NC 512

/* Layout of the packed panels (each element a uint32_t holding a pair of bf16, the lower k
 * index in the low half, zero past an odd k):
 *  - an A panel of mr rows: for each pair q, the mr pairs (A[i, 2q], A[i, 2q + 1]);
 *  - a B panel of w = nv * VL columns: for each pair q, the w pairs (B[2q, j], B[2q + 1, j]).
 * Edge panels are padded with zero rows or columns up to an edge size. */

static inline uint32_t pair_of(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | (uint32_t)hi << 16;
}

/* r rounded to bf16, to nearest even as bf16_round does, a NaN kept quiet. */
static inline __attribute__((always_inline)) TARGET __m256i rounded(__m512 r) {
    __m512i u = _mm512_castps_si512(r);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rn = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    rn = _mm512_mask_or_epi32(rn, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rn, 16));
}

/* h[0:16] = r rounded to bf16. */
static inline __attribute__((always_inline)) TARGET void store_rounded(uint16_t *h, __m512 r) {
    _mm256_storeu_si256((__m256i *)h, rounded(r));
}

/* C[0:mr, 0:nv*VL] = alpha * Ap * Bp + beta * C over kcp pairs, C rows rsc apart with
 * contiguous columns; when h is not NULL, the result is rounded to bf16 and written to h
 * (rows rsh apart) instead, C being read only when beta is not 0. mr and nv are constants in
 * every instance, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) TARGET void
tile(const int mr, const int nv, int64_t kcp, const uint32_t *restrict ap, int64_t rsa,
     const uint32_t *restrict bp, float *restrict c, int64_t rsc, float alpha, float beta,
     uint16_t *restrict h, int64_t rsh) {
    __m512 acc[MR][NV];
    for (int i = 0; i < mr; i++) {
        if (h) {
            __builtin_prefetch(h + i * rsh, 1, 3);
        } else {
            __builtin_prefetch(c + i * rsc, 1, 3);
            __builtin_prefetch(c + i * rsc + nv * VL - 1, 1, 3);
        }
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_setzero_ps();
    }
    int64_t q = 0;
    do {
        __m512bh b[NV];
        for (int v = 0; v < nv; v++) b[v] = (__m512bh)_mm512_loadu_si512(bp + v * VL);
        for (int i = 0; i < mr; i++) {
            uint32_t pair;
            if (rsa) /* a row-major A read in place: its pairs of k are 32-bit words */
                memcpy(&pair, (const uint16_t *)ap + i * rsa, sizeof pair);
            else
                pair = ap[i];
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
        }
        ap = rsa ? (const uint32_t *)((const uint16_t *)ap + 2) : ap + mr;
        bp += nv * VL;
    } while (++q < kcp);
    /* One store loop per case, with no branch inside it: with small k (attention's per-head
     * products) the stores weigh. Every case does the same operations in the same order
     * (acc * alpha, + beta * C, rounding). */
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (!h) {
        if (beta == 0) {
            for (int i = 0; i < mr; i++)
                for (int v = 0; v < nv; v++)
                    _mm512_storeu_ps(c + i * rsc + v * VL, _mm512_mul_ps(acc[i][v], va));
            return;
        }
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++) {
                float *cp = c + i * rsc + v * VL;
                __m512 r = _mm512_mul_ps(acc[i][v], va);
                _mm512_storeu_ps(cp, _mm512_fmadd_ps(vb, _mm512_loadu_ps(cp), r));
            }
        return;
    }
    if (beta == 0) {
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++)
                store_rounded(h + i * rsh + v * VL, _mm512_mul_ps(acc[i][v], va));
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) {
            __m512 r = _mm512_mul_ps(acc[i][v], va);
            r = _mm512_fmadd_ps(vb, _mm512_loadu_ps(c + i * rsc + v * VL), r);
            store_rounded(h + i * rsh + v * VL, r);
        }
}

typedef void (*tile_fn)(int64_t kcp, const uint32_t *restrict ap, const uint32_t *restrict bp,
                        float *restrict c, int64_t rsc, float alpha, float beta,
                        uint16_t *restrict h, int64_t rsh);

#define TILE_INSTANCE(mr, nv)                                                                 \
    static TARGET void tile_##mr##x##nv(int64_t kcp, const uint32_t *restrict ap,           \
                                        const uint32_t *restrict bp, float *restrict c,     \
                                        int64_t rsc, float alpha, float beta,               \
                                        uint16_t *restrict h, int64_t rsh) {                \
        tile(mr, nv, kcp, ap, 0, bp, c, rsc, alpha, beta, h, rsh);                           \
    }
TILE_INSTANCE(1, 1)
TILE_INSTANCE(2, 1)
TILE_INSTANCE(4, 1)
TILE_INSTANCE(8, 1)
TILE_INSTANCE(12, 1)
TILE_INSTANCE(1, 2)
TILE_INSTANCE(2, 2)
TILE_INSTANCE(4, 2)
TILE_INSTANCE(8, 2)
TILE_INSTANCE(12, 2)
#undef TILE_INSTANCE

/* A whole tile with A row-major and read in place (A[i, l] = a[i * rsa + l], rsa > 0, whole
 * pairs of k): as in the F32 GEMM, for few columns its pack costs as much as the products. */
static TARGET void tile_direct(int64_t kcp, const uint16_t *restrict a, int64_t rsa,
                               const uint32_t *restrict bp, float *restrict c, int64_t rsc,
                               float alpha, float beta, uint16_t *restrict h, int64_t rsh) {
    tile(MR, NV, kcp, (const uint32_t *)(const void *)a, rsa, bp, c, rsc, alpha, beta, h, rsh);
}

static int edge_mr(int64_t rows) {
    if (rows >= MR) return MR;
    if (rows <= 2) return (int)rows;
    if (rows <= 4) return 4;
    if (rows <= 8) return 8;
    return MR;
}

static int edge_nv(int64_t cols) {
    return cols <= VL ? 1 : NV;
}

static tile_fn tile_for(int mr, int nv) {
    switch (mr) {
    case 1: return nv == 1 ? tile_1x1 : tile_1x2;
    case 2: return nv == 1 ? tile_2x1 : tile_2x2;
    case 4: return nv == 1 ? tile_4x1 : tile_4x2;
    case 8: return nv == 1 ? tile_8x1 : tile_8x2;
    default: return nv == 1 ? tile_12x1 : tile_12x2;
    }
}

/* ---- Packing ----------------------------------------------------------------------------- */

/* r[c] = column c of the 16 x 16 matrix of 32-bit elements whose rows are r[0..15]. */
static inline __attribute__((always_inline)) TARGET void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* then r[4g + e], 128-bit block b, holds rows 4g..4g+3 of column 4b + e */
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; e++) {
        __m512i u0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
        __m512i u1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xdd);
        __m512i u2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
        __m512i u3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xdd);
        t[e] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        t[8 + e] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
        t[4 + e] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        t[12 + e] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Element (x, l) at src[x * ss + l], so the pairs of k are contiguous: a row-major A, or a B
 * read transposed. dst[q * w + x] = pair (x, 2q), (x, 2q + 1) for x < count, zero for
 * count <= x < w: a transpose of 32-bit pairs, 16 rows by 16 pairs at a time (rows past
 * count read as zero), the last block masked. */
static TARGET void pack_pairs_along(const uint16_t *src, int64_t ss, int count, int w,
                                    int64_t kc, uint32_t *restrict dst) {
    int64_t kcp = (kc + 1) / 2, full = kc / 2;
    for (int x0 = 0; x0 < w; x0 += VL) {
        int rows = count - x0 < 0 ? 0 : count - x0 > VL ? VL : count - x0;
        int lanes = w - x0 < VL ? w - x0 : VL;
        __mmask16 mask = (__mmask16)((1u << lanes) - 1);
        int64_t q = 0;
        for (; q + VL <= full; q += VL) {
            __m512i r[VL];
            for (int i = 0; i < VL; i++) {
                r[i] = _mm512_setzero_si512();
                if (i >= rows) continue;
                const uint16_t *row = src + (x0 + i) * ss + 2 * q;
                r[i] = _mm512_loadu_si512(row);
                __builtin_prefetch(row + 2 * VL, 0, 3);
            }
            transpose16(r);
            for (int e = 0; e < VL; e++)
                _mm512_mask_storeu_epi32(dst + (q + e) * w + x0, mask, r[e]);
        }
        if (q == kcp) continue;
        /* the last 1..31 values of k (a head of 16 has no whole block): masked loads, which
         * read nothing past kc and leave the odd k's missing half zero */
        __mmask32 km = (__mmask32)((1ull << (kc - 2 * q)) - 1);
        __m512i r[VL];
        for (int i = 0; i < VL; i++)
            r[i] = i < rows ? _mm512_maskz_loadu_epi16(km, src + (x0 + i) * ss + 2 * q)
                            : _mm512_setzero_si512();
        transpose16(r);
        for (int e = 0; e < kcp - q; e++)
            _mm512_mask_storeu_epi32(dst + (q + e) * w + x0, mask, r[e]);
    }
}

/* Element (x, l) at src[l * ss + x], so a step of k is a contiguous row: a row-major B, or an
 * A read transposed. Packs `count` values of x into panels of width w (the last one of width
 * ew, zero-padded), two rows of k widened and interleaved into pairs 16 at a time. Pairs go
 * in groups of PACK_PAIRS, each group across all the panels: going panel by panel reads the
 * rows' cache lines far apart in time, over a row stride that is often a power of two, and
 * going row by row scatters the writes over panels w * kcp apart; both make the L1 sets
 * conflict (the F32 GEMM's pack_rows says the same). */
static TARGET void pack_pairs_across(const uint16_t *src, int64_t ss, int64_t count, int w,
                                     int ew, int64_t kc, uint32_t *restrict dst) {
    enum { PACK_PAIRS = 8 };
    int64_t kcp = (kc + 1) / 2, full = count / w;
    for (int64_t q0 = 0; q0 < kcp; q0 += PACK_PAIRS) {
        int64_t q1 = kcp - q0 < PACK_PAIRS ? kcp : q0 + PACK_PAIRS;
        /* The rows of the next group are read across, a line from each in turn, which the
         * hardware prefetcher does not follow: ask for them while this group is packed. */
        for (int64_t l = 2 * q1; l < 2 * q1 + 2 * PACK_PAIRS && l < kc; l++)
            for (int64_t x = 0; x < count; x += 32) __builtin_prefetch(src + l * ss + x, 0, 3);
        for (int64_t p = 0; p * w < count; p++) {
            int pw = p < full ? w : ew;
            int64_t x0 = p * w, cnt = count - x0 < w ? count - x0 : w;
            uint32_t *d = dst + p * w * kcp;
            for (int64_t q = q0; q < q1; q++) {
                const uint16_t *r0 = src + 2 * q * ss + x0;
                bool pad = 2 * q + 1 == kc; /* an odd k: no second row */
                for (int x = 0; x < pw; x += VL) {
                    int64_t valid = cnt - x < 0 ? 0 : cnt - x > VL ? VL : cnt - x;
                    __mmask16 ml = (__mmask16)((1u << valid) - 1);
                    __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(ml, r0 + x));
                    __m512i hi = pad ? _mm512_setzero_si512()
                                     : _mm512_cvtepu16_epi32(
                                           _mm256_maskz_loadu_epi16(ml, r0 + ss + x));
                    __m512i v = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
                    int n = pw - x < VL ? pw - x : VL;
                    if (n == VL)
                        _mm512_storeu_si512(d + q * pw + x, v);
                    else
                        _mm512_mask_storeu_epi32(d + q * pw + x, (__mmask16)((1u << n) - 1), v);
                }
            }
        }
    }
}

/* Any strides: element (x, l) at src[x * sx + l * sl]. */
static void pack_pairs_strided(const uint16_t *src, int64_t sx, int64_t sl, int count, int w,
                               int64_t kc, uint32_t *restrict dst) {
    int64_t kcp = (kc + 1) / 2;
    for (int64_t q = 0; q < kcp; q++)
        for (int x = 0; x < w; x++) {
            uint16_t lo = 0, hi = 0;
            if (x < count) {
                lo = src[x * sx + 2 * q * sl];
                if (2 * q + 1 < kc) hi = src[x * sx + (2 * q + 1) * sl];
            }
            dst[q * w + x] = pair_of(lo, hi);
        }
}

static TARGET void pack_a(const uint16_t *a, int64_t rs, int64_t cs, int64_t mc, int64_t kc,
                          uint32_t *dst) {
    int64_t kcp = (kc + 1) / 2;
    if (rs == 1 && cs != 1) {
        pack_pairs_across(a, cs, mc, MR, edge_mr(mc % MR), kc, dst);
        return;
    }
    for (int64_t i = 0; i < mc; i += MR) {
        int rows = (int)(mc - i < MR ? mc - i : MR);
        int mr = edge_mr(rows);
        if (cs == 1)
            pack_pairs_along(a + i * rs, rs, rows, mr, kc, dst);
        else
            pack_pairs_strided(a + i * rs, rs, cs, rows, mr, kc, dst);
        dst += mr * kcp;
    }
}

static TARGET void pack_b(const uint16_t *b, int64_t rs, int64_t cs, int64_t kc, int64_t nc,
                          uint32_t *dst) {
    int64_t kcp = (kc + 1) / 2;
    if (cs == 1) {
        pack_pairs_across(b, rs, nc, NR, edge_nv(nc % NR) * VL, kc, dst);
        return;
    }
    for (int64_t j = 0; j < nc; j += NR) {
        int cols = (int)(nc - j < NR ? nc - j : NR);
        int w = edge_nv(cols) * VL;
        if (rs == 1)
            pack_pairs_along(b + j * cs, cs, cols, w, kc, dst);
        else
            pack_pairs_strided(b + j * cs, cs, rs, cols, w, kc, dst);
        dst += w * kcp;
    }
}

/* ---- Blocks ------------------------------------------------------------------------------ */

/* One tile of C: rows x cols at c (float32, rsc/csc), or rounded into h (rsh/csh) when h is
 * not NULL. Tiles that are not whole or not row-contiguous go through a small buffer, so
 * every tile runs the same kernel code and rounds the same way. */
static TARGET void run_tile(int64_t kcp, const uint32_t *ap, const uint32_t *bp, int rows,
                            int cols, float *c, int64_t rsc, int64_t csc, float alpha,
                            float beta, uint16_t *h, int64_t rsh, int64_t csh) {
    int mr = edge_mr(rows), nv = edge_nv(cols);
    tile_fn fn = tile_for(mr, nv);
    bool whole = rows == mr && cols == nv * VL;
    if (whole && (h ? csh == 1 && (beta == 0 || csc == 1) : csc == 1)) {
        fn(kcp, ap, bp, c, rsc, alpha, beta, h, rsh);
        return;
    }
    /* With beta 0 the kernel does not read the buffer, so it is not filled: a fill masked
     * by beta would still address C, which is NULL for a bf16 output, and masked loads
     * near bad addresses are slow. */
    _Alignas(64) float buf[MR * NR];
    if (beta != 0)
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nv * VL; j++)
                buf[i * NR + j] = i < rows && j < cols ? c[i * rsc + j * csc] : 0;
    fn(kcp, ap, bp, buf, NR, alpha, beta, NULL, 0);
    if (h ? csh == 1 : csc == 1) { /* contiguous rows: 16 columns at a time, masked */
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j += VL) {
                __mmask16 m = (__mmask16)((1u << (cols - j < VL ? cols - j : VL)) - 1);
                __m512 r = _mm512_load_ps(buf + i * NR + j);
                if (h)
                    _mm256_mask_storeu_epi16(h + i * rsh + j, m, rounded(r));
                else
                    _mm512_mask_storeu_ps(c + i * rsc + j, m, r);
            }
        return;
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            if (h)
                h[i * rsh + j * csh] = bf16_round(buf[i * NR + j]);
            else
                c[i * rsc + j * csc] = buf[i * NR + j];
        }
}

/* ad, when not NULL, is a row-major A block (rows rsa apart) read in place by whole tiles;
 * a panel some edge tile needs is packed into pa when first needed. */
static TARGET void macro_kernel(int64_t mc, int64_t nc, int64_t kc, uint32_t *pa,
                                const uint32_t *pb, float *c, int64_t rsc, int64_t csc,
                                float alpha, float beta, uint16_t *h, int64_t rsh,
                                int64_t csh, const uint16_t *ad, int64_t rsa) {
    int64_t kcp = (kc + 1) / 2;
    for (int64_t i = 0; i < mc; i += MR) {
        int rows = (int)(mc - i < MR ? mc - i : MR);
        uint32_t *ap = pa + i * kcp;
        bool packed = !ad;
        for (int64_t j = 0; j < nc; j += NR) {
            int cols = (int)(nc - j < NR ? nc - j : NR);
            float *ct = c ? c + i * rsc + j * csc : NULL;
            uint16_t *ht = h ? h + i * rsh + j * csh : NULL;
            if (!packed && rows == MR && cols == NR &&
                (h ? csh == 1 && (beta == 0 || csc == 1) : csc == 1)) {
                tile_direct(kcp, ad + i * rsa, rsa, pb + j * kcp, ct, rsc, alpha, beta, ht, rsh);
                continue;
            }
            if (!packed) {
                pack_pairs_along(ad + i * rsa, rsa, rows, edge_mr(rows), kc, ap);
                packed = true;
            }
            run_tile(kcp, ap, pb + j * kcp, rows, cols, ct, rsc, csc, alpha, beta, ht, rsh,
                     csh);
        }
    }
}

/* Whether the k block of A at a is read in place: row-major, whole pairs of k. */
static const uint16_t *direct_a(const bf16_args *g, const uint16_t *a, int64_t kc) {
    return g->csa == 1 && g->rsa > 0 && kc % 2 == 0 ? a : NULL;
}

/* Packing buffers (and, for a bf16 output summed over several k blocks, a float32 block of
 * partial sums), one set per thread, grown on demand, kept for the next call and freed when
 * their thread ends, as in the F32 GEMM. */
typedef struct buffers {
    uint32_t *a, *b;
    float *s;
    size_t cap_a, cap_b, cap_s;
} buffers;
static _Thread_local buffers bufs;
static tss_t bufs_key;
static atomic_bool bufs_key_ok;
static once_flag bufs_once = ONCE_FLAG_INIT;

static void bufs_free(void *p) {
    buffers *b = p;
    free(b->a);
    free(b->b);
    free(b->s);
    *b = (buffers){0};
}

static void bufs_key_make(void) {
    atomic_store_explicit(&bufs_key_ok, tss_create(&bufs_key, bufs_free) == thrd_success,
                          memory_order_release);
}

static void *grow(void *buf, size_t *cap, size_t need, void **slot) {
    if (*cap >= need) return buf;
    if (!bufs.a && !bufs.b && !bufs.s) {
        call_once(&bufs_once, bufs_key_make);
        if (atomic_load_explicit(&bufs_key_ok, memory_order_acquire)) tss_set(bufs_key, &bufs);
    }
    void *p = aligned_alloc(64, (need + 63) & ~(size_t)63);
    if (!p) return NULL;
    free(buf);
    *slot = p;
    *cap = need;
    return p;
}

/* The k blocks, the same for every split of the output: whole pairs, so that only the last
 * block can hold an odd k. */
static int64_t k_block(int64_t k) {
    int64_t nb = (k + 2 * KCP - 1) / (2 * KCP);
    int64_t kb = (k + nb - 1) / nb;
    return kb + (kb & 1);
}

/* C rows m0..m1, columns n0..n1 of batch entry p. A float32 C takes each k block in turn
 * (the first sets C with beta, the later ones add to it); a bf16 C with several k blocks
 * sums them in a float32 block first, with the same operations, and the last rounds. */
static TARGET void block(const bf16_args *g, int64_t p, int64_t m0, int64_t m1, int64_t n0,
                         int64_t n1) {
    const uint16_t *a = g->a + (g->a_off ? g->a_off[p] : 0);
    const uint16_t *b = g->b + (g->b_off ? g->b_off[p] : 0);
    int64_t co = g->c_off ? g->c_off[p] : 0;
    float *c = g->c ? g->c + co : NULL;
    uint16_t *h = g->h ? g->h + co : NULL;
    int64_t kb = k_block(g->k), kbp = kb / 2;
    int64_t mcap = m1 - m0 < MC ? m1 - m0 : MC, ncap = n1 - n0 < NC ? n1 - n0 : NC;
    bool staged = h && kb < g->k;
    size_t need_a = (size_t)((mcap + MR - 1) / MR * MR * kbp) * sizeof(uint32_t);
    size_t need_b = (size_t)((ncap + NR - 1) / NR * NR * kbp) * sizeof(uint32_t);
    uint32_t *pa = grow(bufs.a, &bufs.cap_a, need_a, (void **)&bufs.a);
    uint32_t *pb = grow(bufs.b, &bufs.cap_b, need_b, (void **)&bufs.b);
    float *s = staged ? grow(bufs.s, &bufs.cap_s, (size_t)(mcap * ncap) * sizeof(float),
                             (void **)&bufs.s)
                      : NULL;
    if (!pa || !pb || (staged && !s)) {
        gemm_unpacked(g, p, m0, m1, n0, n1);
        return;
    }
    for (int64_t ic = m0; ic < m1; ic += MC) {
        int64_t mc = m1 - ic < MC ? m1 - ic : MC;
        if (!staged) {
            for (int64_t pc = 0; pc < g->k; pc += kb) {
                int64_t kc = g->k - pc < kb ? g->k - pc : kb;
                float beta = pc == 0 ? g->beta : 1;
                const uint16_t *ablock = a + ic * g->rsa + pc * g->csa;
                const uint16_t *ad = direct_a(g, ablock, kc);
                if (!ad) pack_a(ablock, g->rsa, g->csa, mc, kc, pa);
                for (int64_t jc = n0; jc < n1; jc += NC) {
                    int64_t nc = n1 - jc < NC ? n1 - jc : NC;
                    pack_b(b + pc * g->rsb + jc * g->csb, g->rsb, g->csb, kc, nc, pb);
                    int64_t cij = ic * g->rsc + jc * g->csc;
                    if (g->bias) /* the bias row, read as a C whose rows are all one */
                        macro_kernel(mc, nc, kc, pa, pb, (float *)g->bias + jc, 0, 1, g->alpha,
                                     1.0f, h + cij, g->rsc, g->csc, ad, g->rsa);
                    else
                        macro_kernel(mc, nc, kc, pa, pb, c ? c + cij : NULL, g->rsc, g->csc,
                                     g->alpha, beta, h ? h + cij : NULL, g->rsc, g->csc, ad,
                                     g->rsa);
                }
            }
            continue;
        }
        for (int64_t jc = n0; jc < n1; jc += NC) {
            int64_t nc = n1 - jc < NC ? n1 - jc : NC;
            for (int64_t pc = 0; pc < g->k; pc += kb) {
                int64_t kc = g->k - pc < kb ? g->k - pc : kb;
                bool last = pc + kc == g->k;
                if (pc == 0 && g->bias)
                    for (int64_t i = 0; i < mc; i++)
                        memcpy(s + i * nc, g->bias + jc, (size_t)nc * sizeof *s);
                const uint16_t *ablock = a + ic * g->rsa + pc * g->csa;
                const uint16_t *ad = direct_a(g, ablock, kc);
                if (!ad) pack_a(ablock, g->rsa, g->csa, mc, kc, pa);
                pack_b(b + pc * g->rsb + jc * g->csb, g->rsb, g->csb, kc, nc, pb);
                float beta = pc == 0 && !g->bias ? 0.0f : 1.0f;
                macro_kernel(mc, nc, kc, pa, pb, s, nc, 1, g->alpha, beta,
                             last ? h + ic * g->rsc + jc * g->csc : NULL, g->rsc, g->csc, ad,
                             g->rsa);
            }
        }
    }
}

static void gemm_native(int64_t batch, const bf16_args *g) {
    gemm_plan plan = gemm_plan_make(batch, g->m, g->n, g->k, MR, NR, false);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(plan.threads) if (plan.threads > 1)
#endif
    for (int64_t t = 0; t < plan.tasks; t++) {
        int64_t p, m0, m1, n0, n1;
        gemm_plan_task(&plan, t, g->m, g->n, MR, NR, &p, &m0, &m1, &n0, &n1);
        block(g, p, m0, m1, n0, n1);
    }
}

#else

static void gemm_native(int64_t batch, const bf16_args *g) {
    gemm_convert(batch, g);
}

#endif

/* ---- Entry points ------------------------------------------------------------------------ */

static void gemm_run(int64_t batch, const bf16_args *g) {
    if (qkv__gemm_bf16_path() == QKV_BF16_GEMM_NATIVE)
        gemm_native(batch, g);
    else
        gemm_convert(batch, g);
}

void qkv__gemm_bf16(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                    const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                    const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                    float beta, float *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    if (batch <= 0 || m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == 0) {
        /* A and B are not read (as in BLAS): the F32 GEMM scales C. */
        qkv__gemm_f32(batch, m, n, 0, alpha, NULL, NULL, 0, 0, NULL, NULL, 0, 0, beta, c, c_off,
                      rsc, csc);
        return;
    }
    bf16_args g = {.m = m, .n = n, .k = k, .alpha = alpha, .beta = beta,
                   .a = a, .a_off = a_off, .rsa = rsa, .csa = csa,
                   .b = b, .b_off = b_off, .rsb = rsb, .csb = csb,
                   .c = c, .c_off = c_off, .rsc = rsc, .csc = csc};
    gemm_run(batch, &g);
}

void qkv__gemm_bf16_out(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                        const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                        const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                        uint16_t *c, const int64_t *c_off, int64_t rsc, int64_t csc) {
    qkv__gemm_bf16_bias_out(batch, m, n, k, alpha, a, a_off, rsa, csa, b, b_off, rsb, csb, NULL,
                            c, c_off, rsc, csc);
}

void qkv__gemm_bf16_bias_out(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                             const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                             const uint16_t *b, const int64_t *b_off, int64_t rsb,
                             int64_t csb, const float *bias, uint16_t *c,
                             const int64_t *c_off, int64_t rsc, int64_t csc) {
    if (batch <= 0 || m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == 0) {
        for (int64_t p = 0; p < batch; p++)
            for (int64_t i = 0; i < m; i++)
                for (int64_t j = 0; j < n; j++)
                    c[(c_off ? c_off[p] : 0) + i * rsc + j * csc] =
                        bias ? bf16_round(bias[j]) : 0;
        return;
    }
    bf16_args g = {.m = m, .n = n, .k = k, .alpha = alpha,
                   .a = a, .a_off = a_off, .rsa = rsa, .csa = csa,
                   .b = b, .b_off = b_off, .rsb = rsb, .csb = csb,
                   .h = c, .bias = bias, .c_off = c_off, .rsc = rsc, .csc = csc};
    gemm_run(batch, &g);
}
