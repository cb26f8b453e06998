/* The language model of qkv-lm, composed from qkv's nn layers, and its checkpoint. */
#include <stdlib.h>
#include <string.h>

#include "lm.h"

static lm_block *block_new(const lm_config *c, qkv_generator *g) {
    lm_block *b = qkv_module_new("lm_block", sizeof *b, NULL);
    if (!b) return NULL;
    qkv_module *base = QKV_MODULE(b);
    b->attn_norm = qkv_module_add_module(base, "attn_norm", QKV_MODULE(qkv_rms_norm_new(c->dim,
                                                                                       1e-5)));
    b->attn = qkv_module_add_module(
        base, "attn", QKV_MODULE(qkv_grouped_query_attention_new(c->dim, c->heads, c->kv_heads,
                                                                 0, false, g)));
    b->ffn_norm = qkv_module_add_module(base, "ffn_norm", QKV_MODULE(qkv_rms_norm_new(c->dim,
                                                                                     1e-5)));
    b->ffn = qkv_module_add_module(base, "ffn", QKV_MODULE(qkv_swiglu_new(c->dim, c->ffn, g)));
    b->dropout = qkv_module_add_module(base, "dropout",
                                       QKV_MODULE(qkv_dropout_layer_new(c->dropout, g)));
    if (!b->attn_norm || !b->attn || !b->ffn_norm || !b->ffn || !b->dropout) {
        qkv_module_free(base);
        return NULL;
    }
    return b;
}

lm_model *lm_new(const lm_config *c, qkv_generator *g) {
    lm_model *m = qkv_module_new("lm", sizeof *m, NULL);
    if (!m) return NULL;
    m->config = *c;
    qkv_module *base = QKV_MODULE(m);
    m->embed = qkv_module_add_module(base, "embed",
                                     QKV_MODULE(qkv_embedding_new(c->vocab_size, c->dim, -1, g)));
    /* N(0, 1) suits an input table, but the same table gives the logits here: GPT-2's 0.02
     * keeps the first predictions near uniform. */
    if (m->embed && !qkv_init_normal_(m->embed->weight, 0, 0.02, g)) m->embed = NULL;
    m->blocks = qkv_module_add_module(base, "blocks", QKV_MODULE(qkv_module_list_new()));
    for (int64_t i = 0; m->blocks && i < c->layers; i++)
        if (!qkv_module_list_append(m->blocks, QKV_MODULE(block_new(c, g)))) m->blocks = NULL;
    m->norm = qkv_module_add_module(base, "norm", QKV_MODULE(qkv_rms_norm_new(c->dim, 1e-5)));
    m->rope = qkv_module_add_module(
        base, "rope", QKV_MODULE(qkv_rotary_embedding_new(c->dim / c->heads, c->context, 0)));
    if (!m->embed || !m->blocks || !m->norm || !m->rope) {
        qkv_module_free(base);
        return NULL;
    }
    return m;
}

static qkv_tensor *block(lm_block *b, const qkv_tensor *x, qkv_rotary_embedding *rope,
                         qkv_kv_cache *cache) {
    qkv_attention_options opts = {.is_causal = true, .cache = cache, .rope = rope};
    qkv_tensor *h = qkv_rms_norm_forward(b->attn_norm, x);
    h = qkv_multi_head_attention_forward(b->attn, h, h, h, &opts);
    x = qkv_add(x, qkv_dropout_layer_forward(b->dropout, h));
    h = qkv_swiglu_forward(b->ffn, qkv_rms_norm_forward(b->ffn_norm, x));
    return qkv_add(x, qkv_dropout_layer_forward(b->dropout, h));
}

static qkv_tensor *block_forward(lm_block *b, const qkv_tensor *x, qkv_rotary_embedding *rope,
                                 qkv_kv_cache *cache) {
    return b ? QKV_CALL(b, block(b, x, rope, cache)) : NULL;
}

static qkv_tensor *decode(lm_model *m, const qkv_tensor *ids, qkv_kv_cache *const *caches) {
    qkv_tensor *x = qkv_embedding_forward(m->embed, ids);
    for (int i = 0; i < m->blocks->n; i++)
        x = block_forward((lm_block *)qkv_module_list_get(m->blocks, i), x, m->rope,
                          caches ? caches[i] : NULL);
    /* Tied output: logits = x E^T, the embedding table read as a projection. */
    return qkv_affine(qkv_rms_norm_forward(m->norm, x), m->embed->weight, NULL);
}

qkv_tensor *lm_forward(lm_model *m, const qkv_tensor *ids, qkv_kv_cache *const *caches) {
    return m ? QKV_CALL(m, decode(m, ids, caches)) : NULL;
}

/* ---- Checkpoints ------------------------------------------------------------------------- */

