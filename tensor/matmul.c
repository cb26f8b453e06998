/*
 * Matrix products with torch.matmul semantics, lowered onto the batched strided GEMM.
 * Operands are never copied for their layout: transposes and head-split permutations reach
 * the GEMM as strides and per-batch offsets.
 */
#include <math.h>
#include <string.h>

#include "tensor/tensor_internal.h"

/* A 2-D-or-more geometry for an operand: 1-D vectors gain a unit dimension. */
typedef struct operand {
    int ndim;
    int64_t shape[QKV_MAX_DIMS], strides[QKV_MAX_DIMS];
} operand;

static void lift(const qkv_tensor *t, bool is_left, operand *o) {
    if (t->ndim >= 2) {
        o->ndim = t->ndim;
        memcpy(o->shape, t->shape, sizeof o->shape);
        memcpy(o->strides, t->strides, sizeof o->strides);
    } else if (is_left) { /* [k] -> [1, k] */
        o->ndim = 2;
        o->shape[0] = 1;
        o->strides[0] = 0;
        o->shape[1] = t->shape[0];
        o->strides[1] = t->strides[0];
    } else { /* [k] -> [k, 1] */
        o->ndim = 2;
        o->shape[0] = t->shape[0];
        o->strides[0] = t->strides[0];
        o->shape[1] = 1;
        o->strides[1] = 0;
    }
}

/* Whether the batch dimensions and the row dimension of o step through memory as one
 * dimension, so that a batch of row blocks is a single taller matrix; *rs gets its row
 * stride. An axis of size 1 takes no step, so its stride, arbitrary as in PyTorch, never
 * counts. */
static bool rows_fold(const operand *o, int64_t *rs) {
    bool outer = false;
    int64_t next = 0;
    *rs = o->strides[o->ndim - 2];
    for (int i = o->ndim - 2; i >= 0; i--) {
        if (o->shape[i] == 1) continue;
        if (!outer) *rs = o->strides[i];
        else if (o->strides[i] != next) return false;
        outer = true;
        next = o->strides[i] * o->shape[i];
    }
    return true;
}

/* bias (per batch entry at bias + bo[p] when bo is not NULL) only for f32 and f64. */
static void gemm(qkv_dtype dt, qkv_tri tri, int64_t batch, int64_t m, int64_t n, int64_t k,
                 double alpha, const void *a, const int64_t *ao, int64_t rsa, int64_t csa,
                 const void *b, const int64_t *bo, int64_t rsb, int64_t csb, const void *bias,
                 const int64_t *biaso, void *c, const int64_t *co, int64_t rsc, int64_t csc) {
    if (dt == QKV_F32)
        qkv__gemm_tri_f32(tri, batch, m, n, k, (float)alpha, a, ao, rsa, csa, b, bo, rsb, csb,
                          bias, biaso, c, co, rsc, csc);
    else if (dt == QKV_BF16) /* f32 accumulation, one rounding per element, as torch's */
        qkv__gemm_bf16_out(batch, m, n, k, (float)alpha, a, ao, rsa, csa, b, bo, rsb, csb, c,
                           co, rsc, csc);
    else
        qkv__gemm_tri_f64(tri, batch, m, n, k, alpha, a, ao, rsa, csa, b, bo, rsb, csb, bias,
                          biaso, c, co, rsc, csc);
}

static qkv_tensor *matmul_error(const char *name, const qkv_tensor *a, const qkv_tensor *b,
                                const char *what) {
    char sa[128], sb[128];
    return qkv_set_error("%s: %s: %s @ %s", name, what, qkv_shape_str(a, sa, sizeof sa),
                         qkv_shape_str(b, sb, sizeof sb));
}

/* A triangular product in bf16: the bf16 GEMM has no triangular mode, so the masked operand
 * (or the masked product) is made whole; the values are those of the f32 path's rule. */
static qkv_tensor *matmul_tri_bf16(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri,
                                   const char *name) {
    bool out_mode = tri == QKV_TRIL_OUT || tri == QKV_TRIU_OUT;
    bool upper = tri == QKV_TRIU_OUT || tri == QKV_TRIU_A;
    const qkv_tensor *zero = qkv_zeros(QKV_BF16, 0, NULL);
    const qkv_tensor *cols = out_mode ? b : a;
    qkv_tensor *mask = qkv__tri_mask(a->shape[a->ndim - 2], cols->shape[cols->ndim - 1], 0,
                                     upper);
    if (!zero || !mask) return NULL;
    if (out_mode) {
        qkv_tensor *full = qkv__matmul_tri(a, b, QKV_TRI_NONE, name);
        return full ? qkv__where(mask, full, zero, name) : NULL;
    }
    qkv_tensor *masked = qkv__where(mask, a, zero, name);
    return masked ? qkv__matmul_tri(masked, b, QKV_TRI_NONE, name) : NULL;
}

