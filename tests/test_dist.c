/* The dist layer in a world of one process (dist/dist.h): collectives keep their values, the
 * fixed tree of sums, micro-batch ranges by sample index, the trainer's tree over micro-batch
 * gradients, draws keyed by step and micro-batch, settings refused at creation, and resuming
 * from a checkpoint to the bit. tests/dist_mpi.sh runs tests/dist_check.c under mpirun for
 * 2 and 4 ranks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qkv.h"
#include "dist_model.h"
#include "harness.h"

/* ---- Collectives ------------------------------------------------------------------------- */

static void all_reduce_of_one_rank_keeps_every_dtype(void **state) {
    (void)state;
    qkv_tensor *f = qkv_from_array(QKV_F32, QKV_SHAPE(3), (float[]){1.5f, -2, 0});
    qkv_tensor *d = qkv_from_array(QKV_F64, QKV_SHAPE(2), (double[]){0.1, 1e300});
    qkv_tensor *i = qkv_from_array(QKV_I64, QKV_SHAPE(2), (int64_t[]){INT64_MAX, -7});
    qkv_tensor *b = qkv_from_array(QKV_BOOL, QKV_SHAPE(2), (bool[]){true, false});
    qkv_tensor *e = qkv_zeros(QKV_F32, QKV_SHAPE(0));
    for (int op = QKV_DIST_SUM; op <= QKV_DIST_MAX; op++) {
        assert_true(qkv_dist_all_reduce_list((qkv_tensor *[]){f, d}, 2, (qkv_dist_op)op));
        assert_true(qkv_dist_all_reduce(e, (qkv_dist_op)op));
        if (op == QKV_DIST_MEAN) continue;
        assert_true(qkv_dist_all_reduce_list((qkv_tensor *[]){i, b}, 2, (qkv_dist_op)op));
    }
    assert_true(((float *)qkv_data(f))[0] == 1.5f && ((float *)qkv_data(f))[1] == -2.0f);
    assert_true(((double *)qkv_data(d))[0] == 0.1 && ((double *)qkv_data(d))[1] == 1e300);
    assert_true(((int64_t *)qkv_data(i))[0] == INT64_MAX);
    assert_true(((bool *)qkv_data(b))[0] && !((bool *)qkv_data(b))[1]);
    assert_true(qkv_dist_broadcast(f, 0));
    assert_null(qkv_error());
}

static void all_reduce_refuses_mean_of_integers_and_strided_tensors(void **state) {
    (void)state;
    qkv_tensor *i = qkv_zeros(QKV_I64, QKV_SHAPE(2));
    assert_false(qkv_dist_all_reduce(i, QKV_DIST_MEAN));
    assert_non_null(strstr(qkv_error(), "mean of a i64 tensor"));
    qkv_clear_error();
    qkv_tensor *t = qkv_transpose(qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)), 0, 1);
    assert_false(qkv_dist_all_reduce(t, QKV_DIST_SUM));
    assert_non_null(strstr(qkv_error(), "contiguous"));
    qkv_clear_error();
    assert_false(qkv_dist_broadcast(i, 1));
    assert_non_null(strstr(qkv_error(), "root 1 out of range for 1 ranks"));
}

static void tree_sum_adds_pairwise(void **state) {
    (void)state;
    /* Left to right gives 1; pairwise, (1e16 + 1) + (-1e16 + 1) rounds to 0. */
    double v[] = {1e16, 1, -1e16, 1}, sum = -1;
    assert_true(qkv_dist_tree_sum(v, 4, &sum));
    assert_true(sum == 0.0);
    /* Three values split at two: (a + b) + c. */
    assert_true(qkv_dist_tree_sum((double[]){1e16, -1e16, 1}, 3, &sum));
    assert_true(sum == 1.0);
    assert_true(qkv_dist_tree_sum(NULL, 0, &sum));
    assert_true(sum == 0.0);
    int64_t counts[] = {3, -4};
    assert_true(qkv_dist_sum_counts(counts, 2));
    assert_int_equal(counts[0], 3);
    assert_int_equal(counts[1], -4);
}

static void broadcast_optimizer_keeps_the_state_of_one_rank(void **state) {
    (void)state;
    dist_model *m = dist_model_new(3, DM_CLASSES);
    qkv_optimizer *opt = dist_model_optimizer(m);
    qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(m), NULL);
    assert_non_null(t);
    assert_true(dist_model_train(m, opt, t, 0, 2));
    qkv_tensor *avg = qkv_optimizer_state(opt, 0, 0, "exp_avg");
    assert_non_null(avg);
    float before = ((float *)qkv_data(avg))[0];
    assert_true(qkv_dist_broadcast_optimizer(opt));
    assert_true(qkv_dist_broadcast_module(QKV_MODULE(m)));
    avg = qkv_optimizer_state(opt, 0, 0, "exp_avg");
    assert_true(((float *)qkv_data(avg))[0] == before);
    assert_int_equal(qkv_optimizer_steps(opt), 2);
    qkv_dist_trainer_free(t);
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(m));
}

