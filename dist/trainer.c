/*
 * The data-parallel trainer: per-parameter partial sums of the micro-batch gradients (a
 * binary counter over this rank's micro-batches), buckets of parameters in reverse
 * registration order, and their exchange, started from the gradient hooks during the last
 * micro-batch's backward and finished before the optimizer step. dist.h states the design.
 */
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd.h"
#include "dist/dist_internal.h"

#define FN_NEW "qkv_dist_trainer_new"
#define LEVELS 32 /* partial sums per parameter: M / N up to 2^31 */

enum phase { IDLE, SCATTERING, GATHERING, DONE };

typedef struct slot {
    qkv_dist_trainer *t;
    qkv_tensor *param;
    qkv_grad_hook *hook;
    int bucket;
    int64_t offset;             /* elements into its bucket */
    qkv_tensor *level[LEVELS];  /* partial sums of 2^k micro-batches, held; NULL: zeros */
    bool full[LEVELS];
    bool pushed;                /* the running micro-batch's gradient is in */
} slot;

typedef struct bucket {
    qkv_dtype dtype;
    int64_t numel;
    int n_members, ready;
    int *members;               /* slots, in reverse registration order */
    void *data;                 /* packed local sums, then the reduced result */
    void *recv;                 /* deterministic mode: every rank's copy of this rank's slice */
    int *counts;                /* 4 * N: slice sizes and starts, received sizes and starts */
    enum phase phase;
#ifdef QKV_HAVE_MPI
    MPI_Request request;
#endif
} bucket;

struct qkv_dist_trainer {
    qkv_module *model;
    qkv_dist_options options;
    int micro_batches, ranks, rank, first, count;
    int n_slots, n_buckets;
    slot *slots;                /* registration order */
    bucket *buckets;            /* bucket 0 holds the last registered parameters */
    qkv_generator_list *generators;
    int done_micro;             /* this rank's micro-batches of the running step so far */
    bool active, last, failed;
    int next_start, next_gather; /* buckets start each phase in order, the same on every rank */
    int64_t signature[5];       /* M, plain, parameters, bucket bytes, hash of shapes */
    double first_start;
    qkv_dist_stats stats;
};

static int log2_exact(int n) {
    int k = 0;
    while ((1 << k) < n) k++;
    return k;
}

static bool power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

/* ---- Partial sums ------------------------------------------------------------------------ */

/* left + right, either NULL for zeros; the result is held by the caller. */
static qkv_tensor *combine(qkv_tensor *left, qkv_tensor *right) {
    if (!left) return right;
    if (!right) return left;
    qkv_scope_begin();
    qkv_tensor *sum = qkv_add(left, right);
    if (sum) qkv__retain(sum);
    qkv_scope_end();
    qkv__release(left);
    qkv__release(right);
    return sum;
}

/* Adds one micro-batch's gradient g (held, or NULL for none) to the counter: equal-sized
 * partial sums merge, left (earlier micro-batches) + right, as the tree over micro-batches
 * does. */
static bool push(slot *s, qkv_tensor *g) {
    int k = 0;
    for (; k < LEVELS && s->full[k]; k++) {
        g = combine(s->level[k], g);
        s->level[k] = NULL;
        s->full[k] = false;
        if (!g && qkv_error()) return false;
    }
    if (k == LEVELS) return qkv_set_error("qkv_dist_backward: too many micro-batches"), false;
    s->level[k] = g;
    s->full[k] = true;
    return true;
}

static void clear_levels(slot *s) {
    for (int k = 0; k < LEVELS; k++) {
        qkv__release(s->level[k]);
        s->level[k] = NULL;
        s->full[k] = false;
    }
}

/* ---- Exchange ---------------------------------------------------------------------------- */

static void pack(qkv_dist_trainer *t, bucket *b) {
    size_t es = qkv_dtype_size(b->dtype);
    int top = log2_exact(t->count);
    for (int i = 0; i < b->n_members; i++) {
        slot *s = &t->slots[b->members[i]];
        char *dst = (char *)b->data + (size_t)s->offset * es;
        size_t bytes = (size_t)s->param->numel * es;
        qkv_tensor *sum = s->level[top];
        if (sum) qkv_copy_out(sum, b->dtype, dst);
        else memset(dst, 0, bytes);
        clear_levels(s);
    }
}

