/* qkv-lm train: the corpus and its tokens, the training loop with its progress display,
 * validation in bits per byte, the loss curve, and the checkpoint. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lm.h"

/* ---- Corpus ------------------------------------------------------------------------------ */

/* Appends the bytes of path to *buf; false with a message naming the file. */
static bool append_file(const char *path, char **buf, size_t *size) {
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f || fstat(fileno(f), &st)) {
        fprintf(stderr, "qkv-lm: %s: %s\n", path, strerror(errno));
        if (f) fclose(f);
        return false;
    }
    if (!S_ISREG(st.st_mode)) {
        fprintf(stderr, "qkv-lm: %s: not a regular file\n", path);
        fclose(f);
        return false;
    }
    char *grown = realloc(*buf, *size + (size_t)st.st_size + 1);
    size_t got = grown ? fread(grown + *size, 1, (size_t)st.st_size, f) : 0;
    bool ok = grown && !ferror(f);
    if (grown) *buf = grown;
    if (!ok) fprintf(stderr, "qkv-lm: %s: %s\n", path, grown ? strerror(errno) : "out of memory");
    *size += got;
    fclose(f);
    return ok;
}

/* The corpus as tokens, and the dataset of windows over them. */
typedef struct corpus {
    qkv_bpe *bpe;
    int64_t *tokens, n_tokens;
    int64_t *token_bytes; /* bytes each id decodes to, for bits per byte */
    qkv_lm_dataset *data;
} corpus;

static void corpus_free(corpus *c) {
    qkv_bpe_free(c->bpe);
    free(c->tokens);
    free(c->token_bytes);
    qkv_lm_dataset_free(c->data);
}

static bool tokenize(corpus *c, const char *text, size_t size, int64_t merges) {
    c->bpe = merges ? qkv_bpe_train(text, size, merges) : qkv_bpe_new();
    c->tokens = malloc((size + 1) * sizeof *c->tokens);
    int64_t v = c->bpe ? qkv_bpe_vocab_size(c->bpe) : 0;
    c->token_bytes = malloc((size_t)(v + 1) * sizeof *c->token_bytes);
    if (!c->bpe || !c->tokens || !c->token_bytes) return false;
    for (int64_t id = 0; id < v; id++) {
        size_t n = 0;
        qkv_bpe_token(c->bpe, id, &n);
        c->token_bytes[id] = (int64_t)n;
    }
    c->n_tokens = qkv_bpe_encode(c->bpe, text, size, c->tokens, (int64_t)size + 1);
    return c->n_tokens >= 0;
}

/* Reads and tokenizes the corpus and cuts it into windows; 0, or the exit status. */
static int load_corpus(const lm_options *o, corpus *c) {
    char *text = NULL;
    size_t size = 0;
    for (int i = 0; i < o->n_texts; i++)
        if (!append_file(o->texts[i], &text, &size)) return free(text), 2;
    if (size == 0) {
        fprintf(stderr, "qkv-lm: the corpus is empty\n");
        return free(text), 2;
    }
    bool ok = tokenize(c, text, size, o->bpe_merges);
    free(text);
    if (!ok) {
        fprintf(stderr, "qkv-lm: %s\n", qkv_error() ? qkv_error() : "out of memory");
        return 2;
    }
    int64_t windows = c->n_tokens > 0 ? (c->n_tokens - 1) / o->context : 0;
    if (windows < 2) {
        fprintf(stderr, "qkv-lm: the corpus gives %lld tokens, %lld windows of --ctx %lld + 1; "
                "training needs at least two (one to validate on)\n", (long long)c->n_tokens,
                (long long)windows, (long long)o->context);
        return 2;
    }
    /* A tenth for validation, and never less than one window. */
    double valid = windows >= 10 ? 0.1 : 1.0 / (double)windows;
    c->data = qkv_lm_dataset_new(c->tokens, c->n_tokens, o->context, valid);
    if (!c->data) return fprintf(stderr, "qkv-lm: %s\n", qkv_error()), 2;
    printf("corpus %zu bytes, %lld tokens (vocabulary %lld), %lld training windows, %lld "
           "validation windows of %lld\n", size, (long long)c->n_tokens,
           (long long)qkv_bpe_vocab_size(c->bpe),
           (long long)qkv_lm_dataset_size(c->data, QKV_SPLIT_TRAIN),
           (long long)qkv_lm_dataset_size(c->data, QKV_SPLIT_VALID), (long long)o->context);
    return 0;
}