/* Whether term, broadcast to the product's shape (batch dims bshape, then m x n), is one row
 * per matrix: n contiguous values (or one), the same for every row. Then the GEMM adds it as
 * it stores each tile, with *st the term's strides over the batch dims (0 where it is
 * broadcast). */
static bool row_term(const qkv_tensor *t, qkv_dtype dt, int nbatch, const int64_t *bshape,
                     int64_t m, int64_t n, int64_t *st) {
    if (!t || t->dtype != dt || dt == QKV_BF16 || t->ndim > nbatch + 2) return false;
    int64_t shape[QKV_MAX_DIMS], strides[QKV_MAX_DIMS];
    for (int i = 0; i < nbatch; i++) shape[i] = bshape[i];
    shape[nbatch] = m;
    shape[nbatch + 1] = n;
    qkv__broadcast_strides(t, nbatch + 2, shape, strides);
    if ((m > 1 && strides[nbatch] != 0) || (n > 1 && strides[nbatch + 1] != 1)) return false;
    memcpy(st, strides, (size_t)nbatch * sizeof *st);
    return true;
}

static qkv_tensor *matmul_core(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri,
                               double alpha, const qkv_tensor *term, bool *added,
                               const qkv_tensor *like, const char *name);

qkv_tensor *qkv__matmul(const qkv_tensor *a, const qkv_tensor *b, const char *name) {
    return matmul_core(a, b, QKV_TRI_NONE, 1.0, NULL, NULL, NULL, name);
}

qkv_tensor *qkv__matmul_like(const qkv_tensor *a, const qkv_tensor *b, double alpha,
                             const qkv_tensor *like, const char *name) {
    if (!isfinite(alpha)) return qkv_set_error("%s: alpha %g is not finite", name, alpha);
    return matmul_core(a, b, QKV_TRI_NONE, alpha, NULL, NULL, like, name);
}

bool qkv__matmul_rowsum_fits(const qkv_tensor *a, const qkv_tensor *b) {
    return a && b && a->ndim == 2 && b->ndim == 2 && a->dtype == b->dtype &&
           (a->dtype == QKV_F32 || a->dtype == QKV_F64) && a->shape[1] == b->shape[0] &&
           a->numel > 0 && b->numel > 0;
}

qkv_tensor *qkv__matmul_rowsum(const qkv_tensor *a, const qkv_tensor *b, qkv_tensor **rowsum,
                               const char *name) {
    *rowsum = NULL;
    if (!qkv__matmul_rowsum_fits(a, b))
        return qkv_set_error("%s: the fused row sums need two non-empty f32 or f64 matrices "
                             "of one dtype that multiply", name);
    QKV__OP(name);
    if (!QKV__CHECK(name, a, b)) return NULL;
    int64_t m = a->shape[0], k = a->shape[1], n = b->shape[1];
    qkv_tensor *out = qkv_empty(a->dtype, 2, (const int64_t[]){m, n});
    qkv_tensor *sums = out ? qkv_empty(a->dtype, 1, &m) : NULL;
    if (!sums) return NULL;
    if (a->dtype == QKV_F32)
        qkv__gemm_rowsum_f32(m, n, k, qkv_data(a), a->strides[0], a->strides[1], qkv_data(b),
                             b->strides[0], b->strides[1], qkv_data(out), n, qkv_data(sums));
    else
        qkv__gemm_rowsum_f64(m, n, k, qkv_data(a), a->strides[0], a->strides[1], qkv_data(b),
                             b->strides[0], b->strides[1], qkv_data(out), n, qkv_data(sums));
    *rowsum = sums;
    return out;
}

qkv_tensor *qkv__matmul_tri(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri,
                            const char *name) {
    return matmul_core(a, b, tri, 1.0, NULL, NULL, NULL, name);
}

/* input + alpha (a @ b), input broadcast to the product's shape. A term of row form
 * (row_term) is added by the GEMM; any other by the add op after it. */