/* ---- Micro-batches ----------------------------------------------------------------------- */

static void micro_batches_split_by_sample_position(void **state) {
    (void)state;
    assert_int_equal(qkv_num_batches(45, 16), 3);
    assert_int_equal(qkv_num_batches(0, 16), 0);
    assert_int_equal(qkv_batch_count(45, 16, 1), 16);
    assert_int_equal(qkv_batch_count(45, 16, 2), 13);
    assert_int_equal(qkv_batch_count(45, 16, 3), -1);
    qkv_clear_error();
    int64_t first, count;
    /* The partial batch: 13 samples from 32 into 4 parts at 13 * k / 4 = 0, 3, 6, 9. */
    int64_t expect[4][2] = {{32, 3}, {35, 3}, {38, 3}, {41, 4}};
    for (int k = 0; k < 4; k++) {
        assert_true(qkv_micro_batch_range(45, 16, 2, 4, k, &first, &count));
        assert_int_equal(first, expect[k][0]);
        assert_int_equal(count, expect[k][1]);
    }
    assert_true(qkv_micro_batch_range(45, 16, 1, 4, 3, &first, &count));
    assert_int_equal(first, 28);
    assert_int_equal(count, 4);
    /* More parts than samples: some are empty. */
    assert_true(qkv_micro_batch_range(3, 16, 0, 4, 0, &first, &count));
    assert_int_equal(count, 0);
    assert_false(qkv_micro_batch_range(45, 16, 3, 4, 0, &first, &count));
    assert_non_null(strstr(qkv_error(), "batch 3 of 3"));
}

/* ---- The trainer ------------------------------------------------------------------------- */

/* Each parameter's gradient after finish is ((g0 + g1) + (g2 + g3)) of the micro-batches'
 * own gradients, each computed alone with the generators the trainer positions. */
static void trainer_sums_micro_batch_gradients_in_a_fixed_tree(void **state) {
    (void)state;
    dist_model *m = dist_model_new(5, DM_CLASSES);
    qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(m),
                                               &(qkv_dist_options){.micro_batches = 4});
    assert_non_null(t);
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(m));
    int np = params->n;
    qkv_tensor *g[4][16] = {{0}};
    assert_true(np <= 16);
    for (int k = 0; k < 4; k++) {
        int64_t first, count;
        assert_true(qkv_micro_batch_range(DM_SAMPLES, DM_BATCH, 0, 4, k, &first, &count));
        assert_true(qkv_dist_micro_begin(t, 7, k, NULL));
        qkv_scope_begin();
        assert_true(qkv_backward(dist_model_loss(m, first, count, DM_BATCH)));
        qkv_scope_end();
        for (int p = 0; p < np; p++) {
            g[k][p] = qkv_clone(params->tensors[p]->grad);
            qkv_zero_grad(params->tensors[p]);
        }
    }
    for (int k = 0; k < 4; k++) {
        int64_t first, count;
        assert_true(qkv_micro_batch_range(DM_SAMPLES, DM_BATCH, 0, 4, k, &first, &count));
        assert_true(qkv_dist_micro_begin(t, 7, k, NULL));
        qkv_scope_begin();
        assert_true(qkv_dist_backward(t, dist_model_loss(m, first, count, DM_BATCH), k));
        qkv_scope_end();
        for (int p = 0; p < np; p++) assert_null(params->tensors[p]->grad);
    }
    assert_true(qkv_dist_finish(t));
    for (int p = 0; p < np; p++) {
        qkv_tensor *want = qkv_add(qkv_add(g[0][p], g[1][p]), qkv_add(g[2][p], g[3][p]));
        qkv_tensor *got = params->tensors[p]->grad;
        assert_non_null(got);
        assert_memory_equal(qkv_data(got), qkv_data(want), (size_t)want->numel * 4);
    }
    qkv_dist_stats st = qkv_dist_trainer_stats(t);
    assert_true(st.buckets >= 1);
    assert_int_equal(st.bytes_sent, 0);
    qkv_named_list_free(params);
    qkv_dist_trainer_free(t);
    qkv_module_free(QKV_MODULE(m));
}

