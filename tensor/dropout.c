/*
 * The dropout kernel: a mask drawn with one 32-bit draw per element from the caller's
 * generator in row-major order, the draws a serial pass would make (blocks and lanes jump the
 * generator ahead to their first element), so one seed gives one mask on every platform and
 * for every thread count; and the product of a tensor with a mask's factors. The op that
 * records it for autograd is in autograd/ops_random.c.
 */
#include <math.h>
#include <string.h>

#include "tensor/tensor_internal.h"

/* Elements per task: a multiple of 64, so tasks write whole words of the saved bit mask (the
 * last block's bits, rounded up to 16, stay inside its last word), and large enough that
 * jumping the generator to a block's start costs nothing next to it. */
#define DROPOUT_BLOCK 16384

/* Element offsets of a block, in elements; blocks are cut by DROPOUT_BLOCK alone, and each
 * element's draw and factor are fixed by its index, so results are the same for every thread
 * count. */
static void block_range(int64_t k, int64_t n, int64_t *b, int64_t *e) {
    *b = k * DROPOUT_BLOCK;
    *e = *b + DROPOUT_BLOCK < n ? *b + DROPOUT_BLOCK : n;
}

/* The vector paths make `lanes` draws side by side, each lane stepping `lanes` draws at a
 * time, which breaks the serial dependency of one LCG chain. `lanes` steps take a state s to
 * mult * s + plus: read both off the states 0 and 1. */
static void lane_step(const qkv_generator *g0, uint64_t lanes, uint64_t *mult, uint64_t *plus) {
    qkv_generator zero = {0, g0->inc}, one = {1, g0->inc};
    qkv__generator_advance(&zero, lanes);
    qkv__generator_advance(&one, lanes);
    *plus = zero.state;
    *mult = one.state - zero.state;
}

/* The states of the draws of elements b, b + 1, ..., b + lanes - 1 into first[0:lanes]. */
static void lane_states(const qkv_generator *g0, int64_t b, int lanes, uint64_t *first) {
    qkv_generator g = *g0;
    qkv__generator_advance(&g, (uint64_t)b);
    for (int l = 0; l < lanes; l++) {
        first[l] = g.state;
        qkv_generator_next_u32(&g);
    }
}

/* The uniform of an element is u = (x >> 8) / 2^24 for its draw x (qkv_rand's F32 uniform),
 * kept when u >= p, that is when x >> 8 >= threshold = ceil(p * 2^24). */
static uint32_t keep_threshold(double p) {
    return (uint32_t)ceil(p * 16777216.0);
}

/* Bit i of a mask of bits, from bit 0 of bits[0]. */
static inline bool bit_set(const uint8_t *bits, int64_t i) {
    return (bits[i / 8] >> (i % 8)) & 1;
}

/* y[i] = x[i] * (bit i ? scale : 0) for i in [from, n), one at a time: the tail of a block
 * that is not a whole vector. The product with 0 keeps the sign and NaN of x * 0, as the
 * vector paths give. */
