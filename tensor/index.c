/*
 * Indexing kernels: index_select and its scatter-add (index_add into zeros), gather and its
 * scatter-add, concat and one_hot. Every index is checked against the size it indexes before
 * any element is read or written, so a bad index is an error naming the op, never an
 * over-read. Scatter-adds accumulate repeated indices in index order, whatever the number of
 * threads, so their results are deterministic.
 *
 * Each kernel opens a scope for its temporaries (a contiguous copy of the index, views of the
 * output) and keeps only its result.
 */
#include <string.h>

#include "tensor/tensor_internal.h"

/* ---- Shared helpers ---------------------------------------------------------------------- */

/* index as a contiguous I64 tensor whose entries all lie in [0, a.shape[axis]); NULL with an
 * error naming the first bad entry otherwise. */
static qkv_tensor *checked_index(const char *op, const qkv_tensor *a, int axis,
                                 const qkv_tensor *index) {
    char sa[128], si[128];
    if (index->dtype != QKV_I64)
        return qkv_set_error("%s: index must be i64, not %s", op, qkv_dtype_name(index->dtype));
    qkv_tensor *c = qkv__contiguous(index);
    if (!c) return NULL;
    const int64_t *ix = qkv_data(c);
    int64_t size = a->shape[axis];
    for (int64_t i = 0; i < c->numel; i++)
        if (ix[i] < 0 || ix[i] >= size)
            return qkv_set_error("%s: index %lld out of range for axis %d of size %lld "
                                 "(input %s, index %s)", op, (long long)ix[i], axis,
                                 (long long)size, qkv_shape_str(a, sa, sizeof sa),
                                 qkv_shape_str(index, si, sizeof si));
    return c;
}

static int64_t prod(const int64_t *shape, int from, int to) {
    int64_t n = 1;
    for (int i = from; i < to; i++) n *= shape[i];
    return n;
}

/* dst[i] += src[i] for n elements of dtype (logical or for masks). */
static void add_row(char *dst, const char *src, int64_t n, qkv_dtype dtype) {
    switch (dtype) {
    case QKV_F32: {
        float *restrict d = (float *)dst;
        const float *restrict s = (const float *)src;
        for (int64_t i = 0; i < n; i++) d[i] += s[i];
        break;
    }
    case QKV_F64: {
        double *restrict d = (double *)dst;
        const double *restrict s = (const double *)src;
        for (int64_t i = 0; i < n; i++) d[i] += s[i];
        break;
    }
    case QKV_I64: {
        int64_t *restrict d = (int64_t *)dst;
        const int64_t *restrict s = (const int64_t *)src;
        for (int64_t i = 0; i < n; i++) d[i] = qkv__wrap_add(d[i], s[i]);
        break;
    }
    case QKV_BOOL: {
        bool *restrict d = (bool *)dst;
        const bool *restrict s = (const bool *)src;
        for (int64_t i = 0; i < n; i++) d[i] = d[i] || s[i];
        break;
    }
    case QKV_BF16: { /* in f32, rounded on store, as torch's index_add */
        uint16_t *restrict d = (uint16_t *)dst;
        const uint16_t *restrict s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++)
            d[i] = qkv__f32_to_bf16(qkv__bf16_to_f32(d[i]) + qkv__bf16_to_f32(s[i]));
        break;
    }
    }
}

static void copy_elem(char *dst, const char *src, size_t es) {
    switch (es) {
    case 1: *(uint8_t *)dst = *(const uint8_t *)src; break;
    case 2: *(uint16_t *)dst = *(const uint16_t *)src; break;
    case 4: *(uint32_t *)dst = *(const uint32_t *)src; break;
    default: *(uint64_t *)dst = *(const uint64_t *)src; break;
    }
}

/* ---- index_select ------------------------------------------------------------------------ */

/* The dimensions after the indexed axis of a source, coalesced, with byte strides. */
typedef struct block {
    int ndim;
    int64_t shape[QKV_MAX_DIMS], stride[QKV_MAX_DIMS];
    int64_t numel;
} block;

