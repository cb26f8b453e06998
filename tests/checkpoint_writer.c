/* Writes a checkpoint of the example classifier's model (seeded weights) with a small padded
 * batch and qkv's logits for it as extras, in the layout tests/fixtures/interop_checkpoint.py
 * checks in PyTorch: `checkpoint_writer OUT`. */
#include <stdio.h>

#include "qkv.h"
#include "examples/classify/model.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: checkpoint_writer OUT\n");
        return 2;
    }
    classifier_config c = {.vocab_size = 50, .n_classes = 3, .max_len = 8, .dim = 16,
                           .heads = 2, .layers = 2, .ffn = 32, .dropout = 0};
    qkv_generator g;
    qkv_generator_init(&g, 11);
    qkv_scope_begin();
    classifier *m = classifier_new(&c, &g);
    qkv_tensor *ids = qkv_randint(2, 50, QKV_SHAPE(3, 8), &g);
    /* rows of 8, 4 and 1 real tokens, the rest padding (id 0) */
    qkv_tensor *pos = qkv_arange(QKV_I64, 0, 8, 1);
    qkv_tensor *len = qkv_from_array(QKV_I64, QKV_SHAPE(3, 1), (int64_t[]){8, 4, 1});
    qkv_tensor *pad = qkv_ge(pos, len);
    ids = qkv_masked_fill(ids, pad, 0);
    if (m) qkv_module_train(QKV_MODULE(m), false);
    qkv_tensor *logits = m ? classifier_forward(m, ids, pad) : NULL;
    const char *names[] = {"test.ids", "test.pad", "test.logits"};
    qkv_tensor *tensors[] = {ids, pad, logits};
    qkv_meta_pair meta[] = {{"vocab_size", "50"}, {"n_classes", "3"}, {"max_len", "8"},
                            {"dim", "16"}, {"heads", "2"}, {"layers", "2"}, {"ffn", "32"}};
    qkv_checkpoint_contents x = {.n_tensors = 3, .tensor_names = names, .tensors = tensors,
                                 .n_meta = 7, .meta = meta};
    bool ok = logits && qkv_module_save(QKV_MODULE(m), argv[1], &x);
    if (!ok) fprintf(stderr, "checkpoint_writer: %s\n", qkv_error());
    qkv_scope_end();
    qkv_module_free(QKV_MODULE(m));
    return ok ? 0 : 1;
}