static void apply_tail(qkv_dtype dtype, const void *x, void *y, const uint8_t *bits,
                       int64_t from, int64_t n, double scale) {
    for (int64_t i = from; i < n; i++) {
        bool kept = bit_set(bits, i);
        if (dtype == QKV_F32)
            ((float *)y)[i] = ((const float *)x)[i] * (kept ? (float)scale : 0.0f);
        else if (dtype == QKV_BF16)
            ((uint16_t *)y)[i] = qkv__f32_to_bf16(qkv__bf16_to_f32(((const uint16_t *)x)[i]) *
                                                  (kept ? (float)scale : 0.0f));
        else
            ((double *)y)[i] = ((const double *)x)[i] * (kept ? scale : 0.0);
    }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
/* ---- AVX-512: mask bits from compares into mask registers, 16 elements a step ----------- */

#include <immintrin.h>

/* The factor of a kept element; a dropped one's factor is 0, from a zeroing move. */
typedef struct factors {
    float f32;
    double f64;
} factors;

static factors *factors_new(double scale) {
    factors *t = qkv__alloc(sizeof *t);
    if (t) *t = (factors){.f32 = (float)scale, .f64 = scale};
    return t;
}

/* Bit 2l of the result: whether the element of lane l of the states s is kept. Its draw is
 * PCG32's output for the state (qkv_generator_next_u32): the xorshift
 * ((s >> 18) ^ s) >> 27 = (s >> 45) ^ (s >> 27), in the low 32 bits of the 64-bit lane,
 * rotated right by s >> 59; compared as 32-bit lanes, the high halves masked off. limit is
 * threshold << 8: draw >= limit is draw >> 8 >= threshold. */
static inline __mmask16 kept_even_bits(__m512i s, __m512i limit) {
    __m512i xs = _mm512_xor_si512(_mm512_srli_epi64(s, 45), _mm512_srli_epi64(s, 27));
    __m512i draw = _mm512_rorv_epi32(xs, _mm512_srli_epi64(s, 59));
    return _mm512_mask_cmpge_epu32_mask(0x5555, draw, limit);
}

/* The mask bits of elements [b, e) (bit i - b of bits), from the draws a serial pass over the
 * tensor would give them; the bits past e up to a multiple of 16 are written as 0. Two groups
 * of 8 lanes step 16 draws at a time: `even` draws the elements b + 2l, `odd` the elements
 * b + 2l + 1, so that the odd group's bits shifted up by one fill the gaps of the even group's
 * to make the 16 bits of 16 elements in order. */
static void draw_bits(const qkv_generator *g0, uint32_t threshold, int64_t b, int64_t e,
                      uint8_t *bits) {
    if (threshold >= 1u << 24) { /* p = 1: nothing kept, and threshold << 8 would overflow */
        memset(bits, 0, (size_t)(e - b + 15) / 16 * 2);
        return;
    }
    uint64_t first[16], even_first[8], odd_first[8], mult, plus;
    lane_states(g0, b, 16, first);
    for (int l = 0; l < 8; l++) {
        even_first[l] = first[2 * l];
        odd_first[l] = first[2 * l + 1];
    }
    lane_step(g0, 16, &mult, &plus);
    __m512i even = _mm512_loadu_si512(even_first), odd = _mm512_loadu_si512(odd_first);
    const __m512i m = _mm512_set1_epi64((int64_t)mult), c = _mm512_set1_epi64((int64_t)plus);
    const __m512i limit = _mm512_set1_epi32((int)(threshold << 8));
    for (int64_t i = b; i < e; i += 16) {
        uint16_t kept = (uint16_t)(kept_even_bits(even, limit) |
                                   kept_even_bits(odd, limit) << 1);
        even = _mm512_add_epi64(_mm512_mullo_epi64(even, m), c);
        odd = _mm512_add_epi64(_mm512_mullo_epi64(odd, m), c);
        if (e - i < 16) kept &= (uint16_t)((1u << (e - i)) - 1);
        memcpy(bits + (i - b) / 8, &kept, sizeof kept);
    }
}

/* y[0:n] = x[0:n] * factor of bit i: a mask register of 16 bits (8 for f64) zeroes the
 * factors of dropped elements, and the product is the one the scalar tail forms. bf16 is
 * multiplied in f32 and rounded on store, as torch's bf16 mul (qkv__bf16_store8's rounding:
 * to nearest even, any NaN to 0xFFFF). */
static void apply_bits(qkv_dtype dtype, const void *x, void *y, const uint8_t *bits, int64_t n,
                       const factors *t) {
    int64_t i = 0;
    if (dtype == QKV_F32) {
        const float *xs = x;
        float *ys = y;
        const __m512 scale = _mm512_set1_ps(t->f32);
        for (; i + 16 <= n; i += 16) {
            __mmask16 kept;
            memcpy(&kept, bits + i / 8, sizeof kept);
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xs + i), _mm512_maskz_mov_ps(kept, scale));
            _mm512_storeu_ps(ys + i, v);
        }
    } else if (dtype == QKV_BF16) {
        const uint16_t *xs = x;
        uint16_t *ys = y;
        const __m512 scale = _mm512_set1_ps(t->f32);
        const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
        for (; i + 16 <= n; i += 16) {
            __mmask16 kept;
            memcpy(&kept, bits + i / 8, sizeof kept);
            __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(xs + i)));
            __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)),
                                     _mm512_maskz_mov_ps(kept, scale));
            __m512i u = _mm512_castps_si512(v);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), odd), 16);
            u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                      _mm512_set1_epi32(0xFFFF));
            _mm256_storeu_si256((void *)(ys + i), _mm512_cvtepi32_epi16(u));
        }
    } else {
        const double *xs = x;
        double *ys = y;
        const __m512d scale = _mm512_set1_pd(t->f64);
        for (; i + 8 <= n; i += 8) {
            __m512d v = _mm512_mul_pd(_mm512_loadu_pd(xs + i),
                                      _mm512_maskz_mov_pd(bits[i / 8], scale));
            _mm512_storeu_pd(ys + i, v);
        }
    }
    apply_tail(dtype, x, y, bits, i, n, t->f64);
}