static bool start(qkv_dist_trainer *t, bucket *b) {
    pack(t, b);
    if (!t->first_start) t->first_start = qkv__dist_now();
    t->stats.buckets++;
    if (t->ranks == 1) {
        b->phase = DONE;
        return true;
    }
#ifdef QKV_HAVE_MPI
    MPI_Datatype type = qkv__dist_mpi_type(b->dtype);
    size_t es = qkv_dtype_size(b->dtype);
    int n = t->ranks, *c = b->counts;
    if (t->options.plain) {
        b->phase = GATHERING;
        t->stats.bytes_sent += 2 * (uint64_t)b->numel * es * (uint64_t)(n - 1) / (uint64_t)n;
        return qkv__dist_ok(MPI_Iallreduce(MPI_IN_PLACE, b->data, (int)b->numel, type, MPI_SUM,
                                           qkv__dist_comm(), &b->request),
                            "qkv_dist_backward", "MPI_Iallreduce");
    }
    b->phase = SCATTERING;
    t->stats.bytes_sent += (uint64_t)(b->numel - c[t->rank]) * es;
    return qkv__dist_ok(MPI_Ialltoallv(b->data, c, c + n, type, b->recv, c + 2 * n, c + 3 * n,
                                       type, qkv__dist_comm(), &b->request),
                        "qkv_dist_backward", "MPI_Ialltoallv");
#else
    return false;
#endif
}

#ifdef QKV_HAVE_MPI
/* This rank's slice of a scattered bucket: the N partial sums in tree order over the rank
 * index, then the all-gather of every slice. */
static bool gather(qkv_dist_trainer *t, bucket *b) {
    int n = t->ranks, *c = b->counts;
    size_t es = qkv_dtype_size(b->dtype);
    qkv__dist_tree_sum(b->recv, n, c[2 * n], b->dtype);
    memcpy((char *)b->data + (size_t)c[n + t->rank] * es, b->recv, (size_t)c[2 * n] * es);
    b->phase = GATHERING;
    t->stats.bytes_sent += (uint64_t)c[t->rank] * es * (uint64_t)(n - 1);
    return qkv__dist_ok(MPI_Iallgatherv(MPI_IN_PLACE, 0, qkv__dist_mpi_type(b->dtype), b->data,
                                        c, c + n, qkv__dist_mpi_type(b->dtype),
                                        qkv__dist_comm2(), &b->request),
                        "qkv_dist_finish", "MPI_Iallgatherv");
}
#endif

/* Moves the exchanges on: scattered buckets start their gather, in bucket order. With wait,
 * until every bucket is done. */
static bool progress(qkv_dist_trainer *t, bool wait) {
#ifdef QKV_HAVE_MPI
    for (int i = t->next_gather; i < t->next_start; i++) {
        bucket *b = &t->buckets[i];
        if (b->phase == SCATTERING) {
            int flag = 1;
            int rc = wait ? MPI_Wait(&b->request, MPI_STATUS_IGNORE)
                          : MPI_Test(&b->request, &flag, MPI_STATUS_IGNORE);
            if (!qkv__dist_ok(rc, "qkv_dist_finish", wait ? "MPI_Wait" : "MPI_Test"))
                return false;
            if (!flag) return true;
            if (!gather(t, b)) return false;
        }
        t->next_gather = i + 1;
    }
    if (!wait) return true;
    for (int i = 0; i < t->n_buckets; i++) {
        bucket *b = &t->buckets[i];
        if (b->phase != GATHERING) continue;
        if (!qkv__dist_ok(MPI_Wait(&b->request, MPI_STATUS_IGNORE), "qkv_dist_finish",
                          "MPI_Wait"))
            return false;
        b->phase = DONE;
    }
#else
    (void)t;
    (void)wait;
#endif
    return true;
}

/* Starts every bucket whose gradients are all final, in bucket order. */
static bool start_ready(qkv_dist_trainer *t) {
    while (t->next_start < t->n_buckets) {
        bucket *b = &t->buckets[t->next_start];
        if (b->ready < b->n_members) break;
        t->next_start++;
        if (!start(t, b)) return false;
    }
    return progress(t, false);
}

/* ---- The hook ---------------------------------------------------------------------------- */

static bool take_gradient(slot *s, qkv_tensor *g) {
    qkv_dist_trainer *t = s->t;
    s->pushed = true;
    if (!push(s, g)) return false;
    if (!t->last) return true;
    t->buckets[s->bucket].ready++;
    return start_ready(t);
}

static void on_grad(qkv_tensor *leaf, void *ctx) {
    slot *s = ctx;
    qkv_dist_trainer *t = s->t;
    if (!t->active || s->pushed || t->failed) return;
    qkv_tensor *g = leaf->grad ? qkv__retain(leaf->grad) : NULL;
    qkv_zero_grad(leaf);
    if (!take_gradient(s, g)) t->failed = true;
}

