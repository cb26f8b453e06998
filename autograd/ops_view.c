/*
 * Views and copies. A view shares its input's storage and only changes shape, strides and
 * offset; its backward maps the gradient back to the input's geometry.
 */
#include <string.h>

#include "autograd/autograd_internal.h"

#define IN(i) qkv_ctx_input(ctx, i)

/* out, already made from a, recorded as fn of a with args: for the views and copies, whose
 * backwards read nothing but a's shape and their arguments. */
static qkv_tensor *record1(const qkv_function *fn, const qkv_tensor *a, const void *args,
                           qkv_tensor *out) {
    return qkv_function_end(qkv_function_begin(fn, 1, QKV_INPUTS(a), args), out);
}
#define REC1(out, fn, a) record1(fn, a, NULL, out)

/* ---- reshape ----------------------------------------------------------------------------- */

/* Strides that let new_shape view memory laid out as (shape, strides), if any: dimensions
 * are matched chunk by chunk, where a chunk is a run of old dimensions that are contiguous
 * with one another. */
static bool view_strides(int ond, const int64_t *oshape, const int64_t *ostride, int nnd,
                         const int64_t *nshape, int64_t *nstride) {
    if (ond == 0 || qkv__numel(ond, oshape) == 0) {
        qkv__contiguous_strides(nnd, nshape, nstride);
        return true;
    }
    int view_d = nnd - 1;
    int64_t chunk_stride = ostride[ond - 1], tensor_numel = 1, view_numel = 1;
    for (int d = ond - 1; d >= 0; d--) {
        tensor_numel *= oshape[d];
        if (d == 0 || (oshape[d - 1] != 1 && ostride[d - 1] != tensor_numel * chunk_stride)) {
            while (view_d >= 0 && (view_numel < tensor_numel || nshape[view_d] == 1)) {
                nstride[view_d] = view_numel * chunk_stride;
                view_numel *= nshape[view_d];
                view_d--;
            }
            if (view_numel != tensor_numel) return false;
            if (d > 0) {
                chunk_stride = ostride[d - 1];
                tensor_numel = view_numel = 1;
            }
        }
    }
    return view_d == -1;
}

/* d reshape = g reshaped to the input's shape */
static void reshape_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv_reshape(g, IN(0)->ndim, IN(0)->shape);
}
static const qkv_function reshape_fn = {.name = "reshape", .backward = reshape_backward};

qkv_tensor *qkv_reshape(const qkv_tensor *a, int ndim, const int64_t *shape) {
    if (QKV__NULL_ARGS("qkv_reshape", a)) return NULL;
    QKV__OP("qkv_reshape");
    if (!QKV__CHECK("qkv_reshape", a)) return NULL;
    if (ndim < 0 || ndim > QKV_MAX_DIMS || (ndim && !shape))
        return qkv_set_error("qkv_reshape: bad number of dimensions %d", ndim);
    int64_t ns[QKV_MAX_DIMS] = {0}, known = 1;
    int infer = -1;
    for (int i = 0; i < ndim; i++) {
        ns[i] = shape[i];
        if (shape[i] == -1 && infer < 0) infer = i;
        else if (shape[i] < 0) return qkv_set_error("qkv_reshape: bad size %lld",
                                                     (long long)shape[i]);
        else if (!qkv__mul_i64("qkv_reshape", known, shape[i], &known)) return NULL;
    }
    if (infer >= 0) ns[infer] = known ? a->numel / known : 0;
    if (!qkv__check_shape("qkv_reshape", ndim, ns)) return NULL;
    char sa[128];
    if (qkv__numel(ndim, ns) != a->numel || (infer >= 0 && known == 0)) {
        char buf[160] = "[";
        for (int i = 0; i < ndim; i++)
            snprintf(buf + strlen(buf), sizeof buf - strlen(buf), i ? ",%lld" : "%lld",
                     (long long)shape[i]);
        strncat(buf, "]", sizeof buf - strlen(buf) - 1);
        return qkv_set_error("qkv_reshape: cannot reshape %s (%lld elements) to %s",
                             qkv_shape_str(a, sa, sizeof sa), (long long)a->numel, buf);
    }
    int64_t st[QKV_MAX_DIMS];
    qkv_tensor *out;
    if (view_strides(a->ndim, a->shape, a->strides, ndim, ns, st)) {
        if (!qkv__check_view("qkv_reshape", a, ndim, ns, st, a->offset)) return NULL;
        out = qkv__view(a, ndim, ns, st, a->offset);
    } else {
        qkv_tensor *c = qkv__contiguous(a);
        qkv__contiguous_strides(ndim, ns, st);
        out = c ? qkv__view(c, ndim, ns, st, c->offset) : NULL;
    }
    return REC1(out, &reshape_fn, a);
}

