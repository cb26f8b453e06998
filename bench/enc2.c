/*
 * The speed reference "enc2" in qkv, the same model and batch as bench/enc2_torch.py:
 * vocabulary 8192, sequence length 128, batch 32, d_model 256, 4 heads, 2 pre-LN encoder
 * layers (GELU, FFN 1024, dropout 0.1), token + learned position embedding, a key padding mask
 * from random lengths in [32, 128], final layer norm, masked mean pool, linear to 4 classes,
 * cross-entropy, Adam lr 1e-3. The model is the example classifier's.
 *
 * A training step is zero_grad + forward + backward + Adam step inside one scope; an inference
 * batch is a forward in eval mode without recording. Each is timed after --warmup untimed runs
 * and reported as the median over --steps, with the allocator's counters for the timed steps.
 * Last, the training step is timed again in checked mode (train_step_checked_ms).
 * With --bf16, forwards run under autocast (bf16 products, f32 master weights), as
 * bench/enc2_torch.py --bf16 runs them under torch.autocast("cpu", dtype=torch.bfloat16).
 *
 * Data-parallel (`mpirun -np N enc2 --micro-batches M`, bench/dist.sh): the same global batch
 * of 32 on every rank, split into M micro-batches of 32 / M rows (each rank running its
 * contiguous block of M / N), through qkv_dist's trainer; M = 0 is the plain mode (one share
 * of 32 / N rows a rank, bucketed all-reduce). Each micro-batch's loss is its cross-entropy sum
 * over the global 32. Rank 0 prints, with the trainer's communication figures: the gradient's
 * size, the bytes a rank sent per step, the time a blocking all-reduce of the gradient takes
 * alone (comm_ms), and the time a step waited for the exchange after its backward (wait_ms):
 * 1 - wait_ms / comm_ms is the part of the communication the backward hid. --train-only 1
 * skips the inference and checked-mode timings.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "../examples/classify/model.h"

enum { VOCAB = 8192, SEQ_LEN = 128, BATCH = 32, D_MODEL = 256, HEADS = 4, LAYERS = 2,
       FFN = 1024, CLASSES = 4, MIN_LEN = 32 };

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

/* 2*M*N*K for every matmul of one forward pass, padding counted as computed, as the PyTorch
 * script counts it. */
static double forward_flops(void) {
    double tokens = (double)BATCH * SEQ_LEN, d = D_MODEL;
    double per_layer = 2 * tokens * (3 * d * d + SEQ_LEN * d + d * SEQ_LEN + d * d +
                                     2.0 * FFN * d);
    return LAYERS * per_layer + 2.0 * BATCH * CLASSES * d;
}

typedef struct batch {
    qkv_tensor *ids, *pad, *labels;
} batch;

/* The global batch's rows, drawn once; a batch is any range of them. */
typedef struct rows {
    int64_t ids[BATCH * SEQ_LEN], labels[BATCH];
    bool pad[BATCH * SEQ_LEN];
} rows;

static void draw_rows(rows *r, qkv_generator *g) {
    for (int b = 0; b < BATCH; b++) {
        int64_t len = MIN_LEN + (int64_t)qkv_generator_below(g, SEQ_LEN - MIN_LEN + 1);
        for (int t = 0; t < SEQ_LEN; t++) {
            r->pad[b * SEQ_LEN + t] = t >= len;
            r->ids[b * SEQ_LEN + t] = t >= len ? 0
                                               : 1 + (int64_t)qkv_generator_below(g, VOCAB - 1);
        }
        r->labels[b] = (int64_t)qkv_generator_below(g, CLASSES);
    }
}

/* Rows [first, first + n) as tensors kept past every scope. */
static batch make_batch(const rows *r, int64_t first, int64_t n) {
    batch out = {
        qkv_retain(qkv_from_array(QKV_I64, QKV_SHAPE(n, SEQ_LEN), r->ids + first * SEQ_LEN)),
        qkv_retain(qkv_from_array(QKV_BOOL, QKV_SHAPE(n, SEQ_LEN), r->pad + first * SEQ_LEN)),
        qkv_retain(qkv_from_array(QKV_I64, QKV_SHAPE(n), r->labels + first)),
    };
    return out;
}