typedef struct bucket_probe {
    qkv_dist_trainer *t;
    int seen[2]; /* buckets started when the head's bias was final, per micro-batch */
    int micro;
} bucket_probe;

static void probe_buckets(qkv_tensor *leaf, void *ctx) {
    (void)leaf;
    bucket_probe *p = ctx;
    p->seen[p->micro] = qkv_dist_trainer_stats(p->t).buckets;
}

/* Buckets start from the hooks during the last micro-batch's backward: when the head's bias
 * (registered last, so in bucket 0) is final, its bucket has started and the attention's
 * (registered first, final last) have not. In earlier micro-batches nothing starts. */
static void buckets_start_during_the_last_backward(void **state) {
    (void)state;
    dist_model *m = dist_model_new(5, DM_CLASSES);
    qkv_dist_trainer *t = qkv_dist_trainer_new(
        QKV_MODULE(m), &(qkv_dist_options){.micro_batches = 2, .bucket_bytes = 64});
    assert_non_null(t);
    bucket_probe probe = {.t = t};
    qkv_grad_hook *h = qkv_register_grad_hook(m->head->bias, probe_buckets, &probe);
    for (int k = 0; k < 2; k++) {
        int64_t first, count;
        probe.micro = k;
        assert_true(qkv_micro_batch_range(DM_SAMPLES, DM_BATCH, 0, 2, k, &first, &count));
        qkv_scope_begin();
        assert_true(qkv_dist_backward(t, dist_model_loss(m, first, count, DM_BATCH), k));
        qkv_scope_end();
    }
    assert_true(qkv_dist_finish(t));
    int total = qkv_dist_trainer_stats(t).buckets;
    assert_int_equal(probe.seen[0], 0);
    assert_true(probe.seen[1] >= 1);
    assert_true(probe.seen[1] < total);
    assert_true(total >= 4);
    qkv_remove_grad_hook(h);
    qkv_dist_trainer_free(t);
    qkv_module_free(QKV_MODULE(m));
}

static void trainer_draws_depend_on_step_and_micro_batch_only(void **state) {
    (void)state;
    dist_model *m = dist_model_new(5, DM_CLASSES);
    qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(m),
                                               &(qkv_dist_options){.micro_batches = 2});
    qkv_generator a, b, c;
    assert_true(qkv_dist_micro_begin(t, 3, 1, &a));
    qkv_generator dropout = m->attn->generator;
    assert_true(qkv_dist_micro_begin(t, 3, 0, &b));
    assert_true(qkv_dist_micro_begin(t, 3, 1, &c));
    assert_memory_equal(&a, &c, sizeof a);
    assert_memory_not_equal(&a, &b, sizeof a);
    assert_memory_equal(&dropout, &m->attn->generator, sizeof dropout);
    assert_false(qkv_dist_micro_begin(t, 3, 2, NULL));
    assert_non_null(strstr(qkv_error(), "micro-batch 2 out of range"));
    qkv_dist_trainer_free(t);
    qkv_module_free(QKV_MODULE(m));
}

static void trainer_refuses_bad_settings_and_order(void **state) {
    (void)state;
    dist_model *m = dist_model_new(5, DM_CLASSES);
    assert_null(qkv_dist_trainer_new(QKV_MODULE(m), &(qkv_dist_options){.micro_batches = 6}));
    assert_string_equal(qkv_error(), "qkv_dist_trainer_new: 6 micro-batches; M must be a power "
                                     "of two");
    qkv_clear_error();
    qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(m),
                                               &(qkv_dist_options){.micro_batches = 2});
    assert_non_null(t);
    int first = -1, count = -1;
    assert_true(qkv_dist_micro_range(t, &first, &count));
    assert_int_equal(first, 0);
    assert_int_equal(count, 2);
    assert_false(qkv_dist_backward(t, NULL, 1));
    assert_non_null(strstr(qkv_error(), "micro-batch 1 given; this rank's next is 0"));
    qkv_clear_error();
    assert_false(qkv_dist_finish(t));
    assert_non_null(strstr(qkv_error(), "0 of this rank's 2 micro-batches"));
    qkv_clear_error();
    /* Two empty micro-batches: every gradient is zero. */
    assert_true(qkv_dist_backward(t, NULL, 0) && qkv_dist_backward(t, NULL, 1));
    assert_true(qkv_dist_finish(t));
    const qkv_tensor *g = m->head->weight->grad;
    assert_non_null(g);
    for (int64_t i = 0; i < g->numel; i++) assert_true(((float *)qkv_data(g))[i] == 0.0f);
    qkv_dist_trainer_free(t);
    qkv_module_free(QKV_MODULE(m));
}

