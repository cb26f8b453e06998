/* What docs/threads.md promises to a program that calls qkv from threads of its own, run on
 * several pthreads at once: the allocator and its statistics are shared, built vocabularies,
 * label sets and datasets are read by any number of threads, and errors, scopes, grad mode and
 * anomaly mode are per thread. CI runs this suite under ThreadSanitizer (tools/tsan.sh), which
 * fails on any data race these calls make; the assertions check the results besides. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <string.h>

#include "qkv.h"
#include "harness.h"

enum { N_THREADS = 4, ROUNDS = 40 };

/* Runs fn(arg_i) on N_THREADS threads at once and joins them. */
static void run_threads(void *(*fn)(void *), void *args, size_t arg_size) {
    pthread_t t[N_THREADS];
    for (int i = 0; i < N_THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, fn, (char *)args + (size_t)i * arg_size), 0);
    for (int i = 0; i < N_THREADS; i++) assert_int_equal(pthread_join(t[i], NULL), 0);
}

/* ---- the allocator ----------------------------------------------------------------------- */

typedef struct train_job {
    uint64_t seed;
    double loss; /* the last round's */
    bool ok;
} train_job;

/* A few rounds of a small model's forward and backward, each in a scope of its own: small
 * blocks, arena blocks (the [64,256] products) and graph nodes, made and freed. */
static void *train_rounds(void *arg) {
    train_job *job = arg;
    qkv_generator g;
    qkv_generator_init(&g, job->seed);
    job->ok = true;
    for (int r = 0; r < ROUNDS && job->ok; r++) {
        qkv_scope_begin();
        qkv_tensor *w = qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(128, 256), &g), true);
        qkv_tensor *x = qkv_rand(QKV_F32, QKV_SHAPE(64, 128), &g);
        qkv_tensor *loss = qkv_mean_all(qkv_tanh(qkv_matmul(x, w)));
        job->ok = loss && qkv_backward(loss) && w->grad && !qkv_error();
        if (job->ok) job->loss = qkv_item(loss);
        qkv_memory_stats s = qkv_memory_stats_get();
        job->ok = job->ok && s.bytes_in_use > 0 && s.live_tensors > 0;
        qkv_scope_end();
    }
    return NULL;
}

static void threads_share_the_allocator_and_its_statistics(void **state) {
    (void)state;
    qkv_memory_stats before = qkv_memory_stats_get();
    train_job jobs[N_THREADS];
    for (int i = 0; i < N_THREADS; i++) jobs[i] = (train_job){.seed = 7 + (uint64_t)(i % 2)};
    run_threads(train_rounds, jobs, sizeof *jobs);
    for (int i = 0; i < N_THREADS; i++) assert_true(jobs[i].ok);
    /* one seed, one loss, whatever ran beside it */
    assert_true(jobs[0].loss == jobs[2].loss && jobs[1].loss == jobs[3].loss);
    assert_true(jobs[0].loss != jobs[1].loss);
    qkv_memory_stats after = qkv_memory_stats_get();
    assert_int_equal(after.live_tensors, before.live_tensors);
    assert_int_equal(after.bytes_in_use, before.bytes_in_use);
}

/* ---- data objects ------------------------------------------------------------------------ */

static const char *const texts[] = {"the cat sat", "a dog ran far", "the dog sat down",
                                    "cats and dogs", "a cat", "far far away"};
static const char *const labels[] = {"pos", "neg", "pos", "neg", "pos", "neg"};
enum { N_TEXTS = 6, MAX_LEN = 4 };

typedef struct data_job {
    const qkv_vocab *vocab;
    const qkv_labels *set;
    const qkv_dataset *ds;
    int64_t ids[N_TEXTS][MAX_LEN + 2]; /* encoded texts */
    int64_t batch[N_TEXTS * MAX_LEN];  /* the batch of every example, in reverse order */
    int64_t classes[N_TEXTS];
    bool ok;
} data_job;

