/*
 * RMSprop as torch.optim.RMSprop: with g = grad + weight_decay * param,
 *   sq = alpha * sq + (1 - alpha) * g * g
 *   avg = sqrt(sq) + eps, or when centered: ga = alpha * ga + (1 - alpha) * g,
 *         avg = sqrt(sq - ga * ga) + eps
 *   momentum > 0: buf = momentum * buf + g / avg; param -= lr * buf
 *   otherwise:    param -= lr * g / avg
 * One rounding per operation in the parameter's dtype, in torch's order.
 */
#include <math.h>

#include "optim/optim_internal.h"

enum { SQUARE_AVG, MOMENTUM_BUFFER, GRAD_AVG };

typedef struct rmsprop_scalars {
    double wd, alpha, one_minus_alpha, eps, momentum, neg_lr;
} rmsprop_scalars;

#define DEFINE_RMSPROP(T, sfx, SQRT)                                                       \
    static void rmsprop_##sfx(int64_t n, T *p, const T *g, T *sq, T *buf, T *ga,           \
                              const rmsprop_scalars *s) {                                  \
        const T wd = (T)s->wd, alpha = (T)s->alpha, oma = (T)s->one_minus_alpha;           \
        const T eps = (T)s->eps, mom = (T)s->momentum, neg_lr = (T)s->neg_lr;              \
        const bool decay = s->wd != 0;                                                     \
        QKV__UPDATE_FOR                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                  \
            T gi = g[i];                                                                   \
            if (decay) gi = gi + wd * p[i];                                                \
            T sqi = sq[i] * alpha;                                                         \
            T w = oma * gi;                                                                \
            w = w * gi;                                                                    \
            sqi = sqi + w;                                                                 \
            sq[i] = sqi;                                                                   \
            T avg;                                                                         \
            if (ga) {                                                                      \
                T gai = ga[i] * alpha;                                                     \
                gai = gai + oma * gi;                                                      \
                ga[i] = gai;                                                               \
                T c = -gai;                                                                \
                c = c * gai;                                                               \
                avg = SQRT(sqi + c);                                                       \
            } else {                                                                       \
                avg = SQRT(sqi);                                                           \
            }                                                                              \
            avg = avg + eps;                                                               \
            if (buf) {                                                                     \
                T b = buf[i] * mom;                                                        \
                b = b + gi / avg;                                                          \
                buf[i] = b;                                                                \
                p[i] = p[i] + neg_lr * b;                                                  \
            } else {                                                                       \
                T num = neg_lr * gi;                                                       \
                p[i] = p[i] + num / avg;                                                   \
            }                                                                              \
        }                                                                                  \
    }

DEFINE_RMSPROP(float, f32, sqrtf)
DEFINE_RMSPROP(double, f64, sqrt)

static void rmsprop_update(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                           void *ctx) {
    (void)step;
    (void)ctx;
    rmsprop_scalars s = {.wd = c->weight_decay, .alpha = c->alpha,
                         .one_minus_alpha = 1 - c->alpha, .eps = c->eps,
                         .momentum = c->momentum, .neg_lr = -c->lr};
    if (u->dtype == QKV_F32)
        rmsprop_f32(u->n, u->param, u->grad, u->slot[SQUARE_AVG], u->slot[MOMENTUM_BUFFER],
                    u->slot[GRAD_AVG], &s);
    else
        rmsprop_f64(u->n, u->param, u->grad, u->slot[SQUARE_AVG], u->slot[MOMENTUM_BUFFER],
                    u->slot[GRAD_AVG], &s);
}

static bool rmsprop_slot_used(const qkv_optim_config *c, int slot) {
    if (slot == MOMENTUM_BUFFER) return c->momentum > 0;
    if (slot == GRAD_AVG) return c->centered;
    return true;
}

static const qkv_optimizer_def rmsprop_def = {
    .name = "rmsprop",
    .slot_names = {"square_avg", "momentum_buffer", "grad_avg"},
    .slot_used = rmsprop_slot_used,
    .update = rmsprop_update,
};

qkv_optimizer *qkv_rmsprop_new(void) {
    return qkv__optimizer_new(&rmsprop_def);
}