qkv_tensor *qkv_flatten(const qkv_tensor *a, int start_axis, int end_axis) {
    if (QKV__NULL_ARGS("qkv_flatten", a)) return NULL;
    QKV__OP("qkv_flatten");
    if (!QKV__CHECK("qkv_flatten", a)) return NULL;
    if (a->ndim == 0) return qkv_reshape(a, 1, (const int64_t[]){1});
    int s = qkv__norm_axis("qkv_flatten", a, start_axis);
    int e = qkv__norm_axis("qkv_flatten", a, end_axis);
    if (s < 0 || e < 0) return NULL;
    if (s > e) return qkv_set_error("qkv_flatten: start axis %d after end axis %d", s, e);
    int64_t shape[QKV_MAX_DIMS];
    int n = 0;
    for (int i = 0; i < a->ndim; i++) {
        if (i <= s || i > e) shape[n++] = a->shape[i];
        else shape[n - 1] *= a->shape[i];
    }
    return qkv_reshape(a, n, shape);
}

/* ---- transpose, permute ------------------------------------------------------------------ */

/* d permute = g permuted by the inverse permutation */
typedef struct permute_args {
    int axes[QKV_MAX_DIMS];
} permute_args;

static void permute_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const permute_args *args = qkv_ctx_args(ctx);
    int inv[QKV_MAX_DIMS];
    for (int i = 0; i < g->ndim; i++) inv[args->axes[i]] = i;
    gi[0] = qkv_permute(g, inv);
}
static const qkv_function permute_fn = {.name = "permute", .backward = permute_backward,
                                        .args_size = sizeof(permute_args)};

qkv_tensor *qkv_permute(const qkv_tensor *a, const int *axes) {
    if (QKV__NULL_ARGS("qkv_permute", a)) return NULL;
    QKV__OP("qkv_permute");
    if (!QKV__CHECK("qkv_permute", a)) return NULL;
    if (!axes) return qkv_set_error("qkv_permute: axes is NULL");
    int64_t shape[QKV_MAX_DIMS], st[QKV_MAX_DIMS];
    bool used[QKV_MAX_DIMS] = {false};
    permute_args args = {{0}};
    int *ax = args.axes;
    for (int i = 0; i < a->ndim; i++) {
        ax[i] = qkv__norm_axis("qkv_permute", a, axes[i]);
        if (ax[i] < 0) return NULL;
        if (used[ax[i]]) return qkv_set_error("qkv_permute: axis %d appears twice", axes[i]);
        used[ax[i]] = true;
        shape[i] = a->shape[ax[i]];
        st[i] = a->strides[ax[i]];
    }
    return record1(&permute_fn, a, &args, qkv__view(a, a->ndim, shape, st, a->offset));
}