static void make_block(block *b, const qkv_tensor *a, int from, size_t es) {
    b->ndim = 0;
    b->numel = 1;
    for (int i = from; i < a->ndim; i++) {
        b->numel *= a->shape[i];
        if (a->shape[i] == 1) continue;
        int64_t st = a->strides[i] * (int64_t)es;
        if (b->ndim && b->stride[b->ndim - 1] == st * a->shape[i]) {
            b->shape[b->ndim - 1] *= a->shape[i];
            b->stride[b->ndim - 1] = st;
        } else {
            b->shape[b->ndim] = a->shape[i];
            b->stride[b->ndim++] = st;
        }
    }
}

/* Copies one block starting at src to contiguous dst. */
static void copy_block(char *dst, const char *src, const block *b, size_t es) {
    if (b->numel == 0) return;
    if (b->ndim == 0) {
        copy_elem(dst, src, es);
        return;
    }
    int last = b->ndim - 1;
    int64_t n = b->shape[last], st = b->stride[last];
    if (b->ndim == 1 && st == (int64_t)es) {
        memcpy(dst, src, (size_t)n * es);
        return;
    }
    int64_t idx[QKV_MAX_DIMS] = {0};
    for (int64_t done = 0; done < b->numel; done += n) {
        const char *p = src;
        for (int d = 0; d < last; d++) p += idx[d] * b->stride[d];
        for (int64_t i = 0; i < n; i++, dst += es) copy_elem(dst, p + i * st, es);
        for (int d = last - 1; d >= 0; d--) {
            if (++idx[d] < b->shape[d]) break;
            idx[d] = 0;
        }
    }
}

/* Byte offset of outer position o (a flat index over the dimensions before axis). */
static int64_t outer_offset(const qkv_tensor *a, int axis, int64_t o, size_t es) {
    int64_t off = 0;
    for (int d = axis - 1; d >= 0; d--) {
        off += (o % a->shape[d]) * a->strides[d];
        o /= a->shape[d];
    }
    return off * (int64_t)es;
}

/* out[o, j, :] = a[o, ix[j], :] for the rows [begin, end) of the (outer, n) grid. */
static void select_rows(char *out, const qkv_tensor *a, int axis, const int64_t *ix, int64_t n,
                        const block *inner, int64_t begin, int64_t end) {
    size_t es = qkv_dtype_size(a->dtype);
    const char *src = qkv_data(a);
    int64_t axis_stride = a->strides[axis] * (int64_t)es, row_bytes = inner->numel * (int64_t)es;
    int64_t o_prev = -1, base = 0;
    for (int64_t r = begin; r < end; r++) {
        int64_t o = r / n;
        if (o != o_prev) {
            base = outer_offset(a, axis, o, es);
            o_prev = o;
        }
        copy_block(out + r * row_bytes, src + base + ix[r % n] * axis_stride, inner, es);
    }
}

/* shape[:axis] + index.shape + shape[axis+1:] into out; its ndim, or -1 past QKV_MAX_DIMS. */
static int select_shape(int ndim, const int64_t *shape, int ax, const qkv_tensor *index,
                        int64_t *out) {
    int n = ndim - 1 + index->ndim;
    if (n > QKV_MAX_DIMS) return -1;
    memcpy(out, shape, (size_t)ax * sizeof(int64_t));
    memcpy(out + ax, index->shape, (size_t)index->ndim * sizeof(int64_t));
    memcpy(out + ax + index->ndim, shape + ax + 1, (size_t)(ndim - ax - 1) * sizeof(int64_t));
    return n;
}

qkv_tensor *qkv__index_select(const qkv_tensor *a, int axis, const qkv_tensor *index,
                              const char *name) {
    if (QKV__NULL_ARGS(name, a, index)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a, index)) return NULL;
    char sa[128], si[128];
    int ax = qkv__norm_axis(name, a, axis);
    if (ax < 0) return NULL;
    if (a->ndim == 0) return qkv_set_error("%s: cannot index a 0-d tensor", name);
    int64_t shape[QKV_MAX_DIMS];
    int ndim = select_shape(a->ndim, a->shape, ax, index, shape);
    if (ndim < 0)
        return qkv_set_error("%s: result of input %s and index %s has more than %d dimensions",
                             name, qkv_shape_str(a, sa, sizeof sa),
                             qkv_shape_str(index, si, sizeof si), QKV_MAX_DIMS);
    if (!qkv__check_shape(name, ndim, shape)) return NULL;
    qkv_scope_begin();
    qkv_tensor *out = NULL, *ci = checked_index(name, a, ax, index);
    if (ci) out = qkv_empty(a->dtype, ndim, shape);
    if (out && out->numel) {
        block inner;
        make_block(&inner, a, ax + 1, qkv_dtype_size(a->dtype));
        int64_t n = index->numel, rows = prod(a->shape, 0, ax) * n;
        const int64_t *ix = qkv_data(ci);
        char *dst = qkv_data(out);
        int threads = qkv__threads_for(out->numel);
        int64_t pieces = qkv__pieces(rows, threads);
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < pieces; t++)
            select_rows(dst, a, ax, ix, n, &inner, rows * t / pieces, rows * (t + 1) / pieces);
    }
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}