static void batch_free(batch *b) {
    qkv_release(b->ids);
    qkv_release(b->pad);
    qkv_release(b->labels);
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, compare);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static bool use_bf16; /* --bf16 */

/* This rank's part of data-parallel training: micro-batches first .. first + count - 1. */
typedef struct dist_part {
    qkv_dist_trainer *trainer;
    int first, count;
    batch *micro;
    qkv_dist_stats *stats; /* per timed step */
} dist_part;

/* The model, its optimizer and its batch: the whole batch alone, or a rank's micro-batches. */
typedef struct bench {
    classifier *m;
    qkv_optimizer *opt;
    const batch *b;
    dist_part *dist; /* NULL: one process, no trainer */
} bench;

static bool train_step(const bench *x) {
    qkv_scope_begin();
    qkv_optimizer_zero_grad(x->opt);
    if (use_bf16) qkv_autocast_begin(QKV_BF16);
    qkv_tensor *logits = classifier_forward(x->m, x->b->ids, x->b->pad);
    qkv_tensor *loss = qkv_cross_entropy(logits, x->b->labels, QKV_REDUCTION_MEAN, -100, 0);
    if (use_bf16) qkv_autocast_end();
    bool ok = loss && qkv_backward(loss) && qkv_optimizer_step(x->opt);
    qkv_scope_end();
    return ok;
}

/* Each micro-batch's loss is its share of the global mean; the trainer sums the gradients
 * over every rank's micro-batches before the step. */
static bool dist_train_step(const bench *x) {
    const dist_part *d = x->dist;
    int64_t step = qkv_optimizer_steps(x->opt);
    bool ok = true;
    for (int j = 0; ok && j < d->count; j++) {
        const batch *b = &d->micro[j];
        qkv_scope_begin();
        ok = qkv_dist_micro_begin(d->trainer, step, d->first + j, NULL);
        if (use_bf16) qkv_autocast_begin(QKV_BF16);
        qkv_tensor *logits = ok ? classifier_forward(x->m, b->ids, b->pad) : NULL;
        qkv_tensor *loss = qkv_div_scalar(
            qkv_cross_entropy(logits, b->labels, QKV_REDUCTION_SUM, -100, 0), BATCH);
        if (use_bf16) qkv_autocast_end();
        ok = loss && qkv_dist_backward(d->trainer, loss, d->first + j);
        qkv_scope_end();
    }
    return ok && qkv_dist_finish(d->trainer) && qkv_optimizer_step(x->opt);
}

static bool infer_batch(const bench *x) {
    qkv_scope_begin();
    qkv_no_grad_begin();
    if (use_bf16) qkv_autocast_begin(QKV_BF16);
    bool ok = classifier_forward(x->m, x->b->ids, x->b->pad) != NULL;
    if (use_bf16) qkv_autocast_end();
    qkv_no_grad_end();
    qkv_scope_end();
    return ok;
}

static bool run_step(const bench *x, bool train) {
    if (!train) return infer_batch(x);
    return x->dist ? dist_train_step(x) : train_step(x);
}

typedef struct timing {
    double median_ms;
    uint64_t system_allocs, allocs; /* during the timed runs */
    long page_faults;
} timing;

