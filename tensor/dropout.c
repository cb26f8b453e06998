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

/* Elements per task: a multiple of 64, so tasks write whole words of the saved bit mask, and
 * large enough that jumping the generator to a block's start costs nothing next to it. */
#define DROPOUT_BLOCK 16384
/* Draws made side by side: lane l of a group of LANES elements starts at element l and steps
 * LANES draws at a time, which breaks the serial dependency of one LCG chain. */
#define LANES 8
_Static_assert(LANES == 8, "a group of lanes fills one byte of mask bits");

typedef uint64_t lanes_u64 __attribute__((vector_size(LANES * sizeof(uint64_t))));

/* What a byte of mask bits multiplies its 8 elements by: scale for a set bit, 0 otherwise.
 * A table lookup turns the bits into a vector of factors. */
typedef struct factors {
    float f32[256][8];
    double f64[256][8];
} factors;

static void factors_init(factors *t, double scale) {
    for (int byte = 0; byte < 256; byte++)
        for (int l = 0; l < 8; l++) {
            bool kept = (byte >> l) & 1;
            t->f32[byte][l] = kept ? (float)scale : 0.0f;
            t->f64[byte][l] = kept ? scale : 0.0;
        }
}

typedef float f32x8 __attribute__((vector_size(8 * sizeof(float))));
typedef double f64x8 __attribute__((vector_size(8 * sizeof(double))));

/* y[i] = x[i] * factor of bit i, for n elements from bit 0 of bits[0]: one vector of 8
 * factors per byte of bits. */
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
        for (int64_t i = 8 * groups; i < n; i++) ys[i] = xs[i] * t->f32[bits[groups]][i % 8];
    } else if (dtype == QKV_BF16) { /* in f32, rounded on store, as torch's bf16 mul */
        const uint16_t *xs = x;
        uint16_t *ys = y;
        for (int64_t j = 0; j < groups; j++) { /* 8 lanes a byte */
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
        for (int64_t i = 8 * groups; i < n; i++)
            ys[i] = qkv__f32_to_bf16(qkv__bf16_to_f32(xs[i]) * t->f32[bits[groups]][i % 8]);
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
        for (int64_t i = 8 * groups; i < n; i++) ys[i] = xs[i] * t->f64[bits[groups]][i % 8];
    }
}

/* Element offsets of a block, in elements; blocks are cut by DROPOUT_BLOCK alone, and each
 * element's draw and factor are fixed by its index, so results are the same for every thread
 * count. */
static void block_range(int64_t k, int64_t n, int64_t *b, int64_t *e) {
    *b = k * DROPOUT_BLOCK;
    *e = *b + DROPOUT_BLOCK < n ? *b + DROPOUT_BLOCK : n;
}

/* PCG32's output for each lane's state (qkv_generator_next_u32), in the low 32 bits. Through
 * pointers: a 512-bit vector passed by value has an ABI that depends on -march. */
static inline void pcg_output(const lanes_u64 *old, lanes_u64 *out) {
    lanes_u64 xs = (((*old >> 18) ^ *old) >> 27) & 0xffffffffu, rot = *old >> 59;
    *out = ((xs >> rot) | (xs << ((-rot) & 31))) & 0xffffffffu;
}

/* The mask bits of elements [b, e) (bit i - b of bits), from the draws a serial pass over the
 * tensor would give them. The uniform of an element is u = (x >> 8) / 2^24 for its draw x
 * (qkv_rand's F32 uniform), kept when u >= p, that is when x >> 8 >= threshold =
 * ceil(p * 2^24). */
static void draw_bits(const qkv_generator *g0, uint32_t threshold, int64_t b, int64_t e,
                      uint8_t *bits) {
    qkv_generator g = *g0;
    qkv__generator_advance(&g, (uint64_t)b);
    lanes_u64 state;
    for (int l = 0; l < LANES; l++) {
        state[l] = g.state;
        qkv_generator_next_u32(&g);
    }
    /* LANES steps take a state s to mult * s + plus: read both off the states 0 and 1. */
    qkv_generator zero = {0, g0->inc}, one = {1, g0->inc};
    qkv__generator_advance(&zero, LANES);
    qkv__generator_advance(&one, LANES);
    uint64_t plus = zero.state, mult = one.state - plus;
    for (int64_t i = b; i < e; i += LANES) {
        lanes_u64 draw;
        pcg_output(&state, &draw);
        lanes_u64 kept = (draw >> 8) >= threshold; /* -1 where kept */
        state = state * mult + plus;
        unsigned byte = 0;
        for (int l = 0; l < LANES && i + l < e; l++) byte |= (unsigned)(kept[l] & 1) << l;
        bits[(i - b) / 8] = (uint8_t)byte;
    }
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
    factors *t = out ? qkv__alloc(sizeof *t) : NULL;
    if (!t || (mask_out && !mask)) {
        qkv__free(t, sizeof *t);
        return NULL;
    }
    factors_init(t, p < 1 ? 1.0 / (1.0 - p) : 0.0);
    uint32_t threshold = (uint32_t)ceil(p * 16777216.0);
    int64_t n = a->numel, blocks = (n + DROPOUT_BLOCK - 1) / DROPOUT_BLOCK;
    size_t es = qkv_dtype_size(a->dtype);
    const char *x = qkv_data(src);
    char *y = qkv_data(out);
    uint8_t *bits = mask ? qkv_data(mask) : NULL;
    int threads = qkv__threads_for(4 * n);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
    for (int64_t k = 0; k < blocks; k++) {
        int64_t b, e;
        block_range(k, n, &b, &e);
        uint8_t local[DROPOUT_BLOCK / 8];
        uint8_t *kb = bits ? bits + b / 8 : local;
        draw_bits(g, threshold, b, e, kb);
        apply_bits(a->dtype, x + b * es, y + b * es, kb, e - b, t);
    }
    qkv__free(t, sizeof *t);
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
    factors *t = out ? qkv__alloc(sizeof *t) : NULL;
    if (!t) return NULL;
    factors_init(t, scale);
    int64_t n = g->numel, blocks = (n + DROPOUT_BLOCK - 1) / DROPOUT_BLOCK;
    size_t es = qkv_dtype_size(g->dtype);
    const char *x = qkv_data(gc);
    char *y = qkv_data(out);
    const uint8_t *bits = qkv_data(mask);
    int threads = qkv__threads_for(n);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
    for (int64_t k = 0; k < blocks; k++) {
        int64_t b, e;
        block_range(k, n, &b, &e);
        apply_bits(g->dtype, x + b * es, y + b * es, bits + b / 8, e - b, t);
    }
    qkv__free(t, sizeof *t);
    return out;
}
