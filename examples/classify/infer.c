/* qkv-classify eval and predict, and the checkpoint that carries a trained classifier. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "classify.h"

#define EVAL_BATCH 256

void trained_free(trained *t) {
    qkv_module_free(QKV_MODULE(t->model));
    qkv_vocab_free(t->vocab);
    qkv_labels_free(t->labels);
    *t = (trained){0};
}

bool predict_all(classifier *m, const qkv_dataset *ds, int64_t max_len, int64_t *pred,
                 float *confidence, int part, int parts) {
    int64_t n = qkv_dataset_size(ds);
    int64_t idx[EVAL_BATCH];
    bool ok = true;
    for (int64_t i = 0; i < n; i++) pred[i] = -1;
    qkv_module_train(QKV_MODULE(m), false);
    qkv_no_grad_begin();
    for (int64_t off = (int64_t)part * EVAL_BATCH; off < n && ok;
         off += (int64_t)parts * EVAL_BATCH) {
        int64_t count = n - off < EVAL_BATCH ? n - off : EVAL_BATCH;
        for (int64_t i = 0; i < count; i++) idx[i] = off + i;
        qkv_scope_begin();
        qkv_batch b = make_batch(ds, idx, count, max_len);
        qkv_tensor *probs = qkv_softmax(classifier_forward(m, b.ids, b.key_padding_mask), -1);
        qkv_tensor *best = qkv_argmax(probs, -1, true);
        qkv_tensor *p = qkv_gather(probs, -1, best);
        ok = p && qkv_copy_out(best, QKV_I64, pred + off) &&
             (!confidence || qkv_copy_out(p, QKV_F32, confidence + off));
        qkv_scope_end();
    }
    qkv_no_grad_end();
    return ok;
}

/* ---- Checkpoints ------------------------------------------------------------------------- */

static const char *const config_keys[] = {"vocab_size", "n_classes", "max_len", "dim",
                                          "heads", "layers", "ffn"};
#define N_CONFIG 7

static int64_t *config_field(classifier_config *c, int i) {
    int64_t *fields[N_CONFIG] = {&c->vocab_size, &c->n_classes, &c->max_len, &c->dim,
                                 &c->heads, &c->layers, &c->ffn};
    return fields[i];
}

bool trained_bytes(const trained *t, qkv_named_bytes bytes[2]) {
    size_t vn = qkv_vocab_to_bytes(t->vocab, NULL, 0);
    size_t ln = qkv_labels_to_bytes(t->labels, NULL, 0);
    char *vb = malloc(vn), *lb = malloc(ln);
    bytes[0] = (qkv_named_bytes){"vocab", vb, vn};
    bytes[1] = (qkv_named_bytes){"labels", lb, ln};
    bool ok = vb && lb && qkv_vocab_to_bytes(t->vocab, vb, vn) == vn &&
              qkv_labels_to_bytes(t->labels, lb, ln) == ln;
    if (!ok) free_bytes(bytes);
    return ok;
}

void free_bytes(qkv_named_bytes bytes[2]) {
    for (int i = 0; i < 2; i++) {
        free((void *)bytes[i].data);
        bytes[i].data = NULL;
    }
}

#define MAX_RUN_META 8

bool save_trained(const trained *t, const qkv_optimizer *opt, const qkv_meta_pair *run_meta,
                  int n_run_meta, const char *path) {
    char values[N_CONFIG][24];
    qkv_meta_pair meta[N_CONFIG + 1 + MAX_RUN_META];
    classifier_config c = t->model->config;
    for (int i = 0; i < N_CONFIG; i++) {
        snprintf(values[i], sizeof values[i], "%lld", (long long)*config_field(&c, i));
        meta[i] = (qkv_meta_pair){config_keys[i], values[i]};
    }
    meta[N_CONFIG] = (qkv_meta_pair){"format", "qkv-classify 1"};
    int n_meta = N_CONFIG + 1;
    for (int i = 0; i < n_run_meta && i < MAX_RUN_META; i++) meta[n_meta++] = run_meta[i];
    qkv_named_bytes bytes[2];
    if (!trained_bytes(t, bytes)) {
        qkv_set_error("save_trained: %s: out of memory", path);
        return false;
    }
    qkv_checkpoint_contents extras = {.n_bytes = 2, .bytes = bytes, .n_meta = n_meta,
                                      .meta = meta};
    bool ok = qkv_dist_checkpoint_save(QKV_MODULE(t->model), opt, path, &extras);
    free_bytes(bytes);
    return ok;
}

static bool read_config(const qkv_safetensors *f, const char *path, classifier_config *c) {
    const char *format = qkv_safetensors_meta(f, "format");
    if (!format || strcmp(format, "qkv-classify 1")) {
        qkv_set_error("%s: not a qkv-classify checkpoint", path);
        return false;
    }
    for (int i = 0; i < N_CONFIG; i++) {
        const char *v = qkv_safetensors_meta(f, config_keys[i]);
        char *end = NULL;
        long long x = v ? strtoll(v, &end, 10) : -1;
        if (!v || *end || x < 0 || x > (1 << 30)) {
            qkv_set_error("%s: bad or missing setting '%s'", path, config_keys[i]);
            return false;
        }
        *config_field(c, i) = x;
    }
    return true;
}

