/* qkv_matmul and its backward. */
#include <string.h>

#include "autograd/autograd_internal.h"

#define IN(i) qkv_ctx_input(ctx, i)
#define NEEDS(i) qkv_ctx_needs_grad(ctx, i)

/* t with a 1-D operand lifted as torch.matmul does: [k] -> [1,k] on the left, [k,1] right */
static qkv_tensor *lifted(const qkv_tensor *t, bool left) {
    if (!t || t->ndim >= 2) return (qkv_tensor *)t;
    return left ? qkv_unsqueeze(t, 0) : qkv_unsqueeze(t, 1);
}

/* The lifted operand's shape into shape; returns its ndim. From the node's shell of the
 * input, which has no values to view. */
static int lifted_shape(const qkv_tensor *t, bool left, int64_t *shape) {
    if (t->ndim >= 2) {
        memcpy(shape, t->shape, (size_t)t->ndim * sizeof *shape);
        return t->ndim;
    }
    shape[0] = left ? 1 : t->shape[0];
    shape[1] = left ? t->shape[0] : 1;
    return 2;
}

/* alpha (x @ y), differentiable: the backward's products of a scaled product. */
static bool autocast_operands(const qkv_tensor **a, const qkv_tensor **b,
                              const qkv_tensor **input);

/* alpha x @ y for a gradient, laid out as the operand like it is for where that is a dense
 * permutation (qkv__matmul_like): through the views the operand came from (a transpose, a
 * head split) it then arrives as a contiguous tensor of their base, and nothing after it
 * copies to undo them. */
static qkv_tensor *scaled_matmul(const qkv_tensor *x, const qkv_tensor *y, double alpha,
                                 const qkv_tensor *like) {
    if (!autocast_operands(&x, &y, NULL)) return NULL;
    return qkv__matmul_like(x, y, alpha, like, alpha == 1 ? "qkv_matmul" : "qkv_baddbmm");
}

/* For C = alpha A B: dB = alpha A^T dC and dA = alpha dC B^T, each summed over the batch
 * dimensions its operand was broadcast along. When B is one matrix shared by a batch of A,
 * dB is a single product over the folded batch: A^T [k, batch*m] times dC [batch*m, n]. A
 * and B are inputs ia and ia + 1, saved in slots 0 and 1; the forward saves A only when B
 * requires grad, and B only when A does. */
static void product_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi, int ia,
                             double alpha) {
    const qkv_tensor *a = IN(ia), *b = IN(ia + 1);
    int64_t ashape[QKV_MAX_DIMS], bshape[QKV_MAX_DIMS], gshape[QKV_MAX_DIMS];
    int and = lifted_shape(a, true, ashape), bnd = lifted_shape(b, false, bshape);
    int gnd = 0;
    for (int i = 0; i < g->ndim - (a->ndim > 1) - (b->ndim > 1); i++) gshape[gnd++] = g->shape[i];
    gshape[gnd++] = ashape[and - 2];
    gshape[gnd++] = bshape[bnd - 1];
    qkv_tensor *G = qkv_reshape(g, gnd, gshape);
    /* dB first: A's values, when recomputed for this backward, are freed before dA is made. */
    if (NEEDS(ia + 1)) {
        qkv_scope_begin(); /* the views of A die with it */
        qkv_tensor *A = lifted(qkv_saved(ctx, 0), true), *gb;
        if (bnd == 2 && and > 2) {
            /* rows counted, not inferred: -1 cannot infer them when k or n is 0 */
            int64_t k = ashape[and - 1], n = bshape[1], rows = qkv__numel(and - 1, ashape);
            qkv_tensor *a2 = qkv_reshape(A, 2, (const int64_t[]){rows, k});
            qkv_tensor *g2 = qkv_reshape(G, 2, (const int64_t[]){rows, n});
            gb = scaled_matmul(qkv_transpose(a2, 0, 1), g2, alpha, b);
        } else {
            gb = qkv__sum_to(scaled_matmul(qkv_transpose(A, -1, -2), G, alpha, b), bnd,
                             bshape);
        }
        gi[ia + 1] = qkv_scope_end_keep(qkv_reshape(gb, b->ndim, b->shape));
        qkv__saved_release(ctx, 0);
    }
    if (NEEDS(ia)) {
        qkv_tensor *ga = scaled_matmul(G, qkv_transpose(lifted(qkv_saved(ctx, 1), false), -1, -2),
                                       alpha, a);
        gi[ia] = qkv_reshape(qkv__sum_to(ga, and, ashape), a->ndim, a->shape);
    }
}

