/* The parts of qkv-classify: options, data, training, evaluation, checkpoints. */
#ifndef CLASSIFY_H
#define CLASSIFY_H

#include "model.h"

typedef struct options {
    const char *train_path, *test_path, *save_path, *load_path;
    qkv_tokenizer level;
    int64_t epochs, batch, max_len, dim, heads, layers, ffn, min_count, seed, threads;
    int64_t micro_batches; /* 0: not given (one process: today's loop; N ranks: M = N) */
    double dropout, lr;
    bool bf16; /* train and evaluate under autocast (bf16 products, f32 master weights) */
} options;

/* Everything a trained classifier needs to read new text. */
typedef struct trained {
    classifier *model;
    qkv_vocab *vocab;
    qkv_labels *labels;
} trained;

void trained_free(trained *t);

/* Commands: each returns the process's exit status. */
int run_train(const options *o);
int run_eval(const options *o);
int run_predict(const options *o);

/* Checkpoints: the model's weights with its vocabulary, labels and configuration, with the
 * optimizer's state and the model's generators (qkv_checkpoint_save; opt may be NULL) and the
 * n_meta pairs of meta saying where the run stands. Rank 0 writes; every rank returns whether
 * the file was written. */
bool save_trained(const trained *t, const qkv_optimizer *opt, const qkv_meta_pair *meta,
                  int n_meta, const char *path);
bool load_trained(trained *t, const char *path);
/* The vocabulary and labels of t as checkpoint extras, into bytes[0..2) (free with
 * free_bytes); false when out of memory. */
bool trained_bytes(const trained *t, qkv_named_bytes bytes[2]);
void free_bytes(qkv_named_bytes bytes[2]);

/* Batches trimmed to their longest example (at most max_len): padding is masked anyway, and
 * short texts then cost short sequences. */
qkv_batch make_batch(const qkv_dataset *ds, const int64_t *idx, int64_t n, int64_t max_len);
/* Predicted class of the examples of ds, in order, into pred; false on error. The examples go
 * in batches fixed by index (EVAL_BATCH); with parts > 1 only the batches k with
 * k % parts == part are predicted (a rank's share) and the others' entries of pred are -1. */
bool predict_all(classifier *m, const qkv_dataset *ds, int64_t max_len, int64_t *pred,
                 float *confidence, int part, int parts);
double seconds_now(void);

#endif
