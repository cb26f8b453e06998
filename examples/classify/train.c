/* qkv-classify train: data, the training loop with its progress display, and the report. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "classify.h"

double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- Data -------------------------------------------------------------------------------- */

static qkv_tsv *read_tsv(const char *path) {
    qkv_tsv *t = qkv_tsv_read(path);
    if (!t) fprintf(stderr, "qkv-classify: %s\n", qkv_error());
    else if (t->n == 0) {
        fprintf(stderr, "qkv-classify: %s has no examples\n", path);
        qkv_tsv_free(t);
        return NULL;
    }
    return t;
}

/* Test labels never seen in training cannot be predicted: they are counted and reported. */
static bool check_test_labels(const qkv_tsv *test, const qkv_labels *labels, const char *path) {
    int64_t unseen = 0;
    const char *first = NULL;
    for (int64_t i = 0; i < test->n; i++)
        if (qkv_labels_id(labels, test->labels[i]) < 0) {
            if (!first) first = test->labels[i];
            unseen++;
        }
    if (!unseen) return true;
    fprintf(stderr, "qkv-classify: %s: %lld examples have labels not seen in training "
            "(the first is '%s')\n", path, (long long)unseen, first);
    return false;
}

qkv_batch make_batch(const qkv_dataset *ds, const int64_t *idx, int64_t n, int64_t max_len) {
    int64_t longest = 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t len = qkv_dataset_length(ds, idx[i]);
        if (len > longest) longest = len;
    }
    return qkv_dataset_batch(ds, idx, n, longest < max_len ? longest : max_len);
}

/* ---- Progress ---------------------------------------------------------------------------- */

typedef struct progress {
    bool live;          /* a terminal: redraw one line as batches finish */
    double start, last_draw;
    int64_t tokens;
} progress;

static void progress_draw(progress *p, int64_t epoch, int64_t done, int64_t total, double loss) {
    double now = seconds_now();
    if (!p->live || (now - p->last_draw < 0.1 && done < total)) return;
    p->last_draw = now;
    double elapsed = now - p->start;
    double eta = done ? elapsed * (double)(total - done) / (double)done : 0;
    int filled = (int)(30 * done / total);
    printf("\repoch %lld [%.*s%*s] %lld/%lld loss %.4f %.0f tok/s ETA %.0fs  ",
           (long long)epoch, filled, "==============================", 30 - filled, "",
           (long long)done, (long long)total, loss, (double)p->tokens / (elapsed + 1e-9), eta);
    fflush(stdout);
}

/* ---- Training ---------------------------------------------------------------------------- */

/* One optimisation step on a batch; returns its loss, NAN on error. */
static double train_step(classifier *m, qkv_optimizer *opt, const qkv_batch *b, bool bf16) {
    qkv_optimizer_zero_grad(opt); /* last step's gradients are not kept through this forward */
    if (bf16) qkv_autocast_begin(QKV_BF16); /* the forward only: the backward follows it */
    qkv_tensor *logits = classifier_forward(m, b->ids, b->key_padding_mask);
    qkv_tensor *loss = qkv_cross_entropy(logits, b->labels, QKV_REDUCTION_MEAN, -100, 0);
    if (bf16) qkv_autocast_end();
    double value = loss ? qkv_item(loss) : NAN;
    if (!isfinite(value)) return NAN;
    if (!qkv_backward(loss) || !qkv_optimizer_step(opt)) return NAN;
    return value;
}

/* Replays a batch whose loss was not finite with anomaly detection on, so that the message
 * names the first op that produced a NaN (or a non-finite gradient) and its layer, with the
 * epoch and the step. */
static void explain_nonfinite(classifier *m, const qkv_batch *b, int64_t epoch, int64_t step) {
    qkv_clear_error();
    qkv_set_detect_anomaly(true);
    qkv_tensor *logits = classifier_forward(m, b->ids, b->key_padding_mask);
    qkv_tensor *loss = qkv_cross_entropy(logits, b->labels, QKV_REDUCTION_MEAN, -100, 0);
    if (loss) qkv_backward(loss);
    qkv_set_detect_anomaly(false);
    fprintf(stderr, "qkv-classify: training stopped at epoch %lld, step %lld: the loss is not "
            "finite: %s\n", (long long)epoch, (long long)step,
            qkv_error() ? qkv_error() : "no op reported a non-finite value");
}

