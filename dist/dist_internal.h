/*
 * What the dist/ files share: the communicators, MPI error messages and the fixed-order sums.
 * Never installed.
 */
#ifndef QKV_DIST_INTERNAL_H
#define QKV_DIST_INTERNAL_H

#include "dist/dist.h"
#include "tensor/tensor_internal.h"

#ifdef QKV_HAVE_MPI
#include <mpi.h>

/* qkv's communicators, duplicates of MPI_COMM_WORLD with MPI_ERRORS_RETURN: one for the
 * collectives and the first phase of the trainer's exchanges, one for the second phase (so
 * each sees its collectives started in the same order on every rank). MPI_COMM_NULL before
 * qkv_dist_init. */
MPI_Comm qkv__dist_comm(void);
MPI_Comm qkv__dist_comm2(void);
/* True for MPI_SUCCESS; otherwise records "op: call: MPI's message" and returns false. */
bool qkv__dist_ok(int rc, const char *op, const char *call);
MPI_Datatype qkv__dist_mpi_type(qkv_dtype dtype);
#endif

/* Whether every rank got here with ok: each rank's message (its qkv_error() when !ok) is
 * gathered, and every rank fails with "op: rank R: message" naming the first rank that failed.
 * A collective: call it on every rank. */
bool qkv__dist_agree(bool ok, const char *op);

/* The fixed order of every float sum: parts[0..n) (each of len elements of dtype) summed
 * pairwise in place into parts[0], splitting at the largest power of two below n (halves for
 * a power of two): ((p0 + p1) + (p2 + p3)) ... Each add is left + right. */
void qkv__dist_tree_sum(void *parts, int n, int64_t len, qkv_dtype dtype);
/* dst[i] += src[i] for len elements of dtype (floats: one rounded add; I64 wrapping; BOOL or) */
void qkv__dist_add(void *dst, const void *src, int64_t len, qkv_dtype dtype);

double qkv__dist_now(void); /* seconds, monotonic */

#endif
