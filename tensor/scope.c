/*
 * Scopes: a per-thread stack of autorelease pools. Each scope holds one reference to every
 * tensor created while it was innermost and drops them all at qkv_scope_end.
 */
#include "tensor/tensor_internal.h"

typedef struct scope {
    qkv_tensor **items;
    size_t n, cap;
} scope;

static _Thread_local scope *stack;
static _Thread_local size_t depth, stack_cap;

void qkv_scope_begin(void) {
    if (!qkv__reserve((void **)&stack, &stack_cap, depth + 1, sizeof(scope))) {
        /* Out of memory: the scope is still counted so begin/end stay paired; tensors made
         * while it is innermost go to the enclosing scope. */
        depth++;
        return;
    }
    stack[depth].items = NULL;
    stack[depth].n = stack[depth].cap = 0;
    depth++;
}

static scope *innermost(void) {
    for (size_t d = depth; d > 0; d--)
        if (d - 1 < stack_cap) return &stack[d - 1];
    return NULL;
}

void qkv_scope_end(void) {
    if (depth == 0) return;
    depth--;
    if (depth >= stack_cap) return;
    scope *s = &stack[depth];
    /* Release newest first: results die before the inputs they were computed from. */
    for (size_t i = s->n; i > 0; i--) qkv_release(s->items[i - 1]);
    qkv__free(s->items, s->cap * sizeof(qkv_tensor *));
    s->items = NULL;
    s->n = s->cap = 0;
    if (depth == 0) {
        qkv__free(stack, stack_cap * sizeof(scope));
        stack = NULL;
        stack_cap = 0;
    }
}

int qkv_scope_depth(void) {
    return (int)depth;
}

bool qkv__scope_add(qkv_tensor *t) {
    scope *s = depth ? innermost() : NULL;
    if (!s) return true;
    if (!qkv__reserve((void **)&s->items, &s->cap, s->n + 1, sizeof(qkv_tensor *))) {
        qkv_release(t);
        return false;
    }
    s->items[s->n++] = t;
    return true;
}

qkv_tensor *qkv_keep(qkv_tensor *t) {
    if (!t) return NULL;
    qkv_retain(t);
    if (depth >= 2 && depth - 2 < stack_cap) {
        scope *parent = &stack[depth - 2];
        if (!qkv__reserve((void **)&parent->items, &parent->cap, parent->n + 1,
                          sizeof(qkv_tensor *))) {
            qkv_release(t);
            return NULL;
        }
        parent->items[parent->n++] = t;
    }
    return t;
}