qkv_tensor *qkv_transpose(const qkv_tensor *a, int axis0, int axis1) {
    if (QKV__NULL_ARGS("qkv_transpose", a)) return NULL;
    QKV__OP("qkv_transpose");
    if (!QKV__CHECK("qkv_transpose", a)) return NULL;
    int d0 = qkv__norm_axis("qkv_transpose", a, axis0);
    int d1 = qkv__norm_axis("qkv_transpose", a, axis1);
    if (d0 < 0 || d1 < 0) return NULL;
    if (a->ndim == 0) return qkv_reshape(a, 0, NULL);
    int axes[QKV_MAX_DIMS];
    for (int i = 0; i < a->ndim; i++) axes[i] = i;
    axes[d0] = d1;
    axes[d1] = d0;
    return qkv_permute(a, axes);
}

/* ---- slice, narrow, select --------------------------------------------------------------- */

/* d slice = g placed into zeros of the input's shape at the sliced positions */
typedef struct slice_args {
    int axis;
    bool drop_axis; /* select: the axis is gone from the output */
    int64_t start, step, len;
} slice_args;

static void slice_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    const qkv_tensor *a = IN(0);
    const slice_args *args = qkv_ctx_args(ctx);
    qkv_tensor *z = qkv_zeros(g->dtype, a->ndim, a->shape);
    if (!z) return;
    int axis = args->axis;
    int64_t shape[QKV_MAX_DIMS], st[QKV_MAX_DIMS];
    memcpy(shape, z->shape, sizeof shape);
    memcpy(st, z->strides, sizeof st);
    shape[axis] = args->len;
    st[axis] *= args->step;
    qkv_tensor *window = qkv__view(z, z->ndim, shape, st, args->start * z->strides[axis]);
    qkv_tensor *gg = args->drop_axis ? qkv_unsqueeze(g, axis) : (qkv_tensor *)g;
    if (window && qkv_copy_(window, gg)) gi[0] = z;
}
static const qkv_function slice_fn = {.name = "slice", .backward = slice_backward,
                                      .args_size = sizeof(slice_args)};

static qkv_tensor *slice_view(const qkv_tensor *a, int axis, int64_t start, int64_t len,
                              int64_t step, bool drop_axis, const char *name) {
    int64_t shape[QKV_MAX_DIMS], st[QKV_MAX_DIMS], offset, axis_step;
    /* A step past the axis's end takes one element: its stride is never applied. */
    if (len <= 1) step = 1;
    if (!qkv__mul_i64(name, a->strides[axis], step, &axis_step) ||
        !qkv__mul_i64(name, start, a->strides[axis], &offset) ||
        !qkv__add_i64(name, a->offset, offset, &offset))
        return NULL;
    int n = 0;
    for (int i = 0; i < a->ndim; i++) {
        if (i == axis && drop_axis) continue;
        shape[n] = i == axis ? len : a->shape[i];
        st[n++] = i == axis ? axis_step : a->strides[i];
    }
    if (!qkv__check_view(name, a, n, shape, st, offset)) return NULL;
    slice_args args = {axis, drop_axis, start, step, len};
    return record1(&slice_fn, a, &args, qkv__view(a, n, shape, st, offset));
}

qkv_tensor *qkv_slice(const qkv_tensor *a, int axis, int64_t start, int64_t end, int64_t step) {
    if (QKV__NULL_ARGS("qkv_slice", a)) return NULL;
    QKV__OP("qkv_slice");
    if (!QKV__CHECK("qkv_slice", a)) return NULL;
    int ax = qkv__norm_axis("qkv_slice", a, axis);
    if (ax < 0) return NULL;
    if (a->ndim == 0) return qkv_set_error("qkv_slice: cannot slice a 0-d tensor");
    if (step <= 0) return qkv_set_error("qkv_slice: step must be positive, not %lld",
                                        (long long)step);
    int64_t n = a->shape[ax];
    if (start < 0) start += n;
    if (end < 0) end += n;
    start = start < 0 ? 0 : start > n ? n : start;
    end = end < start ? start : end > n ? n : end;
    int64_t len = end > start ? (end - start - 1) / step + 1 : 0;
    return slice_view(a, ax, start, len, step, false, "qkv_slice");
}