/* The training windows of every step, epoch after epoch, each epoch shuffled: all of the
 * order is drawn before training, so that it can be exported for a reference run. */
static int64_t *training_order(const lm_options *o, const corpus *c) {
    int64_t n = qkv_lm_dataset_size(c->data, QKV_SPLIT_TRAIN), total = o->steps * o->batch;
    int64_t *order = malloc((size_t)(total + 1) * sizeof *order);
    int64_t *epoch = malloc((size_t)n * sizeof *epoch);
    qkv_generator g;
    qkv_generator_init(&g, (uint64_t)o->seed + 1);
    for (int64_t i = 0; order && epoch && i < total; i += n) {
        qkv_lm_dataset_order(c->data, QKV_SPLIT_TRAIN, epoch, &g);
        memcpy(order + i, epoch, (size_t)(total - i < n ? total - i : n) * sizeof *order);
    }
    free(epoch);
    return epoch ? order : (free(order), NULL);
}

/* ---- Validation -------------------------------------------------------------------------- */

typedef struct eval_result {
    double nats;
    int64_t tokens, bytes;
} eval_result;

static double loss_of(eval_result r) {
    return r.nats / (double)r.tokens;
}
static double bpb_of(eval_result r) {
    return r.nats / (log(2.0) * (double)r.bytes);
}

/* Summed loss of the first n validation windows, with the bytes their targets decode to. */
static bool evaluate(lm_model *m, const corpus *c, int64_t n, int64_t batch, eval_result *r) {
    *r = (eval_result){0};
    int64_t *idx = malloc((size_t)batch * sizeof *idx);
    bool ok = idx != NULL;
    qkv_module_train(QKV_MODULE(m), false);
    qkv_no_grad_begin();
    for (int64_t off = 0; ok && off < n; off += batch) {
        int64_t count = n - off < batch ? n - off : batch;
        for (int64_t i = 0; i < count; i++) idx[i] = off + i;
        qkv_scope_begin();
        qkv_lm_batch b = qkv_lm_dataset_batch(c->data, QKV_SPLIT_VALID, idx, count);
        qkv_tensor *logits = lm_forward(m, b.inputs, NULL);
        int64_t v = m->config.vocab_size;
        qkv_tensor *loss = qkv_cross_entropy(qkv_reshape(logits, 2, (int64_t[]){-1, v}),
                                             qkv_reshape(b.targets, 1, (int64_t[]){-1}),
                                             QKV_REDUCTION_SUM, -100, 0);
        ok = loss != NULL;
        if (ok) {
            r->nats += qkv_item(loss);
            const int64_t *t = qkv_data(b.targets);
            for (int64_t i = 0; i < b.targets->numel; i++) r->bytes += c->token_bytes[t[i]];
            r->tokens += b.targets->numel;
        }
        qkv_scope_end();
    }
    qkv_no_grad_end();
    qkv_module_train(QKV_MODULE(m), true);
    free(idx);
    return ok;
}

/* ---- Progress and the loss curve --------------------------------------------------------- */


typedef struct progress {
    bool live; /* a terminal: one line redrawn as steps finish */
    double start, last_draw, train_seconds;
    int64_t tokens;
} progress;

static void progress_draw(progress *p, int64_t done, int64_t total, double loss) {
    double now = lm_seconds();
    if (!p->live || (now - p->last_draw < 0.1 && done < total)) return;
    p->last_draw = now;
    double eta = done ? p->train_seconds * (double)(total - done) / (double)done : 0;
    int filled = (int)(30 * done / total);
    printf("\rstep %lld/%lld [%.*s%*s] loss %.4f %.0f tok/s ETA %.0fs  ", (long long)done,
           (long long)total, filled, "==============================", 30 - filled, "", loss,
           (double)p->tokens / (p->train_seconds + 1e-9), eta);
    fflush(stdout);
}

static void report_eval(progress *p, int64_t step, int64_t total, double train,
                        eval_result r) {
    if (p->live) printf("\r\033[K");
    printf("step %lld/%lld", (long long)step, (long long)total);
    if (!isnan(train)) printf(" train_loss=%.4f", train);
    printf(" val_loss=%.4f val_bpb=%.3f", loss_of(r), bpb_of(r));
    if (step) printf(" tok/s=%.0f", (double)p->tokens / (p->train_seconds + 1e-9));
    printf("\n");
    fflush(stdout);
}

/* ---- Training ---------------------------------------------------------------------------- */

