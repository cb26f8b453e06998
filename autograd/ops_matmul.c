/* qkv_matmul and its backward. */
#include <string.h>

#include "autograd/autograd_internal.h"

#define IN(i) (node->inputs[i])

/* t with a 1-D operand lifted as torch.matmul does: [k] -> [1,k] on the left, [k,1] right */
static qkv_tensor *lifted(const qkv_tensor *t, bool left) {
    if (t->ndim >= 2) return (qkv_tensor *)t;
    return left ? qkv_unsqueeze(t, 0) : qkv_unsqueeze(t, 1);
}

/* The lifted operand's shape into shape; returns its ndim. For operands the node keeps only
 * as shells, which have no values to view. */
static int lifted_shape(const qkv_tensor *t, bool left, int64_t *shape) {
    if (t->ndim >= 2) {
        memcpy(shape, t->shape, (size_t)t->ndim * sizeof *shape);
        return t->ndim;
    }
    shape[0] = left ? 1 : t->shape[0];
    shape[1] = left ? t->shape[0] : 1;
    return 2;
}

/* For C = A B: dA = dC B^T and dB = A^T dC, each summed over the batch dimensions its operand
 * was broadcast along. When B is one matrix shared by a batch of A, dB is a single product
 * over the folded batch: A^T [k, batch*m] times dC [batch*m, n]. The node keeps A's values
 * only when B requires grad, and B's only when A does. */
static void matmul_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *a = IN(0), *b = IN(1);
    int64_t ashape[QKV_MAX_DIMS], bshape[QKV_MAX_DIMS], gshape[QKV_MAX_DIMS];
    int and = lifted_shape(a, true, ashape), bnd = lifted_shape(b, false, bshape);
    int gnd = 0;
    for (int i = 0; i < g->ndim - (a->ndim > 1) - (b->ndim > 1); i++) gshape[gnd++] = g->shape[i];
    gshape[gnd++] = ashape[and - 2];
    gshape[gnd++] = bshape[bnd - 1];
    qkv_tensor *G = qkv_reshape(g, gnd, gshape);
    /* dB first: A's values, when recomputed for this backward, are freed before dA is made. */
    if (b->requires_grad) {
        qkv_scope_begin(); /* the views of A die with it */
        qkv_tensor *A = lifted(a, true), *gb;
        if (bnd == 2 && and > 2) {
            int64_t k = ashape[and - 1], n = bshape[1];
            qkv_tensor *a2 = qkv_reshape(A, 2, (const int64_t[]){-1, k});
            qkv_tensor *g2 = qkv_reshape(G, 2, (const int64_t[]){-1, n});
            gb = qkv_matmul(qkv_transpose(a2, 0, 1), g2);
        } else {
            gb = qkv__sum_to(qkv_matmul(qkv_transpose(A, -1, -2), G), bnd, bshape);
        }
        gi[1] = qkv_scope_end_keep(qkv_reshape(gb, b->ndim, b->shape));
        qkv__release_values(node, 0);
    }
    if (a->requires_grad) {
        qkv_tensor *ga = qkv_matmul(G, qkv_transpose(lifted(b, false), -1, -2));
        gi[0] = qkv_reshape(qkv__sum_to(ga, and, ashape), a->ndim, a->shape);
    }
}
static const qkv_op_def matmul_op = {"matmul", matmul_backward, .cross = true};

qkv_tensor *qkv_matmul(const qkv_tensor *a, const qkv_tensor *b) {
    return qkv__record(qkv__matmul(a, b, "qkv_matmul"), &matmul_op, 2,
                       (const qkv_tensor *const[]){a, b});
}

/* For y = x W^T + b: dx = g W, dW = g^T x summed over every row, db = g summed over rows. */
static void affine_backward(qkv_node *node, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *x = IN(0), *w = IN(1), *b = IN(2);
    int64_t out_f = w->shape[0], in = w->shape[1];
    qkv_tensor *g2 = qkv_reshape(g, 2, (const int64_t[]){-1, out_f});
    /* dW first: x's values, when recomputed for this backward, are freed before dx is made. */
    if (w->requires_grad)
        gi[1] = QKV_SCOPED(qkv_matmul(qkv_transpose(g2, 0, 1),
                                      qkv_reshape(x, 2, (const int64_t[]){-1, in})));
    qkv__release_values(node, 0);
    if (x->requires_grad) gi[0] = qkv_matmul(g, w);
    if (b && b->requires_grad) gi[2] = qkv_sum(g2, 0, false);
}
static const qkv_op_def affine_op = {"affine", affine_backward, .drop = 0x4, .cross = true};

qkv_tensor *qkv_affine(const qkv_tensor *x, const qkv_tensor *weight, const qkv_tensor *bias) {
    return qkv__record(qkv__affine(x, weight, bias, "qkv_affine"), &affine_op, 3,
                       (const qkv_tensor *const[]){x, weight, bias});
}