qkv_tensor *qkv__baddbmm(const qkv_tensor *input, const qkv_tensor *a, const qkv_tensor *b,
                         double alpha, const char *name) {
    if (QKV__NULL_ARGS(name, a, b)) return NULL;
    if (!isfinite(alpha)) return qkv_set_error("%s: alpha %g is not finite", name, alpha);
    if (!input) return matmul_core(a, b, QKV_TRI_NONE, alpha, NULL, NULL, NULL, name);
    QKV__OP(name);
    if (!QKV__CHECK(name, input)) return NULL;
    qkv_scope_begin();
    bool added;
    qkv_tensor *out = matmul_core(a, b, QKV_TRI_NONE, alpha, input, &added, NULL, name);
    if (out && !added) out = qkv__binary(QKV_OP_ADD, out, input, name);
    return qkv_scope_end_keep(out);
}

/* Strides for the product laid out as like (qkv__matmul_like): false when like's shape is not
 * the product's, its layout is not dense, it is contiguous already, or neither of its last two
 * dimensions is the innermost. */
static bool like_layout(const qkv_tensor *like, int ond, const int64_t *oshape, int64_t *st) {
    if (!like || like->ndim != ond || ond < 2 ||
        memcmp(like->shape, oshape, (size_t)ond * sizeof *oshape) || qkv_is_contiguous(like) ||
        !qkv__dense_layout(like, st))
        return false;
    return st[ond - 1] == 1 || st[ond - 2] == 1;
}

/* alpha (a @ b), of the triangle tri; with term (tri none), *added tells whether the GEMM
 * added it (row_term); with like (no term, no triangle), laid out as like_layout says. */