/* What a training run holds. dist is NULL for one process without --micro-batches: the loop
 * is then the single-process one, with the results it always had. */
typedef struct run {
    const options *o;
    trained *t;
    qkv_dataset *train, *test;
    qkv_optimizer *opt;
    qkv_dist_trainer *dist;
    qkv_generator *g;    /* the data order's */
    int64_t *order;      /* the epoch's order of the training examples */
    int64_t *pred;       /* this rank's test predictions, -1 for the other ranks' */
    int64_t *counts;     /* test counts (test_counts) */
    double *micro_loss;  /* this rank's micro-batch losses of one step */
} run;

/* Batch k of the epoch in one process, as qkv-classify always trained. */
static double local_step(run *r, int64_t epoch, int64_t k, bool *nonfinite, int64_t *tokens) {
    int64_t n = qkv_dataset_size(r->train), off = k * r->o->batch;
    int64_t count = n - off < r->o->batch ? n - off : r->o->batch;
    qkv_scope_begin();
    qkv_batch b = make_batch(r->train, r->order + off, count, r->o->max_len);
    double loss = b.ids ? train_step(r->t->model, r->opt, &b, r->o->bf16) : NAN;
    if (isnan(loss) && b.ids && !qkv_error()) {
        *nonfinite = true;
        explain_nonfinite(r->t->model, &b, epoch, k + 1);
    }
    *tokens += b.ids ? b.ids->numel : 0;
    qkv_scope_end();
    return loss;
}

/* The forward and backward of micro-batch j of global batch k (total examples): padded to its
 * own longest example, dropout keyed by (seed, step, j), its loss its share of the global
 * mean (its sum over the global count). The loss goes to *loss, 0 for an empty micro-batch. */
static bool micro_step(run *r, int64_t k, int j, int64_t total, double *loss,
                       int64_t *tokens) {
    int64_t n = qkv_dataset_size(r->train), pos = 0, len = 0;
    qkv_scope_begin();
    bool ok = qkv_micro_batch_range(n, r->o->batch, k, qkv_dist_micro_batches(r->dist), j,
                                    &pos, &len);
    qkv_tensor *value = NULL;
    if (ok && len) {
        ok = qkv_dist_micro_begin(r->dist, qkv_optimizer_steps(r->opt), j, NULL);
        qkv_batch b = make_batch(r->train, r->order + pos, len, r->o->max_len);
        if (r->o->bf16) qkv_autocast_begin(QKV_BF16);
        qkv_tensor *logits = ok ? classifier_forward(r->t->model, b.ids, b.key_padding_mask)
                                : NULL;
        value = qkv_div_scalar(qkv_cross_entropy(logits, b.labels, QKV_REDUCTION_SUM, -100, 0),
                               (double)total);
        if (r->o->bf16) qkv_autocast_end();
        ok = value != NULL;
        *tokens += b.ids ? b.ids->numel : 0;
    }
    *loss = value ? qkv_item(value) : 0;
    ok = ok && qkv_dist_backward(r->dist, value, j);
    qkv_scope_end();
    return ok;
}

/* Batch k of the epoch over the ranks: this rank's micro-batches, then the gradient summed in
 * the fixed tree over all of them, then one Adam step. Returns the batch's mean loss, summed
 * in the same tree (the same bits on every rank), so that a loss that stopped being finite
 * stops every rank at the same step. */
static double dist_step(run *r, int64_t epoch, int64_t k, bool *nonfinite, int64_t *tokens) {
    int64_t total = qkv_batch_count(qkv_dataset_size(r->train), r->o->batch, k);
    int first = 0, count = 0;
    bool ok = qkv_dist_micro_range(r->dist, &first, &count);
    for (int j = first; ok && j < first + count; j++)
        ok = micro_step(r, k, j, total, &r->micro_loss[j - first], tokens);
    double loss = NAN;
    if (!ok || !qkv_dist_finish(r->dist) || !qkv_dist_tree_sum(r->micro_loss, count, &loss))
        return NAN;
    if (!isfinite(loss)) {
        *nonfinite = true;
        if (qkv_dist_rank() == 0)
            fprintf(stderr, "qkv-classify: training stopped at epoch %lld, step %lld: the loss "
                    "is not finite\n", (long long)epoch, (long long)(k + 1));
        return NAN;
    }
    return qkv_optimizer_step(r->opt) ? loss : NAN;
}

