/*
 * Gradient hooks on leaves: registration, and the count of contributions a backward still owes
 * a leaf, so that the hooks run once its .grad is final.
 */
#include "autograd/autograd_internal.h"

struct qkv_grad_hook {
    qkv_grad_hook *next;
    qkv_tensor *leaf; /* weak: the leaf owns its hooks */
    qkv_grad_hook_fn fn;
    void *ctx;
};

/* A leaf's hooks, in registration order, and its count for the running backward. */
typedef struct qkv__grad_hooks {
    qkv__grad_hooks_base base;
    qkv_grad_hook *first;
    uint64_t mark; /* the backward that last counted */
    int pending;   /* contributions that backward still owes */
} hook_list;

static void free_all(qkv_tensor *leaf) {
    hook_list *l = leaf->grad_hooks;
    for (qkv_grad_hook *h = l->first, *next; h; h = next) {
        next = h->next;
        qkv__free(h, sizeof *h);
    }
    qkv__free(l, sizeof *l);
    leaf->grad_hooks = NULL;
}

qkv_grad_hook *qkv_register_grad_hook(qkv_tensor *leaf, qkv_grad_hook_fn fn, void *ctx) {
    if (QKV__NULL_ARGS("qkv_register_grad_hook", leaf) ||
        !QKV__CHECK("qkv_register_grad_hook", leaf)) return NULL;
    if (!fn) return qkv_set_error("qkv_register_grad_hook: the hook function is NULL");
    if (leaf->grad_fn || !leaf->requires_grad)
        return qkv_set_error("qkv_register_grad_hook: a hook goes on a leaf that requires "
                             "grad; %s", leaf->grad_fn ? "this tensor was made by an op"
                                                       : "this one does not require grad");
    if (!leaf->grad_hooks) {
        hook_list *l = qkv__calloc(sizeof *l);
        if (!l) return NULL;
        l->base.free_all = free_all;
        leaf->grad_hooks = l;
    }
    qkv_grad_hook *h = qkv__alloc(sizeof *h);
    if (!h) {
        if (!leaf->grad_hooks->first) free_all(leaf);
        return NULL;
    }
    *h = (qkv_grad_hook){.leaf = leaf, .fn = fn, .ctx = ctx};
    qkv_grad_hook **end = &leaf->grad_hooks->first;
    while (*end) end = &(*end)->next;
    *end = h;
    return h;
}

void qkv_remove_grad_hook(qkv_grad_hook *hook) {
    if (!hook) return;
    qkv_tensor *leaf = hook->leaf;
    hook_list *l = leaf->grad_hooks;
    for (qkv_grad_hook **p = &l->first; *p; p = &(*p)->next) {
        if (*p != hook) continue;
        *p = hook->next;
        qkv__free(hook, sizeof *hook);
        break;
    }
    /* An empty list goes; a backward in progress finds no hooks on the leaf then. */
    if (!l->first) free_all(leaf);
}

void qkv__hooks_expect(qkv_tensor *leaf, uint64_t backward) {
    hook_list *l = leaf->grad_hooks;
    if (!l) return;
    if (l->mark != backward) {
        l->mark = backward;
        l->pending = 0;
    }
    l->pending++;
}

void qkv__hooks_contributed(qkv_tensor *leaf) {
    hook_list *l = leaf->grad_hooks;
    if (!l || l->pending <= 0 || --l->pending > 0) return;
    for (qkv_grad_hook *h = l->first, *next; h; h = next) {
        next = h->next; /* a hook may remove itself */
        h->fn(leaf, h->ctx);
    }
}

void qkv__hooks_run(qkv_tensor *leaf) {
    hook_list *l = leaf->grad_hooks;
    if (!l) return;
    for (qkv_grad_hook *h = l->first, *next; h; h = next) {
        next = h->next;
        h->fn(leaf, h->ctx);
    }
}