/* out[o, ix[j], :] += src[o, j, :] for the destination rows ix in [lo, hi) of outer block o,
 * in the order of j. */
static void add_rows(char *out, const char *src, const int64_t *ix, int64_t n, int64_t size,
                     int64_t inner, qkv_dtype dtype, int64_t o, int64_t lo, int64_t hi) {
    int64_t es = (int64_t)qkv_dtype_size(dtype), row = inner * es;
    char *dst = out + o * size * row;
    const char *s = src + o * n * row;
    for (int64_t j = 0; j < n; j++)
        if (ix[j] >= lo && ix[j] < hi) add_row(dst + ix[j] * row, s + j * row, inner, dtype);
}

qkv_tensor *qkv__index_add(const qkv_tensor *src, int axis, const qkv_tensor *index, int ndim,
                           const int64_t *shape, const char *name) {
    if (QKV__NULL_ARGS(name, src, index)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, src, index)) return NULL;
    int64_t want[QKV_MAX_DIMS];
    int nwant = axis >= 0 && axis < ndim ? select_shape(ndim, shape, axis, index, want) : -1;
    if (nwant != src->ndim || memcmp(want, src->shape, (size_t)nwant * sizeof(int64_t))) {
        char a[128], b[128];
        return qkv_set_error("%s: source %s does not fit index %s along axis %d", name,
                             qkv_shape_str(src, a, sizeof a), qkv_shape_str(index, b, sizeof b),
                             axis);
    }
    qkv_scope_begin();
    qkv_tensor *out = qkv_zeros(src->dtype, ndim, shape);
    qkv_tensor *ci = out ? checked_index(name, out, axis, index) : NULL;
    qkv_tensor *cs = ci ? qkv__contiguous(src) : NULL;
    if (cs && cs->numel) {
        int64_t outer = prod(shape, 0, axis), inner = prod(shape, axis + 1, ndim);
        int64_t n = index->numel, size = shape[axis];
        const int64_t *ix = qkv_data(ci);
        int threads = qkv__threads_for(cs->numel);
        /* Each destination row is owned by one thread: split the outer blocks when there
         * are enough of them, else split each block's rows into ranges. */
        int64_t parts = outer >= threads ? 1 : threads;
        char *dst = qkv_data(out);
        const char *s = qkv_data(cs);
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t tile = 0; tile < outer * parts; tile++) {
            int64_t o = tile / parts, part = tile % parts;
            add_rows(dst, s, ix, n, size, inner, src->dtype, o, size * part / parts,
                     size * (part + 1) / parts);
        }
    }
    out = qkv_keep(cs ? out : NULL);
    qkv_scope_end();
    return out;
}

/* ---- gather ------------------------------------------------------------------------------ */

typedef struct gather_ctx {
    size_t es;
    int64_t axis_stride; /* bytes */
    qkv_dtype dtype;
} gather_ctx;

/* Operands: 0 the output, 1 the source at the index's position with the axis coordinate 0,
 * 2 the index. */
static void gather_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const gather_ctx *c = vctx;
    for (int64_t i = 0; i < n; i++) {
        int64_t v = *(const int64_t *)(p[2] + i * st[2]);
        copy_elem(p[0] + i * st[0], p[1] + i * st[1] + v * c->axis_stride, c->es);
    }
}

/* Operands: 0 the destination at the index's position with the axis coordinate 0, 1 the
 * source, 2 the index. */
static void scatter_add_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    const gather_ctx *c = vctx;
    for (int64_t i = 0; i < n; i++) {
        int64_t v = *(const int64_t *)(p[2] + i * st[2]);
        add_row(p[0] + i * st[0] + v * c->axis_stride, p[1] + i * st[1], 1, c->dtype);
    }
}