typedef struct trainer {
    const lm_options *o;
    corpus *c;
    lm_model *model;
    qkv_optimizer *opt;
    qkv_named_list *params;
    qkv_lr_schedule schedule;
    int64_t *order;
} trainer;

/* One optimisation step; its loss, NAN on error or when the loss is not finite. */
static double train_step(trainer *t, int64_t step) {
    int64_t v = t->model->config.vocab_size;
    qkv_optimizer_zero_grad(t->opt);
    qkv_lm_batch b = qkv_lm_dataset_batch(t->c->data, QKV_SPLIT_TRAIN,
                                          t->order + step * t->o->batch, t->o->batch);
    qkv_tensor *logits = lm_forward(t->model, b.inputs, NULL);
    qkv_tensor *loss = qkv_cross_entropy(qkv_reshape(logits, 2, (int64_t[]){-1, v}),
                                         qkv_reshape(b.targets, 1, (int64_t[]){-1}),
                                         QKV_REDUCTION_MEAN, -100, 0);
    double value = loss ? qkv_item(loss) : NAN;
    if (!isfinite(value) || !qkv_backward(loss) || isnan(qkv_clip_grad_norm(t->params, 1.0)) ||
        !qkv_lr_schedule_apply(&t->schedule, t->opt, step) || !qkv_optimizer_step(t->opt))
        return NAN;
    return value;
}

static int train_loop(trainer *t, curve_point *pts, int *n_pts) {
    const lm_options *o = t->o;
    int64_t n_valid = qkv_lm_dataset_size(t->c->data, QKV_SPLIT_VALID);
    int64_t probe = o->eval_windows < n_valid ? o->eval_windows : n_valid;
    progress p = {.live = isatty(STDOUT_FILENO), .start = lm_seconds()};
    eval_result r;
    if (!evaluate(t->model, t->c, probe, o->batch, &r)) return 2;
    report_eval(&p, 0, o->steps, NAN, r);
    pts[(*n_pts)++] = (curve_point){0, NAN, loss_of(r)};
    double sum = 0;
    int64_t since = 0;
    for (int64_t step = 0; step < o->steps; step++) {
        double begin = lm_seconds();
        qkv_scope_begin();
        double loss = train_step(t, step);
        qkv_scope_end();
        p.train_seconds += lm_seconds() - begin;
        if (isnan(loss)) {
            if (p.live) printf("\n");
            if (qkv_error()) return 2;
            fprintf(stderr, "qkv-lm: training stopped at step %lld: the loss is not finite\n",
                    (long long)step + 1);
            return 1;
        }
        p.tokens += o->batch * o->context;
        sum += loss;
        since++;
        progress_draw(&p, step + 1, o->steps, sum / (double)since);
        bool last = step + 1 == o->steps;
        if (last || (o->eval_every && (step + 1) % o->eval_every == 0)) {
            if (!evaluate(t->model, t->c, probe, o->batch, &r)) return 2;
            report_eval(&p, step + 1, o->steps, sum / (double)since, r);
            pts[(*n_pts)++] = (curve_point){step + 1, sum / (double)since, loss_of(r)};
            sum = 0;
            since = 0;
        }
    }
    printf("train_seconds=%.2f tokens=%lld\n", p.train_seconds, (long long)p.tokens);
    return 0;
}

/* The initial weights, the token stream and every step's windows, for bench/lm_torch.py. */
static bool export_init(const trainer *t) {
    const lm_options *o = t->o;
    qkv_tensor *tokens = qkv_from_array(QKV_I64, 1, (int64_t[]){t->c->n_tokens}, t->c->tokens);
    qkv_tensor *order = qkv_from_array(QKV_I64, 2, (int64_t[]){o->steps, o->batch}, t->order);
    char values[10][32];
    snprintf(values[0], 32, "%lld", (long long)qkv_lm_dataset_size(t->c->data, QKV_SPLIT_TRAIN));
    snprintf(values[1], 32, "%lld", (long long)qkv_lm_dataset_size(t->c->data, QKV_SPLIT_VALID));
    snprintf(values[2], 32, "%.17g", o->lr);
    snprintf(values[3], 32, "%.17g", o->min_lr);
    snprintf(values[4], 32, "%lld", (long long)o->warmup);
    snprintf(values[5], 32, "%.17g", o->weight_decay);
    snprintf(values[6], 32, "%lld", (long long)o->context);
    snprintf(values[7], 32, "%lld", (long long)o->ffn);
    snprintf(values[8], 32, "%lld", (long long)o->heads);
    snprintf(values[9], 32, "%lld", (long long)o->kv_heads);
    const char *keys[10] = {"train_windows", "valid_windows", "lr", "min_lr", "warmup",
                            "weight_decay", "context", "ffn", "heads", "kv_heads"};
    qkv_meta_pair meta[10];
    for (int i = 0; i < 10; i++) meta[i] = (qkv_meta_pair){keys[i], values[i]};
    qkv_checkpoint_contents extras = {
        .n_tensors = 2, .tensor_names = (const char *const[]){"data.tokens", "data.order"},
        .tensors = (qkv_tensor *const[]){tokens, order}, .n_meta = 10, .meta = meta};
    bool ok = tokens && order && qkv_module_save(QKV_MODULE(t->model), o->export_path, &extras);
    qkv_release(tokens);
    qkv_release(order);
    return ok;
}

