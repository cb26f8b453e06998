/* The text classifier's model: token and position embeddings, pre-LN transformer encoder
 * layers over the key padding mask, a final layer norm, mean pooling over the real tokens,
 * and a linear layer to the classes. */
#ifndef CLASSIFY_MODEL_H
#define CLASSIFY_MODEL_H

#include "qkv.h"

typedef struct classifier_config {
    int64_t vocab_size, n_classes, max_len, dim, heads, layers, ffn;
    double dropout;
} classifier_config;

typedef struct classifier {
    qkv_module base;
    classifier_config config;
    qkv_embedding *tok_embed;
    qkv_positional_encoding *pos_embed;
    qkv_dropout_layer *dropout;
    qkv_transformer_encoder *encoder;
    qkv_linear *head;
} classifier;

classifier *classifier_new(const classifier_config *config, qkv_generator *g);
/* The number of parameters classifier_new makes for config, without making them; -1 when it
 * overflows. */
int64_t classifier_parameter_count(const classifier_config *config);
/* Whether checkpoint f (read from path) can hold the model config describes: every size in
 * config agrees with the shapes of the file's tensors, and the model has no more parameters
 * than the file has values. False with an error naming path otherwise. A loader calls it
 * before classifier_new, so that settings in a file never allocate more than the file holds. */
bool classifier_config_fits(const classifier_config *config, const qkv_safetensors *f,
                            const char *path);
/* ids I64 [B,T], pad BOOL [B,T] (true = padding) -> logits [B, n_classes]. */
qkv_tensor *classifier_forward(classifier *m, const qkv_tensor *ids, const qkv_tensor *pad);

#endif
