/*
 * The graph node and the pieces every op definition uses. Never installed.
 *
 * An op is defined once, in its family's file: a forward that computes the result with the
 * tensor layer's kernels and then calls qkv__record, and a backward adjacent to it that turns
 * the output's gradient into one gradient per input using the public ops (grad mode is off
 * while backward runs). The engine reduces each input gradient to its input's shape and dtype
 * (undoing broadcasting), so backwards may return broadcast-shaped gradients.
 *
 * Adding an op therefore touches its own file and one line elsewhere: a new ops_<name>.c
 * holding the forward, the backward and their static qkv_op_def (name, backward, and which
 * inputs' values the backward reads, side by side), listed in autograd/meson.build; plus its
 * declaration in autograd.h. Nothing else names the op: the engine reaches a backward through
 * the node's qkv_op_def. Composite ops built from public ops need no backward at all.
 */
#ifndef QKV_AUTOGRAD_INTERNAL_H
#define QKV_AUTOGRAD_INTERNAL_H

#include "autograd/autograd.h"
#include "tensor/tensor_internal.h"

typedef struct qkv_node qkv_node;

/* grads has one slot per input, all NULL on entry; leave a slot NULL for no gradient. */
typedef void (*qkv_backward_fn)(qkv_node *node, const qkv_tensor *grad, qkv_tensor **grads);

/* The node's output values computed again from what the node holds (qkv__values for its
 * inputs), bit for bit as the forward made them; owned by the innermost scope. */
typedef qkv_tensor *(*qkv_recompute_fn)(qkv_node *node);

/* What a node keeps of its inputs. A backward reads an input's values only where its op's
 * def allows; for every other input the node holds a shell with the input's shape, dtype and
 * graph link but no storage, so a forward's intermediates are freed as soon as nothing else
 * holds them. A leaf that requires grad is always held whole: its .grad is accumulated.
 *
 * An input whose values are read but which a cheap op made (an activation, a dropout, an op
 * that saves its own output) is held as a shell too, and recomputed from what its maker holds
 * when the backward runs: a GELU's output from the GELU's input, which the GELU keeps for its
 * own backward anyway, or a dropout's from its input and bit mask. Chains of such ops are
 * recomputed at most QKV_RECOMPUTE_DEPTH ops deep. */
#define QKV_DROP_ALL UINT32_MAX
#define QKV_RECOMPUTE_DEPTH 2

typedef struct qkv_op_def {
    const char *name;
    qkv_backward_fn backward;
    uint32_t drop;  /* inputs (bit i for input i) whose values the backward never reads */
    bool cross;     /* the others' values are read only for another input's gradient, as in a
                       product (d(ab)/da needs b): kept only when another input requires grad */
    qkv_recompute_fn recompute;  /* NULL where recomputing costs more than keeping */
    uint32_t recompute_reads;    /* inputs whose values recompute reads */
} qkv_op_def;

#define QKV_NODE_SAVED 4
#define QKV_UNVERSIONED UINT64_MAX
#define QKV_NODE_ARGS 8

struct qkv_node {
    qkv_node_base base;
    const qkv_op_def *op;
    int refcount;                       /* tensors whose grad_fn this is */
    int n_inputs;
    qkv_tensor **inputs;                /* retained, or shells (see qkv_op_def); NULL once the
                                           graph is freed */
    qkv_tensor *saved[QKV_NODE_SAVED];  /* retained extras (an output's values, a mask) */
    /* The storage versions the forward saw (see qkv_version), checked before the values are
     * read: of each input held whole whose values the backward or recompute reads
     * (QKV_UNVERSIONED for the others; after inputs, in the same block), and of saved. */
    uint64_t *versions;
    uint32_t recompute_only;            /* versioned inputs that only recompute reads */
    uint64_t saved_version[QKV_NODE_SAVED];
    int64_t iargs[QKV_NODE_ARGS];       /* op parameters */
    double dargs[QKV_NODE_ARGS];
    int out_ndim;                       /* the output's shape and dtype, for backward */
    int64_t out_shape[QKV_MAX_DIMS];
    qkv_dtype out_dtype;
    /* engine state during one backward */
    qkv_tensor *grad;                   /* accumulated gradient of the output */
    int pending;                        /* consumers in this backward not yet processed */
    bool freed;                         /* inputs and saved released (graph freed) */
    uint64_t mark;                      /* the backward pass that last visited this node */
    qkv_tensor *retained_out;           /* weak: the output, when qkv_retain_grad asked */
    qkv_tensor *recomputed;             /* the output recomputed for one consumer's backward,
                                           kept for the others of the same backward */
    uint32_t needed_grad;               /* inputs that required grad when recorded */
    uint32_t materialize;               /* inputs held as shells that the backward reads:
                                           recomputed before it runs */
    int depth;                          /* recomputations needed to recompute the output
                                           (0: from held values), or -1 if it cannot be */
};

/* Records a node for out when grad mode is on and an input requires grad: out->grad_fn is set
 * and out->requires_grad becomes true. Returns out, or NULL (out released) on failure. NULL
 * inputs are allowed. */
qkv_tensor *qkv__record(qkv_tensor *out, const qkv_op_def *op, int n_inputs,
                        const qkv_tensor *const *inputs);
/* A tensor sharing t's storage and geometry but with no graph links, retained into
 * node->saved[slot]: for saving an op's own output without a reference cycle. */
bool qkv__save_output(qkv_node *node, int slot, const qkv_tensor *out);
bool qkv__save(qkv_node *node, int slot, const qkv_tensor *t);
/* Input i's values: the input itself when the node holds it whole, else its maker's
 * recomputation (owned by the innermost scope). NULL with an error if it cannot be had. */
qkv_tensor *qkv__values(qkv_node *node, int i);
/* For a backward done reading input i: frees its values now if they were recomputed for it,
 * rather than when the backward returns. Nothing otherwise. */
void qkv__release_values(qkv_node *node, int i);
/* recompute for ops that save their own output in saved[0] */
qkv_tensor *qkv__saved_output(qkv_node *node);
/* Reduces a gradient of a broadcast shape back to shape (sums the broadcast dims). */
qkv_tensor *qkv__sum_to(const qkv_tensor *g, int ndim, const int64_t *shape);
bool qkv__needs_grad(const qkv_tensor *t);

/* torch.nn.functional.layer_norm over the last ndim dims of x, as one op (autograd/ops_norm.c):
 * weight and bias (NULL for none) have those dims' size and x's float dtype. name is the op
 * for messages. */
qkv_tensor *qkv__layer_norm(const qkv_tensor *x, int ndim, const qkv_tensor *weight,
                            const qkv_tensor *bias, double eps, const char *name);

#endif
