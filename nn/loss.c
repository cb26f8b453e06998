/*
 * Losses as torch.nn.functional defines them, composed from log_softmax, gather, where and
 * reductions, so their gradients come from those ops.
 */
#include <string.h>

#include "autograd/autograd_internal.h"
#include "nn/nn.h"

static qkv_tensor *reduce(qkv_tensor *loss, qkv_reduction reduction, double count) {
    switch (reduction) {
    case QKV_REDUCTION_NONE: return loss;
    case QKV_REDUCTION_SUM: return qkv_sum_all(loss);
    case QKV_REDUCTION_MEAN: return qkv_div_scalar(qkv_sum_all(loss), count);
    }
    return qkv_set_error("qkv loss: unknown reduction %d", (int)reduction);
}

static bool check_reduction(const char *op, qkv_reduction reduction) {
    if (reduction == QKV_REDUCTION_MEAN || reduction == QKV_REDUCTION_SUM ||
        reduction == QKV_REDUCTION_NONE)
        return true;
    qkv_set_error("%s: unknown reduction %d", op, (int)reduction);
    return false;
}

/* input [N,C] float, targets I64 [N] with every entry in [0, C) or ignore_index. Counts the
 * targets that are not ignored into *n_valid. */
static bool check_classification(const char *op, const qkv_tensor *input,
                                 const qkv_tensor *targets, int64_t ignore_index,
                                 int64_t *n_valid) {
    char si[128], st[128];
    if (input->ndim != 2 || !qkv__is_float(input->dtype) || targets->dtype != QKV_I64 ||
        targets->ndim != 1 || targets->shape[0] != input->shape[0]) {
        qkv_set_error("%s: input %s %s and targets %s %s; expected float [N,C] and i64 [N]", op,
                      qkv_shape_str(input, si, sizeof si), qkv_dtype_name(input->dtype),
                      qkv_shape_str(targets, st, sizeof st), qkv_dtype_name(targets->dtype));
        return false;
    }
    int64_t n = targets->numel, c = input->shape[1];
    int64_t *ids = qkv__alloc((size_t)n * sizeof *ids);
    if (!ids || !qkv_copy_out(targets, QKV_I64, ids)) {
        if (ids) qkv__free(ids, (size_t)n * sizeof *ids);
        return false;
    }
    bool ok = true;
    *n_valid = 0;
    for (int64_t i = 0; i < n && ok; i++) {
        if (ids[i] == ignore_index) continue;
        (*n_valid)++;
        if (ids[i] < 0 || ids[i] >= c) {
            qkv_set_error("%s: target %lld at %lld out of range for %lld classes", op,
                          (long long)ids[i], (long long)i, (long long)c);
            ok = false;
        }
    }
    qkv__free(ids, (size_t)n * sizeof *ids);
    return ok;
}

/* -log_probs[i, target_i] with 0 where the target is ignored (valid false). Ignored rows read
 * column 0 and are then replaced, so they get no gradient. */
static qkv_tensor *picked_nll(const qkv_tensor *log_probs, const qkv_tensor *targets,
                              const qkv_tensor *valid) {
    if (!log_probs) return NULL;
    qkv_tensor *safe = qkv_where(valid, targets, qkv_zeros(QKV_I64, 0, NULL));
    qkv_tensor *picked = qkv_squeeze(qkv_gather(log_probs, 1, qkv_unsqueeze(safe, 1)), 1);
    return qkv_where(valid, qkv_neg(picked), qkv_zeros(log_probs->dtype, 0, NULL));
}

qkv_tensor *qkv_nll_loss(const qkv_tensor *log_probs, const qkv_tensor *targets,
                         qkv_reduction reduction, int64_t ignore_index) {
    int64_t n_valid;
    if (!log_probs || !targets || !check_reduction("qkv_nll_loss", reduction) ||
        !check_classification("qkv_nll_loss", log_probs, targets, ignore_index, &n_valid))
        return NULL;
    if (!(log_probs = qkv__autocast_f32(log_probs))) return NULL; /* f32 under autocast */
    qkv_tensor *valid = qkv_ne_scalar(targets, (double)ignore_index);
    return reduce(picked_nll(log_probs, targets, valid), reduction, (double)n_valid);
}

/* PyTorch's label smoothing: (1 - e) * nll_i + e / C * (-sum_c log_probs[i, c]), both terms
 * zero for ignored targets, and the mean divides by the number of targets not ignored. */
