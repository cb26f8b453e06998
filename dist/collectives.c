/*
 * Collectives on tensors: all-reduce in a fixed order, broadcast of tensors and modules, the
 * sums of sharded evaluation, and the checkpoint that rank 0 writes. (The optimizer's
 * broadcast is optim_bcast.c.)
 */
#include <stdlib.h>
#include <string.h>

#include "dist/dist_internal.h"

/* Whether p was allocated; an out-of-memory error for fn if not. */
static bool allocated(const void *p, const char *fn) {
    if (!p) qkv_set_error("%s: out of memory", fn);
    return p != NULL;
}

static bool check_reducible(const char *fn, const qkv_tensor *t, qkv_dist_op op) {
    if (!t) return qkv_set_error("%s: tensor is NULL", fn), false;
    if (!qkv_is_contiguous(t))
        return qkv_set_error("%s: the tensor must be contiguous", fn), false;
    if ((unsigned)op > QKV_DIST_MAX)
        return qkv_set_error("%s: unknown reduction %d", fn, (int)op), false;
    if (op == QKV_DIST_MEAN && !qkv__is_float(t->dtype))
        return qkv_set_error("%s: mean of a %s tensor; mean is for f32, f64 and bf16", fn,
                             qkv_dtype_name(t->dtype)), false;
    return true;
}

#ifdef QKV_HAVE_MPI
static void max_into(void *dst, const void *src, int64_t len, qkv_dtype dtype) {
    switch (dtype) {
    case QKV_F32: {
        float *d = dst;
        const float *s = src;
        for (int64_t i = 0; i < len; i++)
            if (s[i] > d[i] || s[i] != s[i]) d[i] = d[i] != d[i] ? d[i] : s[i];
        break;
    }
    case QKV_F64: {
        double *d = dst;
        const double *s = src;
        for (int64_t i = 0; i < len; i++)
            if (s[i] > d[i] || s[i] != s[i]) d[i] = d[i] != d[i] ? d[i] : s[i];
        break;
    }
    case QKV_I64: {
        int64_t *d = dst;
        const int64_t *s = src;
        for (int64_t i = 0; i < len; i++) d[i] = s[i] > d[i] ? s[i] : d[i];
        break;
    }
    case QKV_BOOL: qkv__dist_add(dst, src, len, dtype); break;
    case QKV_BF16: {
        uint16_t *d = dst;
        const uint16_t *s = src;
        for (int64_t i = 0; i < len; i++) {
            float a = qkv__bf16_to_f32(d[i]), b = qkv__bf16_to_f32(s[i]);
            if (b > a || b != b) d[i] = a != a ? d[i] : s[i];
        }
        break;
    }
    }
}

/* parts[0..n) of len elements reduced into parts[0]: the tree for sums, rank order for max
 * (which any order gives alike). */
static void reduce_parts(void *parts, int n, int64_t len, qkv_dtype dtype, qkv_dist_op op) {
    if (op != QKV_DIST_MAX) {
        qkv__dist_tree_sum(parts, n, len, dtype);
        return;
    }
    size_t part = (size_t)len * qkv_dtype_size(dtype);
    for (int r = 1; r < n; r++) max_into(parts, (char *)parts + (size_t)r * part, len, dtype);
}

static void divide(void *data, int64_t len, qkv_dtype dtype, int n) {
    if (dtype == QKV_F32)
        for (int64_t i = 0; i < len; i++) ((float *)data)[i] /= (float)n;
    else if (dtype == QKV_BF16)
        for (int64_t i = 0; i < len; i++)
            ((uint16_t *)data)[i] = qkv__f32_to_bf16(qkv__bf16_to_f32(((uint16_t *)data)[i]) /
                                                     (float)n);
    else
        for (int64_t i = 0; i < len; i++) ((double *)data)[i] /= (double)n;
}

/* Slice r of len elements over n ranks: [len * r / n, len * (r + 1) / n). */
static int64_t slice_start(int64_t len, int r, int n) { return len * r / n; }

/* One tensor, reduced by hand: each rank receives every rank's copy of its slice
 * (MPI_Alltoallv), reduces them in rank order, and the slices are gathered back. */
