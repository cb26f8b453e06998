/*
 * Library-internal parts of the optimizers: the optimizer struct behind the public accessors,
 * and the helpers shared by the step driver, the state export/import and the built-in
 * optimizers. Never installed.
 */
#ifndef QKV_OPTIM_INTERNAL_H
#define QKV_OPTIM_INTERNAL_H

#include "optim/optim.h"

/* The updates round after every operation, in torch's order; a fused multiply-add would give
 * different last bits. GCC contracts nothing in ISO C mode; clang needs telling. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* The state of one parameter: its step count (updates applied to it) and its slot tensors
 * (NULL when unused or not yet made). */
typedef struct qkv_param_state {
    int64_t step;
    qkv_tensor *slots[QKV_OPTIM_SLOTS];
    bool fresh; /* the slots were made for the step under way (SGD starts its buffer there) */
} qkv_param_state;

typedef struct qkv_param_group {
    int n;
    char **names;            /* copies of the names given */
    qkv_tensor **params;     /* retained by the optimizer */
    qkv_param_state *state;  /* one per parameter */
    qkv_optim_config config; /* config.lr is the current learning rate (schedules set it) */
    double initial_lr;       /* the lr the group was added with: schedules scale from it */
} qkv_param_group;

struct qkv_optimizer {
    qkv_optimizer_def def;   /* a copy of what made it */
    void *ctx;               /* passed to def.update */
    bool parallel;           /* def.update shares its loop among the threads of a parallel
                                region (QKV__UPDATE_FOR): the built-in ones */
    int n_groups, cap_groups;
    qkv_param_group *groups;
    int64_t steps;           /* qkv_optimizer_step calls that succeeded */
};

/* A built-in optimizer: def's update loops are written with QKV__UPDATE_FOR. */
qkv_optimizer *qkv__optimizer_new(const qkv_optimizer_def *def);

/* torch.optim's checks of a config (plus finiteness); op and type name the error. */
bool qkv__optim_check_config(const char *op, const char *type,
                             const qkv_optim_config *c);
/* Makes p's grad contiguous with p's dtype (a copy only in unusual cases: the engine
 * accumulates contiguous grads of the parameter's dtype); an error naming op when its shape
 * differs from p's. */
bool qkv__fit_grad(const char *op, const char *name, qkv_tensor *p);

/* Whether the config c uses slot s of opt's definition. */
bool qkv__slot_used(const qkv_optimizer *opt, const qkv_optim_config *c, int s);

/* A copy of s from qkv__alloc (free with qkv__optim_free_str); NULL with an error on failure. */
char *qkv__optim_strdup(const char *s);
void qkv__optim_free_str(char *s);
/* Takes a reference to t, a new result, that the caller will hold beyond every scope: t itself
 * when no scope is open (the caller already owns it), else t retained (the scope drops its own
 * reference when it ends). Opening a scope of our own instead would leak when its begin fails
 * with none open, as the result then belongs to the caller. */
qkv_tensor *qkv__own(qkv_tensor *t);
/* A new tensor like t (zeros) held outside every scope, or NULL with an error. */
qkv_tensor *qkv__held_zeros_like(const qkv_tensor *t);

/* Pragmas for the clipping loops: split among nt threads only for large tensors; every
 * element's update is independent, so the result does not depend on the thread count. */
#ifdef _OPENMP
#define QKV__PARALLEL_FOR _Pragma("omp parallel for num_threads(nt) if(nt > 1) schedule(static)")
#else
#define QKV__PARALLEL_FOR (void)nt; /* one thread: the count is unused */
#endif

/* The pragma for the update loops. qkv_optimizer_step calls the update function of every
 * parameter from each thread of one parallel region, and each loop is shared among those
 * threads, a block at a time as they come free, with no barrier at its end (parameters are
 * independent): one fork and join per step instead of one per parameter, which matters when
 * other work competes for the cores. Outside a parallel region the loop runs whole on the
 * calling thread. */
#ifdef _OPENMP
#define QKV__UPDATE_FOR _Pragma("omp for schedule(dynamic, 4096) nowait")
#else
#define QKV__UPDATE_FOR
#endif

#endif