/* A whole step of a trainer over a linear layer with M = 2, from creation to free; the
 * gradients it leaves are dropped. */
static bool linear_step(qkv_linear *l) {
    qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(l),
                                               &(qkv_dist_options){.micro_batches = 2});
    bool ok = t != NULL;
    for (int k = 0; ok && k < 2; k++) {
        qkv_scope_begin();
        qkv_tensor *x = qkv_full(QKV_F32, QKV_SHAPE(2, 3), k + 1);
        ok = qkv_dist_backward(t, qkv_sum_all(qkv_linear_forward(l, x)), k);
        qkv_scope_end();
    }
    ok = ok && qkv_dist_finish(t);
    if (ok) ok = ((float *)qkv_data(l->weight->grad))[0] == 6.0f; /* 2 rows x (1 + 2) */
    qkv_dist_trainer_free(t);
    qkv_module_zero_grad(QKV_MODULE(l));
    return ok;
}

static void every_allocation_failure_in_a_trainer_step_is_clean(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_linear *l = qkv_linear_new(3, 2, true, &g);
    assert_non_null(l);
    assert_every_allocation_failure_is_clean(linear_step(l));
    qkv_module_free(QKV_MODULE(l));
}

/* 3 steps, a checkpoint, a fresh model and optimizer loaded from it, 2 more steps: the same
 * bits as 5 steps straight. */
static void resume_from_a_checkpoint_continues_to_the_bit(void **state) {
    (void)state;
    char straight[] = "/tmp/qkv_dist_a_XXXXXX", resumed[] = "/tmp/qkv_dist_b_XXXXXX";
    char ckpt[] = "/tmp/qkv_dist_c_XXXXXX";
    close(mkstemp(straight));
    close(mkstemp(resumed));
    close(mkstemp(ckpt));
    for (int run = 0; run < 2; run++) {
        dist_model *m = dist_model_new(9, DM_CLASSES);
        qkv_optimizer *opt = dist_model_optimizer(m);
        qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(m),
                                                   &(qkv_dist_options){.micro_batches = 4});
        assert_non_null(t);
        if (run == 0) {
            assert_true(dist_model_train(m, opt, t, 0, 5));
            assert_true(dist_model_write(m, straight));
        } else {
            assert_true(dist_model_train(m, opt, t, 0, 3));
            assert_true(qkv_dist_checkpoint_save(QKV_MODULE(m), opt, ckpt, NULL));
            qkv_dist_trainer_free(t);
            qkv_optimizer_free(opt);
            qkv_module_free(QKV_MODULE(m));
            m = dist_model_new(10, DM_CLASSES);
            opt = dist_model_optimizer(m);
            t = qkv_dist_trainer_new(QKV_MODULE(m), &(qkv_dist_options){.micro_batches = 4});
            assert_true(qkv_checkpoint_load(QKV_MODULE(m), opt, ckpt, NULL));
            assert_true(dist_model_train(m, opt, t, qkv_optimizer_steps(opt), 5));
            assert_true(dist_model_write(m, resumed));
        }
        qkv_dist_trainer_free(t);
        qkv_optimizer_free(opt);
        qkv_module_free(QKV_MODULE(m));
    }
    FILE *a = fopen(straight, "rb"), *b = fopen(resumed, "rb");
    char ba[4096], bb[4096];
    size_t na = fread(ba, 1, sizeof ba, a), nb = fread(bb, 1, sizeof bb, b);
    fclose(a);
    fclose(b);
    assert_true(na > 0);
    assert_int_equal(na, nb);
    assert_memory_equal(ba, bb, na);
    remove(straight);
    remove(resumed);
    remove(ckpt);
}

int main(void) {
#define T(name) cmocka_unit_test_setup_teardown(name, open_scope, close_scope)
    /* No qkv_dist_init: before it the world is one process in every build, so this suite
     * runs the same with and without MPI, and without MPI's start-up (dist_mpi.sh has it). */
    const struct CMUnitTest tests[] = {
        T(all_reduce_of_one_rank_keeps_every_dtype),
        T(all_reduce_refuses_mean_of_integers_and_strided_tensors),
        T(tree_sum_adds_pairwise),
        T(broadcast_optimizer_keeps_the_state_of_one_rank),
        T(micro_batches_split_by_sample_position),
        T(trainer_sums_micro_batch_gradients_in_a_fixed_tree),
        T(buckets_start_during_the_last_backward),
        T(trainer_draws_depend_on_step_and_micro_batch_only),
        T(trainer_refuses_bad_settings_and_order),
        T(resume_from_a_checkpoint_continues_to_the_bit),
        T(every_allocation_failure_in_a_trainer_step_is_clean),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
