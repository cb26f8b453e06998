/*
 * Learning-rate schedules as closed forms of the step number, so that a resumed run needs only
 * the step count to continue the same curve.
 */
#include <math.h>

#include "optim/optim_internal.h"

qkv_lr_schedule qkv_lr_step(int64_t step_size, double gamma) {
    return (qkv_lr_schedule){.kind = QKV_LR_STEP, .step_size = step_size, .gamma = gamma};
}

qkv_lr_schedule qkv_lr_exponential(double gamma) {
    return (qkv_lr_schedule){.kind = QKV_LR_EXPONENTIAL, .gamma = gamma};
}

qkv_lr_schedule qkv_lr_cosine(int64_t t_max, double eta_min) {
    return (qkv_lr_schedule){.kind = QKV_LR_COSINE, .t_max = t_max, .min_lr = eta_min};
}

qkv_lr_schedule qkv_lr_warmup_cosine(int64_t warmup_steps, int64_t total_steps, double min_lr) {
    return (qkv_lr_schedule){.kind = QKV_LR_WARMUP_COSINE, .warmup_steps = warmup_steps,
                             .total_steps = total_steps, .min_lr = min_lr};
}

qkv_lr_schedule qkv_lr_warmup_linear(int64_t warmup_steps, int64_t total_steps, double min_lr) {
    return (qkv_lr_schedule){.kind = QKV_LR_WARMUP_LINEAR, .warmup_steps = warmup_steps,
                             .total_steps = total_steps, .min_lr = min_lr};
}

static bool check(const char *op, const qkv_lr_schedule *s, int64_t step) {
    const char *bad = NULL;
    if (step < 0) bad = "step is negative";
    else if (s->kind == QKV_LR_STEP && s->step_size <= 0) bad = "step_size must be positive";
    else if (s->kind == QKV_LR_COSINE && s->t_max <= 0) bad = "t_max must be positive";
    else if ((s->kind == QKV_LR_WARMUP_COSINE || s->kind == QKV_LR_WARMUP_LINEAR) &&
             (s->warmup_steps < 0 || s->total_steps < s->warmup_steps))
        bad = "need 0 <= warmup_steps <= total_steps";
    else if (s->kind < QKV_LR_CONSTANT || s->kind > QKV_LR_WARMUP_LINEAR) bad = "unknown kind";
    if (bad) qkv_set_error("%s: %s", op, bad);
    return !bad;
}

/* Linear warmup from 0, then a cosine or linear decay from base_lr to min_lr. */
static double warmup_then(const qkv_lr_schedule *s, double base, int64_t step, bool cosine) {
    if (step < s->warmup_steps) return base * (double)step / (double)s->warmup_steps;
    int64_t span = s->total_steps - s->warmup_steps;
    double p = (double)(step - s->warmup_steps) / (double)(span > 1 ? span : 1);
    if (p > 1) p = 1;
    double shape = cosine ? 0.5 * (1 + cos(M_PI * p)) : 1 - p;
    return s->min_lr + (base - s->min_lr) * shape;
}

double qkv_lr_at(const qkv_lr_schedule *s, double base_lr, int64_t step) {
    if (!s) return qkv_set_error("qkv_lr_at: NULL schedule"), NAN;
    if (!check("qkv_lr_at", s, step)) return NAN;
    switch (s->kind) {
    case QKV_LR_STEP:
        return base_lr * pow(s->gamma, (double)(step / s->step_size));
    case QKV_LR_EXPONENTIAL:
        return base_lr * pow(s->gamma, (double)step);
    case QKV_LR_COSINE:
        return s->min_lr +
               (base_lr - s->min_lr) * (1 + cos(M_PI * (double)step / (double)s->t_max)) / 2;
    case QKV_LR_WARMUP_COSINE:
        return warmup_then(s, base_lr, step, true);
    case QKV_LR_WARMUP_LINEAR:
        return warmup_then(s, base_lr, step, false);
    default:
        return base_lr;
    }
}

bool qkv_lr_schedule_apply(const qkv_lr_schedule *s, qkv_optimizer *opt, int64_t step) {
    if (!opt) return qkv_set_error("qkv_lr_schedule_apply: NULL optimizer"), false;
    if (!s) return qkv_set_error("qkv_lr_schedule_apply: NULL schedule"), false;
    if (!check("qkv_lr_schedule_apply", s, step)) return false;
    for (int g = 0; g < opt->n_groups; g++)
        opt->groups[g].config.lr = qkv_lr_at(s, opt->groups[g].initial_lr, step);
    return true;
}