static long minor_faults(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

static bool run_timed(bool train, const bench *x, int warmup, int steps, timing *out) {
    double *ms = calloc((size_t)steps, sizeof *ms);
    if (!ms) return false;
    bool ok = true;
    for (int i = 0; i < warmup && ok; i++) ok = run_step(x, train);
    qkv_memory_stats before = qkv_memory_stats_get();
    long faults = minor_faults();
    for (int i = 0; i < steps && ok; i++) {
        double t0 = now_ms();
        ok = run_step(x, train);
        ms[i] = now_ms() - t0;
        if (ok && train && x->dist) x->dist->stats[i] = qkv_dist_trainer_stats(x->dist->trainer);
    }
    qkv_memory_stats after = qkv_memory_stats_get();
    out->page_faults = minor_faults() - faults;
    out->median_ms = median(ms, steps);
    out->system_allocs = after.system_allocs - before.system_allocs;
    out->allocs = after.allocs - before.allocs;
    free(ms);
    return ok;
}

/* The trainer and this rank's micro-batches; micro_batches 0 is the plain mode. */
static bool dist_start(dist_part *d, classifier *m, const rows *r, int micro_batches,
                       int steps) {
    qkv_dist_options o = {.micro_batches = micro_batches, .plain = micro_batches == 0};
    d->trainer = qkv_dist_trainer_new(QKV_MODULE(m), &o);
    if (!d->trainer || !qkv_dist_micro_range(d->trainer, &d->first, &d->count)) return false;
    int total = qkv_dist_micro_batches(d->trainer);
    if (BATCH % total) {
        qkv_set_error("enc2: %d micro-batches do not divide the batch of %d", total, BATCH);
        return false;
    }
    d->micro = calloc((size_t)d->count, sizeof *d->micro);
    d->stats = calloc((size_t)steps, sizeof *d->stats);
    if (!d->micro || !d->stats) return false;
    int64_t rows_each = BATCH / total;
    for (int j = 0; j < d->count; j++)
        d->micro[j] = make_batch(r, (d->first + j) * rows_each, rows_each);
    return true;
}

static void dist_end(dist_part *d) {
    for (int j = 0; d->micro && j < d->count; j++) batch_free(&d->micro[j]);
    free(d->micro);
    free(d->stats);
    qkv_dist_trainer_free(d->trainer);
}

/* The median over the timed steps of one of the trainer's figures. */
static double stats_median(const dist_part *d, int steps, int which) {
    double *v = calloc((size_t)steps, sizeof *v);
    if (!v) return NAN;
    for (int i = 0; i < steps; i++)
        v[i] = which == 0 ? (double)d->stats[i].bytes_sent
               : which == 1 ? d->stats[i].wait_seconds : d->stats[i].exchange_seconds;
    double m = median(v, steps);
    free(v);
    return m;
}

/* The median time of a blocking all-reduce of every gradient, as one list (the same bytes
 * as the trainer's exchange, with nothing to hide it behind). */
static double comm_alone_ms(const qkv_module *m, int steps) {
    qkv_named_list *params = qkv_module_parameters(m);
    qkv_tensor **grads = params ? calloc((size_t)params->n, sizeof *grads) : NULL;
    double *ms = calloc((size_t)steps, sizeof *ms);
    double result = NAN;
    bool ok = grads && ms;
    for (int i = 0; ok && i < params->n; i++)
        ok = (grads[i] = qkv_retain(qkv_zeros_like(params->tensors[i]))) != NULL;
    for (int i = 0; ok && i <= steps; i++) {
        ok = qkv_dist_barrier();
        double t0 = now_ms();
        ok = ok && qkv_dist_all_reduce_list(grads, params->n, QKV_DIST_SUM);
        if (i) ms[i - 1] = now_ms() - t0; /* the first is a warm-up */
    }
    if (ok) result = median(ms, steps);
    for (int i = 0; grads && i < params->n; i++) qkv_release(grads[i]);
    free(grads);
    free(ms);
    qkv_named_list_free(params);
    return result;
}

static void print_dist(const bench *x, int micro_batches, int steps, double train_ms,
                       double comm_ms) {
    const dist_part *d = x->dist;
    int64_t params = qkv_module_num_parameters(QKV_MODULE(x->m));
    printf("ranks=%d\n", qkv_dist_size());
    printf("mode=%s\n", micro_batches ? "micro-batches" : "plain");
    printf("micro_batches=%d\n", qkv_dist_micro_batches(d->trainer));
    printf("grad_mb=%.2f\n", (double)params * 4 / 1e6);
    printf("sent_mb_per_rank=%.2f\n", stats_median(d, steps, 0) / 1e6);
    printf("comm_ms=%.2f\n", comm_ms);
    printf("wait_ms=%.2f\n", 1e3 * stats_median(d, steps, 1));
    printf("exchange_ms=%.2f\n", 1e3 * stats_median(d, steps, 2));
    printf("train_step_ms=%.2f\n", train_ms);
}

int main(int argc, char **argv) {
    int threads = 1, warmup = 3, steps = 10, micro_batches = -1, train_only = 0;
    if (!qkv_dist_init(&argc, &argv)) {
        fprintf(stderr, "enc2: %s\n", qkv_error());
        return 1;
    }
    bool usage = false;
    for (int i = 1; i < argc; i += 2) {
        if (!strcmp(argv[i], "--bf16")) {
            use_bf16 = true;
            i--;
        } else if (i + 1 >= argc) {
            usage = true;
        } else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--micro-batches")) micro_batches = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--train-only")) train_only = atoi(argv[i + 1]);
    }
    if (qkv_dist_size() > 1 && micro_batches < 0) micro_batches = 0;
    if (threads < 1 || warmup < 0 || steps < 1 || usage) {
        fprintf(stderr, "usage: enc2 [--threads N] [--warmup 3] [--steps 10] [--bf16] "
                "[--micro-batches M (0: plain mode)] [--train-only 0|1]\n");
        return 2;
    }
    qkv_set_num_threads(threads);
    qkv_generator g;
    qkv_generator_init(&g, 0);
    classifier_config c = {VOCAB, CLASSES, SEQ_LEN, D_MODEL, HEADS, LAYERS, FFN, 0.1};
    classifier *m = classifier_new(&c, &g);
    qkv_optimizer *opt = qkv_adam_new();
    qkv_named_list *params = m ? qkv_module_parameters(QKV_MODULE(m)) : NULL;
    static rows r;
    draw_rows(&r, &g);
    batch b = make_batch(&r, 0, BATCH);
    dist_part d = {0};
    bench x = {.m = m, .opt = opt, .b = &b, .dist = micro_batches >= 0 ? &d : NULL};
    timing train = {0}, infer = {0};
    bool ok = m && opt && params && qkv_optimizer_add_group(opt, params, qkv_adam_config(1e-3));
    if (ok && x.dist) ok = dist_start(&d, m, &r, micro_batches, steps);
    if (ok) {
        qkv_module_train(QKV_MODULE(m), true);
        ok = run_timed(true, &x, warmup, steps, &train);
    }
    double comm_ms = ok && x.dist ? comm_alone_ms(QKV_MODULE(m), steps) : 0;
    if (ok && !train_only) {
        qkv_module_train(QKV_MODULE(m), false);
        ok = run_timed(false, &x, warmup, steps, &infer);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    /* The same training step in checked mode (QKV_DEBUG=1), last: its quarantine of freed
     * tensors would count in the peak above. */
    timing checked = {0};
    if (ok && !train_only) {
        bool was = qkv_is_debug();
        qkv_module_train(QKV_MODULE(m), true);
        qkv_debug(true);
        ok = run_timed(true, &x, warmup, steps, &checked);
        qkv_debug(was);
    }
    if (!ok) {
        fprintf(stderr, "enc2: %s\n", qkv_error() ? qkv_error() : "failed");
        return 1;
    }
    double flops = 3 * forward_flops();
    if (qkv_dist_rank() == 0) {
        printf("threads=%d\n", threads);
        printf("bf16=%d\n", use_bf16);
        printf("params=%lld\n", (long long)qkv_module_num_parameters(QKV_MODULE(m)));
        printf("flops_per_step=%.0f\n", flops);
        if (x.dist) print_dist(&x, micro_batches, steps, train.median_ms, comm_ms);
        else printf("train_step_ms=%.2f\n", train.median_ms);
    }
    if (qkv_dist_rank() == 0 && !train_only) {
        printf("infer_batch_ms=%.2f\n", infer.median_ms);
        printf("train_step_checked_ms=%.2f\n", checked.median_ms);
        printf("train_gflops=%.2f\n", flops / (train.median_ms * 1e-3) / 1e9);
        printf("peak_rss_mb=%.1f\n", (double)ru.ru_maxrss / 1024);
        qkv_memory_stats ms = qkv_memory_stats_get();
        printf("peak_tensor_mb=%.1f\n", (double)ms.peak_bytes / (1 << 20));
        printf("cached_mb=%.1f\n", (double)ms.cached_bytes / (1 << 20));
        printf("steady_system_allocs_per_step=%.2f\n", (double)train.system_allocs / steps);
        printf("allocator_requests_per_step=%.0f\n", (double)train.allocs / steps);
        printf("page_faults_per_step=%.0f\n", (double)train.page_faults / steps);
    }
    if (x.dist) dist_end(&d);
    batch_free(&b);
    qkv_named_list_free(params);
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(m));
    qkv_dist_finalize();
    return 0;
}