/* ---- Creation ---------------------------------------------------------------------------- */

static bool check_params(const qkv_named_list *params) {
    for (int i = 0; i < params->n; i++) {
        const qkv_tensor *p = params->tensors[i];
        if (qkv__is_float(p->dtype) && qkv_is_contiguous(p) && p->numel <= 0x7fffffff)
            continue;
        qkv_set_error(FN_NEW ": parameter %s must be a contiguous f32 or f64 tensor of under "
                      "2^31 elements (it is %s, %lld elements)", params->names[i],
                      qkv_dtype_name(p->dtype), (long long)p->numel);
        return false;
    }
    return true;
}

static uint64_t params_hash(const qkv_named_list *params) {
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < params->n; i++) {
        const qkv_tensor *p = params->tensors[i];
        h = (h ^ (uint64_t)p->dtype) * 1099511628211ULL;
        for (int d = 0; d < p->ndim; d++) h = (h ^ (uint64_t)p->shape[d]) * 1099511628211ULL;
        h = (h ^ 0xffu) * 1099511628211ULL;
    }
    return h;
}

/* Every rank's signature against rank 0's: the first difference fails every rank alike (each
 * compares the same gathered signatures). */
static bool same_settings(const qkv_dist_trainer *t) {
    int n = t->ranks;
    int64_t *all = malloc(sizeof t->signature * (size_t)n);
    if (!all) qkv_set_error(FN_NEW ": out of memory");
    if (!qkv__dist_agree(all != NULL, FN_NEW)) {
        free(all);
        return false;
    }
    bool ok = true;
#ifdef QKV_HAVE_MPI
    if (n > 1)
        ok = qkv__dist_ok(MPI_Allgather(t->signature, 5, MPI_INT64_T, all, 5, MPI_INT64_T,
                                        qkv__dist_comm()), FN_NEW, "MPI_Allgather");
    else
#endif
        memcpy(all, t->signature, sizeof t->signature);
    static const char *what[] = {"micro-batches (M)", "plain mode", "parameters",
                                 "bucket bytes"};
    for (int r = 1; ok && r < n; r++) {
        int64_t *o = all + 5 * r;
        for (int k = 0; ok && k < 4; k++)
            if (o[k] != all[k]) {
                qkv_set_error(FN_NEW ": rank %d has %lld %s, rank 0 has %lld; every rank must "
                              "use the same model and settings", r, (long long)o[k], what[k],
                              (long long)all[k]);
                ok = false;
            }
        if (ok && o[4] != all[4]) {
            qkv_set_error(FN_NEW ": the parameters' shapes or dtypes differ between rank 0 and "
                          "rank %d; every rank must build the same model", r);
            ok = false;
        }
    }
    free(all);
    return ok;
}

static bool check_world(const qkv_dist_trainer *t) {
    int m = t->micro_batches, n = t->ranks;
    if (t->options.plain) return true;
    if (!power_of_two(m)) {
        qkv_set_error(FN_NEW ": %d micro-batches; M must be a power of two", m);
        return false;
    }
    if (!power_of_two(n) || m % n) {
        qkv_set_error(FN_NEW ": %d ranks cannot share %d micro-batches; the rank count must "
                      "be a power of two dividing M", n, m);
        return false;
    }
    return true;
}

/* Buckets in reverse registration order, each of one dtype and about bucket_bytes. */
static bool make_buckets(qkv_dist_trainer *t) {
    t->buckets = calloc((size_t)(t->n_slots ? t->n_slots : 1), sizeof *t->buckets);
    if (!t->buckets) return false;
    size_t limit = t->options.bucket_bytes;
    bucket *b = NULL;
    for (int i = t->n_slots - 1; i >= 0; i--) {
        slot *s = &t->slots[i];
        size_t bytes = (size_t)s->param->numel * qkv_dtype_size(s->param->dtype);
        size_t have = b ? (size_t)b->numel * qkv_dtype_size(b->dtype) : 0;
        /* MPI counts are ints: a bucket stays under 2^31 elements. */
        bool full = b && have &&
                    (have + bytes > limit || b->numel + s->param->numel > 0x7fffffff);
        if (!b || b->dtype != s->param->dtype || full) {
            b = &t->buckets[t->n_buckets++];
            b->dtype = s->param->dtype;
            b->members = calloc((size_t)(i + 1), sizeof *b->members);
            if (!b->members) return false;
        }
        s->bucket = (int)(b - t->buckets);
        s->offset = b->numel;
        b->members[b->n_members++] = i;
        b->numel += s->param->numel;
    }
    return true;
}

