/*
 * Kernels that work along one axis rather than element by element: the cumulative sum, the
 * stable sort behind sort, argsort and topk, multinomial sampling, and the masks of tril and
 * triu. Each walks its input row by row, a row being the elements along the axis at one
 * position of the other axes, through the input's strides (no contiguous copy first). Rows
 * are done in order on one thread: every result is then the same for any thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tensor/tensor_internal.h"

/* One axis of a tensor seen as rows: rows of len elements step elements apart. A 0-d tensor
 * is one row of one element, as torch takes it for axis 0. */
typedef struct rows {
    int64_t count, len, step;
} rows;

static rows rows_of(const qkv_tensor *t, int axis) {
    rows r = {1, 1, 0};
    if (t->ndim == 0) return r;
    r.len = t->shape[axis];
    r.step = t->strides[axis];
    r.count = r.len ? t->numel / r.len : 0;
    if (r.len == 0) /* no elements, but still as many (empty) rows as the other axes make */
        for (int i = 0; i < t->ndim; i++) r.count *= i == axis ? 1 : t->shape[i];
    return r;
}

/* Element offset of row number r of t along axis (rows in row-major order of the other
 * axes). */
static int64_t row_offset(const qkv_tensor *t, int axis, int64_t r) {
    int64_t off = t->offset;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (i == axis) continue;
        off += (r % t->shape[i]) * t->strides[i];
        r /= t->shape[i];
    }
    return off;
}

/* ---- cumsum ------------------------------------------------------------------------------ */

#define CUMSUM_ROW(T, ACC)                                                                   \
    do {                                                                                     \
        const T *x = (const T *)a->storage->data + row_offset(a, axis, r);                   \
        T *y = (T *)out->storage->data + row_offset(out, axis, r);                           \
        ACC sum = 0;                                                                         \
        for (int64_t j = 0; j < ra.len; j++) {                                               \
            int64_t k = reverse ? ra.len - 1 - j : j;                                        \
            sum = (ACC)(sum + (ACC)x[k * ra.step]);                                          \
            y[k * ro.step] = (T)sum;                                                         \
        }                                                                                    \
    } while (0)

/* Integer sums wrap, as torch's do: the addition is done unsigned. */
typedef uint64_t wrapping_sum;

qkv_tensor *qkv__cumsum(const qkv_tensor *a, int axis, bool reverse, const char *name) {
    if (!a) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    axis = qkv__norm_axis(name, a, axis);
    if (axis < 0) return NULL;
    if (a->dtype == QKV_BOOL) { /* counted as integers, as in torch */
        qkv_scope_begin();
        qkv_tensor *out = qkv_keep(qkv__cumsum(qkv__to_dtype(a, QKV_I64), axis, reverse, name));
        qkv_scope_end();
        return out;
    }
    if (a->dtype == QKV_BF16) return QKV__IN_F32(qkv__cumsum(QKV__F32(a), axis, reverse, name));
    qkv_tensor *out = qkv_empty(a->dtype, a->ndim, a->shape);
    if (!out) return NULL;
    rows ra = rows_of(a, axis), ro = rows_of(out, axis);
    for (int64_t r = 0; r < ra.count && ra.len; r++) {
        /* F32 accumulates in double, as torch's CPU kernel does. */
        if (a->dtype == QKV_F32) CUMSUM_ROW(float, double);
        else if (a->dtype == QKV_F64) CUMSUM_ROW(double, double);
        else CUMSUM_ROW(int64_t, wrapping_sum);
    }
    return out;
}

/* ---- sort -------------------------------------------------------------------------------- */

/* A value and its position along the row. Ties are broken by position, which makes qsort
 * stable. NaN sorts above everything, as in torch; NaNs tie with one another. */
typedef struct fkey {
    double v;
    int64_t i;
} fkey;
typedef struct ikey {
    int64_t v;
    int64_t i;
} ikey;

static int by_position(int64_t a, int64_t b) {
    return (a > b) - (a < b);
}
static int fcompare(double a, double b) {
    if (isnan(a) || isnan(b)) return isnan(a) - isnan(b);
    return (a > b) - (a < b);
}
static int fkey_up(const void *pa, const void *pb) {
    const fkey *a = pa, *b = pb;
    int c = fcompare(a->v, b->v);
    return c ? c : by_position(a->i, b->i);
}
static int fkey_down(const void *pa, const void *pb) {
    const fkey *a = pa, *b = pb;
    int c = fcompare(b->v, a->v);
    return c ? c : by_position(a->i, b->i);
}
static int ikey_up(const void *pa, const void *pb) {
    const ikey *a = pa, *b = pb;
    int c = (a->v > b->v) - (a->v < b->v);
    return c ? c : by_position(a->i, b->i);
}
static int ikey_down(const void *pa, const void *pb) {
    const ikey *a = pa, *b = pb;
    int c = (b->v > a->v) - (b->v < a->v);
    return c ? c : by_position(a->i, b->i);
}

