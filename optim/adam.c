/*
 * Adam and AdamW as torch.optim.Adam and torch.optim.AdamW. At step t (from 1):
 *   Adam:  g = grad + weight_decay * param          AdamW: param *= 1 - lr * weight_decay
 *   m = beta1 * m + (1 - beta1) * g
 *   v = beta2 * v + (1 - beta2) * g * g
 *   vmax = max(vmax, v), used instead of v          (amsgrad)
 *   param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * Each line is one rounding per operation in the parameter's dtype, in torch's order; the
 * scalar factors are computed in double as torch computes them in Python.
 */
#include <math.h>

#include "optim/optim_internal.h"

enum { EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ };

typedef struct adam_scalars {
    double l2, decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2;
    double bias_correction2_sqrt, eps, neg_step_size;
    bool decoupled;
} adam_scalars;

#define DEFINE_ADAM(T, sfx, SQRT)                                                          \
    static void adam_##sfx(int64_t n, T *p, const T *g, T *m, T *v, T *vmax,               \
                           const adam_scalars *s) {                                        \
        const T l2 = (T)s->l2, decay_factor = (T)s->decay_factor;                          \
        const T b1 = (T)s->beta1, omb1 = (T)s->one_minus_beta1;                             \
        const T b2 = (T)s->beta2, omb2 = (T)s->one_minus_beta2;                             \
        const T bc2 = (T)s->bias_correction2_sqrt, eps = (T)s->eps;                         \
        const T neg_step = (T)s->neg_step_size;                                            \
        const bool decoupled = s->decoupled, l2_on = s->l2 != 0;                            \
        QKV__UPDATE_FOR                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                  \
            T gi = g[i];                                                                   \
            if (decoupled) p[i] = p[i] * decay_factor;                                     \
            else if (l2_on) gi = gi + l2 * p[i];                                           \
            T mi = m[i] * b1;                                                              \
            mi = mi + omb1 * gi;                                                           \
            T vi = v[i] * b2;                                                              \
            T w = omb2 * gi;                                                               \
            w = w * gi;                                                                    \
            vi = vi + w;                                                                   \
            m[i] = mi;                                                                     \
            v[i] = vi;                                                                     \
            if (vmax) {                                                                    \
                if (vmax[i] > vi || vmax[i] != vmax[i]) vi = vmax[i];                      \
                vmax[i] = vi;                                                              \
            }                                                                              \
            T denom = SQRT(vi) / bc2;                                                      \
            denom = denom + eps;                                                           \
            T num = neg_step * mi;                                                         \
            p[i] = p[i] + num / denom;                                                     \
        }                                                                                  \
    }

DEFINE_ADAM(float, f32, sqrtf)
DEFINE_ADAM(double, f64, sqrt)

static void update(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                   bool decoupled) {
    double t = (double)step;
    double bias_correction1 = 1 - pow(c->beta1, t);
    double bias_correction2 = 1 - pow(c->beta2, t);
    adam_scalars s = {
        .l2 = decoupled ? 0 : c->weight_decay,
        .decay_factor = 1 - c->lr * c->weight_decay,
        .beta1 = c->beta1, .one_minus_beta1 = 1 - c->beta1,
        .beta2 = c->beta2, .one_minus_beta2 = 1 - c->beta2,
        .bias_correction2_sqrt = sqrt(bias_correction2), .eps = c->eps,
        .neg_step_size = -(c->lr / bias_correction1),
        .decoupled = decoupled,
    };
    if (u->dtype == QKV_F32)
        adam_f32(u->n, u->param, u->grad, u->slot[EXP_AVG], u->slot[EXP_AVG_SQ],
                 u->slot[MAX_EXP_AVG_SQ], &s);
    else
        adam_f64(u->n, u->param, u->grad, u->slot[EXP_AVG], u->slot[EXP_AVG_SQ],
                 u->slot[MAX_EXP_AVG_SQ], &s);
}

static void adam_update(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                        void *ctx) {
    (void)ctx;
    update(c, step, u, false);
}

static void adamw_update(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                         void *ctx) {
    (void)ctx;
    update(c, step, u, true);
}

static bool adam_slot_used(const qkv_optim_config *c, int slot) {
    return slot != MAX_EXP_AVG_SQ || c->amsgrad;
}

static const qkv_optimizer_def adam_def = {
    .name = "adam",
    .slot_names = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    .slot_used = adam_slot_used,
    .update = adam_update,
};

static const qkv_optimizer_def adamw_def = {
    .name = "adamw",
    .slot_names = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    .slot_used = adam_slot_used,
    .update = adamw_update,
};

qkv_optimizer *qkv_adam_new(void) {
    return qkv__optimizer_new(&adam_def);
}

qkv_optimizer *qkv_adamw_new(void) {
    return qkv__optimizer_new(&adamw_def);
}