qkv_tensor *qkv_cross_entropy(const qkv_tensor *logits, const qkv_tensor *targets,
                              qkv_reduction reduction, int64_t ignore_index,
                              double label_smoothing) {
    int64_t n_valid;
    if (QKV__NULL_ARGS("qkv_cross_entropy", logits, targets) ||
        !check_reduction("qkv_cross_entropy", reduction) ||
        !check_classification("qkv_cross_entropy", logits, targets, ignore_index, &n_valid))
        return NULL;
    if (!(label_smoothing >= 0 && label_smoothing <= 1))
        return qkv_set_error("qkv_cross_entropy: label_smoothing %g not in [0, 1]",
                             label_smoothing);
    qkv_tensor *log_probs = qkv_log_softmax(logits, 1);
    qkv_tensor *valid = qkv_ne_scalar(targets, (double)ignore_index);
    qkv_tensor *loss = picked_nll(log_probs, targets, valid);
    if (label_smoothing > 0) {
        qkv_tensor *smooth = qkv_where(valid, qkv_neg(qkv_sum(log_probs, 1, false)),
                                       qkv_zeros(logits->dtype, 0, NULL));
        double c = (double)logits->shape[1];
        loss = qkv_add(qkv_mul_scalar(loss, 1 - label_smoothing),
                       qkv_mul_scalar(smooth, label_smoothing / c));
    }
    return reduce(loss, reduction, (double)n_valid);
}

qkv_tensor *qkv_mse_loss(const qkv_tensor *input, const qkv_tensor *target,
                         qkv_reduction reduction) {
    if (QKV__NULL_ARGS("qkv_mse_loss", input, target) ||
        !check_reduction("qkv_mse_loss", reduction))
        return NULL;
    if (!(input = qkv__autocast_f32(input)) || !(target = qkv__autocast_f32(target)))
        return NULL; /* f32 under autocast */
    qkv_tensor *d = qkv_sub(input, target);
    if (d && d->numel != input->numel) {
        char si[128], st[128];
        return qkv_set_error("qkv_mse_loss: target %s does not broadcast to input %s",
                             qkv_shape_str(target, st, sizeof st),
                             qkv_shape_str(input, si, sizeof si));
    }
    return reduce(qkv_mul(d, d), reduction, (double)input->numel);
}

/* log sigmoid(z) = min(z, 0) - log(1 + exp(-|z|)): exact at both infinities (0 and -inf),
 * and its gradient sigmoid(-z) has no kink at 0 (min's tie gives 1/2 there, abs's 0). */
static qkv_tensor *log_sigmoid(const qkv_tensor *z) {
    qkv_tensor *tail = qkv_log(qkv_add_scalar(qkv_exp(qkv_neg(qkv_abs(z))), 1.0));
    return qkv_sub(qkv_minimum_scalar(z, 0.0), tail);
}

qkv_tensor *qkv_binary_cross_entropy_with_logits(const qkv_tensor *logits,
                                                 const qkv_tensor *targets,
                                                 qkv_reduction reduction) {
    if (!logits || !targets || !check_reduction("qkv_binary_cross_entropy_with_logits",
                                                reduction))
        return NULL;
    if (!qkv__is_float(logits->dtype))
        return qkv_set_error("qkv_binary_cross_entropy_with_logits: logits must be float, "
                             "not %s", qkv_dtype_name(logits->dtype));
    if (targets->ndim != logits->ndim ||
        memcmp(targets->shape, logits->shape, (size_t)logits->ndim * sizeof(int64_t))) {
        char si[128], st[128];
        return qkv_set_error("qkv_binary_cross_entropy_with_logits: targets %s must have the "
                             "shape of logits %s", qkv_shape_str(targets, st, sizeof st),
                             qkv_shape_str(logits, si, sizeof si));
    }
    if (!(logits = qkv__autocast_f32(logits)) || !(targets = qkv__autocast_f32(targets)))
        return NULL; /* f32 under autocast */
    qkv_tensor *log_p = log_sigmoid(logits), *log_not_p = log_sigmoid(qkv_neg(logits));
    qkv_tensor *loss = qkv_neg(qkv_add(qkv_mul(targets, log_p),
                                       qkv_mul(qkv_rsub_scalar(1.0, targets), log_not_p)));
    return reduce(loss, reduction, (double)logits->numel);
}
