/* The strided loop driver shared by every elementwise kernel, and the copies built on it. */
#include <string.h>

#include "tensor/tensor_internal.h"

typedef struct loop {
    int ndim, nops;
    int64_t shape[QKV_MAX_DIMS];
    int64_t strides[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
} loop;

/* Drops size-1 dimensions and merges neighbours that step through memory as one. */
static void coalesce(loop *l) {
    int out = 0;
    for (int i = 0; i < l->ndim; i++) {
        if (l->shape[i] == 1) continue;
        bool merge = out > 0;
        for (int k = 0; k < l->nops && merge; k++)
            merge = l->strides[k][out - 1] == l->strides[k][i] * l->shape[i];
        if (merge) {
            l->shape[out - 1] *= l->shape[i];
            for (int k = 0; k < l->nops; k++) l->strides[k][out - 1] = l->strides[k][i];
        } else {
            l->shape[out] = l->shape[i];
            for (int k = 0; k < l->nops; k++) l->strides[k][out] = l->strides[k][i];
            out++;
        }
    }
    if (out == 0) {
        l->shape[0] = 1;
        for (int k = 0; k < l->nops; k++) l->strides[k][0] = 0;
        out = 1;
    }
    l->ndim = out;
}

/* Runs outer iterations [begin, end) of the loop. */
static void run_range(const loop *l, char *const *bases, int64_t begin, int64_t end,
                      qkv__run_fn fn, void *ctx) {
    int outer = l->ndim - 1;
    int64_t idx[QKV_MAX_DIMS] = {0};
    int64_t rem = begin;
    for (int d = outer - 1; d >= 0; d--) {
        idx[d] = rem % l->shape[d];
        rem /= l->shape[d];
    }
    char *ptrs[QKV_MAX_OPERANDS];
    int64_t inner_strides[QKV_MAX_OPERANDS];
    for (int k = 0; k < l->nops; k++) inner_strides[k] = l->strides[k][outer];
    for (int64_t it = begin; it < end; it++) {
        for (int k = 0; k < l->nops; k++) {
            char *p = bases[k];
            for (int d = 0; d < outer; d++) p += idx[d] * l->strides[k][d];
            ptrs[k] = p;
        }
        fn(l->shape[outer], ptrs, inner_strides, ctx);
        for (int d = outer - 1; d >= 0; d--) {
            if (++idx[d] < l->shape[d]) break;
            idx[d] = 0;
        }
    }
}

void qkv__foreach(int nops, char *const *bases, int ndim, const int64_t *shape,
                  const int64_t (*strides)[QKV_MAX_DIMS], qkv__run_fn fn, void *ctx,
                  bool parallel) {
    loop l;
    l.ndim = ndim;
    l.nops = nops;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0) return;
        l.shape[i] = shape[i];
        for (int k = 0; k < nops; k++) l.strides[k][i] = strides[k][i];
    }
    coalesce(&l);
    int64_t inner = l.shape[l.ndim - 1];
    int64_t n_outer = 1;
    for (int d = 0; d < l.ndim - 1; d++) n_outer *= l.shape[d];
    int threads = parallel ? qkv__threads_for(inner * n_outer) : 1;
    if (threads <= 1 || (n_outer == 1 && inner < 2 * 4096)) {
        run_range(&l, bases, 0, n_outer, fn, ctx);
        return;
    }
    if (n_outer == 1) {
        /* One long run: split it into pieces, each a run of its own. */
        int64_t pieces = qkv__pieces(inner, threads), chunk = (inner + pieces - 1) / pieces;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < pieces; t++) {
            int64_t b = t * chunk, e = b + chunk < inner ? b + chunk : inner;
            if (b >= e) continue;
            char *ptrs[QKV_MAX_OPERANDS];
            int64_t st[QKV_MAX_OPERANDS];
            for (int k = 0; k < l.nops; k++) {
                st[k] = l.strides[k][0];
                ptrs[k] = bases[k] + b * st[k];
            }
            fn(e - b, ptrs, st, ctx);
        }
        return;
    }
    int64_t pieces = qkv__pieces(n_outer, threads);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < pieces; t++) {
        int64_t b = n_outer * t / pieces, e = n_outer * (t + 1) / pieces;
        if (b < e) run_range(&l, bases, b, e, fn, ctx);
    }
}

/* ---- Copy with conversion ---------------------------------------------------------------- */

typedef struct copy_ctx {
    qkv_dtype dst, src;
} copy_ctx;

#define COPY_RUN(TD, TS)                                                                       \
    do {                                                                                       \
        if (st[0] == sizeof(TD) && st[1] == sizeof(TS)) {                                     \
            TD *restrict d = (TD *)p[0];                                                       \
            const TS *restrict s = (const TS *)p[1];                                           \
            for (int64_t i = 0; i < n; i++) d[i] = (TD)s[i];                                   \
        } else {                                                                               \
            for (int64_t i = 0; i < n; i++)                                                    \
                *(TD *)(p[0] + i * st[0]) = (TD) * (const TS *)(p[1] + i * st[1]);            \
        }                                                                                      \
    } while (0)