/* torch.gather's rule: index has a's ndim and is no larger than a outside axis. */
static bool check_gather_shape(const char *name, const qkv_tensor *a, int ax,
                               const qkv_tensor *index) {
    bool ok = index->ndim == a->ndim;
    for (int d = 0; d < a->ndim && ok; d++) ok = d == ax || index->shape[d] <= a->shape[d];
    if (!ok) {
        char sa[128], si[128];
        qkv_set_error("%s: index %s does not fit input %s along axes other than %d", name,
                      qkv_shape_str(index, si, sizeof si), qkv_shape_str(a, sa, sizeof sa), ax);
    }
    return ok;
}

/* Runs fn over the index's positions with three operands seen at the index's shape: 0 dst,
 * 1 src, 2 the index. The operand `indexed` (0 or 1) gets axis stride 0; fn adds the index
 * value times its real axis stride. */
static void index_loop(qkv_tensor *dst, const qkv_tensor *src, const qkv_tensor *ci, int ax,
                       int indexed, qkv__run_fn fn, bool parallel) {
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    const qkv_tensor *ops[3] = {dst, src, ci};
    for (int k = 0; k < 3; k++)
        for (int d = 0; d < ci->ndim; d++)
            st[k][d] = ops[k]->strides[d] * (int64_t)qkv_dtype_size(ops[k]->dtype);
    st[indexed][ax] = 0;
    size_t es = qkv_dtype_size(dst->dtype);
    gather_ctx c = {es, ops[indexed]->strides[ax] * (int64_t)es, dst->dtype};
    char *bases[3] = {qkv_data(dst), qkv_data(src), qkv_data(ci)};
    qkv__foreach(3, bases, ci->ndim, ci->shape, (const int64_t(*)[QKV_MAX_DIMS])st, fn, &c,
                 parallel);
}

qkv_tensor *qkv__gather(const qkv_tensor *a, int axis, const qkv_tensor *index,
                        const char *name) {
    if (QKV__NULL_ARGS(name, a, index)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a, index)) return NULL;
    int ax = qkv__norm_axis(name, a, axis);
    if (ax < 0) return NULL;
    if (a->ndim == 0) return qkv_set_error("%s: cannot index a 0-d tensor", name);
    /* An empty index picks nothing, whatever its shape (as in torch). */
    if (index->numel == 0 && index->dtype == QKV_I64)
        return qkv_empty(a->dtype, index->ndim, index->shape);
    if (!check_gather_shape(name, a, ax, index)) return NULL;
    qkv_scope_begin();
    qkv_tensor *out = NULL, *ci = checked_index(name, a, ax, index);
    if (ci) out = qkv_empty(a->dtype, index->ndim, index->shape);
    if (out) index_loop(out, a, ci, ax, 1, gather_run, true);
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}

qkv_tensor *qkv__scatter_add(const qkv_tensor *src, int axis, const qkv_tensor *index, int ndim,
                             const int64_t *shape, const char *name) {
    if (QKV__NULL_ARGS(name, src, index)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, src, index)) return NULL;
    if (axis < 0 || axis >= ndim) return qkv_set_error("%s: axis %d out of range", name, axis);
    if (index->numel == 0 && src->numel == 0) return qkv_zeros(src->dtype, ndim, shape);
    qkv_scope_begin();
    qkv_tensor *out = qkv_zeros(src->dtype, ndim, shape), *ci = NULL;
    if (out && check_gather_shape(name, out, axis, index)) ci = checked_index(name, out, axis,
                                                                              index);
    if (ci && (src->ndim != ndim ||
               memcmp(src->shape, index->shape, (size_t)ndim * sizeof(int64_t)))) {
        char a[128], b[128];
        qkv_set_error("%s: source %s differs from index %s", name,
                      qkv_shape_str(src, a, sizeof a), qkv_shape_str(index, b, sizeof b));
        ci = NULL;
    }
    /* Serial: two positions that differ only along axis may hit the same element, and the
     * row-major order fixes the order of their sum. */
    if (ci) index_loop(out, src, ci, axis, 0, scatter_add_run, false);
    out = qkv_keep(ci ? out : NULL);
    qkv_scope_end();
    return out;
}

/* ---- concat ------------------------------------------------------------------------------ */