static bool reduce_one(qkv_tensor *t, qkv_dist_op op, const char *fn) {
    int n = qkv_dist_size(), me = qkv_dist_rank();
    int64_t len = t->numel;
    size_t es = qkv_dtype_size(t->dtype);
    int64_t mine = slice_start(len, me + 1, n) - slice_start(len, me, n);
    int *counts = malloc(4 * (size_t)n * sizeof *counts);
    char *recv = malloc((size_t)(mine ? mine : 1) * es * (size_t)n);
    if (!qkv__dist_agree(allocated(counts, fn) && allocated(recv, fn), fn)) {
        free(counts);
        free(recv);
        return false;
    }
    int *sdispl = counts + n, *rcounts = counts + 2 * n, *rdispl = counts + 3 * n;
    for (int r = 0; r < n; r++) {
        counts[r] = (int)(slice_start(len, r + 1, n) - slice_start(len, r, n));
        sdispl[r] = (int)slice_start(len, r, n);
        rcounts[r] = (int)mine;
        rdispl[r] = (int)(mine * r);
    }
    MPI_Datatype type = qkv__dist_mpi_type(t->dtype);
    MPI_Comm c = qkv__dist_comm();
    void *data = qkv_data(t);
    bool ok = qkv__dist_ok(MPI_Alltoallv(data, counts, sdispl, type, recv, rcounts, rdispl,
                                         type, c), fn, "MPI_Alltoallv");
    if (ok) {
        reduce_parts(recv, n, mine, t->dtype, op);
        if (op == QKV_DIST_MEAN) divide(recv, mine, t->dtype, n);
        memcpy((char *)data + (size_t)sdispl[me] * es, recv, (size_t)mine * es);
        ok = qkv__dist_ok(MPI_Allgatherv(MPI_IN_PLACE, 0, type, data, counts, sdispl, type, c),
                          fn, "MPI_Allgatherv");
    }
    free(counts);
    free(recv);
    return ok;
}

/* Every rank's tensor count, then each tensor's dtype and element count, compared with rank
 * 0's: true on every rank or false on every rank. */
static bool same_everywhere(qkv_tensor *const *ts, int n, const char *fn) {
    int64_t count = n;
    if (!qkv__dist_ok(MPI_Bcast(&count, 1, MPI_INT64_T, 0, qkv__dist_comm()), fn, "MPI_Bcast"))
        return false;
    if (count != n) qkv_set_error("%s: %d tensors here, %lld on rank 0", fn, n, (long long)count);
    if (!qkv__dist_agree(count == n, fn)) return false;
    int64_t *sig = malloc((size_t)(n ? n : 1) * 4 * sizeof *sig), *root = sig + 2 * n;
    if (!qkv__dist_agree(allocated(sig, fn), fn)) {
        free(sig);
        return false;
    }
    for (int i = 0; i < n; i++) {
        sig[2 * i] = root[2 * i] = ts[i] ? (int64_t)ts[i]->dtype : -1;
        sig[2 * i + 1] = root[2 * i + 1] = ts[i] ? ts[i]->numel : -1;
    }
    bool ok = qkv__dist_ok(MPI_Bcast(root, 2 * n, MPI_INT64_T, 0, qkv__dist_comm()), fn,
                           "MPI_Bcast");
    for (int i = 0; ok && i < n; i++)
        if (root[2 * i] != sig[2 * i] || root[2 * i + 1] != sig[2 * i + 1]) {
            qkv_set_error("%s: tensor %d is %s of %lld elements here, %s of %lld on rank 0", fn,
                          i, qkv_dtype_name((qkv_dtype)sig[2 * i]), (long long)sig[2 * i + 1],
                          qkv_dtype_name((qkv_dtype)root[2 * i]), (long long)root[2 * i + 1]);
            ok = false;
        }
    free(sig);
    return qkv__dist_agree(ok, fn);
}
#endif

