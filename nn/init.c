/*
 * Parameter initialisation schemes, as torch.nn.init: each fills a tensor in place from an
 * explicit generator, so one seed gives the same model everywhere. Values are drawn with the
 * tensor layer's qkv_rand/qkv_randn (row-major order), then scaled and copied in.
 */
#include <math.h>

#include "nn/nn.h"
#include "tensor/tensor_internal.h"

double qkv_init_calculate_gain(qkv_nonlinearity nonlinearity, double a) {
    switch (nonlinearity) {
    case QKV_NONLINEARITY_TANH: return 5.0 / 3.0;
    case QKV_NONLINEARITY_RELU: return sqrt(2.0);
    case QKV_NONLINEARITY_LEAKY_RELU: return sqrt(2.0 / (1.0 + a * a));
    case QKV_NONLINEARITY_LINEAR:
    case QKV_NONLINEARITY_SIGMOID: return 1.0;
    }
    return 1.0;
}

static bool check_target(const char *op, const qkv_tensor *t, const qkv_generator *g) {
    if (!t) return false;
    if (!g) return qkv_set_error("%s: no generator", op), false;
    if (!qkv__is_float(t->dtype))
        return qkv_set_error("%s: %s tensor; needs f32, f64 or bf16", op,
                             qkv_dtype_name(t->dtype)),
               false;
    return true;
}

/* t = draw * scale + shift, with draw U[0,1) or N(0,1) of t's shape. */
static bool fill_random(const char *op, qkv_tensor *t, bool normal, double scale, double shift,
                        qkv_generator *g) {
    if (!check_target(op, t, g)) return false;
    qkv_no_grad_begin();
    qkv_scope_begin();
    qkv_tensor *r = normal ? qkv_randn(t->dtype, t->ndim, t->shape, g)
                           : qkv_rand(t->dtype, t->ndim, t->shape, g);
    bool ok = qkv_copy_(t, qkv_add_scalar(qkv_mul_scalar(r, scale), shift));
    qkv_scope_end();
    qkv_no_grad_end();
    return ok;
}

bool qkv_init_uniform_(qkv_tensor *t, double low, double high, qkv_generator *g) {
    return fill_random("qkv_init_uniform_", t, false, high - low, low, g);
}

bool qkv_init_normal_(qkv_tensor *t, double mean, double std, qkv_generator *g) {
    return fill_random("qkv_init_normal_", t, true, std, mean, g);
}

static bool fans(const char *op, const qkv_tensor *t, double *fan_in, double *fan_out) {
    if (!t) return false;
    if (t->ndim < 2) {
        char s[128];
        qkv_set_error("%s: fans need 2 or more dims, not %s", op, qkv_shape_str(t, s, sizeof s));
        return false;
    }
    double receptive = 1;
    for (int i = 2; i < t->ndim; i++) receptive *= (double)t->shape[i];
    *fan_in = (double)t->shape[1] * receptive;
    *fan_out = (double)t->shape[0] * receptive;
    return true;
}

bool qkv_init_xavier_uniform_(qkv_tensor *t, double gain, qkv_generator *g) {
    double fi, fo;
    if (!fans("qkv_init_xavier_uniform_", t, &fi, &fo)) return false;
    double bound = gain * sqrt(6.0 / (fi + fo));
    return fill_random("qkv_init_xavier_uniform_", t, false, 2 * bound, -bound, g);
}

bool qkv_init_xavier_normal_(qkv_tensor *t, double gain, qkv_generator *g) {
    double fi, fo;
    if (!fans("qkv_init_xavier_normal_", t, &fi, &fo)) return false;
    return fill_random("qkv_init_xavier_normal_", t, true, gain * sqrt(2.0 / (fi + fo)), 0, g);
}

static bool kaiming_std(const char *op, const qkv_tensor *t, double a, qkv_fan_mode mode,
                        qkv_nonlinearity nonlinearity, double *std) {
    double fi, fo;
    if (!fans(op, t, &fi, &fo)) return false;
    double fan = mode == QKV_FAN_OUT ? fo : fi;
    *std = qkv_init_calculate_gain(nonlinearity, a) / sqrt(fan);
    return true;
}

bool qkv_init_kaiming_uniform_(qkv_tensor *t, double a, qkv_fan_mode mode,
                               qkv_nonlinearity nonlinearity, qkv_generator *g) {
    double std;
    if (!kaiming_std("qkv_init_kaiming_uniform_", t, a, mode, nonlinearity, &std)) return false;
    double bound = sqrt(3.0) * std;
    return fill_random("qkv_init_kaiming_uniform_", t, false, 2 * bound, -bound, g);
}

bool qkv_init_kaiming_normal_(qkv_tensor *t, double a, qkv_fan_mode mode,
                              qkv_nonlinearity nonlinearity, qkv_generator *g) {
    double std;
    if (!kaiming_std("qkv_init_kaiming_normal_", t, a, mode, nonlinearity, &std)) return false;
    return fill_random("qkv_init_kaiming_normal_", t, true, std, 0, g);
}
