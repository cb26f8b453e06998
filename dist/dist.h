/*
 * qkv dist: data-parallel training over MPI, identical to the bit at any rank count.
 *
 * A program written with this header runs unchanged as one process or under `mpirun -np N`.
 * Built without MPI (meson -Dmpi=disabled, or no MPI installed), the same functions run a
 * world of one process through the same code paths (the gradient tree is summed locally as
 * with MPI); qkv_dist_has_mpi() says which build this is.
 *
 * Conventions are tensor.h's: a failure returns false, NULL or -1 and records a message read
 * with qkv_error(); nothing here aborts the process. MPI errors are returned, not fatal
 * (MPI_ERRORS_RETURN is set on qkv's communicator), and name the MPI call and its message.
 * Every collective (all-reduce, broadcast, trainer creation and finish, tree sums) must be
 * called by every rank in the same order, as MPI requires. A failure that every rank can see
 * (bad arguments, mismatched settings) fails every rank with the same message naming the rank;
 * one only a single rank sees during a step (out of memory in its backward) leaves the others
 * waiting in qkv_dist_finish, so a program ends with a non-zero status on any failure: a rank
 * that exits before qkv_dist_finalize ends the whole job (mpirun aborts every rank).
 *
 * Determinism. The default trainer mode (deterministic) gives weights identical to the bit
 * at 1, 2, 4, ... ranks for the same micro-batch count M:
 *  - a global batch is M micro-batches (qkv_micro_batch_range in data.h, by sample index
 *    alone); each micro-batch's forward and backward run whole on one rank, which owns a
 *    contiguous block of M/N of them;
 *  - micro-batch gradients are summed in one fixed binary tree over the micro-batch index:
 *    each rank sums its subtree locally (pairwise, holding log2(M/N) + 1 partial sums per
 *    parameter), then the ranks finish the tree by a reduce-scatter written with
 *    MPI_Ialltoallv (each rank sums its slice of the N partial sums, pairwise in rank order)
 *    and an MPI_Iallgatherv. MPI_Allreduce, whose order is not fixed, is never used for them;
 *  - random draws (dropout) are keyed by seed, step and micro-batch index, never by rank
 *    (qkv_dist_micro_begin positions the model's generators);
 *  - the loss of a micro-batch is its share of the global mean: its sum divided by the global
 *    count, an exact integer from the data (qkv_batch_count for samples; a count of valid
 *    tokens the caller takes over the whole global batch, which every rank can read);
 *  - clipping and the optimizer step come after qkv_dist_finish, on the reduced gradient.
 * The plain mode (options.plain) all-reduces each rank's gradient with MPI_Iallreduce in
 * buckets, without micro-batches: a little faster, not identical across rank counts. The
 * deterministic mode is the default because a run must be reproducible on another machine
 * count, and it costs little: the same bytes move (a reduce-scatter then an all-gather is
 * what a ring all-reduce does), started during the backward of the last micro-batch.
 *
 * A training step (docs/internals.md, section 8, has the design):
 *
 *     qkv_dist_micro_range(t, &first, &count);
 *     int64_t global = qkv_batch_count(n, batch_size, b);
 *     for (int k = first; k < first + count; k++) {
 *         qkv_micro_batch_range(n, batch_size, b, qkv_dist_micro_batches(t), k, &lo, &len);
 *         qkv_scope_begin();
 *         qkv_dist_micro_begin(t, qkv_optimizer_steps(opt), k, NULL);
 *         qkv_tensor *loss = len ? qkv_div_scalar(summed_loss(model, order + lo, len),
 *                                                 (double)global) : NULL;
 *         qkv_dist_backward(t, loss, k);
 *         qkv_scope_end();
 *     }
 *     qkv_dist_finish(t);             // every rank: the same summed gradient
 *     qkv_clip_grad_norm(params, 1.0);
 *     qkv_optimizer_step(opt);
 *     qkv_optimizer_zero_grad(opt);
 */
#ifndef QKV_DIST_H
#define QKV_DIST_H

#include "data/data.h"
#include "nn/nn.h"
#include "optim/optim.h"
#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- The world --------------------------------------------------------------------------- */

/* Starts MPI (MPI_Init_thread, funneled) unless it is already running, and makes qkv's
 * communicators, duplicates of MPI_COMM_WORLD with MPI_ERRORS_RETURN. argc and argv may be
 * NULL. Calling it twice is harmless. Without MPI: a world of one process. The world is the
 * process's: call this layer from the thread that called qkv_dist_init (MPI's funneled
 * level; kernels still run on every OpenMP thread). Before init every build is a world of
 * one process. */
bool qkv_dist_init(int *argc, char ***argv);
/* Frees the communicator and ends MPI if qkv_dist_init started it. */
void qkv_dist_finalize(void);
int qkv_dist_rank(void);     /* 0 .. size - 1; 0 before init */
int qkv_dist_size(void);     /* ranks in the job; 1 before init and without MPI */
bool qkv_dist_has_mpi(void); /* whether qkv was built with MPI */
bool qkv_dist_barrier(void);

/* ---- Collectives ------------------------------------------------------------------------- */

typedef enum qkv_dist_op {
    QKV_DIST_SUM = 0,
    QKV_DIST_MEAN, /* the sum divided by the rank count; floats only */
    QKV_DIST_MAX,
} qkv_dist_op;

