/* Tensor objects and storage: creation, reference counting, views, element access. */
#include <math.h>
#include <string.h>

#include "tensor/tensor_internal.h"

static const char *const dtype_names[] = {"f32", "f64", "i64", "bool", "bf16"};
static const size_t dtype_sizes[] = {4, 8, 8, 1, 2};

const char *qkv_dtype_name(qkv_dtype dtype) {
    return qkv__dtype_valid(dtype) ? dtype_names[dtype] : "?";
}

size_t qkv_dtype_size(qkv_dtype dtype) {
    return qkv__dtype_valid(dtype) ? dtype_sizes[dtype] : 0;
}

uint16_t qkv_f32_to_bf16(float value) {
    return qkv__f32_to_bf16(value);
}

float qkv_bf16_to_f32(uint16_t bits) {
    return qkv__bf16_to_f32(bits);
}

bool qkv__is_float(qkv_dtype dtype) {
    return dtype == QKV_F32 || dtype == QKV_F64 || dtype == QKV_BF16;
}

qkv_storage *qkv__storage_new(size_t nbytes) {
    qkv_storage *s = qkv__alloc(sizeof *s);
    if (!s) return NULL;
    s->data = qkv__alloc(nbytes);
    if (!s->data) {
        qkv__free(s, sizeof *s);
        return NULL;
    }
    s->nbytes = nbytes;
    s->refcount = 1;
    s->version = 0;
    return s;
}

void qkv__storage_release(qkv_storage *s) {
    if (!s || --s->refcount > 0) return;
    /* In checked mode stale values read through a kept data pointer show as NaN (or -1). */
    if (qkv__checking()) memset(s->data, 0xff, s->nbytes);
    qkv__free(s->data, s->nbytes);
    qkv__free(s, sizeof *s);
}

int64_t qkv__numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

int64_t qkv__contiguous_strides(int ndim, const int64_t *shape, int64_t *strides) {
    int64_t n = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        strides[i] = n;
        n *= shape[i];
    }
    return n;
}

/* Element counts whose byte size does not fit in 2^62 are refused before any multiplication
 * can overflow. The bound holds for the product of the non-zero sizes, so an empty tensor
 * cannot hide huge dimensions that strides are computed from. */
bool qkv__check_shape(const char *op, int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > QKV_MAX_DIMS)
        return qkv_set_error("%s: %d dimensions (at most %d)", op, ndim, QKV_MAX_DIMS), false;
    if (ndim > 0 && !shape) return qkv_set_error("%s: shape is NULL", op), false;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return qkv_set_error("%s: negative size %lld in dimension %d", op,
                                 (long long)shape[i], i), false;
        if (shape[i] > 0 && n > (INT64_C(1) << 58) / shape[i])
            return qkv_set_error("%s: shape too large (dimension %d)", op, i), false;
        if (shape[i] > 0) n *= shape[i];
    }
    return true;
}

qkv_tensor *qkv__make(qkv_dtype dtype, int ndim, const int64_t *shape, const int64_t *strides,
                      int64_t offset, qkv_storage *storage) {
    qkv_tensor *t = qkv__alloc(sizeof *t);
    if (!t) return NULL;
    memset(t, 0, sizeof *t);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->strides[i] = strides[i];
    }
    t->offset = offset;
    t->numel = qkv__numel(ndim, shape);
    t->storage = storage;
    storage->refcount++;
    t->refcount = 1;
    t->magic = QKV__TENSOR_LIVE;
    qkv__count_tensor(1);
    if (qkv__checking()) qkv__debug_track(t);
    return qkv__scope_add(t) ? t : NULL;
}

qkv_tensor *qkv__view(const qkv_tensor *t, int ndim, const int64_t *shape,
                      const int64_t *strides, int64_t offset) {
    return qkv__make(t->dtype, ndim, shape, strides, offset, t->storage);
}

qkv_tensor *qkv__retain(qkv_tensor *t) {
    if (t) t->refcount++;
    return t;
}

qkv_tensor *qkv_retain(qkv_tensor *t) {
    if (!t) return NULL;
    if (t->magic == QKV__TENSOR_FREED) return qkv__freed_error("qkv_retain", t), NULL;
    t->user_refs++;
    t->refcount++;
    return t;
}

static void destroy(qkv_tensor *t) {
    if (t->grad_fn) ((qkv_node_base *)t->grad_fn)->release(t->grad_fn, t);
    if (t->grad_hooks) ((qkv__grad_hooks_base *)t->grad_hooks)->free_all(t);
    qkv__release(t->grad);
    qkv__storage_release(t->storage);
    t->magic = QKV__TENSOR_FREED;
    qkv__count_tensor(-1);
    if (t->debug) qkv__debug_quarantine(t);
    else qkv__free(t, sizeof *t);
}

/* Releasing a graph's output releases its inputs in turn. A worklist instead of recursion
 * keeps the stack flat however long the chain of ops is. */
