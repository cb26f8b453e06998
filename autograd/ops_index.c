/*
 * Indexing ops: index_select, gather, concat, stack and one_hot. Forwards are the tensor
 * layer's index kernels; the backwards scatter-add (select, gather) or slice (concat, stack)
 * the output's gradient back to each input.
 */
#include <string.h>

#include "autograd/autograd_internal.h"

#define IN(i) qkv_ctx_input(ctx, i)

/* The (non-negative) axis every op here works along. */
typedef struct axis_args {
    int axis;
} axis_args;

static int axis_of(qkv_ctx *ctx) {
    return ((const axis_args *)qkv_ctx_args(ctx))->axis;
}

/* ---- index_select, gather ---------------------------------------------------------------- */
/* Input 1 is the index, saved in slot 1. */

/* d index_select = g's slices added into zeros of a's shape at the indices */
static void index_select_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv__index_add(g, axis_of(ctx), qkv_saved(ctx, 1), IN(0)->ndim, IN(0)->shape,
                           "qkv_index_select backward");
}
static const qkv_function index_select_fn = {.name = "index_select",
                                             .backward = index_select_backward,
                                             .args_size = sizeof(axis_args)};

/* out recorded as fn of a along axis, picked at index */
static qkv_tensor *record_indexed(const qkv_function *fn, const qkv_tensor *a, int axis,
                                  const qkv_tensor *index, qkv_tensor *out) {
    qkv_ctx *ctx = qkv_function_begin(fn, 2, QKV_INPUTS(a, index), &(axis_args){axis});
    qkv_save(ctx, 1, index);
    return qkv_function_end(ctx, out);
}

qkv_tensor *qkv_index_select(const qkv_tensor *a, int axis, const qkv_tensor *index) {
    if (QKV__NULL_ARGS("qkv_index_select", a, index)) return NULL;
    int ax = qkv__norm_axis("qkv_index_select", a, axis);
    if (ax < 0) return NULL;
    return record_indexed(&index_select_fn, a, ax, index,
                          qkv__index_select(a, ax, index, "qkv_index_select"));
}

/* d gather = g's elements added into zeros of a's shape at the gathered positions */
static void gather_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    gi[0] = qkv__scatter_add(g, axis_of(ctx), qkv_saved(ctx, 1), IN(0)->ndim, IN(0)->shape,
                             "qkv_gather backward");
}
static const qkv_function gather_fn = {.name = "gather", .backward = gather_backward,
                                       .args_size = sizeof(axis_args)};

qkv_tensor *qkv_gather(const qkv_tensor *a, int axis, const qkv_tensor *index) {
    if (QKV__NULL_ARGS("qkv_gather", a, index)) return NULL;
    int ax = qkv__norm_axis("qkv_gather", a, axis);
    if (ax < 0) return NULL;
    if (a->ndim == 0 && index->ndim <= 1) {
        /* A 0-d input is one element along axis 0, as in torch: a 0-d index gives a 0-d
         * result, a vector of indices a vector. */
        qkv_tensor *vector = qkv_gather(qkv_reshape(a, 1, (const int64_t[]){1}), 0,
                                        qkv_reshape(index, 1, (const int64_t[]){index->numel}));
        return index->ndim ? vector : qkv_reshape(vector, 0, NULL);
    }
    return record_indexed(&gather_fn, a, ax, index, qkv__gather(a, ax, index, "qkv_gather"));
}

/* ---- concat, stack ----------------------------------------------------------------------- */

/* d concat = the slice of g along axis where each input was placed */
static void concat_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    int axis = axis_of(ctx);
    int64_t start = 0;
    for (int k = 0; IN(k); k++) {
        int64_t len = IN(k)->shape[axis];
        if (qkv_ctx_needs_grad(ctx, k)) gi[k] = qkv_narrow(g, axis, start, len);
        start += len;
    }
}
static const qkv_function concat_fn = {.name = "concat", .backward = concat_backward,
                                       .args_size = sizeof(axis_args)};