static bool check_concat(int n, const qkv_tensor *const *ts, int ax, const char *name) {
    char s0[128], sk[128];
    for (int k = 1; k < n; k++) {
        const qkv_tensor *t = ts[k];
        bool same = t->ndim == ts[0]->ndim;
        for (int d = 0; d < t->ndim && same; d++)
            same = d == ax || t->shape[d] == ts[0]->shape[d];
        if (!same) {
            qkv_set_error("%s: tensor %d has shape %s but tensor 0 has %s; sizes must match "
                          "except along axis %d", name, k, qkv_shape_str(t, sk, sizeof sk),
                          qkv_shape_str(ts[0], s0, sizeof s0), ax);
            return false;
        }
    }
    return true;
}

qkv_tensor *qkv__concat(int n, const qkv_tensor *const *ts, int axis, const char *name) {
    if (n <= 0 || !ts) return qkv_set_error("%s: no tensors to concatenate", name);
    for (int k = 0; k < n; k++)
        if (!ts[k]) return qkv_set_error("%s: tensors[%d] is NULL", name, k);
    QKV__OP(name);
    if (qkv__checking() && !qkv__check_args(name, n, ts)) return NULL;
    if (ts[0]->ndim == 0) return qkv_set_error("%s: cannot concatenate 0-d tensors", name);
    int ax = qkv__norm_axis(name, ts[0], axis);
    if (ax < 0 || !check_concat(n, ts, ax, name)) return NULL;
    int64_t shape[QKV_MAX_DIMS];
    memcpy(shape, ts[0]->shape, sizeof shape);
    shape[ax] = 0;
    /* Mixed dtypes are promoted, as torch.cat does. */
    qkv_dtype dtype = ts[0]->dtype;
    for (int k = 0; k < n; k++) {
        /* empty tensors can be long along axis: their sum may overflow */
        if (!qkv__add_i64(name, shape[ax], ts[k]->shape[ax], &shape[ax])) return NULL;
        dtype = qkv__promote(dtype, ts[k]->dtype);
    }
    if (!qkv__check_shape(name, ts[0]->ndim, shape)) return NULL;
    qkv_scope_begin();
    qkv_tensor *out = qkv_empty(dtype, ts[0]->ndim, shape);
    int64_t start = 0;
    for (int k = 0; k < n && out; k++) {
        shape[ax] = ts[k]->shape[ax];
        qkv_tensor *part = qkv__view(out, out->ndim, shape, out->strides,
                                     start * out->strides[ax]);
        if (!part || !qkv_copy_(part, ts[k])) out = NULL;
        start += shape[ax];
    }
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}

/* ---- one_hot ----------------------------------------------------------------------------- */

qkv_tensor *qkv__one_hot(const qkv_tensor *index, int64_t n_classes, const char *name) {
    if (QKV__NULL_ARGS(name, index)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, index)) return NULL;
    char si[128];
    if (index->dtype != QKV_I64)
        return qkv_set_error("%s: index must be i64, not %s", name,
                             qkv_dtype_name(index->dtype));
    if (n_classes <= 0)
        return qkv_set_error("%s: n_classes must be positive, not %lld", name,
                             (long long)n_classes);
    if (index->ndim >= QKV_MAX_DIMS)
        return qkv_set_error("%s: index %s already has %d dimensions", name,
                             qkv_shape_str(index, si, sizeof si), QKV_MAX_DIMS);
    int64_t shape[QKV_MAX_DIMS];
    memcpy(shape, index->shape, (size_t)index->ndim * sizeof(int64_t));
    shape[index->ndim] = n_classes;
    if (!qkv__check_shape(name, index->ndim + 1, shape)) return NULL;
    qkv_scope_begin();
    qkv_tensor *ci = qkv__contiguous(index), *out = ci ? qkv_zeros(QKV_I64, index->ndim + 1,
                                                                   shape) : NULL;
    if (out) {
        const int64_t *ix = qkv_data(ci);
        int64_t *o = qkv_data(out);
        for (int64_t i = 0; i < ci->numel && out; i++) {
            if (ix[i] < 0 || ix[i] >= n_classes) {
                qkv_set_error("%s: index %lld out of range [0, %lld) (index %s)", name,
                              (long long)ix[i], (long long)n_classes,
                              qkv_shape_str(index, si, sizeof si));
                out = NULL;
            } else {
                o[i * n_classes + ix[i]] = 1;
            }
        }
    }
    out = qkv_keep(out);
    qkv_scope_end();
    return out;
}