static _Thread_local qkv_tensor *dying;
static _Thread_local bool draining;

void qkv__release(qkv_tensor *t) {
    if (!t || --t->refcount > 0) return;
    t->dying_next = dying;
    dying = t;
    if (draining) return;
    draining = true;
    while (dying) {
        qkv_tensor *d = dying;
        dying = d->dying_next;
        destroy(d);
    }
    draining = false;
}

/* Only the caller's own references can be released: dropping one a scope or the library
 * holds would free the tensor while they still point at it. */
void qkv_release(qkv_tensor *t) {
    if (!t) return;
    if (t->magic == QKV__TENSOR_FREED) return qkv__freed_error("qkv_release", t);
    if (t->user_refs == 0) {
        char d[256];
        qkv__describe(t, d, sizeof d);
        if (t->scope_refs > 0)
            qkv_set_error("qkv_release: the tensor %s is owned by its scope and you hold no "
                          "reference to it; qkv_scope_end frees it (qkv_retain first to keep "
                          "it longer)", d);
        else
            qkv_set_error("qkv_release: the tensor %s is held only by the library (a "
                          "module's parameter, a gradient, a graph) and you hold no "
                          "reference to it", d);
        return;
    }
    t->user_refs--;
    if (qkv__checking()) qkv__debug_releasing("qkv_release", NULL, 0);
    qkv__release(t);
    if (qkv__checking()) qkv__debug_releasing(NULL, NULL, 0);
}

/* qkv_empty for the creation function op, which names itself in errors. */
static qkv_tensor *empty_for(const char *op, qkv_dtype dtype, int ndim, const int64_t *shape) {
    QKV__OP(op);
    if (!qkv__dtype_valid(dtype)) return qkv_set_error("%s: unknown dtype %d", op, dtype);
    if (!qkv__check_shape(op, ndim, shape)) return NULL;
    int64_t strides[QKV_MAX_DIMS];
    int64_t n = qkv__contiguous_strides(ndim, shape, strides);
    qkv_storage *s = qkv__storage_new((size_t)n * qkv_dtype_size(dtype));
    if (!s) return NULL;
    qkv_tensor *t = qkv__make(dtype, ndim, shape, strides, 0, s);
    qkv__storage_release(s);
    return t;
}

bool qkv__dense_layout(const qkv_tensor *t, int64_t *strides) {
    if (t->numel == 0) return false;
    /* The dimensions that step, outermost (largest stride) first; ties keep their order. */
    int order[QKV_MAX_DIMS], n = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 1) continue;
        int j = n++;
        for (; j > 0 && t->strides[order[j - 1]] < t->strides[i]; j--) order[j] = order[j - 1];
        order[j] = i;
    }
    int64_t expect = 1;
    for (int j = n - 1; j >= 0; j--) {
        if (t->strides[order[j]] != expect) return false;
        expect *= t->shape[order[j]];
    }
    memcpy(strides, t->strides, (size_t)t->ndim * sizeof *strides);
    return true;
}

qkv_tensor *qkv__empty_strided(qkv_dtype dtype, int ndim, const int64_t *shape,
                               const int64_t *strides) {
    QKV__OP("qkv_empty");
    if (!qkv__check_shape("qkv_empty", ndim, shape)) return NULL;
    qkv_storage *s = qkv__storage_new((size_t)qkv__numel(ndim, shape) * qkv_dtype_size(dtype));
    if (!s) return NULL;
    qkv_tensor *t = qkv__make(dtype, ndim, shape, strides, 0, s);
    qkv__storage_release(s);
    return t;
}

qkv_tensor *qkv_empty(qkv_dtype dtype, int ndim, const int64_t *shape) {
    return empty_for("qkv_empty", dtype, ndim, shape);
}

static qkv_tensor *full_for(const char *op, qkv_dtype dtype, int ndim, const int64_t *shape,
                            double value) {
    qkv_tensor *t = empty_for(op, dtype, ndim, shape);
    if (t) qkv_fill_(t, value);
    return t;
}

qkv_tensor *qkv_full(qkv_dtype dtype, int ndim, const int64_t *shape, double value) {
    return full_for("qkv_full", dtype, ndim, shape, value);
}

qkv_tensor *qkv_zeros(qkv_dtype dtype, int ndim, const int64_t *shape) {
    qkv_tensor *t = empty_for("qkv_zeros", dtype, ndim, shape);
    if (t) memset(qkv_data(t), 0, (size_t)t->numel * qkv_dtype_size(dtype));
    return t;
}

qkv_tensor *qkv_ones(qkv_dtype dtype, int ndim, const int64_t *shape) {
    return full_for("qkv_ones", dtype, ndim, shape, 1.0);
}

qkv_tensor *qkv_scalar(qkv_dtype dtype, double value) {
    return full_for("qkv_scalar", dtype, 0, NULL, value);
}

