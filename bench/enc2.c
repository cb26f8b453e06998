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
 */
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

static batch make_batch(qkv_generator *g) {
    int64_t ids[BATCH * SEQ_LEN], labels[BATCH];
    bool pad[BATCH * SEQ_LEN];
    for (int b = 0; b < BATCH; b++) {
        int64_t len = MIN_LEN + (int64_t)qkv_generator_below(g, SEQ_LEN - MIN_LEN + 1);
        for (int t = 0; t < SEQ_LEN; t++) {
            pad[b * SEQ_LEN + t] = t >= len;
            ids[b * SEQ_LEN + t] = t >= len ? 0 : 1 + (int64_t)qkv_generator_below(g, VOCAB - 1);
        }
        labels[b] = (int64_t)qkv_generator_below(g, CLASSES);
    }
    batch out = {
        qkv_retain(qkv_from_array(QKV_I64, QKV_SHAPE(BATCH, SEQ_LEN), ids)),
        qkv_retain(qkv_from_array(QKV_BOOL, QKV_SHAPE(BATCH, SEQ_LEN), pad)),
        qkv_retain(qkv_from_array(QKV_I64, QKV_SHAPE(BATCH), labels)),
    };
    return out;
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

static bool train_step(classifier *m, qkv_optimizer *opt, const batch *b) {
    qkv_scope_begin();
    qkv_optimizer_zero_grad(opt);
    if (use_bf16) qkv_autocast_begin(QKV_BF16);
    qkv_tensor *logits = classifier_forward(m, b->ids, b->pad);
    qkv_tensor *loss = qkv_cross_entropy(logits, b->labels, QKV_REDUCTION_MEAN, -100, 0);
    if (use_bf16) qkv_autocast_end();
    bool ok = loss && qkv_backward(loss) && qkv_optimizer_step(opt);
    qkv_scope_end();
    return ok;
}

static bool infer_batch(classifier *m, const batch *b) {
    qkv_scope_begin();
    qkv_no_grad_begin();
    if (use_bf16) qkv_autocast_begin(QKV_BF16);
    bool ok = classifier_forward(m, b->ids, b->pad) != NULL;
    if (use_bf16) qkv_autocast_end();
    qkv_no_grad_end();
    qkv_scope_end();
    return ok;
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

static bool run_timed(bool train, classifier *m, qkv_optimizer *opt, const batch *b,
                      int warmup, int steps, timing *out) {
    double *ms = calloc((size_t)steps, sizeof *ms);
    if (!ms) return false;
    bool ok = true;
    for (int i = 0; i < warmup && ok; i++) ok = train ? train_step(m, opt, b) : infer_batch(m, b);
    qkv_memory_stats before = qkv_memory_stats_get();
    long faults = minor_faults();
    for (int i = 0; i < steps && ok; i++) {
        double t0 = now_ms();
        ok = train ? train_step(m, opt, b) : infer_batch(m, b);
        ms[i] = now_ms() - t0;
    }
    qkv_memory_stats after = qkv_memory_stats_get();
    out->page_faults = minor_faults() - faults;
    out->median_ms = median(ms, steps);
    out->system_allocs = after.system_allocs - before.system_allocs;
    out->allocs = after.allocs - before.allocs;
    free(ms);
    return ok;
}

int main(int argc, char **argv) {
    int threads = 1, warmup = 3, steps = 10;
    for (int i = 1; i < argc; i += 2) {
        if (!strcmp(argv[i], "--bf16")) {
            use_bf16 = true;
            i--;
        } else if (i + 1 >= argc) {
            steps = 0;
        } else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
    }
    if (threads < 1 || warmup < 0 || steps < 1) {
        fprintf(stderr, "usage: enc2 [--threads N] [--warmup 3] [--steps 10] [--bf16]\n");
        return 2;
    }
    qkv_set_num_threads(threads);
    qkv_generator g;
    qkv_generator_init(&g, 0);
    classifier_config c = {VOCAB, CLASSES, SEQ_LEN, D_MODEL, HEADS, LAYERS, FFN, 0.1};
    classifier *m = classifier_new(&c, &g);
    qkv_optimizer *opt = qkv_adam_new();
    qkv_named_list *params = m ? qkv_module_parameters(QKV_MODULE(m)) : NULL;
    batch b = make_batch(&g);
    timing train = {0}, infer = {0};
    bool ok = m && opt && params && qkv_optimizer_add_group(opt, params, qkv_adam_config(1e-3));
    if (ok) {
        qkv_module_train(QKV_MODULE(m), true);
        ok = run_timed(true, m, opt, &b, warmup, steps, &train);
    }
    if (ok) {
        qkv_module_train(QKV_MODULE(m), false);
        ok = run_timed(false, m, opt, &b, warmup, steps, &infer);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    /* The same training step in checked mode (QKV_DEBUG=1), last: its quarantine of freed
     * tensors would count in the peak above. */
    timing checked = {0};
    if (ok) {
        bool was = qkv_is_debug();
        qkv_module_train(QKV_MODULE(m), true);
        qkv_debug(true);
        ok = run_timed(true, m, opt, &b, warmup, steps, &checked);
        qkv_debug(was);
    }
    if (!ok) {
        fprintf(stderr, "enc2: %s\n", qkv_error() ? qkv_error() : "failed");
        return 1;
    }
    double flops = 3 * forward_flops();
    printf("threads=%d\n", threads);
    printf("bf16=%d\n", use_bf16);
    printf("params=%lld\n", (long long)qkv_module_num_parameters(QKV_MODULE(m)));
    printf("flops_per_step=%.0f\n", flops);
    printf("train_step_ms=%.2f\n", train.median_ms);
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
    qkv_release(b.ids);
    qkv_release(b.pad);
    qkv_release(b.labels);
    qkv_named_list_free(params);
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(m));
    return 0;
}
