/* The parts of qkv-classify: options, data, training, evaluation, checkpoints. */
#ifndef CLASSIFY_H
#define CLASSIFY_H

#include "model.h"

typedef struct options {
    const char *train_path, *test_path, *save_path, *load_path;
    qkv_tokenizer level;
    int64_t epochs, batch, max_len, dim, heads, layers, ffn, min_count, seed, threads;
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

/* Checkpoints: the model's weights with its vocabulary, labels and configuration. */
bool save_trained(const trained *t, const char *path);
bool load_trained(trained *t, const char *path);

/* Batches trimmed to their longest example (at most max_len): padding is masked anyway, and
 * short texts then cost short sequences. */
qkv_batch make_batch(const qkv_dataset *ds, const int64_t *idx, int64_t n, int64_t max_len);
/* Predicted class of every example of ds, in order, into pred; false on error. */
bool predict_all(classifier *m, const qkv_dataset *ds, int64_t max_len, int64_t *pred,
                 float *confidence);
double seconds_now(void);

#endif
