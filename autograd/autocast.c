/*
 * Autocast: mixed precision per thread, as PyTorch's CPU autocast. Inside a region, the
 * products (matmul, affine) take bf16 copies of their f32 operands and return bf16, and the
 * ops kept in f32 (softmax, log_softmax, layer norm, sum/mean/var, the losses) take f32 copies
 * of bf16 inputs; every other op runs in its inputs' dtype. A cast is recorded like any op, so
 * the gradient of a cast is a cast back.
 *
 * A leaf that requires grad (a parameter) is converted once for the outermost region: its
 * bf16 copy is cached, keyed by the tensor (held until the region ends, so its address cannot
 * be reused) and its storage's version, so an in-place write (an optimizer step) makes a new
 * copy at the next use instead of reusing stale values. The old copy is never written over:
 * a graph built before the write may still hold it. Each use links the parameter to its
 * product through a node of its own, with no copy.
 */
#include "autograd/autograd_internal.h"

typedef struct cast_entry {
    qkv_tensor *source; /* held by the cache */
    uint64_t version;   /* the source's version when copied */
    qkv_tensor *copy;   /* bf16, held by the cache */
} cast_entry;

static _Thread_local int depth;
static _Thread_local cast_entry *cache;
static _Thread_local size_t cache_n, cache_cap;

bool qkv_autocast_begin(qkv_dtype dtype) {
    if (dtype != QKV_BF16)
        return qkv_set_error("qkv_autocast_begin: dtype must be bf16, not %s",
                             qkv_dtype_name(dtype)), false;
    depth++;
    return true;
}

static void cache_clear(void) {
    for (size_t i = 0; i < cache_n; i++) {
        qkv__release(cache[i].copy);
        qkv__release(cache[i].source);
    }
    qkv__free(cache, cache_cap * sizeof *cache);
    cache = NULL;
    cache_n = cache_cap = 0;
}

void qkv_autocast_end(void) {
    if (depth == 0) {
        qkv_set_error("qkv_autocast_end: no autocast region is open");
        return;
    }
    if (--depth == 0) cache_clear();
}

bool qkv_is_autocast_enabled(void) {
    return depth > 0;
}

/* d cast = g: the engine converts it back to the parameter's dtype */
static void cast_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    gi[0] = (qkv_tensor *)g;
}
static const qkv_function autocast_fn = {.name = "autocast", .backward = cast_backward};

/* The cached bf16 copy of the parameter p, made (or made again, when p was written) now. */
static qkv_tensor *cached_copy(const qkv_tensor *p) {
    cast_entry *e = NULL;
    for (size_t i = 0; i < cache_n && !e; i++)
        if (cache[i].source == p) e = &cache[i];
    uint64_t version = qkv_version(p);
    if (e && e->version == version) return e->copy;
    qkv_scope_begin();
    qkv_tensor *copy = qkv__to_dtype(p, QKV_BF16);
    if (copy) qkv__retain(copy);
    qkv_scope_end();
    if (!copy) return NULL;
    if (e) {
        qkv__release(e->copy);
    } else {
        if (!qkv__reserve((void **)&cache, &cache_cap, cache_n + 1, sizeof *cache)) {
            qkv__release(copy);
            return NULL;
        }
        e = &cache[cache_n++];
        e->source = qkv__retain((qkv_tensor *)p);
    }
    e->version = version;
    e->copy = copy;
    return copy;
}

qkv_tensor *qkv__autocast_lower(const qkv_tensor *t) {
    if (depth == 0 || !t || t->dtype != QKV_F32) return (qkv_tensor *)t;
    if (!t->requires_grad || t->grad_fn) return qkv_to_dtype(t, QKV_BF16);
    qkv_tensor *copy = cached_copy(t);
    if (!copy) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&autocast_fn, 1, QKV_INPUTS(t), NULL);
    return qkv_function_end(ctx, qkv__view(copy, copy->ndim, copy->shape, copy->strides,
                                           copy->offset));
}

qkv_tensor *qkv__autocast_f32(const qkv_tensor *t) {
    if (depth == 0 || !t || t->dtype != QKV_BF16) return (qkv_tensor *)t;
    return qkv_to_dtype(t, QKV_F32);
}