static bool make_buffers(qkv_dist_trainer *t) {
    int n = t->ranks;
    for (int i = 0; i < t->n_buckets; i++) {
        bucket *b = &t->buckets[i];
        size_t es = qkv_dtype_size(b->dtype);
        b->data = malloc((size_t)(b->numel ? b->numel : 1) * es);
        b->counts = malloc(4 * (size_t)n * sizeof *b->counts);
        if (!b->data || !b->counts) return false;
        int64_t mine = b->numel * (t->rank + 1) / n - b->numel * t->rank / n;
        for (int r = 0; r < n; r++) {
            b->counts[r] = (int)(b->numel * (r + 1) / n - b->numel * r / n);
            b->counts[n + r] = (int)(b->numel * r / n);
            b->counts[2 * n + r] = (int)mine;
            b->counts[3 * n + r] = (int)(mine * r);
        }
        if (n > 1 && !t->options.plain) {
            b->recv = malloc((size_t)(mine ? mine : 1) * es * (size_t)n);
            if (!b->recv) return false;
        }
    }
    return true;
}

/* One slot and one hook per parameter, and the signature the ranks compare. */
static bool make_slots(qkv_dist_trainer *t) {
    qkv_named_list *params = qkv_module_parameters(t->model);
    if (!params) return false;
    bool ok = check_params(params);
    int64_t signature[5] = {t->micro_batches, t->options.plain, params->n,
                            (int64_t)t->options.bucket_bytes, (int64_t)params_hash(params)};
    memcpy(t->signature, signature, sizeof signature);
    t->n_slots = params->n;
    t->slots = ok ? calloc((size_t)(params->n ? params->n : 1), sizeof *t->slots) : NULL;
    ok = ok && t->slots != NULL;
    for (int i = 0; ok && i < params->n; i++) {
        slot *s = &t->slots[i];
        *s = (slot){.t = t, .param = params->tensors[i]};
        s->hook = qkv_register_grad_hook(s->param, on_grad, s);
        ok = s->hook != NULL;
    }
    qkv_named_list_free(params);
    return ok;
}

/* Everything this rank needs, made without a word to the others. */
static bool build(qkv_dist_trainer *t, qkv_module *model, const qkv_dist_options *options) {
    t->model = model;
    if (options) t->options = *options;
    if (!t->options.bucket_bytes) t->options.bucket_bytes = 1 << 20;
    t->ranks = qkv_dist_size();
    t->rank = qkv_dist_rank();
    t->micro_batches = t->options.plain ? t->ranks
                       : t->options.micro_batches ? t->options.micro_batches : t->ranks;
    t->count = t->micro_batches / t->ranks;
    t->first = t->rank * t->count;
    if (!make_slots(t)) return false;
    t->generators = qkv_module_generators(model);
    return t->generators && make_buckets(t) && make_buffers(t);
}

qkv_dist_trainer *qkv_dist_trainer_new(qkv_module *model, const qkv_dist_options *options) {
    if (!model) return qkv_set_error(FN_NEW ": model is NULL");
    qkv_dist_trainer *t = calloc(1, sizeof *t);
    bool ok = t && build(t, model, options);
    if (!ok && !qkv_error()) qkv_set_error(FN_NEW ": out of memory");
    /* Then together: every rank built its part, has rank 0's settings, and they fit N. */
    ok = qkv__dist_agree(ok, FN_NEW) && same_settings(t) && check_world(t);
    if (ok) return t;
    qkv_dist_trainer_free(t);
    return NULL;
}

void qkv_dist_trainer_free(qkv_dist_trainer *t) {
    if (!t) return;
    for (int i = 0; t->slots && i < t->n_slots; i++) {
        clear_levels(&t->slots[i]);
        qkv_remove_grad_hook(t->slots[i].hook);
    }
    for (int i = 0; t->buckets && i < t->n_buckets; i++) {
        free(t->buckets[i].members);
        free(t->buckets[i].data);
        free(t->buckets[i].recv);
        free(t->buckets[i].counts);
    }
    qkv_generator_list_free(t->generators);
    free(t->slots);
    free(t->buckets);
    free(t);
}

/* ---- A step ------------------------------------------------------------------------------ */

int qkv_dist_micro_batches(const qkv_dist_trainer *t) {
    return t ? t->micro_batches : -1;
}

bool qkv_dist_micro_range(const qkv_dist_trainer *t, int *first, int *count) {
    if (!t || !first || !count)
        return qkv_set_error("qkv_dist_micro_range: NULL argument"), false;
    *first = t->first;
    *count = t->count;
    return true;
}