static qkv_tensor *record_n(qkv_tensor *out, const qkv_function *fn, int n,
                            qkv_tensor *const *tensors, int axis) {
    qkv_ctx *ctx = qkv_function_begin(fn, n, (const qkv_tensor *const *)tensors,
                                      &(axis_args){axis});
    return qkv_function_end(ctx, out);
}

qkv_tensor *qkv_concat(int n, qkv_tensor *const *tensors, int axis) {
    qkv_tensor *out = qkv__concat(n, (const qkv_tensor *const *)tensors, axis, "qkv_concat");
    if (!out) return NULL;
    return record_n(out, &concat_fn, n, tensors, axis < 0 ? axis + out->ndim : axis);
}

/* d stack = g selected at each input's position along axis */
static void stack_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    for (int k = 0; IN(k); k++)
        if (qkv_ctx_needs_grad(ctx, k)) gi[k] = qkv_select(g, axis_of(ctx), k);
}
static const qkv_function stack_fn = {.name = "stack", .backward = stack_backward,
                                      .args_size = sizeof(axis_args)};

static bool check_stack(int n, qkv_tensor *const *ts) {
    char s0[128], sk[128];
    for (int k = 1; k < n; k++) {
        if (ts[k]->ndim == ts[0]->ndim &&
            !memcmp(ts[k]->shape, ts[0]->shape, (size_t)ts[0]->ndim * sizeof(int64_t)))
            continue;
        qkv_set_error("qkv_stack: tensor %d has shape %s but tensor 0 has %s", k,
                      qkv_shape_str(ts[k], sk, sizeof sk), qkv_shape_str(ts[0], s0, sizeof s0));
        return false;
    }
    return true;
}

/* Each input gains a size-1 axis (a view, not recorded) and the views are concatenated. */
qkv_tensor *qkv_stack(int n, qkv_tensor *const *tensors, int axis) {
    if (n <= 0 || !tensors) return qkv_set_error("qkv_stack: no tensors to stack");
    for (int k = 0; k < n; k++)
        if (!tensors[k]) return qkv_set_error("qkv_stack: tensors[%d] is NULL", k);
    const qkv_tensor *t0 = tensors[0];
    int ax = axis < 0 ? axis + t0->ndim + 1 : axis;
    if (ax < 0 || ax > t0->ndim || t0->ndim >= QKV_MAX_DIMS) {
        char s[128];
        return qkv_set_error("qkv_stack: axis %d out of range for %s", axis,
                             qkv_shape_str(t0, s, sizeof s));
    }
    if (!check_stack(n, tensors)) return NULL;
    qkv_scope_begin();
    const qkv_tensor *small[8];
    const qkv_tensor **views = n <= 8 ? small : qkv__alloc((size_t)n * sizeof *views);
    qkv_tensor *out = NULL;
    bool ok = views != NULL;
    for (int k = 0; k < n && ok; k++) {
        const qkv_tensor *t = tensors[k];
        int64_t shape[QKV_MAX_DIMS], st[QKV_MAX_DIMS];
        for (int i = 0, j = 0; i <= t->ndim; i++) {
            shape[i] = i == ax ? 1 : t->shape[j];
            st[i] = i == ax ? 1 : t->strides[j++];
        }
        views[k] = qkv__view(t, t->ndim + 1, shape, st, t->offset);
        ok = views[k] != NULL;
    }
    if (ok) out = qkv_keep(qkv__concat(n, views, ax, "qkv_stack"));
    if (views && views != small) qkv__free(views, (size_t)n * sizeof *views);
    qkv_scope_end();
    return record_n(out, &stack_fn, n, tensors, ax);
}

/* ---- one_hot ----------------------------------------------------------------------------- */

qkv_tensor *qkv_one_hot(const qkv_tensor *index, int64_t n_classes) {
    return qkv__one_hot(index, n_classes, "qkv_one_hot");
}
