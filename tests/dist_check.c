/*
 * The dist layer across ranks, run under mpirun by tests/dist_mpi.sh (at 1, 2 and 4 ranks).
 * Each command checks on every rank and exits 0 when all is as expected, 1 otherwise,
 * printing what differed:
 *   dist_check collectives
 *       all-reduce (sum, mean, max) and broadcast of every dtype against hand-computed values,
 *       empty tensors, sizes that do not split evenly, the broadcast of a module and of an
 *       optimizer, tree sums and counts, and a size mismatch refused on every rank;
 *   dist_check train M STEPS OUT [--resume CKPT] [--save CKPT AT] [--die|--kill AT] [--plain]
 *       trains tests/dist_model.h to STEPS steps with M micro-batches and writes the weights
 *       to OUT (rank 0); --resume loads a checkpoint first, --save writes one after step AT,
 *       --die makes rank 1 leave the job in the middle of step AT (--kill: killed by
 *       SIGKILL);
 *   dist_check mismatch params|shapes|micro
 *       rank 1 builds a model with one more parameter or another head, or uses twice the
 *       micro-batches: the trainer's creation must fail on every rank with a message naming
 *       rank 1.
 */
#include <inttypes.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "dist_model.h"

static int failures;

#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "rank %d: %s:%d: ", qkv_dist_rank(), __FILE__, __LINE__);        \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, " (%s)\n", qkv_error() ? qkv_error() : "no error");               \
            failures++;                                                                       \
            qkv_clear_error();                                                                \
        }                                                                                     \
    } while (0)

/* ---- Collectives ------------------------------------------------------------------------- */

static void check_floats(qkv_dist_op op, int n, int r) {
    /* Rank r holds 0.5 (r + 1) (i + 1): sums are exact in binary, whatever the order. */
    float f[5];
    double d[7];
    for (int i = 0; i < 7; i++) {
        if (i < 5) f[i] = 0.5f * (float)(r + 1) * (float)(i + 1);
        d[i] = 0.5 * (r + 1) * (i + 1);
    }
    qkv_tensor *tf = qkv_from_array(QKV_F32, QKV_SHAPE(5), f);
    qkv_tensor *td = qkv_from_array(QKV_F64, QKV_SHAPE(7), d);
    qkv_tensor *th = qkv_to_dtype(tf, QKV_BF16); /* small multiples of 0.25: exact in bf16 */
    CHECK(qkv_dist_all_reduce_list((qkv_tensor *[]){tf, td, th}, 3, op), "all-reduce of floats");
    for (int i = 0; i < 7; i++) {
        double sum = 0.5 * (i + 1) * n * (n + 1) / 2.0;
        double want = op == QKV_DIST_SUM ? sum : op == QKV_DIST_MEAN ? sum / n
                                                                      : 0.5 * (i + 1) * n;
        if (i < 5) {
            CHECK(((float *)qkv_data(tf))[i] == (float)want, "f32 op %d element %d: %g, not %g",
                  (int)op, i, ((float *)qkv_data(tf))[i], want);
            float h = qkv_bf16_to_f32(((uint16_t *)qkv_data(th))[i]);
            CHECK(h == (float)want, "bf16 op %d element %d: %g, not %g", (int)op, i, h, want);
        }
        CHECK(((double *)qkv_data(td))[i] == want, "f64 op %d element %d: %g, not %g", (int)op,
              i, ((double *)qkv_data(td))[i], want);
    }
}

static void check_integers(qkv_dist_op op, int n, int r) {
    int64_t v[3] = {(r + 1) * 1000, (r + 1) * 1000 + 1, INT64_MAX};
    bool b[5];
    for (int i = 0; i < 5; i++) b[i] = i == r;
    qkv_tensor *ti = qkv_from_array(QKV_I64, QKV_SHAPE(3), v);
    qkv_tensor *tb = qkv_from_array(QKV_BOOL, QKV_SHAPE(5), b);
    qkv_tensor *empty = qkv_zeros(QKV_I64, QKV_SHAPE(0, 3));
    CHECK(qkv_dist_all_reduce_list((qkv_tensor *[]){ti, empty, tb}, 3, op), "integers");
    const int64_t *gi = qkv_data(ti);
    int64_t tri = 1000 * (int64_t)n * (n + 1) / 2;
    int64_t want[3] = {tri, tri + n, (int64_t)((uint64_t)INT64_MAX * (uint64_t)n)};
    if (op == QKV_DIST_MAX) {
        want[0] = 1000 * (int64_t)n;
        want[1] = want[0] + 1;
        want[2] = INT64_MAX;
    }
    for (int i = 0; i < 3; i++)
        CHECK(gi[i] == want[i], "i64 op %d element %d: %" PRId64 ", not %" PRId64, (int)op, i,
              gi[i], want[i]);
    for (int i = 0; i < 5; i++)
        CHECK(((bool *)qkv_data(tb))[i] == (i < n), "bool op %d element %d", (int)op, i);
}