bool load_trained(trained *t, const char *path) {
    qkv_safetensors *f = qkv_safetensors_read(path);
    classifier_config c = {0};
    size_t vn = 0, ln = 0;
    bool ok = f && read_config(f, path, &c) && classifier_config_fits(&c, f, path);
    const void *vb = ok ? qkv_safetensors_bytes(f, "vocab", &vn) : NULL;
    const void *lb = vb ? qkv_safetensors_bytes(f, "labels", &ln) : NULL;
    ok = ok && vb && lb;
    if (ok) {
        t->vocab = qkv_vocab_from_bytes(vb, vn);
        t->labels = qkv_labels_from_bytes(lb, ln);
        ok = t->vocab && t->labels && qkv_vocab_size(t->vocab) == c.vocab_size &&
             qkv_labels_size(t->labels) == c.n_classes;
        if (!ok && t->vocab && t->labels)
            qkv_set_error("%s: vocabulary or labels disagree with the model", path);
    }
    qkv_generator g;
    qkv_generator_init(&g, 0);
    if (ok) t->model = classifier_new(&c, &g);
    ok = ok && t->model && qkv_module_load(QKV_MODULE(t->model), path, NULL);
    qkv_safetensors_free(f);
    if (!ok) trained_free(t);
    return ok;
}

/* ---- Commands ---------------------------------------------------------------------------- */

static int fail(const char *what) {
    fprintf(stderr, "qkv-classify: %s\n", what ? what : "failed");
    return 2;
}

int run_eval(const options *o) {
    trained t = {0};
    if (!load_trained(&t, o->load_path)) return fail(qkv_error());
    qkv_tsv *test = qkv_tsv_read(o->test_path);
    int64_t unseen = 0, right = 0;
    qkv_dataset *ds = NULL;
    int64_t *pred = NULL;
    int status = 2;
    if (!test) goto done;
    if (test->n == 0) { /* an accuracy of nothing is no result */
        qkv_set_error("%s has no examples", o->test_path);
        goto done;
    }
    for (int64_t i = 0; i < test->n; i++) unseen += qkv_labels_id(t.labels, test->labels[i]) < 0;
    if (unseen) {
        qkv_set_error("%s: %lld examples have labels the model does not know", o->test_path,
                      (long long)unseen);
        goto done;
    }
    ds = qkv_dataset_new(t.vocab, test->texts, t.labels, test->labels, test->n);
    pred = malloc((size_t)(test->n ? test->n : 1) * sizeof *pred);
    /* Each rank predicts its share of the batches; the counts are summed exactly. */
    if (!ds || !pred ||
        !predict_all(t.model, ds, t.model->config.max_len, pred, NULL, qkv_dist_rank(),
                     qkv_dist_size()))
        goto done;
    for (int64_t i = 0; i < test->n; i++) right += pred[i] == qkv_dataset_label(ds, i);
    if (!qkv_dist_sum_counts(&right, 1)) goto done;
    printf("test_acc=%.3f\n", (double)right / (double)test->n);
    status = 0;
done:
    if (status) fail(qkv_error());
    free(pred);
    qkv_dataset_free(ds);
    qkv_tsv_free(test);
    trained_free(&t);
    return status;
}

/* Reads stdin one text per line (a trailing \r is dropped). */
static char **read_lines(int64_t *n) {
    char **lines = NULL, *line = NULL;
    size_t cap = 0, size = 0;
    ssize_t len;
    *n = 0;
    while ((len = getline(&line, &size, stdin)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if ((size_t)*n == cap) {
            cap = cap ? 2 * cap : 64;
            char **grown = realloc(lines, cap * sizeof *lines);
            if (!grown) break;
            lines = grown;
        }
        lines[(*n)++] = strdup(line);
    }
    free(line);
    return lines;
}

int run_predict(const options *o) {
    trained t = {0};
    if (!load_trained(&t, o->load_path)) return fail(qkv_error());
    int64_t n;
    char **lines = read_lines(&n);
    qkv_dataset *ds = n ? qkv_dataset_new(t.vocab, (const char *const *)lines, NULL, NULL, n)
                        : NULL;
    int64_t *pred = malloc((size_t)(n ? n : 1) * sizeof *pred);
    float *conf = malloc((size_t)(n ? n : 1) * sizeof *conf);
    int status = 0;
    if (n && (!ds || !pred || !conf || !predict_all(t.model, ds, t.model->config.max_len, pred,
                                                    conf, 0, 1)))
        status = fail(qkv_error());
    for (int64_t i = 0; i < n && !status; i++)
        printf("%s\t%.4f\n", qkv_labels_name(t.labels, pred[i]), conf[i]);
    for (int64_t i = 0; i < n; i++) free(lines[i]);
    free(lines);
    free(pred);
    free(conf);
    qkv_dataset_free(ds);
    trained_free(&t);
    return status;
}
