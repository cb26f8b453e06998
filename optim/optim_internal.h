/*
 * Library-internal parts of the optimizers: the step driver shared by SGD, Adam and RMSprop,
 * and the shared vtable entries. Never installed.
 */
#ifndef QKV_OPTIM_INTERNAL_H
#define QKV_OPTIM_INTERNAL_H

#include "optim/optim.h"

/* The updates round after every operation, in torch's order; a fused multiply-add would give
 * different last bits. GCC contracts nothing in ISO C mode; clang needs telling. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* One parameter's update as raw contiguous arrays of n elements of dtype (F32 or F64). */
typedef struct qkv__update {
    int64_t n;
    qkv_dtype dtype;
    void *param;
    const void *grad;
    void *slot[QKV_OPTIM_SLOTS]; /* NULL for slots the config does not use */
    bool first;                  /* the slots were just made (zeros) for this step */
} qkv__update;

typedef void (*qkv__update_fn)(const qkv_optim_config *c, int64_t step, const qkv__update *u);

/* The body of every built-in step: makes missing slots (zeros) and contiguous same-dtype grads
 * first, so that nothing can fail once parameters start changing, then calls fn once per
 * parameter with a grad, with its step count already incremented, in no-grad mode. */
bool qkv__optimizer_step(qkv_optimizer *opt, qkv__update_fn fn);
qkv_optimizer *qkv__optimizer_new(const qkv_optimizer_vtable *vtable);

/* torch.optim's checks of a config (plus finiteness); op and type name the error. */
bool qkv__optim_check_config(const char *op, const char *type,
                             const qkv_optim_config *c);
/* Makes p's grad contiguous with p's dtype (a copy only in unusual cases: the engine
 * accumulates contiguous grads of the parameter's dtype); an error naming op when its shape
 * differs from p's. */
bool qkv__fit_grad(const char *op, const char *name, qkv_tensor *p);

/* The shared vtable entries. */
void qkv__optimizer_zero_grad(qkv_optimizer *opt);
void qkv__optimizer_free(qkv_optimizer *opt);
qkv_optim_state *qkv__optim_state_export(const qkv_optimizer *opt);
bool qkv__optim_state_import(qkv_optimizer *opt, const qkv_optim_state *state);

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

/* The pragma for the update loops. qkv__optimizer_step calls the update function of every
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