/* The mean loss of an epoch; NAN on error, with *nonfinite set when the cause was a loss
 * that stopped being finite (no op failed). */
static double train_epoch(run *r, int64_t epoch, bool *nonfinite) {
    int64_t n = qkv_dataset_size(r->train), batches = (n + r->o->batch - 1) / r->o->batch;
    progress p = {.live = isatty(STDOUT_FILENO), .start = seconds_now()};
    double total = 0;
    qkv_shuffle(r->order, n, r->g);
    qkv_module_train(QKV_MODULE(r->t->model), true);
    for (int64_t k = 0; k < batches; k++) {
        double loss = r->dist ? dist_step(r, epoch, k, nonfinite, &p.tokens)
                              : local_step(r, epoch, k, nonfinite, &p.tokens);
        if (isnan(loss)) return NAN;
        total += loss;
        progress_draw(&p, epoch, k + 1, batches, total / (double)(k + 1));
    }
    if (p.live) printf("\r\033[K");
    return total / (double)batches;
}

/* ---- Evaluation -------------------------------------------------------------------------- */

/* The test set's counts, each rank predicting its share of the batches, summed exactly over
 * the ranks: per class correct, predicted and actual ([0, c), [c, 2c), [2c, 3c)), then all
 * correct ([3c]). */
static bool test_counts(run *r) {
    int64_t c = qkv_labels_size(r->t->labels), n = qkv_dataset_size(r->test);
    if (r->o->bf16) qkv_autocast_begin(QKV_BF16);
    bool ok = predict_all(r->t->model, r->test, r->o->max_len, r->pred, NULL, qkv_dist_rank(),
                          qkv_dist_size());
    if (r->o->bf16) qkv_autocast_end();
    if (!ok) return false;
    memset(r->counts, 0, (size_t)(3 * c + 1) * sizeof *r->counts);
    for (int64_t i = 0; i < n; i++) {
        int64_t y = qkv_dataset_label(r->test, i), p = r->pred[i];
        if (p < 0) continue;
        r->counts[y] += p == y;
        r->counts[c + p]++;
        r->counts[2 * c + y]++;
        r->counts[3 * c] += p == y;
    }
    return qkv_dist_sum_counts(r->counts, (int)(3 * c + 1));
}

/* ---- Report ------------------------------------------------------------------------------ */

static void report(const run *r) {
    int64_t c = qkv_labels_size(r->t->labels), n = qkv_dataset_size(r->test);
    const int64_t *tp = r->counts, *predicted = r->counts + c, *actual = r->counts + 2 * c;
    int64_t *train = calloc((size_t)c, sizeof *train);
    if (!train) return;
    for (int64_t i = 0; i < qkv_dataset_size(r->train); i++)
        train[qkv_dataset_label(r->train, i)]++;
    int64_t majority = 0;
    for (int64_t k = 1; k < c; k++)
        if (train[k] > train[majority]) majority = k;
    printf("majority class '%s': test_acc=%.3f\n", qkv_labels_name(r->t->labels, majority),
           (double)actual[majority] / (double)n);
    printf("%-24s %9s %9s %8s\n", "label", "precision", "recall", "support");
    for (int64_t k = 0; k < c; k++)
        printf("%-24s %9.3f %9.3f %8lld\n", qkv_labels_name(r->t->labels, k),
               predicted[k] ? (double)tp[k] / (double)predicted[k] : 0.0,
               actual[k] ? (double)tp[k] / (double)actual[k] : 0.0, (long long)actual[k]);
    free(train);
}

/* ---- Checkpoints of a run ---------------------------------------------------------------- */

static int64_t micro_batches(const run *r) {
    return r->dist ? qkv_dist_micro_batches(r->dist) : 0;
}

/* The run after `epoch` epochs, into --save: the model, Adam's state and the settings that a
 * resumed run must share with this one (the rank count is not one of them). Over ranks, the
 * model's generators are first keyed to the next step's first micro-batch: what they held
 * was the last micro-batch of rank 0's, which depends on the rank count. */