qkv_tensor *qkv_arange(qkv_dtype dtype, double start, double end, double step) {
    if (step == 0 || !isfinite(start) || !isfinite(end) || !isfinite(step))
        return qkv_set_error("qkv_arange: bad range %g..%g step %g", start, end, step);
    double len = ceil((end - start) / step);
    if (len < 0) len = 0;
    if (len > 1e15) return qkv_set_error("qkv_arange: range too long");
    int64_t n = (int64_t)len;
    qkv_tensor *t = empty_for("qkv_arange", dtype, 1, &n);
    if (!t) return NULL;
    void *d = qkv_data(t);
    for (int64_t i = 0; i < n; i++) qkv__store(d, dtype, i, start + (double)i * step);
    return t;
}

qkv_tensor *qkv_from_array(qkv_dtype dtype, int ndim, const int64_t *shape, const void *data) {
    /* checked before allocating, so that a refused call leaves nothing behind */
    if (!qkv__check_shape("qkv_from_array", ndim, shape)) return NULL;
    if (!data && qkv__numel(ndim, shape) > 0)
        return qkv_set_error("qkv_from_array: data is NULL");
    qkv_tensor *t = empty_for("qkv_from_array", dtype, ndim, shape);
    if (t && t->numel > 0) memcpy(qkv_data(t), data, (size_t)t->numel * qkv_dtype_size(dtype));
    return t;
}

qkv_tensor *qkv_empty_like(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_empty_like", t) || !QKV__CHECK("qkv_empty_like", t)) return NULL;
    return qkv_empty(t->dtype, t->ndim, t->shape);
}

qkv_tensor *qkv_zeros_like(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_zeros_like", t) || !QKV__CHECK("qkv_zeros_like", t)) return NULL;
    return qkv_zeros(t->dtype, t->ndim, t->shape);
}

qkv_tensor *qkv_ones_like(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_ones_like", t) || !QKV__CHECK("qkv_ones_like", t)) return NULL;
    return qkv_ones(t->dtype, t->ndim, t->shape);
}

bool qkv_is_contiguous(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_is_contiguous", t) ||
        !QKV__CHECK("qkv_is_contiguous", t)) return false;
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != expect) return false;
        expect *= t->shape[i];
    }
    return true;
}

uint64_t qkv_version(const qkv_tensor *t) {
    return t && t->storage ? t->storage->version : 0;
}

void *qkv_data(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_data", t) || !QKV__CHECK("qkv_data", t)) return NULL;
    return (char *)t->storage->data + (size_t)t->offset * qkv_dtype_size(t->dtype);
}

double qkv__load(const void *base, qkv_dtype dtype, int64_t i) {
    switch (dtype) {
    case QKV_F32: return ((const float *)base)[i];
    case QKV_F64: return ((const double *)base)[i];
    case QKV_I64: return (double)((const int64_t *)base)[i];
    case QKV_BOOL: return ((const bool *)base)[i] ? 1.0 : 0.0;
    case QKV_BF16: return qkv__bf16_to_f32(((const uint16_t *)base)[i]);
    }
    return NAN;
}

void qkv__store(void *base, qkv_dtype dtype, int64_t i, double v) {
    switch (dtype) {
    case QKV_F32: ((float *)base)[i] = (float)v; break;
    case QKV_F64: ((double *)base)[i] = v; break;
    case QKV_I64: ((int64_t *)base)[i] = qkv__f64_to_i64(v); break;
    case QKV_BOOL: ((bool *)base)[i] = v != 0; break;
    case QKV_BF16: ((uint16_t *)base)[i] = qkv__f32_to_bf16((float)v); break;
    }
}

double qkv_item(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_item", t) || !QKV__CHECK("qkv_item", t)) return NAN;
    if (t->numel != 1) {
        char s[128];
        qkv_set_error("qkv_item: tensor has %lld elements, not 1: %s", (long long)t->numel,
                      qkv_shape_str(t, s, sizeof s));
        return NAN;
    }
    int64_t off = 0;
    return qkv__load(qkv_data(t), t->dtype, off);
}

double qkv_get(const qkv_tensor *t, const int64_t *index) {
    if (QKV__NULL_ARGS("qkv_get", t) || !QKV__CHECK("qkv_get", t)) return NAN;
    if (!index && t->ndim > 0) return qkv_set_error("qkv_get: index is NULL"), NAN;
    int64_t off = 0;
    for (int i = 0; i < t->ndim; i++) {
        int64_t k = index[i] < 0 ? index[i] + t->shape[i] : index[i];
        if (k < 0 || k >= t->shape[i]) {
            char s[128];
            qkv_set_error("qkv_get: index %lld out of range for dimension %d of %s",
                          (long long)index[i], i, qkv_shape_str(t, s, sizeof s));
            return NAN;
        }
        off += k * t->strides[i];
    }
    return qkv__load(qkv_data(t), t->dtype, off);
}