static void check_broadcasts(int n, int r) {
    qkv_tensor *t = qkv_full(QKV_I64, QKV_SHAPE(2, 3), r);
    CHECK(qkv_dist_broadcast(t, n - 1), "broadcast");
    for (int i = 0; i < 6; i++)
        CHECK(((int64_t *)qkv_data(t))[i] == n - 1, "broadcast element %d", i);
    dist_model *mine = dist_model_new(100 + (uint64_t)r, DM_CLASSES);
    dist_model *zero = dist_model_new(100, DM_CLASSES);
    CHECK(qkv_dist_broadcast_module(QKV_MODULE(mine)), "module broadcast");
    const qkv_tensor *a = mine->attn->q_proj->weight, *b = zero->attn->q_proj->weight;
    CHECK(!memcmp(qkv_data(a), qkv_data(b), (size_t)a->numel * 4), "module broadcast values");
    /* Rank 0 alone takes an optimizer step; the broadcast gives the others its state. */
    qkv_optimizer *opt = dist_model_optimizer(mine);
    if (r == 0) {
        qkv_scope_begin();
        CHECK(qkv_backward(dist_model_loss(mine, 0, 4, 4)) && qkv_optimizer_step(opt), "step");
        qkv_scope_end();
    }
    CHECK(qkv_dist_broadcast_optimizer(opt), "optimizer broadcast");
    CHECK(qkv_optimizer_steps(opt) == 1, "steps after the broadcast: %lld",
          (long long)qkv_optimizer_steps(opt));
    qkv_tensor *avg = qkv_optimizer_state(opt, 0, 0, "exp_avg");
    float first = avg ? ((float *)qkv_data(avg))[0] : NAN;
    qkv_tensor *ft = qkv_from_array(QKV_F32, QKV_SHAPE(1), &first);
    float mine_first = first;
    CHECK(qkv_dist_broadcast(ft, 0) && ((float *)qkv_data(ft))[0] == mine_first,
          "exp_avg differs from rank 0's");
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(mine));
    qkv_module_free(QKV_MODULE(zero));
}

static double pairwise(const double *v, int n) {
    if (n == 1) return v[0];
    int h = 1;
    while (h * 2 < n) h *= 2;
    return pairwise(v, h) + pairwise(v + h, n - h);
}

static void check_sums(int n, int r) {
    /* Rank r holds r + 1 values of the sequence 1 / (k + 1), k counting over the ranks. */
    double all[64], local[8];
    int total = 0, start = 0;
    for (int q = 0; q < n; q++) {
        if (q == r) start = total;
        for (int j = 0; j <= q; j++, total++) all[total] = 1.0 / (total + 1);
    }
    for (int j = 0; j <= r; j++) local[j] = all[start + j];
    double sum = NAN;
    CHECK(qkv_dist_tree_sum(local, r + 1, &sum), "tree sum");
    CHECK(sum == pairwise(all, total), "tree sum %.17g, not %.17g", sum, pairwise(all, total));
    int64_t counts[2] = {r, 1};
    CHECK(qkv_dist_sum_counts(counts, 2), "counts");
    CHECK(counts[0] == (int64_t)n * (n - 1) / 2 && counts[1] == n, "counts %lld %lld",
          (long long)counts[0], (long long)counts[1]);
    /* Rank 1 gives a tensor of another size: every rank fails, naming it. */
    if (n > 1) {
        qkv_tensor *t = qkv_zeros(QKV_F32, QKV_SHAPE(r == 1 ? 4 : 3));
        bool ok = qkv_dist_all_reduce(t, QKV_DIST_SUM);
        CHECK(!ok && qkv_error() && strstr(qkv_error(), "rank 1"),
              "a size mismatch was not refused on every rank");
        qkv_clear_error();
    }
}

static int collectives(void) {
    int n = qkv_dist_size(), r = qkv_dist_rank();
    qkv_scope_begin();
    for (int op = QKV_DIST_SUM; op <= QKV_DIST_MAX; op++) {
        check_floats((qkv_dist_op)op, n, r);
        if (op != QKV_DIST_MEAN) check_integers((qkv_dist_op)op, n, r);
    }
    check_broadcasts(n, r);
    check_sums(n, r);
    qkv_scope_end();
    return failures;
}

/* ---- Training ---------------------------------------------------------------------------- */

typedef struct train_args {
    int micro;
    int64_t steps, save_at, die_at;
    const char *out, *resume, *save;
    bool plain, kill; /* kill: rank 1 dies of SIGKILL rather than exiting */
} train_args;

