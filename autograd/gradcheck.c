/*
 * qkv_gradcheck: the analytic gradient of every input against central differences, in F64.
 * The checked function's output is reduced to a scalar with fixed pseudo-random weights, so
 * every output element contributes with a different factor and errors cannot cancel.
 */
#include <math.h>
#include <string.h>

#include "autograd/autograd_internal.h"

/* sum(fn(inputs) * w), with w drawn once (seed fixed) for the output's shape. */
static double weighted_output(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx,
                              qkv_tensor **w, bool record) {
    qkv_scope_begin();
    double v = NAN;
    qkv_tensor *out = fn(inputs, n, ctx);
    if (out && !*w) {
        qkv_generator g;
        qkv_generator_init(&g, 0x9e3779b9);
        *w = qkv_randn(QKV_F64, out->ndim, out->shape, &g);
        if (*w) qkv__retain(*w);
    }
    qkv_tensor *loss = qkv_sum_all(qkv_mul(qkv_to_dtype(out, QKV_F64), *w));
    if (loss) {
        v = qkv_item(loss);
        if (record && !qkv_backward(loss)) v = NAN;
    }
    qkv_scope_end();
    return v;
}

static int64_t element_offset(const qkv_tensor *t, int64_t flat) {
    int64_t off = 0;
    for (int d = t->ndim - 1; d >= 0; d--) {
        off += (flat % t->shape[d]) * t->strides[d];
        flat /= t->shape[d];
    }
    return off;
}

/* The dimensions along which an expanded input repeats one memory location (stride 0). */
static uint32_t shared_dims(const qkv_tensor *t) {
    uint32_t mask = 0;
    for (int d = 0; d < t->ndim; d++)
        if (t->strides[d] == 0 && t->shape[d] > 1) mask |= 1u << d;
    return mask;
}

/* x's geometry with each shared dimension cut to size 1: one element per memory location. */
static qkv_tensor distinct_elements(const qkv_tensor *x) {
    qkv_tensor geo = *x;
    uint32_t mask = shared_dims(x);
    for (int d = 0; d < x->ndim; d++)
        if (mask & (1u << d)) geo.shape[d] = 1;
    geo.numel = qkv__numel(geo.ndim, geo.shape);
    return geo;
}

static bool check_input(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx,
                        qkv_tensor *w, int i, const qkv_tensor *analytic, double eps,
                        double atol, double rtol) {
    qkv_tensor x = distinct_elements(inputs[i]);
    double *data = qkv_data(&x);
    qkv_no_grad_begin();
    bool ok = true;
    for (int64_t e = 0; e < x.numel && ok; e++) {
        int64_t off = element_offset(&x, e);
        double keep = data[off];
        data[off] = keep + eps;
        double up = weighted_output(fn, inputs, n, ctx, &w, false);
        data[off] = keep - eps;
        double down = weighted_output(fn, inputs, n, ctx, &w, false);
        data[off] = keep;
        double numeric = (up - down) / (2 * eps);
        double exact = analytic ? ((const double *)qkv_data(analytic))[e] : 0.0;
        double diff = fabs(exact - numeric);
        if (!(diff <= atol + rtol * fabs(numeric))) {
            qkv_set_error("qkv_gradcheck: input %d element %lld: analytic %.10g, numeric %.10g, "
                          "difference %.3g (atol %g, rtol %g)", i, (long long)e, exact, numeric,
                          diff, atol, rtol);
            ok = false;
        }
    }
    qkv_no_grad_end();
    return ok;
}

bool qkv_gradcheck(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx,
                   double eps, double atol, double rtol) {
    if (!fn) return qkv_set_error("qkv_gradcheck: fn is NULL"), false;
    if (n < 0 || (n > 0 && !inputs))
        return qkv_set_error("qkv_gradcheck: bad input list (%d inputs)", n), false;
    for (int i = 0; i < n; i++) {
        if (!inputs[i]) return qkv_set_error("qkv_gradcheck: input %d is NULL", i), false;
        if (inputs[i]->requires_grad && inputs[i]->dtype != QKV_F64)
            return qkv_set_error("qkv_gradcheck: input %d is %s; gradcheck needs f64", i,
                                 qkv_dtype_name(inputs[i]->dtype)), false;
        if (inputs[i]->requires_grad && inputs[i]->grad_fn)
            return qkv_set_error("qkv_gradcheck: input %d is not a leaf", i), false;
    }
    qkv_tensor *saved[64] = {0};
    if (n > 64) return qkv_set_error("qkv_gradcheck: at most 64 inputs"), false;
    for (int i = 0; i < n; i++) {
        saved[i] = inputs[i]->grad;
        inputs[i]->grad = NULL;
    }
    qkv_tensor *w = NULL;
    bool ok = !isnan(weighted_output(fn, inputs, n, ctx, &w, true));
    if (!ok && !qkv_error()) qkv_set_error("qkv_gradcheck: the function returned NULL");
    for (int i = 0; i < n && ok; i++) {
        if (!inputs[i]->requires_grad) continue;
        qkv_scope_begin();
        /* Perturbing a memory location an expanded input repeats moves every element that
         * shares it, so its numeric derivative is compared with the sum of theirs. */
        qkv_tensor *g = inputs[i]->grad, *analytic = NULL;
        if (g && shared_dims(inputs[i]))
            g = qkv__reduce(QKV_RED_SUM, g, shared_dims(inputs[i]), true, 0, "qkv_gradcheck");
        if (g) analytic = qkv__contiguous(g);
        ok = check_input(fn, inputs, n, ctx, w, i, analytic, eps, atol, rtol);
        qkv_scope_end();
    }
    for (int i = 0; i < n; i++) {
        qkv__release(inputs[i]->grad);
        inputs[i]->grad = saved[i];
    }
    qkv__release(w);
    return ok;
}