static void matmul_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    product_backward(ctx, g, gi, 0, 1.0);
}
static const qkv_function matmul_fn = {.name = "matmul", .backward = matmul_backward};

/* The operands lowered to bf16 under autocast, as torch's lower-precision op list has
 * matmul and baddbmm; false when a cast failed. */
static bool autocast_operands(const qkv_tensor **a, const qkv_tensor **b,
                              const qkv_tensor **input) {
    if (!qkv_is_autocast_enabled() || !*a || !*b) return true;
    *a = qkv__autocast_lower(*a);
    *b = *a ? qkv__autocast_lower(*b) : NULL;
    if (!*b) return false;
    return !input || !*input || (*input = qkv__autocast_lower(*input));
}

qkv_tensor *qkv_matmul(const qkv_tensor *a, const qkv_tensor *b) {
    if (!autocast_operands(&a, &b, NULL)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&matmul_fn, 2, QKV_INPUTS(a, b), NULL);
    if (NEEDS(0)) qkv_save(ctx, 1, b);
    if (NEEDS(1)) qkv_save(ctx, 0, a);
    return qkv_function_end(ctx, qkv__matmul(a, b, "qkv_matmul"));
}

typedef struct baddbmm_args {
    double alpha;
} baddbmm_args;

/* d input = the gradient summed to input's shape; the operands' as a product's, times alpha. */
static void baddbmm_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    double alpha = ((const baddbmm_args *)qkv_ctx_args(ctx))->alpha;
    product_backward(ctx, g, gi, 1, alpha);
    if (NEEDS(0)) gi[0] = qkv__sum_to(g, IN(0)->ndim, IN(0)->shape);
}
static const qkv_function baddbmm_fn = {.name = "baddbmm", .backward = baddbmm_backward,
                                        .args_size = sizeof(baddbmm_args)};

qkv_tensor *qkv_baddbmm(const qkv_tensor *input, const qkv_tensor *a, const qkv_tensor *b,
                        double alpha) {
    if (!input && alpha == 1) return qkv_matmul(a, b);
    if (!autocast_operands(&a, &b, &input)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&baddbmm_fn, 3, QKV_INPUTS(input, a, b),
                                      &(baddbmm_args){alpha});
    if (NEEDS(1)) qkv_save(ctx, 1, b);
    if (NEEDS(2)) qkv_save(ctx, 0, a);
    return qkv_function_end(ctx, qkv__baddbmm(input, a, b, alpha, "qkv_baddbmm"));
}

/* ---- Triangular products ---------------------------------------------------------------- */

typedef struct matmul_tri_args {
    qkv_tri tri;
} matmul_tri_args;

/* The gradients stay triangular products. For C = tril(A B): dA = tril(G) B^T and
 * dB = A^T tril(G) = (triu(G^T) A)^T. For C = tril(A) B: dA = tril(G B^T) and
 * dB = triu(A^T) G. The upper kinds mirror them. Each is summed over the batch dimensions
 * its operand was broadcast along. */