static bool parse_train(int argc, char **argv, train_args *a) {
    if (argc < 5) return false;
    *a = (train_args){.micro = atoi(argv[2]), .steps = atoll(argv[3]), .out = argv[4],
                      .save_at = -1, .die_at = -1};
    for (int i = 5; i < argc; i++) {
        if (!strcmp(argv[i], "--resume") && i + 1 < argc) a->resume = argv[++i];
        else if (!strcmp(argv[i], "--save") && i + 2 < argc) {
            a->save = argv[++i];
            a->save_at = atoll(argv[++i]);
        } else if (!strcmp(argv[i], "--die") && i + 1 < argc) a->die_at = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--kill") && i + 1 < argc) {
            a->die_at = atoll(argv[++i]);
            a->kill = true;
        }
        else if (!strcmp(argv[i], "--plain")) a->plain = true;
        else return false;
    }
    return true;
}

/* Rank 1 leaves at the start of step die_at, without a word to MPI, while the others go on
 * into the step's exchange. */
static bool train_until(dist_model *m, qkv_optimizer *opt, qkv_dist_trainer *t,
                        const train_args *a) {
    int64_t from = qkv_optimizer_steps(opt);
    for (int64_t s = from; s < a->steps; s++) {
        if (s == a->die_at && qkv_dist_rank() == 1) {
            fprintf(stderr, "rank 1 leaves the job in step %lld\n", (long long)s);
            if (a->kill) raise(SIGKILL);
            _exit(3);
        }
        if (!dist_model_train(m, opt, t, s, s + 1)) return false;
        if (s + 1 == a->save_at && !qkv_dist_checkpoint_save(QKV_MODULE(m), opt, a->save, NULL))
            return false;
    }
    return true;
}

static int train(int argc, char **argv) {
    train_args a;
    if (!parse_train(argc, argv, &a)) {
        fprintf(stderr, "usage: dist_check train M STEPS OUT [--resume CKPT] [--save CKPT AT] "
                        "[--die AT | --kill AT] [--plain]\n");
        return 2;
    }
    dist_model *m = dist_model_new(42, DM_CLASSES);
    qkv_optimizer *opt = m ? dist_model_optimizer(m) : NULL;
    qkv_dist_trainer *t = opt ? qkv_dist_trainer_new(QKV_MODULE(m), &(qkv_dist_options){
                                    .micro_batches = a.micro, .plain = a.plain, .seed = 7,
                                    .bucket_bytes = 512}) : NULL;
    bool ok = t && (!a.resume || qkv_checkpoint_load(QKV_MODULE(m), opt, a.resume, NULL)) &&
              train_until(m, opt, t, &a) && (qkv_dist_rank() != 0 || dist_model_write(m, a.out));
    CHECK(ok, "training");
    if (ok && qkv_dist_rank() == 0) {
        qkv_dist_stats st = qkv_dist_trainer_stats(t);
        printf("buckets %d, bytes sent %llu, exchange %.6f s, waited %.6f s\n", st.buckets,
               (unsigned long long)st.bytes_sent, st.exchange_seconds, st.wait_seconds);
    }
    qkv_dist_trainer_free(t);
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(m));
    return failures;
}

/* ---- Mismatches -------------------------------------------------------------------------- */

static int mismatch(const char *what) {
    bool params = !strcmp(what, "params"), shapes = !strcmp(what, "shapes");
    dist_model *m = dist_model_new(1, shapes && qkv_dist_rank() == 1 ? 4 : DM_CLASSES);
    int micro = 4;
    if (qkv_dist_rank() == 1 && params)
        qkv_module_add_parameter(QKV_MODULE(m), "extra",
                                 qkv_requires_grad_(qkv_zeros(QKV_F32, QKV_SHAPE(2)), true));
    if (qkv_dist_rank() == 1 && !params && !shapes) micro = 8;
    qkv_dist_trainer *t = qkv_dist_trainer_new(QKV_MODULE(m),
                                               &(qkv_dist_options){.micro_batches = micro});
    const char *want = params   ? "rank 1 has 11 parameters, rank 0 has 10"
                       : shapes ? "shapes or dtypes differ between rank 0 and rank 1"
                                : "rank 1 has 8 micro-batches (M), rank 0 has 4";
    const char *err = qkv_error();
    CHECK(!t && err && strstr(err, want), "expected an error containing \"%s\"", want);
    if (err) printf("rank %d: %s\n", qkv_dist_rank(), err);
    qkv_dist_trainer_free(t);
    qkv_module_free(QKV_MODULE(m));
    return failures;
}

int main(int argc, char **argv) {
    if (!qkv_dist_init(&argc, &argv)) {
        fprintf(stderr, "%s\n", qkv_error());
        return 1;
    }
    const char *threads = getenv("QKV_THREADS");
    if (threads) qkv_set_num_threads(atoi(threads));
    int status = 2;
    if (argc >= 2 && !strcmp(argv[1], "collectives")) status = collectives();
    else if (argc >= 2 && !strcmp(argv[1], "train")) status = train(argc, argv);
    else if (argc >= 3 && !strcmp(argv[1], "mismatch")) status = mismatch(argv[2]);
    else fprintf(stderr, "usage: dist_check collectives | train ... | mismatch WHAT\n");
    qkv_dist_finalize();
    return status ? 1 : 0;
}
