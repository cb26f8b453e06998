/*
 * The small attention model that the dist tests train, shared by the one-process suite
 * (test_dist.c) and the program run under mpirun (dist_check.c): multi-head attention with
 * dropout on its weights, a linear head and a cross-entropy loss, on synthetic sequences of
 * varied lengths (sample i has 2 + i % 5 steps), each micro-batch padded to its own longest.
 */
#ifndef QKV_TEST_DIST_MODEL_H
#define QKV_TEST_DIST_MODEL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "qkv.h"

#define DM_EMBED 8
#define DM_CLASSES 3
#define DM_SAMPLES 45 /* 45 = 2 batches of 16, then a partial batch of 13 */
#define DM_BATCH 16

typedef struct dist_model {
    qkv_module base;
    qkv_multi_head_attention *attn;
    qkv_linear *head;
} dist_model;

static inline dist_model *dist_model_new(uint64_t seed, int64_t classes) {
    qkv_generator g;
    qkv_generator_init(&g, seed);
    dist_model *m = qkv_module_new("dist_model", sizeof *m, NULL);
    if (!m) return NULL;
    m->attn = qkv_module_add_module(QKV_MODULE(m), "attn", QKV_MODULE(
        qkv_multi_head_attention_new(DM_EMBED, 2, 0.25, true, 0, 0, &g)));
    m->head = qkv_module_add_module(QKV_MODULE(m), "head",
                                    QKV_MODULE(qkv_linear_new(DM_EMBED, classes, true, &g)));
    if (!m->attn || !m->head) {
        qkv_module_free(QKV_MODULE(m));
        return NULL;
    }
    return m;
}

static inline int64_t dm_length(int64_t i) { return 2 + i % 5; }

/* The sum over samples [first, first + count) of the cross-entropy, divided by global: the
 * micro-batch's share of the global batch's mean loss. In the innermost scope. */
static inline qkv_tensor *dist_model_loss(dist_model *m, int64_t first, int64_t count,
                                          int64_t global) {
    int64_t longest = 1;
    for (int64_t i = first; i < first + count; i++)
        if (dm_length(i) > longest) longest = dm_length(i);
    qkv_tensor *x = qkv_zeros(QKV_F32, QKV_SHAPE(count, longest, DM_EMBED));
    qkv_tensor *pad = qkv_zeros(QKV_BOOL, QKV_SHAPE(count, longest));
    qkv_tensor *y = qkv_zeros(QKV_I64, QKV_SHAPE(count));
    if (!x || !pad || !y) return NULL;
    float *xd = qkv_data(x);
    bool *pd = qkv_data(pad);
    int64_t *yd = qkv_data(y);
    for (int64_t r = 0; r < count; r++) {
        int64_t i = first + r;
        qkv_generator g;
        qkv_generator_init(&g, 1000 + (uint64_t)i);
        for (int64_t s = 0; s < longest; s++) {
            pd[r * longest + s] = s >= dm_length(i);
            for (int64_t e = 0; s < dm_length(i) && e < DM_EMBED; e++)
                xd[(r * longest + s) * DM_EMBED + e] = (float)qkv_generator_normal(&g);
        }
        yd[r] = i % DM_CLASSES;
    }
    qkv_attention_options o = {.key_padding_mask = pad};
    qkv_tensor *h = qkv_multi_head_attention_forward(m->attn, x, x, x, &o);
    qkv_tensor *logits = qkv_linear_forward(m->head, qkv_select(h, 1, 0));
    qkv_tensor *loss = qkv_cross_entropy(logits, y, QKV_REDUCTION_SUM, -100, 0.0);
    return qkv_div_scalar(loss, (double)global);
}

/* Steps [from, to) of training with AdamW and clipping at norm 1 through the trainer: step s
 * takes global batch s % batches of the samples in index order. False with qkv_error(). */
static inline bool dist_model_train(dist_model *m, qkv_optimizer *opt, qkv_dist_trainer *t,
                                    int64_t from, int64_t to) {
    int first, count, micro = qkv_dist_micro_batches(t);
    if (!qkv_dist_micro_range(t, &first, &count)) return false;
    int64_t batches = qkv_num_batches(DM_SAMPLES, DM_BATCH);
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    bool ok = params != NULL;
    for (int64_t step = from; ok && step < to; step++) {
        int64_t batch = step % batches, start, n;
        int64_t global = qkv_batch_count(DM_SAMPLES, DM_BATCH, batch);
        for (int k = first; ok && k < first + count; k++) {
            qkv_scope_begin();
            ok = qkv_micro_batch_range(DM_SAMPLES, DM_BATCH, batch, micro, k, &start, &n) &&
                 qkv_dist_micro_begin(t, step, k, NULL);
            qkv_tensor *loss = ok && n ? dist_model_loss(m, start, n, global) : NULL;
            ok = ok && (!n || loss) && qkv_dist_backward(t, loss, k);
            qkv_scope_end();
        }
        ok = ok && qkv_dist_finish(t) && !isnan(qkv_clip_grad_norm(params, 1.0)) &&
             qkv_optimizer_step(opt);
        qkv_optimizer_zero_grad(opt);
    }
    qkv_named_list_free(params);
    return ok;
}

static inline qkv_optimizer *dist_model_optimizer(dist_model *m) {
    qkv_optimizer *opt = qkv_adamw_new();
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    bool ok = opt && params && qkv_optimizer_add_group(opt, params, qkv_adamw_config(0.01));
    qkv_named_list_free(params);
    if (!ok) {
        qkv_optimizer_free(opt);
        return NULL;
    }
    return opt;
}

/* Every parameter's bytes, in order, to path: runs compare these files with cmp. */
static inline bool dist_model_write(dist_model *m, const char *path) {
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    FILE *f = params ? fopen(path, "wb") : NULL;
    bool ok = f != NULL;
    for (int i = 0; ok && i < params->n; i++) {
        const qkv_tensor *p = params->tensors[i];
        ok = fwrite(qkv_data(p), qkv_dtype_size(p->dtype), (size_t)p->numel, f) ==
             (size_t)p->numel;
    }
    if (f && fclose(f) != 0) ok = false;
    qkv_named_list_free(params);
    return ok;
}

#endif