static void matmul_tri_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    qkv_tri tri = ((const matmul_tri_args *)qkv_ctx_args(ctx))->tri;
    const qkv_tensor *a = IN(0), *b = IN(1);
    bool lower = tri == QKV_TRIL_OUT || tri == QKV_TRIL_A;
    bool out_kind = tri == QKV_TRIL_OUT || tri == QKV_TRIU_OUT;
    qkv_tri same_a = lower ? QKV_TRIL_A : QKV_TRIU_A, other_a = lower ? QKV_TRIU_A : QKV_TRIL_A;
    if (NEEDS(1)) {
        qkv_scope_begin();
        qkv_tensor *A = qkv_saved(ctx, 0), *gb;
        if (out_kind)
            gb = qkv_transpose(qkv_matmul_tri(qkv_transpose(g, -1, -2), A, other_a), -1, -2);
        else
            gb = qkv_matmul_tri(qkv_transpose(A, -1, -2), g, other_a);
        gi[1] = qkv_scope_end_keep(qkv__sum_to(gb, b->ndim, b->shape));
        qkv__saved_release(ctx, 0);
    }
    if (NEEDS(0)) {
        qkv_tri t = out_kind ? same_a : lower ? QKV_TRIL_OUT : QKV_TRIU_OUT;
        qkv_tensor *ga = qkv_matmul_tri(g, qkv_transpose(qkv_saved(ctx, 1), -1, -2), t);
        gi[0] = qkv__sum_to(ga, a->ndim, a->shape);
    }
}
static const qkv_function matmul_tri_fn = {.name = "matmul_tri",
                                           .backward = matmul_tri_backward,
                                           .args_size = sizeof(matmul_tri_args)};

qkv_tensor *qkv_matmul_tri(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri) {
    if (tri == QKV_TRI_NONE) return qkv_matmul(a, b);
    if (!autocast_operands(&a, &b, NULL)) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&matmul_tri_fn, 2, QKV_INPUTS(a, b),
                                      &(matmul_tri_args){tri});
    if (NEEDS(0)) qkv_save(ctx, 1, b);
    if (NEEDS(1)) qkv_save(ctx, 0, a);
    return qkv_function_end(ctx, qkv__matmul_tri(a, b, tri, "qkv_matmul_tri"));
}

/* For y = x W^T + b: dx = g W, dW = g^T x summed over every row, db = g summed over rows. */
static void affine_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *w = IN(1);
    /* rows counted from g's leading dims: with no features in or out, -1 cannot infer them */
    int64_t out_f = w->shape[0], in = w->shape[1], rows = qkv__numel(g->ndim - 1, g->shape);
    qkv_tensor *g2 = qkv_reshape(g, 2, (const int64_t[]){rows, out_f});
    /* dW first: x's values, when recomputed for this backward, are freed before dx is made.
     * db, the sums of g's columns, comes from dW's pass over g where the GEMM can add them. */
    qkv_tensor *db = NULL;
    if (NEEDS(1)) {
        qkv_scope_begin();
        qkv_tensor *gt = qkv_transpose(g2, 0, 1);
        qkv_tensor *x2 = qkv_reshape(qkv_saved(ctx, 0), 2, (const int64_t[]){rows, in});
        if (NEEDS(2) && !qkv_is_autocast_enabled() && qkv__matmul_rowsum_fits(gt, x2)) {
            gi[1] = qkv_keep(qkv__matmul_rowsum(gt, x2, &db, "qkv_affine"));
            db = qkv_keep(db);
        } else {
            gi[1] = qkv_keep(qkv_matmul(gt, x2));
        }
        qkv_scope_end();
    }
    qkv__saved_release(ctx, 0);
    if (NEEDS(0)) gi[0] = qkv_matmul(g, qkv_saved(ctx, 1));
    if (NEEDS(2)) gi[2] = db ? db : qkv_sum(g2, 0, false);
}
static const qkv_function affine_fn = {.name = "affine", .backward = affine_backward};

qkv_tensor *qkv_affine(const qkv_tensor *x, const qkv_tensor *weight, const qkv_tensor *bias) {
    if (qkv_is_autocast_enabled() && x && weight) {
        x = qkv__autocast_lower(x);
        weight = x ? qkv__autocast_lower(weight) : NULL;
        if (!x || !weight || (bias && !(bias = qkv__autocast_lower(bias)))) return NULL;
    }
    qkv_ctx *ctx = qkv_function_begin(&affine_fn, 3, QKV_INPUTS(x, weight, bias), NULL);
    if (NEEDS(0)) qkv_save(ctx, 1, weight);
    if (NEEDS(1)) qkv_save(ctx, 0, x);
    return qkv_function_end(ctx, qkv__affine(x, weight, bias, "qkv_affine"));
}
