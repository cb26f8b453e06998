/*
 * Random ops: dropout. Its mask takes one 32-bit draw per element from the caller's generator
 * in row-major order, the draws a serial pass would make (blocks and lanes jump the generator
 * ahead to their first element), so one seed gives one mask on every platform and for every
 * thread count.
 */
#include <math.h>

#include "autograd/autograd_internal.h"

#define REC1(out, def, a) qkv__record(out, def, 1, (const qkv_tensor *const[]){a})

/* Elements per task: a multiple of 64, so tasks write whole words of the saved bit mask, and
 * large enough that jumping the generator to a block's start costs nothing next to it. */
#define DROPOUT_BLOCK 16384
/* Draws made side by side: lane l of a group of LANES elements starts at element l and steps
 * LANES draws at a time, which breaks the serial dependency of one LCG chain. */
#define LANES 8

typedef uint64_t lanes_u64 __attribute__((vector_size(LANES * sizeof(uint64_t))));

typedef struct dropout_ctx {
    const qkv_generator *g; /* the caller's generator before this call */
    /* The uniform of an element is u = (x >> 8) / 2^24 for its draw x (qkv_rand's F32
     * uniform), kept when u >= p, that is when x >> 8 >= ceil(p * 2^24). */
    uint32_t threshold;
    double scale;           /* 1 / (1 - p) */
    int64_t n;
    const void *x;
    void *y;
    uint8_t *bits;          /* bit i of byte i / 8 set when element i is kept; may be NULL */
    qkv_dtype dtype;
} dropout_ctx;

/* PCG32's output for each lane's state (qkv_generator_next_u32), in the low 32 bits. */
static inline lanes_u64 pcg_output(lanes_u64 old) {
    lanes_u64 xs = (((old >> 18) ^ old) >> 27) & 0xffffffffu, rot = old >> 59;
    return ((xs >> rot) | (xs << ((-rot) & 31))) & 0xffffffffu;
}

/* y = x * (kept ? scale : 0) for each element; the byte of mask bits for each group of 8. */
#define DROPOUT_GROUP(T, i, keep)                                                               \
    do {                                                                                       \
        const T *xs_ = c->x;                                                                   \
        T *ys_ = c->y, s_ = (T)c->scale;                                                       \
        unsigned byte_ = 0;                                                                    \
        for (int l = 0; l < LANES; l++) {                                                      \
            bool k_ = (keep)[l];                                                               \
            ys_[(i) + l] = xs_[(i) + l] * (k_ ? s_ : (T)0);                                    \
            byte_ |= (unsigned)k_ << l;                                                        \
        }                                                                                      \
        if (c->bits) c->bits[(i) / 8] = (uint8_t)byte_;                                        \
    } while (0)

/* Elements [b, e) with the draws a serial pass would give them. */
static void dropout_block(const dropout_ctx *c, int64_t b, int64_t e) {
    qkv_generator g = *c->g;
    qkv__generator_advance(&g, (uint64_t)b);
    lanes_u64 state;
    for (int l = 0; l < LANES; l++) {
        state[l] = g.state;
        qkv_generator_next_u32(&g);
    }
    /* LANES steps take a state s to mult * s + plus: read both off the states 0 and 1. */
    qkv_generator zero = {0, c->g->inc}, one = {1, c->g->inc};
    qkv__generator_advance(&zero, LANES);
    qkv__generator_advance(&one, LANES);
    uint64_t plus = zero.state, mult = one.state - plus;
    int64_t i = b;
    for (; i + LANES <= e; i += LANES) {
        lanes_u64 draws = pcg_output(state);
        state = state * mult + plus;
        bool keep[LANES];
        for (int l = 0; l < LANES; l++) keep[l] = (draws[l] >> 8) >= c->threshold;
        if (c->dtype == QKV_F32) DROPOUT_GROUP(float, i, keep);
        else DROPOUT_GROUP(double, i, keep);
    }
    if (i < e) { /* the last few elements of the tensor: a partial group */
        bool keep[LANES] = {0};
        for (int l = 0; i + l < e; l++) keep[l] = (pcg_output(state)[l] >> 8) >= c->threshold;
        unsigned byte = 0;
        for (int64_t j = i; j < e; j++) {
            bool k = keep[j - i];
            if (c->dtype == QKV_F32)
                ((float *)c->y)[j] = ((const float *)c->x)[j] * (k ? (float)c->scale : 0.0f);
            else
                ((double *)c->y)[j] = ((const double *)c->x)[j] * (k ? c->scale : 0.0);
            byte |= (unsigned)k << (j - i);
        }
        if (c->bits) c->bits[i / 8] = (uint8_t)byte;
    }
}