#define FORMAT "qkv-lm 1"
static const char *const config_keys[] = {"vocab_size", "context", "dim", "heads", "kv_heads",
                                          "layers", "ffn"};
#define N_CONFIG 7

static int64_t *config_field(lm_config *c, int i) {
    int64_t *fields[N_CONFIG] = {&c->vocab_size, &c->context, &c->dim, &c->heads,
                                 &c->kv_heads, &c->layers, &c->ffn};
    return fields[i];
}

void lm_trained_free(lm_trained *t) {
    qkv_module_free(QKV_MODULE(t->model));
    qkv_bpe_free(t->bpe);
    *t = (lm_trained){0};
}

bool lm_save(const lm_trained *t, const char *path) {
    size_t n = qkv_bpe_to_bytes(t->bpe, NULL, 0);
    char *bytes = n ? malloc(n) : NULL;
    char values[N_CONFIG][24];
    qkv_meta_pair meta[N_CONFIG + 1];
    lm_config c = t->model->config;
    for (int i = 0; i < N_CONFIG; i++) {
        snprintf(values[i], sizeof values[i], "%lld", (long long)*config_field(&c, i));
        meta[i] = (qkv_meta_pair){config_keys[i], values[i]};
    }
    meta[N_CONFIG] = (qkv_meta_pair){"format", FORMAT};
    qkv_named_bytes extra = {"bpe", bytes, n};
    qkv_checkpoint_contents extras = {.n_bytes = 1, .bytes = &extra, .n_meta = N_CONFIG + 1,
                                      .meta = meta};
    bool ok = bytes && qkv_bpe_to_bytes(t->bpe, bytes, n) == n &&
              qkv_module_save(QKV_MODULE(t->model), path, &extras);
    free(bytes);
    return ok;
}

static bool read_config(const qkv_safetensors *f, const char *path, lm_config *c) {
    const char *format = qkv_safetensors_meta(f, "format");
    if (!format || strcmp(format, FORMAT)) {
        qkv_set_error("%s: not a qkv-lm checkpoint", path);
        return false;
    }
    for (int i = 0; i < N_CONFIG; i++) {
        const char *v = qkv_safetensors_meta(f, config_keys[i]);
        char *end = NULL;
        long long x = v ? strtoll(v, &end, 10) : -1;
        if (!v || *end || x < 1 || x > (1 << 20)) {
            qkv_set_error("%s: bad or missing setting '%s'", path, config_keys[i]);
            return false;
        }
        *config_field(c, i) = x;
    }
    if (c->dim % c->heads || c->heads % c->kv_heads || (c->dim / c->heads) % 2) {
        qkv_set_error("%s: dim %lld, heads %lld and kv_heads %lld do not fit together", path,
                      (long long)c->dim, (long long)c->heads, (long long)c->kv_heads);
        return false;
    }
    return true;
}

/* The settings are checked against the file's tensors before a model of that size is made,
 * so a file that lies about them costs no memory. */
static bool fits(const qkv_safetensors *f, const char *path, const char *name, int64_t rows,
                 int64_t cols) {
    int64_t shape[QKV_MAX_DIMS];
    int ndim = qkv_safetensors_shape(f, name, shape);
    if (ndim == 2 && shape[0] == rows && shape[1] == cols) return true;
    qkv_set_error("%s: the settings give \"%s\" [%lld,%lld], the file has it otherwise or not "
                  "at all", path, name, (long long)rows, (long long)cols);
    return false;
}

bool lm_load(lm_trained *t, const char *path) {
    qkv_safetensors *f = qkv_safetensors_read(path);
    lm_config c = {0};
    size_t n = 0;
    bool ok = f && read_config(f, path, &c) && fits(f, path, "embed.weight", c.vocab_size, c.dim)
              && fits(f, path, "blocks.0.ffn.w1.weight", c.ffn, c.dim) &&
              fits(f, path, "blocks.0.attn.k_proj.weight", c.kv_heads * (c.dim / c.heads), c.dim);
    const void *bytes = ok ? qkv_safetensors_bytes(f, "bpe", &n) : NULL;
    if (ok && bytes) t->bpe = qkv_bpe_from_bytes(bytes, n);
    ok = ok && t->bpe;
    if (ok && qkv_bpe_vocab_size(t->bpe) != c.vocab_size) {
        qkv_set_error("%s: the tokenizer has %lld ids, the model %lld", path,
                      (long long)qkv_bpe_vocab_size(t->bpe), (long long)c.vocab_size);
        ok = false;
    }
    qkv_generator g;
    qkv_generator_init(&g, 0);
    if (ok) t->model = lm_new(&c, &g);
    ok = ok && t->model && qkv_module_load_safetensors(QKV_MODULE(t->model), f, NULL);
    qkv_safetensors_free(f);
    if (!ok) lm_trained_free(t);
    return ok;
}