static qkv_tensor *matmul_core(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri,
                               double alpha, const qkv_tensor *term, bool *added,
                               const qkv_tensor *like, const char *name) {
    if (added) *added = false;
    if (QKV__NULL_ARGS(name, a, b)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a, b)) return NULL;
    if (a->ndim == 0 || b->ndim == 0) return matmul_error(name, a, b, "both operands need a dimension");
    if (tri && (a->ndim < 2 || b->ndim < 2))
        return matmul_error(name, a, b, "a triangular product needs matrices");
    if ((unsigned)tri > QKV_TRIU_A)
        return qkv_set_error("%s: %d is not a qkv_tri", name, (int)tri);
    if (!qkv__is_float(a->dtype) || !qkv__is_float(b->dtype))
        return matmul_error(name, a, b, "operands must be f32, f64 or bf16");
    if (a->dtype != b->dtype) {
        qkv_scope_begin();
        qkv_dtype dt = qkv__promote(a->dtype, b->dtype);
        qkv_tensor *out = qkv_keep(matmul_core(a->dtype == dt ? a : qkv__to_dtype(a, dt),
                                               b->dtype == dt ? b : qkv__to_dtype(b, dt), tri,
                                               alpha, term, added, like, name));
        qkv_scope_end();
        return out;
    }
    if (tri && a->dtype == QKV_BF16 && a->shape[a->ndim - 1] == b->shape[b->ndim - 2]) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(matmul_tri_bf16(a, b, tri, name));
        qkv_scope_end();
        return out;
    }
    operand A, B;
    lift(a, true, &A);
    lift(b, false, &B);
    int64_t m = A.shape[A.ndim - 2], k = A.shape[A.ndim - 1];
    int64_t n = B.shape[B.ndim - 1];
    if (B.shape[B.ndim - 2] != k) return matmul_error(name, a, b, "inner dimensions differ");
    int nbatch;
    int64_t bshape[QKV_MAX_DIMS];
    if (!qkv__broadcast_shape(A.ndim - 2, A.shape, B.ndim - 2, B.shape, &nbatch, bshape))
        return matmul_error(name, a, b, "batch dimensions do not broadcast");
    if (nbatch + 2 > QKV_MAX_DIMS) return matmul_error(name, a, b, "too many dimensions");

    /* Output shape: batch, then m unless a was 1-D, then n unless b was 1-D. */
    int64_t oshape[QKV_MAX_DIMS];
    int ond = 0;
    for (int i = 0; i < nbatch; i++) oshape[ond++] = bshape[i];
    if (a->ndim > 1) oshape[ond++] = m;
    if (b->ndim > 1) oshape[ond++] = n;
    int tnd;
    int64_t tshape[QKV_MAX_DIMS];
    if (term && !(qkv__broadcast_shape(ond, oshape, term->ndim, term->shape, &tnd, tshape) &&
                  tnd == ond && !memcmp(tshape, oshape, (size_t)ond * sizeof *oshape))) {
        char st[128], sa[128], sb[128];
        return qkv_set_error("%s: input %s does not broadcast to the shape of %s @ %s", name,
                             qkv_shape_str(term, st, sizeof st), qkv_shape_str(a, sa, sizeof sa),
                             qkv_shape_str(b, sb, sizeof sb));
    }
    int64_t ost[QKV_MAX_DIMS];
    bool laid = !term && !tri && a->ndim > 1 && b->ndim > 1 &&
                like_layout(like, ond, oshape, ost);
    qkv_tensor *out = laid ? qkv__empty_strided(a->dtype, ond, oshape, ost)
                           : qkv_empty(a->dtype, ond, oshape);
    if (!out) return NULL;
    int64_t batch = qkv__numel(nbatch, bshape);
    if (out->numel == 0) return out;
    if (k == 0) {
        qkv_fill_(out, 0);
        return out;
    }
    const char *ad = qkv_data(a), *bd = qkv_data(b);
    char *od = qkv_data(out);
    int64_t tst[QKV_MAX_DIMS] = {0};
    bool batch_term = false;
    const void *td = NULL;
    if (a->ndim > 1 && b->ndim > 1 && row_term(term, a->dtype, nbatch, bshape, m, n, tst)) {
        td = qkv_data(term);
        for (int i = 0; i < nbatch; i++) batch_term |= tst[i] != 0;
        *added = true;
    }

    /* A stack of row blocks times one matrix is one taller product, unless a triangle's rows
     * start again in each block. */
    int64_t rsa;
    if (B.ndim == 2 && rows_fold(&A, &rsa) && (a->ndim > 1 || batch == 1) &&
        (!tri || batch == 1) && !batch_term && !laid) {
        int64_t rows = batch * m;
        gemm(a->dtype, tri, 1, rows, n, k, alpha, ad, NULL, rsa, A.strides[A.ndim - 1], bd,
             NULL, B.strides[0], B.strides[1], td, NULL, od, NULL, n, 1);
        return out;
    }

    size_t offs_bytes = (size_t)batch * 4 * sizeof(int64_t);
    int64_t *offs = qkv__alloc(offs_bytes);
    if (!offs) return NULL;
    int64_t ast[QKV_MAX_DIMS], bst[QKV_MAX_DIMS];
    for (int i = 0; i < nbatch; i++) {
        int ia = A.ndim - 2 - nbatch + i, ib = B.ndim - 2 - nbatch + i;
        ast[i] = ia >= 0 && A.shape[ia] != 1 ? A.strides[ia] : 0;
        bst[i] = ib >= 0 && B.shape[ib] != 1 ? B.strides[ib] : 0;
    }
    int64_t idx[QKV_MAX_DIMS] = {0};
    for (int64_t p = 0; p < batch; p++) {
        int64_t oa = 0, ob = 0, ot = 0, oc = 0;
        for (int i = 0; i < nbatch; i++) {
            oa += idx[i] * ast[i];
            ob += idx[i] * bst[i];
            ot += idx[i] * tst[i];
            oc += idx[i] * (laid ? ost[i] : 0);
        }
        offs[p] = oa;
        offs[batch + p] = ob;
        offs[2 * batch + p] = laid ? oc : p * m * n;
        offs[3 * batch + p] = ot;
        for (int i = nbatch - 1; i >= 0; i--) {
            if (++idx[i] < bshape[i]) break;
            idx[i] = 0;
        }
    }
    if (laid && ost[ond - 1] != 1) /* columns innermost: C^T = B^T A^T, the same sums */
        gemm(a->dtype, tri, batch, n, m, k, alpha, bd, offs + batch, B.strides[B.ndim - 1],
             B.strides[B.ndim - 2], ad, offs, A.strides[A.ndim - 1], A.strides[A.ndim - 2],
             NULL, NULL, od, offs + 2 * batch, ost[ond - 1], 1);
    else
        gemm(a->dtype, tri, batch, m, n, k, alpha, ad, offs, A.strides[A.ndim - 2],
             A.strides[A.ndim - 1], bd, offs + batch, B.strides[B.ndim - 2],
             B.strides[B.ndim - 1], td, batch_term ? offs + 3 * batch : NULL, od,
             offs + 2 * batch, laid ? ost[ond - 2] : n, 1);
    qkv__free(offs, offs_bytes);
    return out;
}