qkv_tensor *qkv_narrow(const qkv_tensor *a, int axis, int64_t start, int64_t length) {
    if (QKV__NULL_ARGS("qkv_narrow", a)) return NULL;
    QKV__OP("qkv_narrow");
    if (!QKV__CHECK("qkv_narrow", a)) return NULL;
    int ax = qkv__norm_axis("qkv_narrow", a, axis);
    if (ax < 0) return NULL;
    if (a->ndim == 0) return qkv_set_error("qkv_narrow: cannot narrow a 0-d tensor");
    int64_t n = a->shape[ax];
    if (start < 0) start += n;
    if (start < 0 || start > n || length < 0 || length > n - start) {
        char s[128];
        return qkv_set_error("qkv_narrow: %lld elements from %lld are outside axis %d of %s",
                             (long long)length, (long long)start, axis,
                             qkv_shape_str(a, s, sizeof s));
    }
    return slice_view(a, ax, start, length, 1, false, "qkv_narrow");
}

qkv_tensor *qkv_select(const qkv_tensor *a, int axis, int64_t index) {
    if (QKV__NULL_ARGS("qkv_select", a)) return NULL;
    QKV__OP("qkv_select");
    if (!QKV__CHECK("qkv_select", a)) return NULL;
    int ax = qkv__norm_axis("qkv_select", a, axis);
    if (ax < 0) return NULL;
    int64_t n = a->ndim ? a->shape[ax] : 0;
    int64_t i = index < 0 ? index + n : index;
    if (i < 0 || i >= n) {
        char s[128];
        return qkv_set_error("qkv_select: index %lld out of range for axis %d of %s",
                             (long long)index, axis, qkv_shape_str(a, s, sizeof s));
    }
    return slice_view(a, ax, i, 1, 1, true, "qkv_select");
}

/* ---- squeeze, unsqueeze, expand ---------------------------------------------------------- */

qkv_tensor *qkv_squeeze(const qkv_tensor *a, int axis) {
    if (QKV__NULL_ARGS("qkv_squeeze", a)) return NULL;
    QKV__OP("qkv_squeeze");
    if (!QKV__CHECK("qkv_squeeze", a)) return NULL;
    int ax = qkv__norm_axis("qkv_squeeze", a, axis);
    if (ax < 0) return NULL;
    if (a->ndim == 0 || a->shape[ax] != 1) return qkv_reshape(a, a->ndim, a->shape);
    int64_t shape[QKV_MAX_DIMS];
    int n = 0;
    for (int i = 0; i < a->ndim; i++)
        if (i != ax) shape[n++] = a->shape[i];
    return qkv_reshape(a, n, shape);
}

qkv_tensor *qkv_squeeze_all(const qkv_tensor *a) {
    if (QKV__NULL_ARGS("qkv_squeeze_all", a)) return NULL;
    QKV__OP("qkv_squeeze_all");
    if (!QKV__CHECK("qkv_squeeze_all", a)) return NULL;
    int64_t shape[QKV_MAX_DIMS];
    int n = 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != 1) shape[n++] = a->shape[i];
    return qkv_reshape(a, n, shape);
}

qkv_tensor *qkv_unsqueeze(const qkv_tensor *a, int axis) {
    if (QKV__NULL_ARGS("qkv_unsqueeze", a)) return NULL;
    QKV__OP("qkv_unsqueeze");
    if (!QKV__CHECK("qkv_unsqueeze", a)) return NULL;
    int ax = axis < 0 ? axis + a->ndim + 1 : axis;
    if (ax < 0 || ax > a->ndim || a->ndim >= QKV_MAX_DIMS) {
        char s[128];
        return qkv_set_error("qkv_unsqueeze: axis %d out of range for %s", axis,
                             qkv_shape_str(a, s, sizeof s));
    }
    int64_t shape[QKV_MAX_DIMS];
    for (int i = 0, j = 0; i <= a->ndim; i++) shape[i] = i == ax ? 1 : a->shape[j++];
    return qkv_reshape(a, a->ndim + 1, shape);
}

