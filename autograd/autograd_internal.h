/*
 * The graph node and the pieces every op definition uses. Never installed.
 *
 * An op is defined once, in its family's file, through the public contract of autograd.h: a
 * qkv_function (name, backward, optional recompute, arguments size) and a forward that runs
 * the tensor layer's kernels between qkv_function_begin and qkv_function_end, saving what its
 * backward reads with qkv_save. The backward, adjacent to it, turns the output's gradient
 * into one gradient per input using the public ops (grad mode is off while it runs). The
 * engine reduces each input gradient to its input's shape and dtype (undoing broadcasting),
 * so backwards may return broadcast-shaped gradients. docs/internals.md has the whole
 * contract and a worked example.
 *
 * Adding an op therefore touches its own file and one line elsewhere: its forward, backward
 * and static qkv_function side by side in autograd/ops_<family>.c, and its declaration in
 * autograd.h. Nothing else names the op. Composite ops built from public ops need no
 * backward at all.
 */
#ifndef QKV_AUTOGRAD_INTERNAL_H
#define QKV_AUTOGRAD_INTERNAL_H

#include <stdalign.h>
#include <stddef.h>

#include "autograd/autograd.h"
#include "tensor/tensor_internal.h"

typedef struct qkv_node qkv_node;

/* Chains of recomputations (a dropout's output from a GELU's from its input) go at most this
 * many ops deep. */
#define QKV_RECOMPUTE_DEPTH 2

/* One saved value. The engine decides how it is held: a tensor whose maker can recompute it
 * is held as a shell (shape, dtype and graph link, no storage) and recomputed when the
 * backward reads it; anything else is retained whole. */
typedef struct qkv_saved_value {
    qkv_tensor *t;        /* retained, or a shell; NULL for an empty slot */
    uint64_t version;     /* its storage's version when saved (held whole) */
    int input;            /* which input it is, or -1 (for messages) */
    bool lazy;            /* a shell, recomputed on read */
    bool attached;        /* a lazy shell holding recomputed values for one backward */
    bool output;          /* the node's own output, held without its graph link */
} qkv_saved_value;

struct qkv_node {
    qkv_node_base base;
    const qkv_function *fn;
    int refcount;                       /* tensors whose grad_fn this is */
    int n_inputs;
    qkv_tensor **inputs;                /* shells (a leaf that requires grad: itself); NULL once
                                           the graph is freed */
    qkv_saved_value saved[QKV_SAVED_SLOTS];
    uint32_t needed_grad;               /* inputs that required grad when recorded */
    int out_ndim;                       /* the output's shape and dtype, for backward */
    int64_t out_shape[QKV_MAX_DIMS];
    qkv_dtype out_dtype;
    bool failed;                        /* a save or an allocation failed in the forward */
    bool no_recompute;                  /* a value recompute reads could not be had */
    bool recomputing;                   /* its recompute is running */
    const qkv_tensor *const *forward_inputs; /* the inputs as given, until the forward ends */
    char *site;                         /* anomaly mode: the module path it was recorded in */
    int depth;                          /* recomputations needed to recompute the output
                                           (0: from held values), or -1 if it cannot be */
    /* engine state during one backward */
    qkv_tensor *grad;                   /* accumulated gradient of the output */
    int pending;                        /* consumers in this backward not yet processed */
    bool freed;                         /* inputs and saved released (graph freed) */
    uint64_t mark;                      /* the backward pass that last visited this node */
    qkv_tensor *retained_out;           /* weak: the output, when qkv_retain_grad asked */
    qkv_tensor *recomputed;             /* the output recomputed for one consumer's backward,
                                           kept for the others of the same backward */
    alignas(max_align_t) unsigned char args[]; /* fn->args_size bytes */
};

/* Saves t in slot only for recompute to read, never for the backward: held as a shell when
 * its maker can recompute it, whole when it is a leaf that requires grad (held anyway), and
 * otherwise not at all, which makes the node's output not recomputable. */
bool qkv__save_for_recompute(qkv_ctx *ctx, int slot, const qkv_tensor *t);
/* For a backward done reading slot: frees its values now if they were recomputed for it,
 * rather than when the backward returns. Nothing otherwise. */
void qkv__saved_release(qkv_ctx *ctx, int slot);
/* recompute for ops that save their own output in slot 0 */
qkv_tensor *qkv__saved_output(qkv_ctx *ctx);
/* Anomaly mode's sites: the path of module calls running on this thread (nn/module.c pushes
 * each call's name within its caller), so that an anomaly names where its op was recorded.
 * A pushed name is copied; names past QKV_SITE_DEPTH levels are dropped. */
#define QKV_SITE_DEPTH 32
void qkv__site_push(const char *name);
void qkv__site_pop(void);

/* Gradient hooks (autograd/hooks.c). A backward counts, for each leaf with hooks that its
 * graph reaches, the input slots of its nodes that hold the leaf (expect); each slot reports
 * once its node has run (contributed), and the last runs the leaf's hooks. run calls them at
 * once (a backward from the leaf itself). */
void qkv__hooks_expect(qkv_tensor *leaf, uint64_t backward);
void qkv__hooks_contributed(qkv_tensor *leaf);
void qkv__hooks_run(qkv_tensor *leaf);

/* The inputs argument of qkv_function_begin: QKV_INPUTS(a, b). */
#define QKV_INPUTS(...) ((const qkv_tensor *const[]){__VA_ARGS__})

/* Reduces a gradient of a broadcast shape back to shape (sums the broadcast dims). */
qkv_tensor *qkv__sum_to(const qkv_tensor *g, int ndim, const int64_t *shape);
bool qkv__needs_grad(const qkv_tensor *t);

/* torch.nn.functional.layer_norm over the last ndim dims of x, as one op (autograd/ops_norm.c):
 * weight and bias (NULL for none) have those dims' size and x's float dtype. name is the op
 * for messages. */
qkv_tensor *qkv__layer_norm(const qkv_tensor *x, int ndim, const qkv_tensor *weight,
                            const qkv_tensor *bias, double eps, const char *name);

#endif