#else
/* ---- Generic: vector extensions, one byte of mask bits per 8 draws ----------------------- */

#define LANES 8
_Static_assert(LANES == 8, "a group of lanes fills one byte of mask bits");

typedef uint64_t lanes_u64 __attribute__((vector_size(LANES * sizeof(uint64_t))));
typedef float f32x8 __attribute__((vector_size(8 * sizeof(float))));
typedef double f64x8 __attribute__((vector_size(8 * sizeof(double))));

/* What a byte of mask bits multiplies its 8 elements by: scale for a set bit, 0 otherwise.
 * A table lookup turns the bits into a vector of factors. */
typedef struct factors {
    float f32[256][8];
    double f64[256][8];
    double scale;
} factors;

static factors *factors_new(double scale) {
    factors *t = qkv__alloc(sizeof *t);
    if (!t) return NULL;
    t->scale = scale;
    for (int byte = 0; byte < 256; byte++)
        for (int l = 0; l < 8; l++) {
            bool kept = (byte >> l) & 1;
            t->f32[byte][l] = kept ? (float)scale : 0.0f;
            t->f64[byte][l] = kept ? scale : 0.0;
        }
    return t;
}

/* PCG32's output for each lane's state (qkv_generator_next_u32), in the low 32 bits. Through
 * pointers: a 512-bit vector passed by value has an ABI that depends on -march. */
static inline void pcg_output(const lanes_u64 *old, lanes_u64 *out) {
    lanes_u64 xs = (((*old >> 18) ^ *old) >> 27) & 0xffffffffu, rot = *old >> 59;
    *out = ((xs >> rot) | (xs << ((-rot) & 31))) & 0xffffffffu;
}

/* The mask bits of elements [b, e) (bit i - b of bits), from the draws a serial pass over the
 * tensor would give them; the bits past e up to a multiple of 8 are written as 0. Lane l of
 * the group draws the elements b + l, b + l + 8, ...: bit l of each byte. The byte is
 * assembled from all 8 lanes and its tail masked after, a loop without a branch. */
static void draw_bits(const qkv_generator *g0, uint32_t threshold, int64_t b, int64_t e,
                      uint8_t *bits) {
    uint64_t first[LANES], mult, plus;
    lane_states(g0, b, LANES, first);
    lane_step(g0, LANES, &mult, &plus);
    lanes_u64 state;
    memcpy(&state, first, sizeof state);
    for (int64_t i = b; i < e; i += LANES) {
        lanes_u64 draw;
        pcg_output(&state, &draw);
        lanes_u64 kept = (lanes_u64)((draw >> 8) >= threshold);
        state = state * mult + plus;
        unsigned byte = 0;
        for (int l = 0; l < LANES; l++) byte |= (unsigned)(kept[l] & 1) << l;
        if (e - i < LANES) byte &= (1u << (e - i)) - 1;
        bits[(i - b) / 8] = (uint8_t)byte;
    }
}

/* y[0:n] = x[0:n] * factor of bit i: one vector of 8 factors per byte of bits. bf16 is
 * multiplied in f32 and rounded on store, as torch's bf16 mul. */