/* d expand = g summed over the broadcast dimensions (the engine's reduction to the input's
 * shape does exactly that) */
static void expand_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    gi[0] = (qkv_tensor *)g;
}
static const qkv_function expand_fn = {.name = "expand", .backward = expand_backward};

qkv_tensor *qkv_expand(const qkv_tensor *a, int ndim, const int64_t *shape) {
    if (QKV__NULL_ARGS("qkv_expand", a)) return NULL;
    QKV__OP("qkv_expand");
    if (!QKV__CHECK("qkv_expand", a)) return NULL;
    char sa[128];
    if (ndim < a->ndim || ndim > QKV_MAX_DIMS)
        return qkv_set_error("qkv_expand: cannot expand %s to %d dimensions",
                             qkv_shape_str(a, sa, sizeof sa), ndim);
    int64_t ns[QKV_MAX_DIMS], st[QKV_MAX_DIMS];
    int lead = ndim - a->ndim;
    for (int i = 0; i < ndim; i++) {
        int j = i - lead;
        int64_t have = j >= 0 ? a->shape[j] : 1;
        int64_t want = shape[i] == -1 && j >= 0 ? have : shape[i];
        if (want < 0 || (have != want && have != 1))
            return qkv_set_error("qkv_expand: cannot expand %s: size %lld to %lld in "
                                 "dimension %d", qkv_shape_str(a, sa, sizeof sa),
                                 (long long)have, (long long)shape[i], i);
        ns[i] = want;
        st[i] = j >= 0 && have == want ? a->strides[j] : 0;
    }
    if (!qkv__check_view("qkv_expand", a, ndim, ns, st, a->offset)) return NULL;
    return REC1(qkv__view(a, ndim, ns, st, a->offset), &expand_fn, a);
}

/* ---- contiguous, clone, to_dtype --------------------------------------------------------- */

/* d copy = g (to_dtype's gradient is converted back by the engine) */
static const qkv_function contiguous_fn = {.name = "contiguous", .backward = expand_backward};
static const qkv_function clone_fn = {.name = "clone", .backward = expand_backward};
static const qkv_function to_dtype_fn = {.name = "to_dtype", .backward = expand_backward};

qkv_tensor *qkv_contiguous(const qkv_tensor *a) {
    QKV__OP("qkv_contiguous");
    if (QKV__NULL_ARGS("qkv_contiguous", a) || !QKV__CHECK("qkv_contiguous", a)) return NULL;
    return REC1(qkv__contiguous(a), &contiguous_fn, a);
}

qkv_tensor *qkv_clone(const qkv_tensor *a) {
    if (QKV__NULL_ARGS("qkv_clone", a)) return NULL;
    QKV__OP("qkv_clone");
    if (!QKV__CHECK("qkv_clone", a)) return NULL;
    qkv_tensor *out = qkv_empty(a->dtype, a->ndim, a->shape);
    if (out && !qkv_copy_(out, a)) return NULL;
    return REC1(out, &clone_fn, a);
}

qkv_tensor *qkv_to_dtype(const qkv_tensor *a, qkv_dtype dtype) {
    if (QKV__NULL_ARGS("qkv_to_dtype", a)) return NULL;
    QKV__OP("qkv_to_dtype");
    if (!QKV__CHECK("qkv_to_dtype", a)) return NULL;
    if (!qkv__dtype_valid(dtype)) return qkv_set_error("qkv_to_dtype: unknown dtype %d", dtype);
    qkv_tensor *out = qkv__to_dtype(a, dtype);
    if (!qkv__is_float(dtype)) return out; /* integers and masks carry no gradient */
    return REC1(out, &to_dtype_fn, a);
}
