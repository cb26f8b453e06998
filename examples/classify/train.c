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

/* The mean loss of an epoch; NAN on error, with *nonfinite set when the cause was a loss
 * that stopped being finite (no op failed). */
static double train_epoch(classifier *m, qkv_optimizer *opt, const qkv_dataset *ds,
                          const options *o, int64_t epoch, int64_t *order, qkv_generator *g,
                          bool *nonfinite) {
    int64_t n = qkv_dataset_size(ds), batches = (n + o->batch - 1) / o->batch;
    progress p = {.live = isatty(STDOUT_FILENO), .start = seconds_now()};
    double total = 0;
    qkv_shuffle(order, n, g);
    qkv_module_train(QKV_MODULE(m), true);
    for (int64_t k = 0; k < batches; k++) {
        int64_t off = k * o->batch, count = n - off < o->batch ? n - off : o->batch;
        qkv_scope_begin();
        qkv_batch b = make_batch(ds, order + off, count, o->max_len);
        double loss = b.ids ? train_step(m, opt, &b, o->bf16) : NAN;
        if (isnan(loss) && b.ids && !qkv_error()) {
            *nonfinite = true;
            explain_nonfinite(m, &b, epoch, k + 1);
        }
        p.tokens += b.ids ? b.ids->numel : 0;
        qkv_scope_end();
        if (isnan(loss)) return NAN;
        total += loss;
        progress_draw(&p, epoch, k + 1, batches, total / (double)(k + 1));
    }
    if (p.live) printf("\r\033[K");
    return total / (double)batches;
}

static double accuracy(classifier *m, const qkv_dataset *ds, const options *o, int64_t *pred) {
    if (o->bf16) qkv_autocast_begin(QKV_BF16);
    bool ok = predict_all(m, ds, o->max_len, pred, NULL);
    if (o->bf16) qkv_autocast_end();
    if (!ok) return NAN;
    int64_t right = 0, n = qkv_dataset_size(ds);
    for (int64_t i = 0; i < n; i++) right += pred[i] == qkv_dataset_label(ds, i);
    return (double)right / (double)n;
}

/* ---- Report ------------------------------------------------------------------------------ */

static void report(const qkv_dataset *train, const qkv_dataset *test, const qkv_labels *labels,
                   const int64_t *pred) {
    int64_t c = qkv_labels_size(labels), n = qkv_dataset_size(test);
    int64_t *counts = calloc((size_t)c * 4, sizeof *counts); /* train, tp, predicted, actual */
    if (!counts) return;
    for (int64_t i = 0; i < qkv_dataset_size(train); i++) counts[qkv_dataset_label(train, i)]++;
    int64_t majority = 0;
    for (int64_t k = 1; k < c; k++)
        if (counts[k] > counts[majority]) majority = k;
    int64_t majority_right = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t y = qkv_dataset_label(test, i);
        majority_right += y == majority;
        counts[c + y] += pred[i] == y;
        counts[2 * c + pred[i]]++;
        counts[3 * c + y]++;
    }
    printf("majority class '%s': test_acc=%.3f\n", qkv_labels_name(labels, majority),
           (double)majority_right / (double)n);
    printf("%-24s %9s %9s %8s\n", "label", "precision", "recall", "support");
    for (int64_t k = 0; k < c; k++) {
        int64_t tp = counts[c + k], predicted = counts[2 * c + k], actual = counts[3 * c + k];
        printf("%-24s %9.3f %9.3f %8lld\n", qkv_labels_name(labels, k),
               predicted ? (double)tp / (double)predicted : 0.0,
               actual ? (double)tp / (double)actual : 0.0, (long long)actual);
    }
    free(counts);
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
    /* A destination that cannot take the checkpoint is found now, not after the training. */
    if (o->save_path && !qkv_safetensors_writable(o->save_path, (size_t)n_params * 4))
        return false;
    printf("train %lld examples, test %lld, %lld labels, vocabulary %lld, %lld parameters\n",
           (long long)train->n, (long long)test->n, (long long)c.n_classes,
           (long long)c.vocab_size, (long long)n_params);
    return true;
}

static int train_and_report(const options *o, trained *t, qkv_dataset *dtrain,
                            qkv_dataset *dtest, qkv_generator *g) {
    int64_t ntrain = qkv_dataset_size(dtrain), ntest = qkv_dataset_size(dtest);
    int64_t *order = malloc((size_t)ntrain * sizeof *order);
    int64_t *pred = malloc((size_t)ntest * sizeof *pred);
    qkv_optimizer *opt = qkv_adam_new();
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(t->model));
    int status = 2; /* a refusal; 1 is kept for a loss that stopped being finite */
    if (!order || !pred || !opt || !params ||
        !qkv_optimizer_add_group(opt, params, qkv_adam_config(o->lr)))
        goto done;
    for (int64_t i = 0; i < ntrain; i++) order[i] = i;
    double acc = NAN, start = seconds_now();
    for (int64_t e = 1; e <= o->epochs; e++) {
        bool nonfinite = false;
        double loss = train_epoch(t->model, opt, dtrain, o, e, order, g, &nonfinite);
        if (isnan(loss)) {
            if (nonfinite) status = 1;
            goto done;
        }
        acc = accuracy(t->model, dtest, o, pred);
        printf("epoch %lld train_loss=%.4f test_acc=%.4f seconds=%.1f\n", (long long)e, loss,
               acc, seconds_now() - start);
        fflush(stdout);
    }
    report(dtrain, dtest, t->labels, pred);
    if (o->save_path) {
        if (!save_trained(t, o->save_path)) goto done;
        printf("saved %s\n", o->save_path);
    }
    printf("test_acc=%.3f\n", acc);
    status = 0;
done:
    if (status == 2)
        fprintf(stderr, "qkv-classify: %s\n", qkv_error() ? qkv_error() : "out of memory");
    qkv_named_list_free(params);
    qkv_optimizer_free(opt);
    free(order);
    free(pred);
    return status;
}

int run_train(const options *o) {
    qkv_generator g;
    qkv_generator_init(&g, (uint64_t)o->seed);
    qkv_tsv *train = read_tsv(o->train_path), *test = train ? read_tsv(o->test_path) : NULL;
    trained t = {0};
    qkv_dataset *dtrain = NULL, *dtest = NULL;
    int status = 2;
    if (train && test) {
        if (prepare(o, train, test, &t, &dtrain, &dtest, &g))
            status = train_and_report(o, &t, dtrain, dtest, &g);
        else if (qkv_error())
            fprintf(stderr, "qkv-classify: %s\n", qkv_error());
    }
    qkv_dataset_free(dtrain);
    qkv_dataset_free(dtest);
    trained_free(&t);
    qkv_tsv_free(train);
    qkv_tsv_free(test);
    return status;
}