static void *read_data(void *arg) {
    data_job *job = arg;
    job->ok = true;
    for (int r = 0; r < ROUNDS && job->ok; r++) {
        for (int i = 0; i < N_TEXTS; i++) {
            memset(job->ids[i], 0, sizeof job->ids[i]);
            job->ok = job->ok && qkv_vocab_encode(job->vocab, texts[i], job->ids[i],
                                                  MAX_LEN + 2) > 0;
            job->classes[i] = qkv_labels_id(job->set, labels[i]);
        }
        job->ok = job->ok && qkv_vocab_id(job->vocab, "cat") > 1 &&
                  qkv_labels_name(job->set, 0) != NULL;
        qkv_scope_begin();
        int64_t idx[N_TEXTS];
        for (int i = 0; i < N_TEXTS; i++) idx[i] = N_TEXTS - 1 - i;
        qkv_batch b = qkv_dataset_batch(job->ds, idx, N_TEXTS, MAX_LEN);
        job->ok = job->ok && b.ids && qkv_copy_out(b.ids, QKV_I64, job->batch);
        qkv_scope_end();
    }
    return NULL;
}

static void threads_share_a_vocabulary_a_label_set_and_a_dataset(void **state) {
    (void)state;
    qkv_vocab *vocab = qkv_vocab_build(QKV_TOKENIZE_WORDS, texts, N_TEXTS, 1, 0);
    qkv_labels *set = qkv_labels_build(labels, N_TEXTS);
    qkv_dataset *ds = vocab && set ? qkv_dataset_new(vocab, texts, set, labels, N_TEXTS) : NULL;
    assert_non_null(ds);
    data_job jobs[N_THREADS + 1];
    for (int i = 0; i <= N_THREADS; i++)
        jobs[i] = (data_job){.vocab = vocab, .set = set, .ds = ds};
    read_data(&jobs[N_THREADS]); /* the same work on one thread, for reference */
    run_threads(read_data, jobs, sizeof *jobs);
    for (int i = 0; i <= N_THREADS; i++) {
        assert_true(jobs[i].ok);
        assert_memory_equal(jobs[i].ids, jobs[N_THREADS].ids, sizeof jobs[i].ids);
        assert_memory_equal(jobs[i].batch, jobs[N_THREADS].batch, sizeof jobs[i].batch);
        assert_memory_equal(jobs[i].classes, jobs[N_THREADS].classes, sizeof jobs[i].classes);
    }
    qkv_dataset_free(ds);
    qkv_labels_free(set);
    qkv_vocab_free(vocab);
}

/* ---- per-thread state -------------------------------------------------------------------- */

typedef struct mode_job {
    int id;
    bool ok;
} mode_job;

/* Each thread sets its own error, scope depth, grad mode and anomaly mode, differently from
 * the others, over and over; none sees another's. */
static void *own_modes(void *arg) {
    mode_job *job = arg;
    bool odd = job->id % 2;
    job->ok = true;
    for (int r = 0; r < ROUNDS && job->ok; r++) {
        qkv_clear_error();
        for (int d = 0; d <= job->id; d++) qkv_scope_begin();
        if (odd) qkv_no_grad_begin();
        qkv_set_detect_anomaly(!odd);
        qkv_tensor *x = qkv_requires_grad_(qkv_ones(QKV_F64, QKV_SHAPE(2)), true);
        qkv_tensor *y = qkv_mul_scalar(x, 2);
        qkv_tensor *bad = qkv_sum(y, job->id + 1, false);
        char want[64];
        snprintf(want, sizeof want, "qkv_sum: axis %d out of range for [2]", job->id + 1);
        job->ok = !bad && qkv_error() && !strcmp(qkv_error(), want) &&
                  qkv_scope_depth() == job->id + 1 && qkv_is_grad_enabled() == !odd &&
                  qkv_is_anomaly_enabled() == !odd && (y->grad_fn != NULL) == !odd;
        qkv_set_detect_anomaly(false);
        if (odd) qkv_no_grad_end();
        for (int d = 0; d <= job->id; d++) qkv_scope_end();
        job->ok = job->ok && qkv_scope_depth() == 0;
    }
    qkv_clear_error();
    return NULL;
}

static void errors_scopes_and_modes_are_per_thread(void **state) {
    (void)state;
    mode_job jobs[N_THREADS];
    for (int i = 0; i < N_THREADS; i++) jobs[i] = (mode_job){.id = i};
    run_threads(own_modes, jobs, sizeof *jobs);
    for (int i = 0; i < N_THREADS; i++) assert_true(jobs[i].ok);
    assert_null(qkv_error());
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope)
        T(threads_share_the_allocator_and_its_statistics),
        T(threads_share_a_vocabulary_a_label_set_and_a_dataset),
        T(errors_scopes_and_modes_are_per_thread),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
