/* qkv-lm generate: samples text from a trained model, with the key/value cache (the prompt
 * fed once, then one token at a time) or, for comparison, recomputing the whole prefix. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lm.h"

/* The next token from the logits [V] of the last position: the largest at temperature 0,
 * else a draw from the softmax of logits / temperature over the top_k largest (0: all),
 * cut to the smallest set whose probability reaches top_p (nucleus sampling). */
static int64_t pick(const qkv_tensor *logits, const lm_options *o, qkv_generator *g) {
    if (o->temperature == 0) return (int64_t)qkv_item(qkv_argmax(logits, -1, false));
    qkv_tensor *ids = NULL;
    qkv_tensor *sorted = qkv_sort(qkv_div_scalar(logits, o->temperature), -1, true, &ids);
    if (o->top_k > 0) sorted = qkv_narrow(sorted, -1, 0, o->top_k);
    qkv_tensor *probs = qkv_softmax(sorted, -1);
    if (o->top_p < 1) {
        /* A token stays while the probability before it is below top_p: the first always. */
        qkv_tensor *before = qkv_sub(qkv_cumsum(probs, -1), probs);
        probs = qkv_masked_fill(probs, qkv_ge_scalar(before, o->top_p), 0);
    }
    qkv_tensor *j = qkv_multinomial(probs, 1, false, g);
    qkv_tensor *id = j ? qkv_index_select(ids, 0, j) : NULL;
    return id ? (int64_t)qkv_item(id) : -1;
}

typedef struct sampler {
    lm_model *model;
    qkv_kv_cache **caches; /* NULL when recomputing the prefix */
    int64_t *seq, len;     /* prompt and generated tokens */
    int64_t fed;           /* tokens of seq the caches have seen */
} sampler;

/* Logits [V] for the position after seq[0..len): with caches, of the tokens not fed yet;
 * without, of the last context tokens again. */
static qkv_tensor *next_logits(sampler *s) {
    int64_t ctx = s->model->config.context;
    int64_t start = s->len > ctx ? s->len - ctx : 0;
    if (s->caches) {
        start = s->fed;
        if (qkv_kv_cache_length(s->caches[0]) + s->len - s->fed > ctx) {
            /* The cache is full: start again from the last half context, so that generation
             * goes on past it (rotary angles are relative, so the restart reads the same). */
            for (int64_t i = 0; i < s->model->config.layers; i++)
                qkv_kv_cache_reset(s->caches[i]);
            start = s->len - (ctx + 1) / 2;
        }
        s->fed = s->len;
    }
    int64_t n = s->len - start;
    qkv_tensor *ids = qkv_from_array(QKV_I64, 2, (int64_t[]){1, n}, s->seq + start);
    qkv_tensor *logits = lm_forward(s->model, ids, s->caches);
    return qkv_select(qkv_select(logits, 0, 0), 0, n - 1);
}

static bool check_args(const lm_options *o, const lm_trained *t, int64_t n_prompt) {
    int64_t v = t->model->config.vocab_size, ctx = t->model->config.context;
    if (o->top_k < 0 || o->top_k > v)
        fprintf(stderr, "qkv-lm: --top-k %lld is not in [0, %lld] (0: no limit; the "
                "vocabulary has %lld tokens)\n", (long long)o->top_k, (long long)v, (long long)v);
    else if (!(o->top_p > 0 && o->top_p <= 1))
        fprintf(stderr, "qkv-lm: --top-p %g is not in (0, 1]\n", o->top_p);
    else if (n_prompt == 0) fprintf(stderr, "qkv-lm: the prompt is empty\n");
    else if (n_prompt > ctx)
        fprintf(stderr, "qkv-lm: the prompt is %lld tokens, longer than the model's context "
                "of %lld\n", (long long)n_prompt, (long long)ctx);
    else return true;
    return false;
}

static bool emit(const lm_trained *t, int64_t id) {
    size_t n = 0;
    const void *bytes = qkv_bpe_token(t->bpe, id, &n);
    if (bytes) fwrite(bytes, 1, n, stdout);
    fflush(stdout);
    return bytes != NULL;
}

static int sample(const lm_options *o, lm_trained *t, sampler *s) {
    qkv_generator g;
    qkv_generator_init(&g, (uint64_t)o->seed);
    qkv_module_train(QKV_MODULE(t->model), false);
    fwrite(o->prompt, 1, strlen(o->prompt), stdout);
    double start = lm_seconds();
    bool ok = true;
    qkv_no_grad_begin();
    for (int64_t i = 0; ok && i < o->tokens; i++) {
        qkv_scope_begin();
        int64_t id = pick(next_logits(s), o, &g);
        qkv_scope_end();
        ok = id >= 0 && emit(t, id);
        s->seq[s->len++] = id;
    }
    qkv_no_grad_end();
    double seconds = lm_seconds() - start;
    printf("\n");
    if (!ok) return fprintf(stderr, "qkv-lm: %s\n", qkv_error() ? qkv_error() : "?"), 2;
    fprintf(stderr, "generated %lld tokens in %.3f s: %.1f tokens/s (%s)\n",
            (long long)o->tokens, seconds, (double)o->tokens / (seconds + 1e-12),
            s->caches ? "kv cache" : "recomputing the prefix");
    return 0;
}

int lm_generate(const lm_options *o) {
    lm_trained t = {0};
    if (!lm_load(&t, o->load_path)) {
        fprintf(stderr, "qkv-lm: %s\n", qkv_error());
        return 2;
    }
    size_t size = strlen(o->prompt);
    int64_t n_prompt = qkv_bpe_encode(t.bpe, o->prompt, size, NULL, 0);
    sampler s = {.model = t.model};
    int status = 2;
    s.seq = malloc((size_t)(n_prompt + o->tokens + 1) * sizeof *s.seq);
    if (!s.seq || n_prompt < 0 || !check_args(o, &t, n_prompt)) goto done;
    s.len = qkv_bpe_encode(t.bpe, o->prompt, size, s.seq, n_prompt);
    if (!o->no_cache) {
        s.caches = calloc((size_t)t.model->config.layers, sizeof *s.caches);
        for (int64_t i = 0; s.caches && i < t.model->config.layers; i++)
            if (!(s.caches[i] = qkv_kv_cache_new(t.model->config.context))) goto done;
        if (!s.caches) goto done;
    }
    status = sample(o, &t, &s);
done:
    if (status == 2 && qkv_error()) fprintf(stderr, "qkv-lm: %s\n", qkv_error());
    for (int64_t i = 0; s.caches && i < t.model->config.layers; i++)
        qkv_kv_cache_free(s.caches[i]);
    free(s.caches);
    free(s.seq);
    lm_trained_free(&t);
    return status;
}