static bool save_epoch(const run *r, int64_t epoch) {
    if (r->dist && !qkv_dist_micro_begin(r->dist, qkv_optimizer_steps(r->opt), 0, NULL))
        return false;
    char values[4][24];
    int64_t settings[4] = {epoch, r->o->seed, r->o->batch, micro_batches(r)};
    static const char *const keys[4] = {"train.epoch", "train.seed", "train.batch",
                                        "train.micro_batches"};
    qkv_meta_pair meta[4];
    for (int i = 0; i < 4; i++) {
        snprintf(values[i], sizeof values[i], "%lld", (long long)settings[i]);
        meta[i] = (qkv_meta_pair){keys[i], values[i]};
    }
    return save_trained(r->t, r->opt, meta, 4, r->o->save_path);
}

/* A setting the checkpoint f (at path) holds under key, as a whole number; -1 when absent. */
static int64_t saved_setting(const qkv_safetensors *f, const char *key) {
    const char *v = qkv_safetensors_meta(f, key);
    char *end = NULL;
    long long x = v ? strtoll(v, &end, 10) : -1;
    return v && !*end && x >= 0 ? x : -1;
}

static bool same_setting(const qkv_safetensors *f, const char *path, const char *key,
                         const char *flag, int64_t value) {
    int64_t saved = saved_setting(f, key);
    if (saved == value) return true;
    if (saved < 0) qkv_set_error("%s: not a training checkpoint of qkv-classify (no %s)", path,
                                 key);
    else qkv_set_error("%s: the run was trained with %s %lld, not %lld", path, flag,
                       (long long)saved, (long long)value);
    return false;
}

/* Whether f's vocabulary and labels are those this run built from --train. */
static bool same_data(const qkv_safetensors *f, const char *path, const trained *t) {
    qkv_named_bytes mine[2];
    if (!trained_bytes(t, mine)) return false;
    bool same = true;
    for (int i = 0; i < 2; i++) {
        size_t size = 0;
        const void *saved = qkv_safetensors_bytes(f, mine[i].name, &size);
        same = same && saved && size == mine[i].size && !memcmp(saved, mine[i].data, size);
    }
    free_bytes(mine);
    if (!same) qkv_set_error("%s: its vocabulary or labels differ from those of --train", path);
    return same;
}

/* Continues the run whose checkpoint is --load: the same training data, seed, batch size and
 * micro-batch count (any rank count); the model, Adam's state and the generators come from the
 * file, and the data order is replayed to where it stood. *done: the epochs it had trained. */
static bool resume(run *r, int64_t *done) {
    const options *o = r->o;
    const char *path = o->load_path;
    qkv_safetensors *f = qkv_safetensors_read(path);
    bool ok = f && same_setting(f, path, "train.seed", "--seed", o->seed) &&
              same_setting(f, path, "train.batch", "--batch", o->batch) &&
              same_setting(f, path, "train.micro_batches", "--micro-batches",
                           micro_batches(r)) &&
              same_data(f, path, r->t);
    *done = f ? saved_setting(f, "train.epoch") : -1;
    qkv_safetensors_free(f);
    if (ok && (*done < 1 || *done >= o->epochs)) {
        qkv_set_error("%s: it has trained %lld epochs, and --epochs %lld asks for no more", path,
                      (long long)*done, (long long)o->epochs);
        ok = false;
    }
    ok = ok && qkv_checkpoint_load(QKV_MODULE(r->t->model), r->opt, path, NULL);
    for (int64_t e = 0; ok && e < *done; e++) qkv_shuffle(r->order, qkv_dataset_size(r->train),
                                                          r->g);
    return ok;
}

/* ---- The command ------------------------------------------------------------------------- */

static bool prepare(const options *o, qkv_tsv *train, qkv_tsv *test, trained *t,
                    qkv_dataset **dtrain, qkv_dataset **dtest, qkv_generator *g) {
    t->vocab = qkv_vocab_build(o->level, train->texts, train->n, o->min_count, 30000);
    t->labels = qkv_labels_build(train->labels, train->n);
    if (!t->vocab || !t->labels) return false;
    if (!check_test_labels(test, t->labels, o->test_path)) return false;
    *dtrain = qkv_dataset_new(t->vocab, train->texts, t->labels, train->labels, train->n);
    *dtest = qkv_dataset_new(t->vocab, test->texts, t->labels, test->labels, test->n);
    classifier_config c = {
        .vocab_size = qkv_vocab_size(t->vocab), .n_classes = qkv_labels_size(t->labels),
        .max_len = o->max_len, .dim = o->dim, .heads = o->heads, .layers = o->layers,
        .ffn = o->ffn, .dropout = o->dropout,
    };
    if (*dtrain && *dtest) t->model = classifier_new(&c, g);
    if (!t->model) return false;
    int64_t n_params = qkv_module_num_parameters(QKV_MODULE(t->model));
    /* A destination that cannot take the checkpoint is found now, not after the training.
     * Rank 0 alone writes it. */
    if (o->save_path && qkv_dist_rank() == 0 &&
        !qkv_safetensors_writable(o->save_path, (size_t)n_params * 12))
        return false;
    printf("train %lld examples, test %lld, %lld labels, vocabulary %lld, %lld parameters\n",
           (long long)train->n, (long long)test->n, (long long)c.n_classes,
           (long long)c.vocab_size, (long long)n_params);
    return true;
}

