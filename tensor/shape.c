/*
 * Checked shape arithmetic for views: every view op computes its sizes, offset and strides
 * here, so an overflowing or negative result is an error naming the op, and a view can never
 * address an element outside its storage.
 */
#include "tensor/tensor_internal.h"

bool qkv__add_i64(const char *op, int64_t a, int64_t b, int64_t *out) {
    if (__builtin_add_overflow(a, b, out))
        return qkv_set_error("%s: %lld + %lld overflows", op, (long long)a, (long long)b), false;
    return true;
}

bool qkv__mul_i64(const char *op, int64_t a, int64_t b, int64_t *out) {
    if (__builtin_mul_overflow(a, b, out))
        return qkv_set_error("%s: %lld * %lld overflows", op, (long long)a, (long long)b), false;
    return true;
}

/* The lowest and highest element offsets a view reaches; false on overflow. */
static bool view_extent(int ndim, const int64_t *shape, const int64_t *strides, int64_t offset,
                        int64_t *lo, int64_t *hi) {
    *lo = *hi = offset;
    for (int i = 0; i < ndim; i++) {
        int64_t reach;
        if (__builtin_mul_overflow(shape[i] - 1, strides[i], &reach)) return false;
        if (reach < 0 ? __builtin_add_overflow(*lo, reach, lo)
                      : __builtin_add_overflow(*hi, reach, hi))
            return false;
    }
    return true;
}

bool qkv__check_view(const char *op, const qkv_tensor *base, int ndim, const int64_t *shape,
                     const int64_t *strides, int64_t offset) {
    if (!qkv__check_shape(op, ndim, shape)) return false;
    if (qkv__numel(ndim, shape) == 0) return true;
    int64_t lo, hi, have = (int64_t)(base->storage->nbytes / qkv_dtype_size(base->dtype));
    if (!view_extent(ndim, shape, strides, offset, &lo, &hi) || lo < 0 || hi >= have) {
        char s[128];
        return qkv_set_error("%s: the view would reach outside the %lld elements of %s's "
                             "storage", op, (long long)have, qkv_shape_str(base, s, sizeof s)),
               false;
    }
    return true;
}