/* Sorts row r of a into keys and writes the first k positions to the index tensor. */
static void sort_row(const qkv_tensor *a, int axis, int64_t r, bool descending, void *keys,
                     qkv_tensor *out, int64_t k) {
    rows ra = rows_of(a, axis), ro = rows_of(out, axis);
    int64_t off = row_offset(a, axis, r);
    int64_t *y = (int64_t *)out->storage->data + row_offset(out, axis, r);
    size_t n = (size_t)ra.len;
    if (qkv__is_float(a->dtype)) {
        fkey *kf = keys;
        for (int64_t j = 0; j < ra.len; j++)
            kf[j] = (fkey){qkv__load(a->storage->data, a->dtype, off + j * ra.step), j};
        qsort(kf, n, sizeof *kf, descending ? fkey_down : fkey_up);
        for (int64_t j = 0; j < k; j++) y[j * ro.step] = kf[j].i;
    } else {
        ikey *ki = keys;
        for (int64_t j = 0; j < ra.len; j++) {
            int64_t at = off + j * ra.step;
            ki[j].v = a->dtype == QKV_I64 ? ((const int64_t *)a->storage->data)[at]
                                          : ((const bool *)a->storage->data)[at];
            ki[j].i = j;
        }
        qsort(ki, n, sizeof *ki, descending ? ikey_down : ikey_up);
        for (int64_t j = 0; j < k; j++) y[j * ro.step] = ki[j].i;
    }
}

qkv_tensor *qkv__sort_indices(const qkv_tensor *a, int axis, bool descending, int64_t k,
                              const char *name) {
    if (!a) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, a)) return NULL;
    axis = qkv__norm_axis(name, a, axis);
    if (axis < 0) return NULL;
    int64_t shape[QKV_MAX_DIMS];
    memcpy(shape, a->shape, sizeof shape);
    if (a->ndim) shape[axis] = k;
    else k = 1; /* a 0-d result holds its one element whatever k is, as in torch */
    rows ra = rows_of(a, axis);
    size_t key_size = sizeof(fkey) > sizeof(ikey) ? sizeof(fkey) : sizeof(ikey);
    size_t nbytes = (size_t)ra.len * key_size;
    void *keys = nbytes ? qkv__alloc(nbytes) : NULL;
    if (nbytes && !keys) return NULL;
    qkv_tensor *out = qkv_empty(QKV_I64, a->ndim, shape);
    for (int64_t r = 0; out && k && r < ra.count; r++)
        sort_row(a, axis, r, descending, keys, out, k);
    if (keys) qkv__free(keys, nbytes);
    return out;
}

/* ---- multinomial ------------------------------------------------------------------------- */

/* Checks a row of weights: every one finite and non-negative, a positive sum, and, without
 * replacement, at least n nonzero ones. */
static bool check_row(const double *w, int64_t len, int64_t row, const qkv_tensor *probs,
                      int64_t n, bool replacement, const char *name) {
    char s[128];
    int64_t nonzero = 0;
    double total = 0;
    for (int64_t j = 0; j < len; j++) {
        if (!(w[j] >= 0) || isinf(w[j])) {
            qkv_set_error("%s: probs %s has %g at row %lld, column %lld: every entry must be "
                          "finite and non-negative", name, qkv_shape_str(probs, s, sizeof s),
                          w[j], (long long)row, (long long)j);
            return false;
        }
        nonzero += w[j] > 0;
        total += w[j];
    }
    if (!(total > 0)) {
        qkv_set_error("%s: row %lld of probs %s sums to zero", name, (long long)row,
                      qkv_shape_str(probs, s, sizeof s));
        return false;
    }
    if (!replacement && n > nonzero) {
        qkv_set_error("%s: cannot draw %lld samples without replacement from row %lld of "
                      "probs %s, which has %lld nonzero entries", name, (long long)n,
                      (long long)row, qkv_shape_str(probs, s, sizeof s), (long long)nonzero);
        return false;
    }
    return true;
}

/* The category whose share of the running total covers u in [0, total): the first j whose
 * cumulative weight exceeds u. Rounding can leave u at the total; then the last category
 * with weight is taken. */
static int64_t pick(const double *w, int64_t len, double u) {
    double acc = 0;
    int64_t last = 0;
    for (int64_t j = 0; j < len; j++) {
        if (w[j] <= 0) continue;
        acc += w[j];
        last = j;
        if (acc > u) return j;
    }
    return last;
}