/* The data-parallel trainer, for more than one rank or with --micro-batches. */
static bool start_dist(run *r) {
    const options *o = r->o;
    if (qkv_dist_size() == 1 && !o->micro_batches) return true;
    qkv_dist_options d = {.micro_batches = (int)o->micro_batches, .seed = (uint64_t)o->seed};
    r->dist = qkv_dist_trainer_new(QKV_MODULE(r->t->model), &d);
    if (!r->dist) return false;
    r->micro_loss = malloc((size_t)qkv_dist_micro_batches(r->dist) * sizeof *r->micro_loss);
    return r->micro_loss != NULL;
}

static int train_and_report(run *r) {
    const options *o = r->o;
    int64_t ntrain = qkv_dataset_size(r->train), ntest = qkv_dataset_size(r->test);
    int64_t c = qkv_labels_size(r->t->labels), done_epochs = 0;
    r->order = malloc((size_t)ntrain * sizeof *r->order);
    r->pred = malloc((size_t)ntest * sizeof *r->pred);
    r->counts = malloc((size_t)(3 * c + 1) * sizeof *r->counts);
    r->opt = qkv_adam_new();
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(r->t->model));
    int status = 2; /* a refusal; 1 is kept for a loss that stopped being finite */
    if (!r->order || !r->pred || !r->counts || !r->opt || !params ||
        !qkv_optimizer_add_group(r->opt, params, qkv_adam_config(o->lr)) || !start_dist(r))
        goto done;
    for (int64_t i = 0; i < ntrain; i++) r->order[i] = i;
    if (o->load_path && !resume(r, &done_epochs)) goto done;
    double acc = NAN, start = seconds_now();
    for (int64_t e = done_epochs + 1; e <= o->epochs; e++) {
        bool nonfinite = false;
        double loss = train_epoch(r, e, &nonfinite);
        if (isnan(loss)) {
            if (nonfinite) status = 1;
            goto done;
        }
        if (!test_counts(r)) goto done;
        acc = (double)r->counts[3 * c] / (double)ntest;
        printf("epoch %lld train_loss=%.4f test_acc=%.4f seconds=%.1f\n", (long long)e, loss,
               acc, seconds_now() - start);
        fflush(stdout);
        if (o->save_path && !save_epoch(r, e)) goto done;
    }
    report(r);
    if (o->save_path) printf("saved %s\n", o->save_path);
    printf("test_acc=%.3f\n", acc);
    status = 0;
done:
    if (status == 2)
        fprintf(stderr, "qkv-classify: %s\n", qkv_error() ? qkv_error() : "out of memory");
    qkv_named_list_free(params);
    qkv_dist_trainer_free(r->dist);
    qkv_optimizer_free(r->opt);
    free(r->micro_loss);
    free(r->order);
    free(r->pred);
    free(r->counts);
    return status;
}

int run_train(const options *o) {
    qkv_generator g;
    qkv_generator_init(&g, (uint64_t)o->seed);
    qkv_tsv *train = read_tsv(o->train_path), *test = train ? read_tsv(o->test_path) : NULL;
    trained t = {0};
    run r = {.o = o, .t = &t, .g = &g};
    int status = 2;
    if (train && test) {
        if (prepare(o, train, test, &t, &r.train, &r.test, &g))
            status = train_and_report(&r);
        else if (qkv_error())
            fprintf(stderr, "qkv-classify: %s\n", qkv_error());
    }
    qkv_dataset_free(r.train);
    qkv_dataset_free(r.test);
    trained_free(&t);
    qkv_tsv_free(train);
    qkv_tsv_free(test);
    return status;
}