/* The same with a conversion function (bf16 to and from f32). */
#define COPY_CONVERT(TD, TS, F)                                                                \
    do {                                                                                       \
        if (st[0] == sizeof(TD) && st[1] == sizeof(TS)) {                                     \
            TD *restrict d = (TD *)p[0];                                                       \
            const TS *restrict s = (const TS *)p[1];                                           \
            for (int64_t i = 0; i < n; i++) d[i] = F(s[i]);                                    \
        } else {                                                                               \
            for (int64_t i = 0; i < n; i++)                                                    \
                *(TD *)(p[0] + i * st[0]) = F(*(const TS *)(p[1] + i * st[1]));               \
        }                                                                                      \
    } while (0)

static void copy_run(int64_t n, char **p, const int64_t *st, void *vctx) {
    copy_ctx *c = vctx;
    if (c->dst == c->src) {
        size_t es = qkv_dtype_size(c->dst);
        if (st[0] == (int64_t)es && st[1] == (int64_t)es) {
            memcpy(p[0], p[1], (size_t)n * es);
            return;
        }
        switch (es) {
        case 1: COPY_RUN(uint8_t, uint8_t); return;
        case 2: COPY_RUN(uint16_t, uint16_t); return;
        case 4: COPY_RUN(uint32_t, uint32_t); return;
        default: COPY_RUN(uint64_t, uint64_t); return;
        }
    }
    if (c->dst == QKV_BOOL) {
        for (int64_t i = 0; i < n; i++)
            *(bool *)(p[0] + i * st[0]) = qkv__load(p[1] + i * st[1], c->src, 0) != 0;
        return;
    }
    if (c->dst == QKV_F32 && c->src == QKV_F64) { COPY_RUN(float, double); return; }
    if (c->dst == QKV_F64 && c->src == QKV_F32) { COPY_RUN(double, float); return; }
    if (c->dst == QKV_BF16 && c->src == QKV_F32) {
        if (st[0] == 2 && st[1] == 4) { /* the casts of autocast: sixteen lanes at a time */
            qkv__bf16_round_n((uint16_t *)p[0], (const float *)p[1], n);
            return;
        }
        COPY_CONVERT(uint16_t, float, qkv__f32_to_bf16);
        return;
    }
    if (c->dst == QKV_F32 && c->src == QKV_BF16) {
        if (st[0] == 4 && st[1] == 2) { /* contiguous: a bf16 is the high half of its f32 */
            float *restrict d = (float *)p[0];
            const uint16_t *restrict h = (const uint16_t *)p[1];
            for (int64_t i = 0; i < n; i++) {
                uint32_t u = (uint32_t)h[i] << 16;
                memcpy(d + i, &u, sizeof u);
            }
            return;
        }
        COPY_CONVERT(float, uint16_t, qkv__bf16_to_f32);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        qkv__store(p[0] + i * st[0], c->dst, 0, qkv__load(p[1] + i * st[1], c->src, 0));
}

/* False with an error naming op when two elements of t share memory (a stride 0 on an axis
 * of size above 1, as an expanded view has): a write would store into them several times, in
 * an order that decides the result. torch refuses the same; qkv's views can overlap no other
 * way, so no general overlap check is needed. An empty tensor has no elements to share. */
static bool writable(const char *op, const qkv_tensor *t) {
    for (int i = 0; i < t->ndim && t->numel > 0; i++) {
        if (t->strides[i] != 0 || t->shape[i] <= 1) continue;
        char s[128];
        qkv_set_error("%s: more than one element of the written-to tensor %s refers to a "
                      "single memory location (dimension %d has stride 0); write into a copy "
                      "(qkv_clone) instead", op, qkv_shape_str(t, s, sizeof s), i);
        return false;
    }
    return true;
}

/* Whether src broadcasts to dst's shape without growing it; dimension by dimension, as the
 * product of the broadcast shape could overflow. */
static bool broadcasts_to(const qkv_tensor *src, const qkv_tensor *dst) {
    if (src->ndim > dst->ndim) return false;
    for (int i = 0; i < src->ndim; i++) {
        int64_t s = src->shape[i], d = dst->shape[dst->ndim - src->ndim + i];
        if (s != d && s != 1) return false;
    }
    return true;
}

bool qkv_copy_(qkv_tensor *dst, const qkv_tensor *src) {
    if (QKV__NULL_ARGS("qkv_copy_", dst, src)) return false;
    if (!QKV__CHECK("qkv_copy_", dst, src)) return false;
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    if (!writable("qkv_copy_", dst)) return false;
    if (!broadcasts_to(src, dst)) {
        char a[128], b[128];
        qkv_set_error("qkv_copy_: cannot copy %s into %s", qkv_shape_str(src, b, sizeof b),
                      qkv_shape_str(dst, a, sizeof a));
        return false;
    }
    qkv__broadcast_strides(dst, dst->ndim, dst->shape, st[0]);
    qkv__broadcast_strides(src, dst->ndim, dst->shape, st[1]);
    for (int i = 0; i < dst->ndim; i++) {
        st[0][i] *= (int64_t)qkv_dtype_size(dst->dtype);
        st[1][i] *= (int64_t)qkv_dtype_size(src->dtype);
    }
    copy_ctx c = {dst->dtype, src->dtype};
    char *bases[2] = {qkv_data(dst), qkv_data(src)};
    qkv__foreach(2, bases, dst->ndim, dst->shape, (const int64_t(*)[QKV_MAX_DIMS])st, copy_run,
                 &c, true);
    qkv__bump_version(dst);
    return true;
}

bool qkv_fill_(qkv_tensor *t, double value) {
    if (QKV__NULL_ARGS("qkv_fill_", t)) return false;
    if (!QKV__CHECK("qkv_fill_", t)) return false;
    if (!writable("qkv_fill_", t)) return false;
    union { float f; double d; int64_t i; bool b; uint16_t h; } v;
    switch (t->dtype) {
    case QKV_F32: v.f = (float)value; break;
    case QKV_F64: v.d = value; break;
    case QKV_I64: v.i = qkv__f64_to_i64(value); break;
    case QKV_BOOL: v.b = value != 0; break;
    case QKV_BF16: v.h = qkv__f32_to_bf16((float)value); break;
    }
    int64_t st[QKV_MAX_OPERANDS][QKV_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) {
        st[0][i] = t->strides[i] * (int64_t)qkv_dtype_size(t->dtype);
        st[1][i] = 0;
    }
    copy_ctx c = {t->dtype, t->dtype};
    char *bases[2] = {qkv_data(t), (char *)&v};
    qkv__foreach(2, bases, t->ndim, t->shape, (const int64_t(*)[QKV_MAX_DIMS])st, copy_run, &c,
                 true);
    qkv__bump_version(t);
    return true;
}

qkv_tensor *qkv__contiguous(const qkv_tensor *t) {
    if (!t) return NULL;
    if (qkv_is_contiguous(t)) {
        qkv_tensor *v = qkv__view(t, t->ndim, t->shape, t->strides, t->offset);
        return v;
    }
    qkv_tensor *out = qkv_empty(t->dtype, t->ndim, t->shape);
    if (out && !qkv_copy_(out, t)) return NULL;
    return out;
}

qkv_tensor *qkv__to_dtype(const qkv_tensor *t, qkv_dtype dtype) {
    if (!t) return NULL;
    qkv_tensor *out = qkv_empty(dtype, t->ndim, t->shape);
    if (out && !qkv_copy_(out, t)) return NULL;
    return out;
}

bool qkv_copy_out(const qkv_tensor *t, qkv_dtype dtype, void *dst) {
    if (QKV__NULL_ARGS("qkv_copy_out", t)) return false;
    if (!QKV__CHECK("qkv_copy_out", t)) return false;
    if (!dst) return qkv_set_error("qkv_copy_out: dst is NULL"), false;
    int64_t strides[QKV_MAX_DIMS];
    qkv__contiguous_strides(t->ndim, t->shape, strides);
    qkv_storage fake = {.data = dst, .nbytes = (size_t)t->numel * qkv_dtype_size(dtype),
                        .refcount = 1};
    qkv_tensor d = {0};
    d.dtype = dtype;
    d.ndim = t->ndim;
    memcpy(d.shape, t->shape, sizeof d.shape);
    memcpy(d.strides, strides, sizeof d.strides);
    d.numel = t->numel;
    d.storage = &fake;
    d.refcount = 1;
    return qkv_copy_(&d, t);
}

/* ---- Broadcasting ------------------------------------------------------------------------ */

bool qkv__broadcast_shape(int na, const int64_t *sa, int nb, const int64_t *sb,
                          int *nout, int64_t *out) {
    int n = na > nb ? na : nb;
    for (int i = 0; i < n; i++) {
        int ia = na - n + i, ib = nb - n + i;
        int64_t a = ia >= 0 ? sa[ia] : 1, b = ib >= 0 ? sb[ib] : 1;
        if (a != b && a != 1 && b != 1) return false;
        out[i] = a == 1 ? b : a;
    }
    *nout = n;
    return true;
}

void qkv__broadcast_strides(const qkv_tensor *t, int ndim, const int64_t *shape,
                            int64_t *strides) {
    for (int i = 0; i < ndim; i++) {
        int it = t->ndim - ndim + i;
        strides[i] = (it < 0 || t->shape[it] == 1) && shape[i] != 1 ? 0
                     : it < 0                                         ? 0
                                                                      : t->strides[it];
    }
}

int qkv__norm_axis(const char *op, const qkv_tensor *t, int axis) {
    /* A 0-d tensor takes axis 0 or -1, as in PyTorch. */
    int n = t->ndim ? t->ndim : 1;
    int a = axis < 0 ? axis + n : axis;
    if (a < 0 || a >= n) {
        char s[128];
        qkv_set_error("%s: axis %d out of range for %s", op, axis, qkv_shape_str(t, s, sizeof s));
        return -1;
    }
    return a;
}