bool qkv_dist_all_reduce_list(qkv_tensor *const *tensors, int n, qkv_dist_op op) {
    const char *fn = "qkv_dist_all_reduce";
    bool ok = n >= 0 && (n == 0 || tensors);
    if (!ok) qkv_set_error("%s: %d tensors at %p", fn, n, (const void *)tensors);
    for (int i = 0; ok && i < n; i++) ok = check_reducible(fn, tensors[i], op);
    for (int i = 0; ok && i < n; i++)
        if (tensors[i]->numel > 0x7fffffff) {
            qkv_set_error("%s: tensor %d has %lld elements; MPI counts stop at 2^31 - 1", fn, i,
                          (long long)tensors[i]->numel);
            ok = false;
        }
#ifdef QKV_HAVE_MPI
    if (qkv_dist_size() > 1) {
        if (!qkv__dist_agree(ok, fn)) return false;
        if (!same_everywhere(tensors, n, fn)) return false;
        for (int i = 0; ok && i < n; i++) ok = reduce_one(tensors[i], op, fn);
        if (ok) {
            for (int i = 0; i < n; i++) qkv__bump_version(tensors[i]);
        }
        return ok;
    }
#endif
    return ok; /* one rank: the sum, mean and max of one value are that value */
}

bool qkv_dist_all_reduce(qkv_tensor *t, qkv_dist_op op) {
    return qkv_dist_all_reduce_list(&t, 1, op);
}

/* ---- Broadcast --------------------------------------------------------------------------- */

#ifdef QKV_HAVE_MPI
/* Bytes from root to every rank, in pieces MPI's int counts can hold. */
static bool bcast_bytes(void *data, size_t size, int root, const char *fn) {
    char *p = data;
    while (size > 0) {
        int piece = size > (1u << 30) ? 1 << 30 : (int)size;
        if (!qkv__dist_ok(MPI_Bcast(p, piece, MPI_BYTE, root, qkv__dist_comm()), fn,
                          "MPI_Bcast"))
            return false;
        p += piece;
        size -= (size_t)piece;
    }
    return true;
}
#endif

/* Broadcasts the tensors' values from root, after checking on every rank that each is
 * contiguous and has root's dtype and size. */
static bool broadcast_tensors(qkv_tensor *const *ts, int n, int root, const char *fn) {
    bool ok = root >= 0 && root < qkv_dist_size();
    if (!ok) qkv_set_error("%s: root %d out of range for %d ranks", fn, root, qkv_dist_size());
    for (int i = 0; ok && i < n; i++) {
        ok = ts[i] && qkv_is_contiguous(ts[i]);
        if (!ok) qkv_set_error("%s: tensor %d is %s", fn, i, ts[i] ? "not contiguous" : "NULL");
    }
#ifdef QKV_HAVE_MPI
    if (qkv_dist_size() > 1) {
        if (!qkv__dist_agree(ok, fn) || !same_everywhere(ts, n, fn)) return false;
        for (int i = 0; ok && i < n; i++) {
            ok = bcast_bytes(qkv_data(ts[i]), (size_t)ts[i]->numel * qkv_dtype_size(ts[i]->dtype),
                             root, fn);
            if (ok && qkv_dist_rank() != root) qkv__bump_version(ts[i]);
        }
    }
#endif
    return ok;
}

bool qkv_dist_broadcast(qkv_tensor *t, int root) {
    return broadcast_tensors(&t, 1, root, "qkv_dist_broadcast");
}

#ifdef QKV_HAVE_MPI
/* A hash of the names, dtypes and shapes of a list (FNV-1a), to compare lists across ranks. */
static uint64_t list_hash(const qkv_named_list *l) {
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < l->n; i++) {
        const qkv_tensor *t = l->tensors[i];
        for (const char *c = l->names[i]; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ULL;
        int64_t v[2 + QKV_MAX_DIMS] = {t->dtype, t->ndim};
        for (int d = 0; d < t->ndim; d++) v[2 + d] = t->shape[d];
        for (int d = 0; d < 2 + t->ndim; d++) h = (h ^ (uint64_t)v[d]) * 1099511628211ULL;
    }
    return h;
}

/* Rank 0's state (NULL where it could not be listed) into every rank's, once every rank has
 * checked that its names, shapes and dtypes are rank 0's. */
static bool broadcast_state(const qkv_named_list *state, const char *fn) {
    if (!qkv__dist_agree(state != NULL, fn)) return false;
    int64_t mine[2] = {state->n, (int64_t)list_hash(state)}, root[2] = {mine[0], mine[1]};
    bool ok = qkv__dist_ok(MPI_Bcast(root, 2, MPI_INT64_T, 0, qkv__dist_comm()), fn,
                           "MPI_Bcast");
    if (ok && (root[0] != mine[0] || root[1] != mine[1])) {
        qkv_set_error("%s: this rank's module has %lld tensors, rank 0's %lld, or their names, "
                      "shapes or dtypes differ", fn, (long long)mine[0], (long long)root[0]);
        ok = false;
    }
    return qkv__dist_agree(ok, fn) && broadcast_tensors(state->tensors, state->n, 0, fn);
}
#endif