static bool setup(trainer *t) {
    const lm_options *o = t->o;
    lm_config cfg = {
        .vocab_size = qkv_bpe_vocab_size(t->c->bpe), .context = o->context, .dim = o->dim,
        .heads = o->heads, .kv_heads = o->kv_heads, .layers = o->layers, .ffn = o->ffn,
        .dropout = o->dropout,
    };
    qkv_generator g;
    qkv_generator_init(&g, (uint64_t)o->seed);
    t->model = lm_new(&cfg, &g);
    t->order = training_order(o, t->c);
    t->opt = qkv_adamw_new();
    t->params = t->model ? qkv_module_parameters(QKV_MODULE(t->model)) : NULL;
    qkv_optim_config adamw = qkv_adamw_config(o->lr);
    adamw.weight_decay = o->weight_decay;
    t->schedule = qkv_lr_warmup_cosine(o->warmup, o->steps, o->min_lr);
    if (!t->model || !t->order || !t->opt || !t->params ||
        !qkv_optimizer_add_decay_groups(t->opt, t->params, adamw))
        return false;
    int64_t n = qkv_module_num_parameters(QKV_MODULE(t->model));
    /* A destination that cannot take the checkpoint is found now, not after the training. */
    if (!qkv_safetensors_writable(o->save_path, (size_t)n * 4)) return false;
    printf("model: %lld layers, dim %lld, %lld heads (%lld key/value), ffn %lld, context %lld, "
           "%lld parameters\n", (long long)o->layers, (long long)o->dim, (long long)o->heads,
           (long long)o->kv_heads, (long long)o->ffn, (long long)o->context, (long long)n);
    return !o->export_path || export_init(t);
}

static int finish(trainer *t, const curve_point *pts, int n_pts) {
    const lm_options *o = t->o;
    eval_result r;
    int64_t n_valid = qkv_lm_dataset_size(t->c->data, QKV_SPLIT_VALID);
    if (!evaluate(t->model, t->c, n_valid, o->batch, &r)) return 2;
    lm_trained trained = {t->model, t->c->bpe};
    if (!lm_save(&trained, o->save_path)) return 2;
    printf("saved %s\n", o->save_path);
    char base[4096];
    snprintf(base, sizeof base, "%s%s", o->curve_path ? o->curve_path : o->save_path,
             o->curve_path ? "" : ".loss");
    if (!write_curve(base, pts, n_pts, o->steps)) return 2;
    printf("loss curve %s.svg, %s.csv\n", base, base);
    printf("validation: %lld windows, %lld tokens, %lld bytes\n", (long long)n_valid,
           (long long)r.tokens, (long long)r.bytes);
    printf("val_loss=%.4f\n", loss_of(r));
    printf("val_bpb=%.3f\n", bpb_of(r));
    return 0;
}

int lm_train(const lm_options *o) {
    corpus c = {0};
    trainer t = {.o = o, .c = &c};
    int n_pts = 0;
    curve_point *pts = NULL;
    int status = load_corpus(o, &c);
    if (status) goto done;
    status = 2;
    pts = malloc((size_t)(o->steps + 2) * sizeof *pts);
    if (!pts || !setup(&t)) goto done;
    status = train_loop(&t, pts, &n_pts);
    if (!status) status = finish(&t, pts, n_pts);
done:
    if (status == 2 && qkv_error()) fprintf(stderr, "qkv-lm: %s\n", qkv_error());
    qkv_named_list_free(t.params);
    qkv_optimizer_free(t.opt);
    qkv_module_free(QKV_MODULE(t.model));
    free(t.order);
    free(pts);
    corpus_free(&c);
    return status;
}
