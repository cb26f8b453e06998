/* The seeded generator (PCG32 seeded by SplitMix64) and the random creation functions. */
#include <math.h>

#include "tensor/tensor_internal.h"

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void qkv_generator_init(qkv_generator *g, uint64_t seed) {
    uint64_t s = seed;
    g->state = splitmix64(&s);
    g->inc = splitmix64(&s) | 1;
}

uint32_t qkv_generator_next_u32(qkv_generator *g) {
    uint64_t old = g->state;
    g->state = old * 6364136223846793005ULL + g->inc;
    uint32_t xorshifted = (uint32_t)(((old >> 18) ^ old) >> 27);
    uint32_t rot = (uint32_t)(old >> 59);
    return (xorshifted >> rot) | (xorshifted << ((-rot) & 31));
}

/* The LCG's state after n steps in O(log n): s -> a^n s + c (a^(n-1) + ... + 1), by squaring
 * (Brown, "Random number generation with arbitrary strides", 1994). Lets a kernel give each
 * block of elements the draws it would see in one serial pass. */
void qkv__generator_advance(qkv_generator *g, uint64_t n) {
    uint64_t mult = 1, plus = 0, cur_mult = 6364136223846793005ULL, cur_plus = g->inc;
    while (n) {
        if (n & 1) {
            mult *= cur_mult;
            plus = plus * cur_mult + cur_plus;
        }
        cur_plus = (cur_mult + 1) * cur_plus;
        cur_mult *= cur_mult;
        n >>= 1;
    }
    g->state = mult * g->state + plus;
}

double qkv_generator_uniform(qkv_generator *g) {
    uint64_t hi = qkv_generator_next_u32(g) >> 5, lo = qkv_generator_next_u32(g) >> 6;
    return (double)(hi * 67108864 + lo) * (1.0 / 9007199254740992.0);
}

static float uniform_f32(qkv_generator *g) {
    return (float)(qkv_generator_next_u32(g) >> 8) * (1.0f / 16777216.0f);
}

/* Box-Muller: one normal per pair of uniforms (the second is dropped, so that the n-th value
 * never depends on how many were drawn before in another call). */
double qkv_generator_normal(qkv_generator *g) {
    double u1 = qkv_generator_uniform(g), u2 = qkv_generator_uniform(g);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

uint64_t qkv_generator_below(qkv_generator *g, uint64_t n) {
    if (n <= 1) return 0;
    if (n <= UINT32_MAX) {
        /* Lemire's multiply-shift with rejection: unbiased. */
        uint32_t bound = (uint32_t)n, threshold = (uint32_t)(-bound) % bound;
        for (;;) {
            uint64_t m = (uint64_t)qkv_generator_next_u32(g) * bound;
            if ((uint32_t)m >= threshold) return m >> 32;
        }
    }
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    for (;;) {
        uint64_t r = ((uint64_t)qkv_generator_next_u32(g) << 32) | qkv_generator_next_u32(g);
        if (r < limit) return r % n;
    }
}

static bool check_float(const char *op, qkv_dtype dtype, const qkv_generator *g) {
    if (!g) return qkv_set_error("%s: no generator", op), false;
    if (qkv__is_float(dtype)) return true;
    qkv_set_error("%s: dtype must be f32, f64 or bf16, not %s", op, qkv_dtype_name(dtype));
    return false;
}

qkv_tensor *qkv_rand(qkv_dtype dtype, int ndim, const int64_t *shape, qkv_generator *g) {
    QKV__OP("qkv_rand");
    if (!check_float("qkv_rand", dtype, g) || !qkv__check_shape("qkv_rand", ndim, shape)) return NULL;
    if (dtype == QKV_BF16) return QKV__IN_F32(qkv_rand(QKV_F32, ndim, shape, g));
    qkv_tensor *t = qkv_empty(dtype, ndim, shape);
    if (!t) return NULL;
    if (dtype == QKV_F32) {
        float *d = qkv_data(t);
        for (int64_t i = 0; i < t->numel; i++) d[i] = uniform_f32(g);
    } else {
        double *d = qkv_data(t);
        for (int64_t i = 0; i < t->numel; i++) d[i] = qkv_generator_uniform(g);
    }
    return t;
}

qkv_tensor *qkv_randn(qkv_dtype dtype, int ndim, const int64_t *shape, qkv_generator *g) {
    QKV__OP("qkv_randn");
    if (!check_float("qkv_randn", dtype, g) || !qkv__check_shape("qkv_randn", ndim, shape)) return NULL;
    if (dtype == QKV_BF16) return QKV__IN_F32(qkv_randn(QKV_F32, ndim, shape, g));
    qkv_tensor *t = qkv_empty(dtype, ndim, shape);
    if (!t) return NULL;
    void *d = qkv_data(t);
    for (int64_t i = 0; i < t->numel; i++) qkv__store(d, dtype, i, qkv_generator_normal(g));
    return t;
}

qkv_tensor *qkv_randint(int64_t low, int64_t high, int ndim, const int64_t *shape,
                        qkv_generator *g) {
    QKV__OP("qkv_randint");
    if (!g) return qkv_set_error("qkv_randint: no generator");
    if (high <= low)
        return qkv_set_error("qkv_randint: empty range [%lld, %lld)", (long long)low,
                             (long long)high);
    if (!qkv__check_shape("qkv_randint", ndim, shape)) return NULL;
    qkv_tensor *t = qkv_empty(QKV_I64, ndim, shape);
    if (!t) return NULL;
    int64_t *d = qkv_data(t);
    uint64_t span = (uint64_t)high - (uint64_t)low;
    for (int64_t i = 0; i < t->numel; i++)
        d[i] = (int64_t)((uint64_t)low + qkv_generator_below(g, span));
    return t;
}
