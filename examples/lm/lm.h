/* The parts of qkv-lm: options, the model, its checkpoint, and the two commands. */
#ifndef LM_H
#define LM_H

#include <stdio.h>

#include "qkv.h"

/* The model's shape: everything needed to rebuild it from a checkpoint. */
typedef struct lm_config {
    int64_t vocab_size, context, dim, heads, kv_heads, layers, ffn;
    double dropout;
} lm_config;

/* One pre-norm block: x + attn(attn_norm(x)), then h + ffn(ffn_norm(h)). */
typedef struct lm_block {
    qkv_module base;
    qkv_rms_norm *attn_norm, *ffn_norm;
    qkv_multi_head_attention *attn;
    qkv_swiglu *ffn;
    qkv_dropout_layer *dropout;
} lm_block;

/* Decoder-only transformer; the output projection is the embedding itself (tied). */
typedef struct lm_model {
    qkv_module base;
    lm_config config;
    qkv_embedding *embed;
    qkv_module_list *blocks;
    qkv_rms_norm *norm;
    qkv_rotary_embedding *rope;
} lm_model;

lm_model *lm_new(const lm_config *c, qkv_generator *g);
/* ids I64 [B,T] -> logits [B,T,vocab]. With caches (one per block, or NULL), the ids follow
 * the positions the caches hold and the caches grow by T. */
qkv_tensor *lm_forward(lm_model *m, const qkv_tensor *ids, qkv_kv_cache *const *caches);

/* A trained model with its tokenizer. */
typedef struct lm_trained {
    lm_model *model;
    qkv_bpe *bpe;
} lm_trained;
void lm_trained_free(lm_trained *t);
bool lm_save(const lm_trained *t, const char *path);
bool lm_load(lm_trained *t, const char *path);

typedef struct lm_options {
    const char **texts;
    int n_texts;
    const char *save_path, *load_path, *curve_path, *export_path, *prompt;
    int64_t bpe_merges, steps, layers, dim, heads, kv_heads, ffn, context, batch, warmup;
    int64_t eval_every, eval_windows, seed, threads, tokens, top_k;
    double lr, min_lr, weight_decay, dropout, temperature, top_p;
    bool no_cache;
} lm_options;

/* The loss curve: BASE.csv and BASE.svg of train and validation loss against step. */
typedef struct curve_point {
    int64_t step;
    double train, valid; /* NAN where not measured */
} curve_point;
bool write_curve(const char *base, const curve_point *pts, int n, int64_t steps);

int lm_train(const lm_options *o);
int lm_generate(const lm_options *o);

double lm_seconds(void);

#endif