/* x W^T + b over bf16: the products accumulate in f32, the GEMM adds the bias (widened to
 * f32) as it stores each tile and rounds each element to bf16 once, as torch's bf16 addmm. */
static bool affine_bf16(qkv_tensor *out, int64_t rows, int64_t n, int64_t k, const uint16_t *x,
                        int64_t rsx, int64_t csx, const uint16_t *w, int64_t rsw, int64_t csw,
                        const uint16_t *bias) {
    uint16_t *o = qkv_data(out);
    size_t bytes = bias ? (size_t)n * sizeof(float) : 0;
    float *wide = bias ? qkv__alloc(bytes) : NULL;
    if (bias && !wide) return false;
    for (int64_t j = 0; bias && j < n; j++) wide[j] = qkv__bf16_to_f32(bias[j]);
    qkv__gemm_bf16_bias_out(1, rows, n, k, 1.0f, x, NULL, rsx, csx, w, NULL, rsw, csw, wide, o,
                            NULL, n, 1);
    if (wide) qkv__free(wide, bytes);
    return true;
}

/* The bias is added by the GEMM as it stores each tile, so it costs no pass of its own; W^T is
 * read through W's strides. */
qkv_tensor *qkv__affine(const qkv_tensor *x, const qkv_tensor *w, const qkv_tensor *b,
                        const char *name) {
    if (QKV__NULL_ARGS(name, x, w)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, x, w, b)) return NULL;
    char sx[128], sw[128], sb[128];
    int64_t in = w->ndim == 2 ? w->shape[1] : -1, out_f = w->ndim == 2 ? w->shape[0] : -1;
    if (w->ndim != 2 || x->ndim < 1 || x->shape[x->ndim - 1] != in ||
        (b && (b->ndim > 1 || (b->numel != out_f && b->numel != 1))))
        return qkv_set_error("%s: shapes do not fit x W^T + b: x %s, W %s, b %s", name,
                             qkv_shape_str(x, sx, sizeof sx), qkv_shape_str(w, sw, sizeof sw),
                             b ? qkv_shape_str(b, sb, sizeof sb) : "none");
    if (!qkv__is_float(x->dtype) || x->dtype != w->dtype || (b && b->dtype != x->dtype))
        return qkv_set_error("%s: x, W and b must share one float dtype", name);
    /* A one-element bias ([1] or 0-d) broadcasts over the features, as in torch. */
    if (b && (b->ndim == 0 || b->shape[0] != out_f)) {
        b = qkv__view(b, 1, &out_f, (const int64_t[]){0}, b->offset);
        if (!b) return NULL;
    }
    operand X;
    int64_t rsx;
    lift(x, true, &X);
    if (!rows_fold(&X, &rsx)) {
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__affine(qkv__contiguous(x), w, b, name));
        qkv_scope_end();
        return out;
    }
    int64_t shape[QKV_MAX_DIMS];
    for (int i = 0; i < x->ndim - 1; i++) shape[i] = x->shape[i];
    shape[x->ndim - 1] = out_f;
    qkv_tensor *out = qkv_empty(x->dtype, x->ndim, shape);
    if (!out || out->numel == 0) return out;
    int64_t rows = out->numel / out_f;
    if (in == 0) {
        if (b) qkv_copy_(out, b);
        else qkv_fill_(out, 0);
        return out;
    }
    /* The GEMM reads the bias as one contiguous row. */
    const qkv_tensor *bc = b && b->strides[0] != 1 ? qkv__contiguous(b) : b;
    if (b && !bc) return NULL;
    const char *xd = qkv_data(x), *wd = qkv_data(w), *bd = bc ? qkv_data(bc) : NULL;
    char *od = qkv_data(out);
    int64_t csx = x->strides[x->ndim - 1];
    if (x->dtype == QKV_BF16)
        return affine_bf16(out, rows, out_f, in, (const uint16_t *)xd, rsx, csx,
                           (const uint16_t *)wd, w->strides[1], w->strides[0],
                           (const uint16_t *)bd) ? out : NULL;
    if (x->dtype == QKV_F32)
        qkv__gemm_bias_f32(rows, out_f, in, (const float *)xd, rsx, csx, (const float *)wd,
                           w->strides[1], w->strides[0], (const float *)bd, (float *)od, out_f);
    else
        qkv__gemm_bias_f64(rows, out_f, in, (const double *)xd, rsx, csx, (const double *)wd,
                           w->strides[1], w->strides[0], (const double *)bd, (double *)od,
                           out_f);
    return out;
}