/* The first j with cdf[j] > u, by bisection (cdf non-decreasing, cdf[len-1] the total). */
static int64_t pick_sorted(const double *cdf, const double *w, int64_t len, double u) {
    int64_t lo = 0, hi = len - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cdf[mid] > u) hi = mid;
        else lo = mid + 1;
    }
    while (lo > 0 && w[lo] <= 0) lo--; /* u at the total: the last category with weight */
    return lo;
}

static void draw_row(double *w, double *cdf, int64_t len, int64_t n, bool replacement,
                     qkv_generator *g, int64_t *y) {
    if (replacement) {
        double acc = 0;
        for (int64_t j = 0; j < len; j++) cdf[j] = acc += w[j];
        for (int64_t s = 0; s < n; s++)
            y[s] = pick_sorted(cdf, w, len, qkv_generator_uniform(g) * acc);
        return;
    }
    for (int64_t s = 0; s < n; s++) { /* each draw from what the earlier ones left */
        double total = 0;
        for (int64_t j = 0; j < len; j++) total += w[j];
        y[s] = pick(w, len, qkv_generator_uniform(g) * total);
        w[y[s]] = 0;
    }
}

/* Row r of probs into w, as doubles. */
static void load_row(const qkv_tensor *probs, int64_t r, double *w) {
    int axis = probs->ndim - 1;
    rows rp = rows_of(probs, axis);
    int64_t off = row_offset(probs, axis, r);
    for (int64_t j = 0; j < rp.len; j++)
        w[j] = qkv__load(probs->storage->data, probs->dtype, off + j * rp.step);
}

static bool check_args(const qkv_tensor *probs, int64_t n, qkv_generator *g, const char *name) {
    char s[128];
    if (!g) return qkv_set_error("%s: the generator is NULL", name), false;
    if (!qkv__is_float(probs->dtype))
        return qkv_set_error("%s: probs must be f32, f64 or bf16, not %s", name,
                             qkv_dtype_name(probs->dtype)), false;
    if (probs->ndim != 1 && probs->ndim != 2)
        return qkv_set_error("%s: probs must be 1-D or 2-D, not %s", name,
                             qkv_shape_str(probs, s, sizeof s)), false;
    if (n <= 0)
        return qkv_set_error("%s: n_samples must be positive, not %lld", name,
                             (long long)n), false;
    if (probs->shape[probs->ndim - 1] == 0)
        return qkv_set_error("%s: probs %s has no categories", name,
                             qkv_shape_str(probs, s, sizeof s)), false;
    return true;
}

qkv_tensor *qkv__multinomial(const qkv_tensor *probs, int64_t n, bool replacement,
                             qkv_generator *g, const char *name) {
    if (QKV__NULL_ARGS(name, probs)) return NULL;
    QKV__OP(name);
    if (!QKV__CHECK(name, probs) || !check_args(probs, n, g, name)) return NULL;
    int64_t len = probs->shape[probs->ndim - 1];
    int64_t count = probs->ndim == 2 ? probs->shape[0] : 1;
    int64_t shape[2] = {count, n};
    size_t nbytes = 2 * (size_t)len * sizeof(double);
    qkv_scope_begin(); /* frees out if a row is refused */
    double *w = qkv__alloc(nbytes);
    qkv_tensor *out = w ? qkv_empty(QKV_I64, probs->ndim, shape + 2 - probs->ndim) : NULL;
    bool ok = out != NULL;
    /* Every row is checked before the first draw, so a refused call leaves g as it was. */
    for (int64_t r = 0; r < count && ok; r++) {
        load_row(probs, r, w);
        ok = check_row(w, len, r, probs, n, replacement, name);
    }
    for (int64_t r = 0; r < count && ok; r++) {
        load_row(probs, r, w);
        draw_row(w, w + len, len, n, replacement, g, (int64_t *)qkv_data(out) + r * n);
    }
    if (w) qkv__free(w, nbytes);
    out = ok ? qkv_keep(out) : NULL;
    qkv_scope_end();
    return out;
}

/* ---- tril, triu -------------------------------------------------------------------------- */

qkv_tensor *qkv__tri_mask(int64_t n_rows, int64_t n_cols, int64_t diagonal, bool upper) {
    qkv_tensor *m = qkv_empty(QKV_BOOL, 2, (const int64_t[]){n_rows, n_cols});
    if (!m) return NULL;
    /* Past the matrix's own extent every diagonal means the same: clamped, j - i - diagonal
     * cannot overflow. */
    if (diagonal > n_cols) diagonal = n_cols;
    if (diagonal < -n_rows) diagonal = -n_rows;
    bool *d = qkv_data(m);
    for (int64_t i = 0; i < n_rows; i++)
        for (int64_t j = 0; j < n_cols; j++)
            d[i * n_cols + j] = upper ? j - i >= diagonal : j - i <= diagonal;
    return m;
}
