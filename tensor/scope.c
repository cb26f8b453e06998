/*
 * Scopes: a per-thread stack of autorelease pools. Each scope holds one reference to every
 * tensor created while it was innermost and drops them all at qkv_scope_end.
 *
 * The levels live in a fixed per-thread array, so opening a scope never allocates and so
 * never fails: a scope that could not open would leave the tensors made inside it with no
 * owner whenever no scope encloses it. Only a level's list of tensors is allocated, and a
 * failure there is an error of the op that made the tensor.
 */
#include "tensor/tensor_internal.h"

/* Deeper levels share the deepest one: their tensors live until it ends. */
#define MAX_LEVELS 128

typedef struct scope {
    qkv_tensor **items;
    size_t n, cap;
} scope;

static _Thread_local scope stack[MAX_LEVELS];
static _Thread_local size_t depth;

/* The scope that owns what is made while the outermost `levels` levels are open. */
static scope *owner_within(size_t levels) {
    if (levels == 0) return NULL;
    return &stack[(levels < MAX_LEVELS ? levels : MAX_LEVELS) - 1];
}

void qkv_scope_begin(void) {
    depth++;
}

void qkv_scope_end(void) {
    if (depth == 0) return;
    depth--;
    if (depth >= MAX_LEVELS) return;
    scope *s = &stack[depth];
    /* Release newest first: results die before the inputs they were computed from. */
    for (size_t i = s->n; i > 0; i--) qkv_release(s->items[i - 1]);
    qkv__free(s->items, s->cap * sizeof(qkv_tensor *));
    *s = (scope){NULL, 0, 0};
}

int qkv_scope_depth(void) {
    return (int)depth;
}

static bool add_to(scope *s, qkv_tensor *t) {
    if (!qkv__reserve((void **)&s->items, &s->cap, s->n + 1, sizeof(qkv_tensor *))) {
        qkv_release(t);
        return false;
    }
    s->items[s->n++] = t;
    return true;
}

bool qkv__scope_add(qkv_tensor *t) {
    scope *s = owner_within(depth);
    return s ? add_to(s, t) : true;
}

qkv_tensor *qkv_keep(qkv_tensor *t) {
    if (!t) return NULL;
    qkv_retain(t);
    scope *parent = depth >= 2 ? owner_within(depth - 1) : NULL;
    if (parent && !add_to(parent, t)) return NULL;
    return t;
}

qkv_tensor *qkv_scope_end_keep(qkv_tensor *t) {
    t = qkv_keep(t);
    qkv_scope_end();
    return t;
}