bool qkv_dist_broadcast_module(qkv_module *module) {
    const char *fn = "qkv_dist_broadcast_module";
    if (!module) return qkv_set_error("%s: module is NULL", fn), false;
    qkv_named_list *state = qkv_module_state(module);
    bool ok = state != NULL;
#ifdef QKV_HAVE_MPI
    if (qkv_dist_size() > 1) ok = broadcast_state(state, fn);
#endif
    qkv_named_list_free(state);
    return ok;
}

/* ---- Sharded evaluation ------------------------------------------------------------------ */

/* Every rank's values in rank order, into a malloc'd array of *total. Collective. */
static double *gather_values(const double *local, int n_local, int *total, const char *fn) {
    int n = qkv_dist_size();
    *total = n_local;
    if (n == 1) {
        double *all = malloc((size_t)(n_local ? n_local : 1) * sizeof *all);
        if (allocated(all, fn) && n_local) memcpy(all, local, (size_t)n_local * sizeof *all);
        return all;
    }
#ifdef QKV_HAVE_MPI
    int *counts = calloc(2 * (size_t)n, sizeof *counts);
    if (!qkv__dist_agree(allocated(counts, fn), fn) ||
        !qkv__dist_ok(MPI_Allgather(&n_local, 1, MPI_INT, counts, 1, MPI_INT,
                                    qkv__dist_comm()), fn, "MPI_Allgather")) {
        free(counts);
        return NULL;
    }
    *total = 0;
    for (int r = 0; r < n; r++) {
        counts[n + r] = *total;
        *total += counts[r];
    }
    double *all = malloc((size_t)(*total ? *total : 1) * sizeof *all);
    bool ok = qkv__dist_agree(allocated(all, fn), fn) &&
              qkv__dist_ok(MPI_Allgatherv(local, n_local, MPI_DOUBLE, all, counts, counts + n,
                                          MPI_DOUBLE, qkv__dist_comm()), fn, "MPI_Allgatherv");
    free(counts);
    if (!ok) {
        free(all);
        return NULL;
    }
    return all;
#else
    return NULL;
#endif
}

bool qkv_dist_tree_sum(const double *local, int n_local, double *sum) {
    const char *fn = "qkv_dist_tree_sum";
    bool ok = sum && n_local >= 0 && (n_local == 0 || local);
    if (!ok) qkv_set_error("%s: %d values at %p, sum at %p", fn, n_local, (const void *)local,
                           (void *)sum);
    if (!qkv__dist_agree(ok, fn)) return false;
    int total = 0;
    double *all = gather_values(local, n_local, &total, fn);
    if (!all) return false;
    qkv__dist_tree_sum(all, total, 1, QKV_F64);
    *sum = total ? all[0] : 0.0;
    free(all);
    return true;
}

bool qkv_dist_sum_counts(int64_t *counts, int n) {
    const char *fn = "qkv_dist_sum_counts";
    bool ok = n >= 0 && (n == 0 || counts);
    if (!ok) qkv_set_error("%s: %d counts at %p", fn, n, (void *)counts);
#ifdef QKV_HAVE_MPI
    if (qkv_dist_size() > 1) {
        if (!qkv__dist_agree(ok, fn)) return false;
        /* Integer sums are exact in any order: MPI's own all-reduce is fine here. */
        return qkv__dist_ok(MPI_Allreduce(MPI_IN_PLACE, counts, n, MPI_INT64_T, MPI_SUM,
                                          qkv__dist_comm()), fn, "MPI_Allreduce");
    }
#endif
    return ok;
}

/* ---- Checkpoints ------------------------------------------------------------------------- */

bool qkv_dist_checkpoint_save(const qkv_module *module, const qkv_optimizer *opt,
                              const char *path, const qkv_checkpoint_contents *extras) {
    bool ok = true;
    if (qkv_dist_rank() == 0) ok = qkv_checkpoint_save(module, opt, path, extras);
    return qkv__dist_agree(ok, "qkv_dist_checkpoint_save");
}