/* Blocks are cut by DROPOUT_BLOCK alone, and each element's draw is fixed by its index, so the
 * mask is the same for every thread count. */
static void dropout_run(const dropout_ctx *c) {
    int64_t blocks = (c->n + DROPOUT_BLOCK - 1) / DROPOUT_BLOCK;
    int threads = qkv__threads_for(4 * c->n);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t k = 0; k < blocks; k++) {
        int64_t b = k * DROPOUT_BLOCK, e = b + DROPOUT_BLOCK < c->n ? b + DROPOUT_BLOCK : c->n;
        dropout_block(c, b, e);
    }
}

/* out = a * mask / (1 - p) in one pass; with mask_out, the mask as bits (an I64 tensor of
 * ceil(n / 64) words), 1/32 of the memory of a float mask. */
static qkv_tensor *dropout_forward(const qkv_tensor *a, double p, qkv_generator *g,
                                   qkv_tensor **mask_out) {
    qkv_tensor *src = qkv__contiguous(a);
    qkv_tensor *out = src ? qkv_empty(a->dtype, a->ndim, a->shape) : NULL;
    qkv_tensor *mask = out && mask_out ? qkv_empty(QKV_I64, QKV_SHAPE((a->numel + 63) / 64))
                                       : NULL;
    if (!out || (mask_out && !mask)) return NULL;
    dropout_ctx c = {g, (uint32_t)ceil(p * 16777216.0), p < 1 ? 1.0 / (1.0 - p) : 0.0,
                     a->numel, qkv_data(src), qkv_data(out), mask ? qkv_data(mask) : NULL,
                     a->dtype};
    dropout_run(&c);
    qkv__generator_advance(g, (uint64_t)a->numel);
    if (mask_out) *mask_out = mask;
    return out;
}

/* g * (kept ? 1 / (1 - p) : 0), the same product the forward formed for its output. */
static qkv_tensor *dropout_apply_mask(const qkv_tensor *g, const qkv_tensor *mask, double scale) {
    qkv_tensor *gc = qkv__contiguous(g);
    qkv_tensor *out = gc ? qkv_empty(g->dtype, g->ndim, g->shape) : NULL;
    if (!out) return NULL;
    const uint8_t *bits = qkv_data(mask);
    int64_t n = g->numel;
    int threads = qkv__threads_for(n);
    (void)threads;
    if (g->dtype == QKV_F32) {
        const float *x = qkv_data(gc);
        float *y = qkv_data(out), s = (float)scale;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * ((bits[i >> 3] >> (i & 7)) & 1 ? s : 0.0f);
    } else {
        const double *x = qkv_data(gc);
        double *y = qkv_data(out);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
        for (int64_t i = 0; i < n; i++)
            y[i] = x[i] * ((bits[i >> 3] >> (i & 7)) & 1 ? scale : 0.0);
    }
    return out;
}

/* d dropout = g * mask / (1 - p), from the bit mask saved by the forward; g itself for the
 * identity (evaluation, p = 0), which saves nothing */
static void dropout_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = node->saved[0] ? dropout_apply_mask(g, node->saved[0], node->dargs[0])
                           : (qkv_tensor *)g;
}
static const qkv_op_def dropout_op = {"dropout", dropout_backward};

qkv_tensor *qkv_dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g) {
    if (!a) return NULL;
    char s[128];
    if (!qkv__is_float(a->dtype))
        return qkv_set_error("qkv_dropout: input %s must be f32 or f64, not %s",
                             qkv_shape_str(a, s, sizeof s), qkv_dtype_name(a->dtype));
    if (!(p >= 0 && p <= 1))
        return qkv_set_error("qkv_dropout: p must be in [0, 1], not %g", p);
    if (!training || p == 0)
        return REC1(qkv__view(a, a->ndim, a->shape, a->strides, a->offset), &dropout_op, a);
    if (!g) return qkv_set_error("qkv_dropout: training with p = %g needs a generator", p);
    bool record = qkv_is_grad_enabled() && a->requires_grad;
    qkv_scope_begin();
    qkv_tensor *mask = NULL;
    qkv_tensor *out = REC1(dropout_forward(a, p, g, record ? &mask : NULL), &dropout_op, a);
    if (out && out->grad_fn) {
        if (qkv__save(out->grad_fn, 0, mask))
            out->grad_fn->dargs[0] = p < 1 ? 1.0 / (1.0 - p) : 0.0;
        else
            out = NULL;
    }
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}