/* Reduces t (contiguous, any dtype, possibly empty) in place over every rank; every rank's t
 * must have the same dtype and element count. Floats are summed in one fixed order (pairwise
 * over the rank index), so every rank gets the same bits and a run repeats exactly. I64 sums
 * wrap as tensor.h says; BOOL SUM and MAX are logical or. */
bool qkv_dist_all_reduce(qkv_tensor *t, qkv_dist_op op);
/* The same for n tensors (of any dtypes and sizes, each as above), exchanged together. */
bool qkv_dist_all_reduce_list(qkv_tensor *const *tensors, int n, qkv_dist_op op);
/* Copies root's t (contiguous) into every rank's t, which must have the same dtype and size. */
bool qkv_dist_broadcast(qkv_tensor *t, int root);
/* Rank 0's parameters and buffers into every rank's module (same names, shapes and dtypes,
 * checked on every rank before anything is written). */
bool qkv_dist_broadcast_module(qkv_module *module);
/* Rank 0's optimizer state (moments, step counts, hyperparameters: qkv_optimizer_state_export)
 * into every rank's optimizer, which must have the same type, groups and parameters. */
bool qkv_dist_broadcast_optimizer(qkv_optimizer *opt);
/* The sum of a sequence of values spread over the ranks in rank order (rank r gives n_local
 * values, possibly 0), taken pairwise in one fixed tree over the global index: the tree of the
 * trainer's gradients when the count is a power of two. *sum is the same on every rank and for
 * every rank count. For sharded evaluation: per-micro-batch losses. */
bool qkv_dist_tree_sum(const double *local, int n_local, double *sum);
/* Exact integer sums over the ranks of n counters, in place (correct predictions, tokens). */
bool qkv_dist_sum_counts(int64_t *counts, int n);

/* ---- The data-parallel trainer ----------------------------------------------------------- */

typedef struct qkv_dist_options {
    int micro_batches;   /* M: a power of two that the rank count divides; 0 for the rank
                            count (then M, and so the bits, follow N: set M to compare runs
                            at several rank counts). One per rank in plain mode. */
    size_t bucket_bytes; /* gradients exchanged together; 0 for 1 MiB */
    bool plain;          /* bucketed MPI_Iallreduce, no micro-batches: not bit-identical */
    uint64_t seed;       /* keys the model's generators with step and micro-batch */
} qkv_dist_options;

typedef struct qkv_dist_trainer qkv_dist_trainer;

/* A trainer over model's parameters (depth-first registration order; buckets are filled in
 * the reverse order, as the backward finishes them). Collective: every rank exchanges a small
 * signature (rank count check, M, mode, bucket size, parameter count, shapes and dtypes), and
 * a difference on any rank fails the creation on every rank with a message naming the rank
 * and what differs. Parameters are F32 or F64. Registers a gradient hook on each parameter
 * (qkv_register_grad_hook) until qkv_dist_trainer_free, so free the trainer before the
 * model. */
qkv_dist_trainer *qkv_dist_trainer_new(qkv_module *model, const qkv_dist_options *options);
void qkv_dist_trainer_free(qkv_dist_trainer *t); /* NULL is ignored */
int qkv_dist_micro_batches(const qkv_dist_trainer *t); /* M (the rank count in plain mode) */
/* This rank's micro-batches of each global batch: first .. first + count - 1. */
bool qkv_dist_micro_range(const qkv_dist_trainer *t, int *first, int *count);
/* Before micro-batch micro's forward of optimizer step `step`: sets every generator the model
 * registered (qkv_module_generators) to a state made from the seed, the step, the micro-batch
 * and the generator's position in the list, so dropout masks do not depend on the rank. g, if
 * not NULL, gets a generator of its own for the same (step, micro) for the caller's draws. */
bool qkv_dist_micro_begin(qkv_dist_trainer *t, int64_t step, int micro, qkv_generator *g);
/* The backward of micro-batch micro's loss (a one-element tensor; NULL for a micro-batch
 * without samples, which contributes nothing). This rank's micro-batches go in order, first
 * to last; gradients the parameters hold at the first are dropped. The gradients are taken
 * into the trainer's partial sums; during the last micro-batch's backward each bucket's
 * exchange starts as soon as its gradients are final. */
bool qkv_dist_backward(qkv_dist_trainer *t, qkv_tensor *loss, int micro);
/* Waits for every exchange and sets each parameter's grad to the sum over all micro-batches
 * of every rank (a parameter that got no gradient anywhere gets zeros). Then clip and step. */
bool qkv_dist_finish(qkv_dist_trainer *t);

/* What the last finish measured, for benchmarks: bytes each rank sent, the time from the first
 * exchange's start to the last one's end, and the part of it spent waiting in
 * qkv_dist_finish (what the backward did not hide). */
typedef struct qkv_dist_stats {
    int buckets;
    uint64_t bytes_sent;
    double exchange_seconds;
    double wait_seconds;
} qkv_dist_stats;
qkv_dist_stats qkv_dist_trainer_stats(const qkv_dist_trainer *t);

/* ---- Checkpoints ------------------------------------------------------------------------- */

/* qkv_checkpoint_save on rank 0 only; every rank returns whether the file was written. Every
 * rank resumes with qkv_checkpoint_load, at any rank count: the step count is saved with the
 * optimizer, and the draws depend on it, not on the rank. */
bool qkv_dist_checkpoint_save(const qkv_module *module, const qkv_optimizer *opt,
                              const char *path, const qkv_checkpoint_contents *extras);

#ifdef __cplusplus
}
#endif
#endif
