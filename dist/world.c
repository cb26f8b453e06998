/*
 * The world: MPI's start and end, qkv's communicators, ranks, errors that MPI returns, and the
 * agreement of every rank on whether a collective step succeeded. Without MPI the world is one
 * process.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dist/dist_internal.h"

#ifdef QKV_HAVE_MPI
/* The communicators qkv_dist_init makes and whether it started MPI: set once by the
 * program's main thread, before and after every other call of this layer. */
static MPI_Comm comm = MPI_COMM_NULL, comm2 = MPI_COMM_NULL;
static bool started_mpi;
static int world_rank, world_size = 1;

MPI_Comm qkv__dist_comm(void) { return comm; }
MPI_Comm qkv__dist_comm2(void) { return comm2; }

bool qkv__dist_ok(int rc, const char *op, const char *call) {
    if (rc == MPI_SUCCESS) return true;
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    qkv_set_error("%s: %s failed: %s", op, call, msg);
    return false;
}

MPI_Datatype qkv__dist_mpi_type(qkv_dtype dtype) {
    switch (dtype) {
    case QKV_F32: return MPI_FLOAT;
    case QKV_F64: return MPI_DOUBLE;
    case QKV_I64: return MPI_INT64_T;
    case QKV_BOOL: return MPI_C_BOOL;
    case QKV_BF16: return MPI_UINT16_T; /* the bits: qkv does the arithmetic */
    }
    return MPI_BYTE;
}

static bool dup_comm(MPI_Comm *c) {
    if (!qkv__dist_ok(MPI_Comm_dup(MPI_COMM_WORLD, c), "qkv_dist_init", "MPI_Comm_dup"))
        return false;
    return qkv__dist_ok(MPI_Comm_set_errhandler(*c, MPI_ERRORS_RETURN), "qkv_dist_init",
                        "MPI_Comm_set_errhandler");
}

bool qkv_dist_init(int *argc, char ***argv) {
    if (comm != MPI_COMM_NULL) return true;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) {
            qkv_set_error("qkv_dist_init: MPI_Init_thread failed (error %d)", rc);
            return false;
        }
        started_mpi = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (!dup_comm(&comm) || !dup_comm(&comm2)) return false;
    MPI_Comm_rank(comm, &world_rank);
    MPI_Comm_size(comm, &world_size);
    return true;
}

void qkv_dist_finalize(void) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    /* A program that ended MPI itself has taken the communicators with it. */
    if (!finalized && comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    if (!finalized && comm2 != MPI_COMM_NULL) MPI_Comm_free(&comm2);
    comm = comm2 = MPI_COMM_NULL;
    world_rank = 0;
    world_size = 1;
    if (started_mpi && !finalized) MPI_Finalize();
    started_mpi = false;
}

int qkv_dist_rank(void) { return world_rank; }
int qkv_dist_size(void) { return world_size; }
bool qkv_dist_has_mpi(void) { return true; }

bool qkv_dist_barrier(void) {
    if (comm == MPI_COMM_NULL) return true;
    return qkv__dist_ok(MPI_Barrier(comm), "qkv_dist_barrier", "MPI_Barrier");
}

#define MSG 256

bool qkv__dist_agree(bool ok, const char *op) {
    if (comm == MPI_COMM_NULL || world_size == 1) return ok;
    char mine[MSG] = "";
    if (!ok) snprintf(mine, sizeof mine, "%s", qkv_error() ? qkv_error() : "failed");
    char *all = malloc((size_t)world_size * MSG);
    if (!all) return qkv_set_error("%s: out of memory", op), false;
    bool sent = qkv__dist_ok(MPI_Allgather(mine, MSG, MPI_CHAR, all, MSG, MPI_CHAR, comm), op,
                             "MPI_Allgather");
    for (int r = 0; sent && r < world_size; r++) {
        if (!all[(size_t)r * MSG]) continue;
        all[(size_t)r * MSG + MSG - 1] = 0;
        /* Every rank reports the same message, the failing one too. */
        const char *msg = all + (size_t)r * MSG;
        size_t len = strlen(op);
        if (!strncmp(msg, op, len) && !strncmp(msg + len, ": ", 2)) msg += len + 2;
        qkv_clear_error();
        qkv_set_error("%s: rank %d: %s", op, r, msg);
        sent = false;
    }
    free(all);
    return sent;
}
#else
bool qkv_dist_init(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return true;
}
void qkv_dist_finalize(void) {}
int qkv_dist_rank(void) { return 0; }
int qkv_dist_size(void) { return 1; }
bool qkv_dist_has_mpi(void) { return false; }
bool qkv_dist_barrier(void) { return true; }
bool qkv__dist_agree(bool ok, const char *op) {
    (void)op;
    return ok;
}
#endif

double qkv__dist_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void qkv__dist_add(void *dst, const void *src, int64_t len, qkv_dtype dtype) {
    switch (dtype) {
    case QKV_F32: {
        float *d = dst;
        const float *s = src;
        for (int64_t i = 0; i < len; i++) d[i] = d[i] + s[i];
        break;
    }
    case QKV_F64: {
        double *d = dst;
        const double *s = src;
        for (int64_t i = 0; i < len; i++) d[i] = d[i] + s[i];
        break;
    }
    case QKV_I64: {
        int64_t *d = dst;
        const int64_t *s = src;
        for (int64_t i = 0; i < len; i++) d[i] = (int64_t)((uint64_t)d[i] + (uint64_t)s[i]);
        break;
    }
    case QKV_BOOL: {
        bool *d = dst;
        const bool *s = src;
        for (int64_t i = 0; i < len; i++) d[i] = d[i] || s[i];
        break;
    }
    case QKV_BF16: { /* in f32, rounded once, as torch adds two bf16 tensors */
        uint16_t *d = dst;
        const uint16_t *s = src;
        for (int64_t i = 0; i < len; i++)
            d[i] = qkv__f32_to_bf16(qkv__bf16_to_f32(d[i]) + qkv__bf16_to_f32(s[i]));
        break;
    }
    }
}

static int split(int n) {
    int h = 1;
    while (h * 2 < n) h *= 2;
    return h;
}

void qkv__dist_tree_sum(void *parts, int n, int64_t len, qkv_dtype dtype) {
    if (n <= 1) return;
    int h = split(n);
    size_t part = (size_t)len * qkv_dtype_size(dtype);
    char *base = parts;
    qkv__dist_tree_sum(base, h, len, dtype);
    qkv__dist_tree_sum(base + (size_t)h * part, n - h, len, dtype);
    qkv__dist_add(base, base + (size_t)h * part, len, dtype);
}