static uint64_t mix(uint64_t h, uint64_t v) {
    uint64_t z = h ^ (v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t key(const qkv_dist_trainer *t, int64_t step, int micro, uint64_t which) {
    return mix(mix(mix(t->options.seed, (uint64_t)step), (uint64_t)micro), which);
}

bool qkv_dist_micro_begin(qkv_dist_trainer *t, int64_t step, int micro, qkv_generator *g) {
    if (!t || step < 0 || micro < 0 || micro >= (t ? t->micro_batches : 0)) {
        qkv_set_error("qkv_dist_micro_begin: step %lld, micro-batch %d out of range",
                      (long long)step, micro);
        return false;
    }
    for (int k = 0; k < t->generators->n; k++)
        qkv_generator_init(t->generators->items[k].generator, key(t, step, micro, (uint64_t)k));
    if (g) qkv_generator_init(g, key(t, step, micro, UINT64_MAX));
    return true;
}

static void reset_step(qkv_dist_trainer *t) {
    for (int i = 0; i < t->n_slots; i++) {
        clear_levels(&t->slots[i]);
        qkv_zero_grad(t->slots[i].param);
    }
    for (int i = 0; i < t->n_buckets; i++) {
        t->buckets[i].ready = 0;
        t->buckets[i].phase = IDLE;
    }
    t->next_start = t->next_gather = 0;
    t->first_start = 0;
    t->stats = (qkv_dist_stats){0};
}

/* After a micro-batch's backward: parameters it did not reach add zeros. */
static bool close_micro(qkv_dist_trainer *t) {
    for (int i = t->n_slots - 1; i >= 0; i--) {
        slot *s = &t->slots[i];
        if (!s->pushed && !take_gradient(s, NULL)) return false;
    }
    return true;
}

bool qkv_dist_backward(qkv_dist_trainer *t, qkv_tensor *loss, int micro) {
    if (!t) return qkv_set_error("qkv_dist_backward: trainer is NULL"), false;
    if (t->failed)
        return qkv_set_error("qkv_dist_backward: an earlier step of this trainer failed"), false;
    if (micro != t->first + t->done_micro) {
        qkv_set_error("qkv_dist_backward: micro-batch %d given; this rank's next is %d (it "
                      "owns %d to %d, in order)", micro, t->first + t->done_micro, t->first,
                      t->first + t->count - 1);
        return false;
    }
    if (t->done_micro == 0) reset_step(t);
    for (int i = 0; i < t->n_slots; i++) t->slots[i].pushed = false;
    t->last = t->done_micro == t->count - 1;
    t->active = true;
    bool ok = !loss || qkv_backward(loss);
    t->active = false;
    ok = ok && !t->failed && close_micro(t);
    if (!ok) t->failed = true;
    t->done_micro++;
    return ok;
}

static bool unpack(qkv_dist_trainer *t) {
    bool ok = true;
    for (int i = 0; ok && i < t->n_slots; i++) {
        slot *s = &t->slots[i];
        bucket *b = &t->buckets[s->bucket];
        const char *src = (const char *)b->data + (size_t)s->offset * qkv_dtype_size(b->dtype);
        qkv_scope_begin();
        qkv_tensor *g = qkv_from_array(b->dtype, s->param->ndim, s->param->shape, src);
        qkv_zero_grad(s->param);
        if (g) s->param->grad = qkv__retain(g);
        ok = g != NULL;
        qkv_scope_end();
    }
    return ok;
}

bool qkv_dist_finish(qkv_dist_trainer *t) {
    if (!t) return qkv_set_error("qkv_dist_finish: trainer is NULL"), false;
    if (t->failed)
        return qkv_set_error("qkv_dist_finish: an earlier step of this trainer failed"), false;
    if (t->done_micro != t->count) {
        qkv_set_error("qkv_dist_finish: %d of this rank's %d micro-batches were given",
                      t->done_micro, t->count);
        return false;
    }
    double wait_start = qkv__dist_now();
    bool ok = start_ready(t) && progress(t, true);
    double end = qkv__dist_now();
    t->done_micro = 0;
    if (!ok) {
        t->failed = true;
        return false;
    }
    t->stats.wait_seconds = end - wait_start;
    t->stats.exchange_seconds = t->first_start ? end - t->first_start : 0;
    return unpack(t);
}

qkv_dist_stats qkv_dist_trainer_stats(const qkv_dist_trainer *t) {
    return t ? t->stats : (qkv_dist_stats){0};
}
