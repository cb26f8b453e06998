/*
 * Scopes: a per-thread stack of autorelease pools. Each scope holds one reference to every
 * tensor created while it was innermost and drops them all at qkv_scope_end.
 *
 * The levels live in a fixed per-thread array, so opening a scope never allocates and so
 * never fails: a scope that could not open would leave the tensors made inside it with no
 * owner whenever no scope encloses it. Only a level's list of tensors is allocated, and a
 * failure there is an error of the op that made the tensor. Each level remembers the file and
 * line that opened it, to name an unbalanced scope.
 */
#include "tensor/tensor_internal.h"

/* Deeper levels share the deepest one: their tensors live until it ends. */
#define MAX_LEVELS 128

typedef struct scope {
    qkv_tensor **items;
    size_t n, cap;
    const char *file;  /* where it was opened, or NULL */
    int line;
} scope;

static _Thread_local scope stack[MAX_LEVELS];
static _Thread_local size_t depth;

/* The scope that owns what is made while the outermost `levels` levels are open. */
static scope *owner_within(size_t levels) {
    if (levels == 0) return NULL;
    return &stack[(levels < MAX_LEVELS ? levels : MAX_LEVELS) - 1];
}

void qkv_scope_begin_at(const char *file, int line) {
    if (depth >= MAX_LEVELS) {
        const scope *last = &stack[MAX_LEVELS - 1];
        if (last->file)
            qkv_set_error("qkv_scope_begin: more than %d scopes open at once; is a "
                          "qkv_scope_end missing? (scope %d was opened at %s:%d)",
                          MAX_LEVELS, MAX_LEVELS, last->file, last->line);
        else
            qkv_set_error("qkv_scope_begin: more than %d scopes open at once; is a "
                          "qkv_scope_end missing?", MAX_LEVELS);
    } else {
        stack[depth].file = file;
        stack[depth].line = line;
    }
    depth++;
}

void (qkv_scope_begin)(void) {
    qkv_scope_begin_at(NULL, 0);
}

void qkv_scope_end(void) {
    if (depth == 0) {
        qkv_set_error("qkv_scope_end: no scope is open (more qkv_scope_end calls than "
                      "qkv_scope_begin)");
        return;
    }
    depth--;
    if (depth >= MAX_LEVELS) return;
    scope *s = &stack[depth];
    bool checking = qkv__checking();
    if (checking) qkv__debug_releasing("qkv_scope_end", s->file, s->line);
    /* Release newest first: results die before the inputs they were computed from. */
    for (size_t i = s->n; i > 0; i--) {
        s->items[i - 1]->scope_refs--;
        qkv__release(s->items[i - 1]);
    }
    if (checking) qkv__debug_releasing(NULL, NULL, 0);
    qkv__free(s->items, s->cap * sizeof(qkv_tensor *));
    *s = (scope){NULL, 0, 0, NULL, 0};
}

int qkv_scope_depth(void) {
    return (int)depth;
}

static bool add_to(scope *s, qkv_tensor *t) {
    if (!qkv__reserve((void **)&s->items, &s->cap, s->n + 1, sizeof(qkv_tensor *))) {
        qkv__release(t);
        return false;
    }
    s->items[s->n++] = t;
    t->scope_refs++;
    return true;
}

bool qkv__scope_add(qkv_tensor *t) {
    scope *s = owner_within(depth);
    if (s) return add_to(s, t);
    t->user_refs++;
    return true;
}

bool qkv__scope_sole(const qkv_tensor *t) {
    if (depth == 0 || depth > MAX_LEVELS || t->refcount != 1 || t->scope_refs != 1) return false;
    const scope *s = &stack[depth - 1];
    for (size_t i = s->n; i > 0; i--)
        if (s->items[i - 1] == t) return true;
    return false;
}

qkv_tensor *qkv_keep(qkv_tensor *t) {
    if (!t) return NULL;
    if (t->magic == QKV__TENSOR_FREED) return qkv__freed_error("qkv_keep", t), NULL;
    if (depth == 0) {
        /* The caller owns t already; a reference more would leak. */
        qkv_set_error("qkv_keep: no scope is open, so the tensor is already yours to "
                      "release; qkv_keep changed nothing");
        return t;
    }
    qkv__retain(t);
    scope *parent = depth >= 2 ? owner_within(depth - 1) : NULL;
    if (!parent) t->user_refs++;
    else if (!add_to(parent, t)) return NULL;
    return t;
}

qkv_tensor *qkv_scope_end_keep(qkv_tensor *t) {
    t = qkv_keep(t);
    qkv_scope_end();
    return t;
}

size_t qkv__scope_report(FILE *f) {
    if (depth == 0) return 0;
    fprintf(f, "qkv: %zu scope%s open (each qkv_scope_begin needs a qkv_scope_end):\n", depth,
            depth == 1 ? "" : "s");
    for (size_t i = 0; i < depth && i < MAX_LEVELS; i++) {
        if (stack[i].file)
            fprintf(f, "  scope %zu opened at %s:%d\n", i + 1, stack[i].file, stack[i].line);
        else
            fprintf(f, "  scope %zu opened by qkv_scope_begin called as a function\n", i + 1);
    }
    if (depth > MAX_LEVELS)
        fprintf(f, "  and %zu more, deeper than %d\n", depth - MAX_LEVELS, MAX_LEVELS);
    return depth;
}