static void apply_bits(qkv_dtype dtype, const void *x, void *y, const uint8_t *bits, int64_t n,
                       const factors *t) {
    int64_t groups = n / 8;
    if (dtype == QKV_F32) {
        const float *xs = x;
        float *ys = y;
        for (int64_t j = 0; j < groups; j++) {
            f32x8 v, f;
            memcpy(&v, xs + 8 * j, sizeof v);
            memcpy(&f, t->f32[bits[j]], sizeof f);
            v *= f;
            memcpy(ys + 8 * j, &v, sizeof v);
        }
    } else if (dtype == QKV_BF16) {
        const uint16_t *xs = x;
        uint16_t *ys = y;
        for (int64_t j = 0; j < groups; j++) {
            qkv__u16x8 h;
            f32x8 f;
            memcpy(&h, xs + 8 * j, sizeof h);
            memcpy(&f, t->f32[bits[j]], sizeof f);
            qkv__u32x8 u = __builtin_convertvector(h, qkv__u32x8) << 16;
            f32x8 v;
            memcpy(&v, &u, sizeof v);
            v *= f;
            float w[8];
            memcpy(w, &v, sizeof w);
            qkv__bf16_store8(ys + 8 * j, w);
        }
    } else {
        const double *xs = x;
        double *ys = y;
        for (int64_t j = 0; j < groups; j++) {
            f64x8 v, f;
            memcpy(&v, xs + 8 * j, sizeof v);
            memcpy(&f, t->f64[bits[j]], sizeof f);
            v *= f;
            memcpy(ys + 8 * j, &v, sizeof v);
        }
    }
    apply_tail(dtype, x, y, bits, 8 * groups, n, t->scale);
}

#endif

static void factors_free(factors *t) {
    qkv__free(t, sizeof *t);
}

/* out = a * mask / (1 - p) in one pass; with mask_out, the mask as bits (an I64 tensor of
 * ceil(n / 64) words), 1/32 of the memory of a float mask. */
qkv_tensor *qkv__dropout(const qkv_tensor *a, double p, qkv_generator *g, qkv_tensor **mask_out,
                         bool in_place) {
    qkv_tensor *src = qkv__contiguous(a);
    qkv_tensor *out = !src ? NULL : in_place ? qkv__view(a, a->ndim, a->shape, a->strides,
                                                         a->offset)
                                             : qkv_empty(a->dtype, a->ndim, a->shape);
    qkv_tensor *mask = out && mask_out ? qkv_empty(QKV_I64, QKV_SHAPE((a->numel + 63) / 64))
                                       : NULL;
    factors *t = out ? factors_new(p < 1 ? 1.0 / (1.0 - p) : 0.0) : NULL;
    if (!t || (mask_out && !mask)) {
        factors_free(t);
        return NULL;
    }
    uint32_t threshold = keep_threshold(p);
    int64_t n = a->numel, blocks = (n + DROPOUT_BLOCK - 1) / DROPOUT_BLOCK;
    size_t es = qkv_dtype_size(a->dtype);
    const char *x = qkv_data(src);
    char *y = qkv_data(out);
    uint8_t *bits = mask ? qkv_data(mask) : NULL;
    int threads = qkv__threads_for(4 * n);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t k = 0; k < blocks; k++) {
        int64_t b, e;
        block_range(k, n, &b, &e);
        uint8_t local[DROPOUT_BLOCK / 8];
        uint8_t *kb = bits ? bits + b / 8 : local;
        draw_bits(g, threshold, b, e, kb);
        apply_bits(a->dtype, x + b * es, y + b * es, kb, e - b, t);
    }
    factors_free(t);
    qkv__generator_advance(g, (uint64_t)n);
    if (in_place) qkv__bump_version(out);
    if (mask_out) *mask_out = mask;
    return out;
}

/* g * (kept ? 1 / (1 - p) : 0), the same product the forward formed for its output. */
qkv_tensor *qkv__dropout_apply_mask(const qkv_tensor *g, const qkv_tensor *mask, double scale,
                                    bool in_place) {
    qkv_tensor *gc = qkv__contiguous(g);
    qkv_tensor *out = !gc ? NULL : in_place ? qkv__view(g, g->ndim, g->shape, g->strides,
                                                        g->offset)
                                            : qkv_empty(g->dtype, g->ndim, g->shape);
    factors *t = out ? factors_new(scale) : NULL;
    if (!t) return NULL;
    int64_t n = g->numel, blocks = (n + DROPOUT_BLOCK - 1) / DROPOUT_BLOCK;
    size_t es = qkv_dtype_size(g->dtype);
    const char *x = qkv_data(gc);
    char *y = qkv_data(out);
    const uint8_t *bits = qkv_data(mask);
    int threads = qkv__threads_for(n);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t k = 0; k < blocks; k++) {
        int64_t b, e;
        block_range(k, n, &b, &e);
        apply_bits(g->dtype, x + b * es, y + b * es, bits + b / 8, e - b, t);
    }
    factors_free(t);
    return out;
}
