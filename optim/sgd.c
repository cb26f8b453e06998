/*
 * SGD as torch.optim.SGD: with d = grad + weight_decay * param,
 *   buf = d at the first step, else momentum * buf + (1 - dampening) * d
 *   d = nesterov ? d + momentum * buf : buf            (when momentum != 0)
 *   param -= lr * d
 * Each line is one rounding in the parameter's dtype, in torch's order.
 */
#include "optim/optim_internal.h"

enum { MOMENTUM_BUFFER };

typedef struct sgd_scalars {
    double wd, momentum, one_minus_dampening, neg_lr;
    bool nesterov, first;
} sgd_scalars;

#define DEFINE_SGD(T, sfx)                                                                  \
    static void sgd_##sfx(int64_t n, T *p, const T *g, T *buf, const sgd_scalars *s) {         \
        const T wd = (T)s->wd, mom = (T)s->momentum, omd = (T)s->one_minus_dampening;        \
        const T neg_lr = (T)s->neg_lr;                                                       \
        const bool decay = s->wd != 0, first = s->first, nesterov = s->nesterov;             \
        QKV__UPDATE_FOR                                                                      \
        for (int64_t i = 0; i < n; i++) {                                                    \
            T d = g[i];                                                                      \
            if (decay) d = d + wd * p[i];                                                    \
            if (buf) {                                                                       \
                T b = d;                                                                     \
                if (!first) {                                                                \
                    b = buf[i] * mom;                                                        \
                    b = b + omd * d;                                                         \
                }                                                                            \
                buf[i] = b;                                                                  \
                d = nesterov ? d + mom * b : b;                                              \
            }                                                                                \
            p[i] = p[i] + neg_lr * d;                                                        \
        }                                                                                    \
    }

DEFINE_SGD(float, f32)
DEFINE_SGD(double, f64)

static void sgd_update(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                       void *ctx) {
    (void)step;
    (void)ctx;
    sgd_scalars s = {.wd = c->weight_decay, .momentum = c->momentum,
                     .one_minus_dampening = 1 - c->dampening, .neg_lr = -c->lr,
                     .nesterov = c->nesterov, .first = u->first};
    if (u->dtype == QKV_F32)
        sgd_f32(u->n, u->param, u->grad, u->slot[MOMENTUM_BUFFER], &s);
    else
        sgd_f64(u->n, u->param, u->grad, u->slot[MOMENTUM_BUFFER], &s);
}

static bool sgd_slot_used(const qkv_optim_config *c, int slot) {
    return slot == MOMENTUM_BUFFER && c->momentum != 0;
}

static const qkv_optimizer_def sgd_def = {
    .name = "sgd",
    .slot_names = {"momentum_buffer"},
    .slot_used = sgd_slot_used,
    .update = sgd_update,
};

qkv_optimizer *qkv_sgd_new(void) {
    return qkv__optimizer_new(&sgd_def);
}
