/*
 * The backward engine: recording nodes, grad mode, and reverse-mode accumulation in
 * topological order without recursion.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "autograd/autograd_internal.h"

static _Thread_local int no_grad_depth;
static _Thread_local bool anomaly;
static _Thread_local uint64_t backward_generation;
static _Thread_local int backward_depth; /* > 0 while backward functions run */

void qkv_no_grad_begin(void) { no_grad_depth++; }
void qkv_no_grad_end(void) { if (no_grad_depth > 0) no_grad_depth--; }
bool qkv_is_grad_enabled(void) { return no_grad_depth == 0; }
void qkv_set_detect_anomaly(bool on) { anomaly = on; }
bool qkv_is_anomaly_enabled(void) { return anomaly; }

bool qkv__needs_grad(const qkv_tensor *t) {
    return t && t->requires_grad;
}

const char *qkv_grad_fn_name(const qkv_tensor *t) {
    if (!QKV__CHECK("qkv_grad_fn_name", t)) return NULL;
    return t && t->grad_fn ? t->grad_fn->fn->name : NULL;
}

/* ---- Nodes ------------------------------------------------------------------------------- */

static size_t node_bytes(const qkv_node *n) {
    return sizeof *n + n->fn->args_size;
}

/* Drops a saved value's recomputed storage; the shell stays for the next backward. */
static void detach_values(qkv_tensor *t) {
    qkv__storage_release(t->storage);
    t->storage = NULL;
}

static void free_site(qkv_node *n) {
    if (n->site) qkv__free(n->site, strlen(n->site) + 1);
    n->site = NULL;
}

static void free_saved(qkv_node *n) {
    for (int k = 0; k < QKV_SAVED_SLOTS; k++) {
        qkv__release(n->saved[k].t);
        n->saved[k] = (qkv_saved_value){0};
    }
}

static void free_graph_links(qkv_node *n) {
    if (n->freed) return;
    n->freed = true;
    for (int i = 0; i < n->n_inputs; i++) qkv__release(n->inputs[i]);
    qkv__free(n->inputs, (size_t)(n->n_inputs ? n->n_inputs : 1) * sizeof(qkv_tensor *));
    n->inputs = NULL;
    free_saved(n);
}

static void node_release(qkv_node *n, qkv_tensor *owner) {
    if (n->retained_out == owner) n->retained_out = NULL;
    if (--n->refcount > 0) return;
    free_graph_links(n);
    free_site(n);
    qkv__release(n->grad);
    qkv__release(n->recomputed);
    qkv__free(n, node_bytes(n));
}

/* Anomaly mode: whether a float tensor holds a NaN (the largest of |t| is then NaN, as max
 * propagates it) or, with infinities, an infinity. */
static bool anomalous(const qkv_tensor *t, bool infinities) {
    if (!t || !qkv__is_float(t->dtype) || t->numel == 0) return false;
    qkv_scope_begin();
    qkv_tensor *m = qkv__reduce(QKV_RED_MAX, qkv__unary(QKV_OP_ABS, t, "anomaly"), ~0u, false, 0,
                                "anomaly");
    double v = m ? qkv_item(m) : 0;
    qkv_scope_end();
    return isnan(v) || (infinities && isinf(v));
}

/* ---- Anomaly sites ----------------------------------------------------------------------- */

static _Thread_local char sites[QKV_SITE_DEPTH][64];
static _Thread_local int n_sites;

void qkv__site_push(const char *name) {
    if (n_sites < QKV_SITE_DEPTH) snprintf(sites[n_sites], sizeof sites[0], "%s", name);
    n_sites++;
}

void qkv__site_pop(void) {
    if (n_sites > 0) n_sites--;
}

/* The current site's dotted path (empty names skipped), copied for a node; NULL if none. */
static char *site_path(void) {
    char path[256] = "";
    size_t len = 0;
    for (int i = 0; i < n_sites && i < QKV_SITE_DEPTH; i++) {
        if (!sites[i][0]) continue;
        int w = snprintf(path + len, sizeof path - len, len ? ".%s" : "%s", sites[i]);
        if (w < 0 || (size_t)w >= sizeof path - len) break;
        len += (size_t)w;
    }
    if (!len) return NULL;
    char *copy = qkv__alloc(len + 1);
    if (copy) memcpy(copy, path, len + 1);
    return copy;
}

/* " (in encoder.layers.0.linear2)" for a node recorded inside a module call, else "". */
static const char *site_of(const qkv_node *n, char *buf, size_t size) {
    if (!n->site) return "";
    snprintf(buf, size, " (in %s)", n->site);
    return buf;
}

/* t's shape, dtype and graph link without its storage: what a node keeps of an input, and of
 * a saved value it will recompute. Owned by the node, never by a scope. */
static qkv_tensor *shell(const qkv_tensor *t) {
    qkv_tensor *s = qkv__alloc(sizeof *s);
    if (!s) return NULL;
    memset(s, 0, sizeof *s);
    s->dtype = t->dtype;
    s->ndim = t->ndim;
    memcpy(s->shape, t->shape, sizeof s->shape);
    memcpy(s->strides, t->strides, sizeof s->strides);
    s->offset = t->offset;
    s->numel = t->numel;
    s->refcount = 1;
    s->magic = QKV__TENSOR_LIVE;
    s->requires_grad = t->requires_grad;
    s->grad_fn = t->grad_fn;
    if (s->grad_fn) s->grad_fn->refcount++;
    qkv__count_tensor(1);
    return s;
}

/* Whether p's output may be held as a shell and recomputed: the one place the engine decides
 * between keeping a saved value and recomputing it. */
static bool recomputable(const qkv_node *p) {
    return p->depth >= 0 && p->depth < QKV_RECOMPUTE_DEPTH && !p->freed;
}

static bool lazy_able(const qkv_tensor *t) {
    return t->grad_fn && t->storage && recomputable(t->grad_fn);
}

qkv_tensor *qkv__saved_output(qkv_ctx *ctx) {
    return ctx->saved[0].t;
}

/* The values of a shell whose maker can recompute them. What a chain of recomputations makes
 * on the way is freed at once. */
static qkv_tensor *recomputed(const qkv_tensor *t) {
    qkv_node *p = t->grad_fn;
    if (!p || p->depth < 0 || p->freed)
        return qkv_set_error("qkv_backward: the values of an input of %s are gone and cannot "
                             "be recomputed", p ? p->fn->name : "a leaf");
    /* A layer norm read by three projections is recomputed once per backward: the values
     * stay with their maker while consumers that have not run yet (pending) remain. */
    qkv_tensor *v = p->recomputed;
    if (v) {
        if (p->pending <= 1) p->recomputed = NULL;
        else qkv__retain(v);
        return qkv__scope_add(v) ? v : NULL;
    }
    p->recomputing = true;
    v = QKV_SCOPED(p->fn->recompute(p));
    p->recomputing = false;
    if (v && (v->ndim != t->ndim || memcmp(v->shape, t->shape, sizeof(int64_t) * t->ndim) ||
              v->dtype != t->dtype))
        return qkv_set_error("qkv_backward: %s recomputed a tensor of another shape",
                             p->fn->name);
    if (v && p->pending > 1) p->recomputed = qkv__retain(v);
    return v;
}

static void drop_recomputed(qkv_node *n) {
    qkv__release(n->recomputed);
    n->recomputed = NULL;
}

/* Gives a shell the storage and geometry of its recomputed values. The shell alone holds
 * them, so qkv__saved_release can free them before the backward ends. */
static bool attach_values(qkv_tensor *t) {
    qkv_scope_begin();
    qkv_tensor *v = recomputed(t);
    if (v) {
        t->storage = v->storage;
        t->storage->refcount++;
        t->offset = v->offset;
        memcpy(t->strides, v->strides, sizeof t->strides);
    }
    qkv_scope_end();
    return v != NULL;
}

/* ---- Functions: recording a node --------------------------------------------------------- */

/* The context handed out when a node could not be allocated: every save fails and end
 * returns NULL. Never written. */
static qkv_node failed_node = {.failed = true};

static void free_unlinked(qkv_node *n, int n_inputs_made) {
    for (int i = 0; i < n_inputs_made; i++) qkv__release(n->inputs[i]);
    qkv__free(n->inputs, (size_t)(n->n_inputs ? n->n_inputs : 1) * sizeof(qkv_tensor *));
    free_saved(n);
    free_site(n);
    qkv__free(n, node_bytes(n));
}

qkv_ctx *qkv_function_begin(const qkv_function *fn, int n_inputs,
                            const qkv_tensor *const *inputs, const void *args) {
    if (no_grad_depth > 0 || !fn || n_inputs < 0 || (n_inputs && !inputs)) return NULL;
    bool any = false;
    for (int i = 0; i < n_inputs; i++) any = any || qkv__needs_grad(inputs[i]);
    if (!any) return NULL;
    no_grad_depth++; /* until qkv_function_end */
    qkv_node *n = qkv__calloc(sizeof *n + fn->args_size);
    if (!n) return &failed_node;
    n->fn = fn;
    n->n_inputs = n_inputs;
    n->inputs = qkv__alloc((size_t)(n_inputs ? n_inputs : 1) * sizeof(qkv_tensor *));
    if (!n->inputs) {
        qkv__free(n, node_bytes(n));
        return &failed_node;
    }
    for (int i = 0; i < n_inputs; i++) {
        const qkv_tensor *in = inputs[i];
        /* A leaf that requires grad is held itself: its .grad is accumulated. */
        bool leaf = in && in->requires_grad && !in->grad_fn;
        n->inputs[i] = !in ? NULL : leaf ? qkv__retain((qkv_tensor *)in) : shell(in);
        if (in && !n->inputs[i]) {
            free_unlinked(n, i);
            return &failed_node;
        }
        if (i < 32 && qkv__needs_grad(in)) n->needed_grad |= 1u << i;
    }
    if (args && fn->args_size) memcpy(n->args, args, fn->args_size);
    if (anomaly) n->site = site_path();
    n->forward_inputs = inputs;
    n->base.release = node_release;
    n->refcount = 1;
    return n;
}

/* The output's recompute depth: 0 when everything recompute reads is held, one more than the
 * deepest maker of a value held as a shell, -1 when it cannot be recomputed. */
static int recompute_depth(const qkv_node *n) {
    if (!n->fn->recompute || n->no_recompute) return -1;
    int depth = 0;
    for (int k = 0; k < QKV_SAVED_SLOTS; k++)
        if (n->saved[k].lazy && n->saved[k].t->grad_fn->depth + 1 > depth)
            depth = n->saved[k].t->grad_fn->depth + 1;
    return depth;
}

/* Saved slots holding out itself hold a view of it with no graph link instead, so that out
 * and its node do not hold each other. */
static bool unlink_saved_output(qkv_node *n, qkv_tensor *out) {
    for (int k = 0; k < QKV_SAVED_SLOTS; k++) {
        if (n->saved[k].t != out) continue;
        qkv_tensor *v = qkv__view(out, out->ndim, out->shape, out->strides, out->offset);
        if (!v) return false;
        n->saved[k].t = qkv_scope_depth() ? qkv__retain(v) : v;
        n->saved[k].version = qkv_version(v);
        n->saved[k].output = true;
        qkv__release(out);
    }
    return true;
}

qkv_tensor *qkv_function_end(qkv_ctx *n, qkv_tensor *out) {
    if (!n) return out;
    no_grad_depth--;
    if (n == &failed_node) goto fail;
    n->forward_inputs = NULL;
    if (!out || n->failed) goto fail;
    /* Ops called by a backward are checked as that backward's gradients, under its name. */
    if (anomaly && backward_depth == 0 && anomalous(out, false)) {
        char site[300];
        qkv_set_error("qkv anomaly: %s produced NaN in its forward%s", n->fn->name,
                      site_of(n, site, sizeof site));
        goto fail;
    }
    /* A forward that returns a tensor already in the graph gets a view of it. */
    if (out->grad_fn || out->requires_grad) {
        out = qkv__view(out, out->ndim, out->shape, out->strides, out->offset);
        if (!out) goto fail;
    }
    if (!unlink_saved_output(n, out)) goto fail;
    n->depth = recompute_depth(n);
    n->out_ndim = out->ndim;
    memcpy(n->out_shape, out->shape, sizeof n->out_shape);
    n->out_dtype = out->dtype;
    out->grad_fn = n;
    out->requires_grad = true;
    return out;
fail:
    if (n != &failed_node) free_unlinked(n, n->n_inputs);
    if (out && qkv_scope_depth() == 0) qkv__release(out);
    return NULL;
}

static qkv_saved_value *slot_of(qkv_ctx *n, int slot) {
    if (slot >= 0 && slot < QKV_SAVED_SLOTS) return &n->saved[slot];
    qkv_set_error("%s: saved slot %d out of range [0, %d)", n->fn ? n->fn->name : "qkv_save",
                  slot, QKV_SAVED_SLOTS);
    return NULL;
}

static int input_index(const qkv_node *n, const qkv_tensor *t) {
    for (int i = 0; n->forward_inputs && i < n->n_inputs; i++)
        if (n->forward_inputs[i] == t) return i;
    return -1;
}

/* A leaf input saved whole is linked by the node as itself rather than a shell: it is held
 * anyway, and a leaf switched to require grad after the forward is then caught by the
 * backward (the node saved nothing for its gradient). */
static void hold_input_itself(qkv_node *n, const qkv_tensor *t) {
    if (t->grad_fn || !n->forward_inputs) return;
    for (int i = 0; i < n->n_inputs; i++) {
        if (n->forward_inputs[i] != t || n->inputs[i]->storage) continue;
        qkv__release(n->inputs[i]);
        n->inputs[i] = qkv__retain((qkv_tensor *)t);
    }
}

bool qkv_save(qkv_ctx *n, int slot, const qkv_tensor *t) {
    if (!n || !t) return true; /* an op whose input failed: its error is recorded */
    if (!QKV__CHECK("qkv_save", t)) {
        n->failed = true;
        return false;
    }
    if (n->failed) return false;
    qkv_saved_value *s = slot_of(n, slot);
    if (!s) return !(n->failed = true);
    qkv__release(s->t);
    *s = (qkv_saved_value){0};
    if (lazy_able(t)) {
        s->t = shell(t);
        s->lazy = true;
    } else {
        s->t = qkv__retain((qkv_tensor *)t);
        s->version = qkv_version(t);
        if (s->t) hold_input_itself(n, t);
    }
    s->input = input_index(n, t);
    if (!s->t) n->failed = true;
    return !n->failed;
}

bool qkv__save_for_recompute(qkv_ctx *n, int slot, const qkv_tensor *t) {
    if (!n || !t) return true;
    if (n->failed) return false;
    if (lazy_able(t) || (t->requires_grad && !t->grad_fn)) return qkv_save(n, slot, t);
    n->no_recompute = true;
    return true;
}

/* A value held whole and changed in place since the forward would give a gradient made from
 * other values than the forward's: an error naming the op, the value and both versions, as
 * PyTorch refuses such a backward. */
static bool unchanged(const qkv_node *n, int slot) {
    const qkv_saved_value *s = &n->saved[slot];
    uint64_t now = qkv_version(s->t);
    if (now == s->version) return true;
    char what[32], shape[128];
    if (s->input >= 0) snprintf(what, sizeof what, "input %d", s->input);
    else snprintf(what, sizeof what, "saved value %d", slot);
    qkv_set_error("qkv_backward: %s of %s (%s %s), saved for %s, was modified in place: its "
                  "storage is at version %llu, the forward saw version %llu; modify it after "
                  "the backward, or run the forward again", what, n->fn->name,
                  qkv_dtype_name(s->t->dtype), qkv_shape_str(s->t, shape, sizeof shape),
                  n->recomputing ? "recomputing its output" : "its backward",
                  (unsigned long long)now, (unsigned long long)s->version);
    return false;
}

qkv_tensor *qkv_saved(qkv_ctx *n, int slot) {
    if (!n) return NULL;
    qkv_saved_value *s = slot_of(n, slot);
    if (!s || !s->t) return NULL;
    if (!s->lazy) return unchanged(n, slot) ? s->t : NULL;
    /* Read by the node's own recompute: the values are made for it alone and die with it,
     * so it may write over them (a dropout over a recomputed GELU output). */
    if (n->recomputing && !s->t->storage) return recomputed(s->t);
    if (!s->t->storage) {
        if (!attach_values(s->t)) return NULL;
        s->attached = true;
    }
    /* A view of the shell, so that what the backward makes of it (even a gradient that is the
     * value itself) keeps the storage it needs when the shell lets go. */
    return qkv__view(s->t, s->t->ndim, s->t->shape, s->t->strides, s->t->offset);
}

void qkv__saved_release(qkv_ctx *n, int slot) {
    qkv_saved_value *s = &n->saved[slot];
    if (!s->attached) return;
    detach_values(s->t);
    s->attached = false;
}

void *qkv_ctx_args(qkv_ctx *n) {
    /* The failed node has no room for arguments: nothing may be written there. */
    return n && n != &failed_node ? n->args : NULL;
}

bool qkv_ctx_needs_grad(const qkv_ctx *n, int input) {
    if (!n || input < 0 || input >= n->n_inputs) return false;
    if (input >= 32) return n->inputs && qkv__needs_grad(n->inputs[input]);
    return (n->needed_grad >> input) & 1;
}

const qkv_tensor *qkv_ctx_input(const qkv_ctx *n, int input) {
    return n && n->inputs && input >= 0 && input < n->n_inputs ? n->inputs[input] : NULL;
}

/* ---- Leaves ------------------------------------------------------------------------------ */

qkv_tensor *qkv_requires_grad_(qkv_tensor *t, bool requires_grad) {
    if (QKV__NULL_ARGS("qkv_requires_grad_", t) ||
        !QKV__CHECK("qkv_requires_grad_", t)) return NULL;
    if (t->grad_fn) {
        qkv_set_error("qkv_requires_grad_: only a leaf can be set; %s made this tensor",
                      t->grad_fn->fn->name);
        return NULL;
    }
    if (requires_grad && !qkv__is_float(t->dtype)) {
        qkv_set_error("qkv_requires_grad_: %s tensors cannot require grad",
                      qkv_dtype_name(t->dtype));
        return NULL;
    }
    t->requires_grad = requires_grad;
    return t;
}

void qkv_zero_grad(qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_zero_grad", t) || !QKV__CHECK("qkv_zero_grad", t)) return;
    qkv__release(t->grad);
    t->grad = NULL;
}

void qkv_retain_grad(qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_retain_grad", t) || !QKV__CHECK("qkv_retain_grad", t)) return;
    t->retains_grad = true;
    if (t->grad_fn) t->grad_fn->retained_out = t;
}

qkv_tensor *qkv_detach(const qkv_tensor *t) {
    if (QKV__NULL_ARGS("qkv_detach", t) || !QKV__CHECK("qkv_detach", t)) return NULL;
    QKV__OP("qkv_detach");
    return qkv__view(t, t->ndim, t->shape, t->strides, t->offset);
}

/* ---- Backward ---------------------------------------------------------------------------- */

qkv_tensor *qkv__sum_to(const qkv_tensor *g, int ndim, const int64_t *shape) {
    if (!g) return NULL;
    if (g->ndim == ndim && !memcmp(g->shape, shape, (size_t)ndim * sizeof(int64_t))) {
        return (qkv_tensor *)g;
    }
    uint32_t mask = 0;
    int lead = g->ndim - ndim;
    for (int i = 0; i < g->ndim; i++) {
        if (i < lead) mask |= 1u << i;
        else if (shape[i - lead] == 1 && g->shape[i] != 1) mask |= 1u << i;
    }
    qkv_tensor *r = qkv__reduce(QKV_RED_SUM, g, mask, true, 0, "backward");
    if (!r) return NULL;
    int64_t strides[QKV_MAX_DIMS];
    qkv__contiguous_strides(ndim, shape, strides);
    if (r->numel != qkv__numel(ndim, shape)) {
        char a[128], b[128];
        return qkv_set_error("backward: gradient of shape %s does not reduce to %s",
                             qkv_shape_str(g, a, sizeof a), qkv_shape_str(r, b, sizeof b));
    }
    return qkv__view(r, ndim, shape, strides, r->offset);
}

/* The gradient for input t, in t's shape and dtype. */
static qkv_tensor *fit(qkv_tensor *g, const qkv_tensor *t) {
    g = qkv__sum_to(g, t->ndim, t->shape);
    if (g && g->dtype != t->dtype) g = qkv__to_dtype(g, t->dtype);
    return g;
}

/* Whether a leaf's first gradient g may become its .grad as it is: a dense tensor that only
 * the running node's scope holds, sharing its storage with nothing, so no value the graph or
 * the user can still reach changes when the .grad does. Anything else is copied. */
static bool grad_takeable(const qkv_tensor *g) {
    return qkv__scope_sole(g) && g->storage && g->storage->refcount == 1 && !g->grad_fn &&
           !g->requires_grad && g->offset == 0 && qkv_is_contiguous(g) &&
           g->storage->nbytes == (size_t)g->numel * qkv_dtype_size(g->dtype);
}

/* *slot + g into *slot: over the running sum's values when nothing but the slot holds them
 * (qkv__add_into), else as a fresh sum. */
static bool accumulate(qkv_tensor **slot, qkv_tensor *g, bool fresh_copy) {
    qkv_tensor *sum;
    if (*slot && qkv__add_into(*slot, g)) return true;
    if (*slot) sum = qkv__binary(QKV_OP_ADD, *slot, g, "backward");
    else sum = fresh_copy ? qkv_clone(g) : g;
    if (!sum) return false;
    qkv__retain(sum);
    qkv__release(*slot);
    *slot = sum;
    return true;
}

typedef struct node_list {
    qkv_node **items;
    size_t n, cap;
} node_list;

static bool push(node_list *l, qkv_node *n) {
    if (!qkv__reserve((void **)&l->items, &l->cap, l->n + 1, sizeof *l->items)) return false;
    l->items[l->n++] = n;
    return true;
}

/* Counts, for every node reachable from root, how many reachable nodes consume it, and lists
 * those nodes in all, each holding a reference for the backward: once a processed node lets go
 * of its inputs, the tensors that linked to a node still waiting for its gradient may die. */
static bool count_consumers(qkv_node *root, uint64_t gen, node_list *all) {
    root->mark = gen;
    root->pending = 0;
    root->refcount++;
    if (!push(all, root)) {
        root->refcount--;
        return false;
    }
    bool ok = true;
    for (size_t k = 0; ok && k < all->n; k++) {
        qkv_node *n = all->items[k];
        if (n->freed) continue;
        for (int i = 0; i < n->n_inputs && ok; i++) {
            qkv_tensor *in = n->inputs[i];
            if (in && in->requires_grad && !in->grad_fn && in->grad_hooks)
                qkv__hooks_expect(in, gen);
            if (!in || !in->requires_grad || !in->grad_fn) continue;
            qkv_node *c = in->grad_fn;
            if (c->mark != gen) {
                c->mark = gen;
                c->pending = 0;
                c->refcount++;
                ok = push(all, c);
                if (!ok) c->refcount--;
            }
            c->pending++;
        }
    }
    return ok;
}

static bool check_gradients(const qkv_node *n, qkv_tensor **grads) {
    for (int i = 0; i < n->n_inputs; i++)
        if (grads[i] && anomalous(grads[i], true)) {
            char site[300];
            qkv_set_error("qkv anomaly: the backward of %s produced a non-finite gradient for "
                          "its input %d%s", n->fn->name, i, site_of(n, site, sizeof site));
            return false;
        }
    return true;
}

/* Runs one node's backward and hands each input its gradient: a leaf accumulates it, an
 * inner node collects it and becomes ready once all its consumers have run. */
static bool run_node(qkv_node *n, node_list *ready) {
    if (n->freed) {
        qkv_set_error("qkv_backward: the graph through %s was already freed by a backward; "
                      "pass retain_graph to backpropagate twice", n->fn->name);
        return false;
    }
    /* What the node kept was chosen by which inputs required grad; a leaf switched on since
     * would have its gradient computed from values that were not kept. */
    for (int i = 0; i < n->n_inputs && i < 32; i++)
        if (qkv__needs_grad(n->inputs[i]) && !((n->needed_grad >> i) & 1)) {
            qkv_set_error("qkv_backward: input %d of %s was set to require grad after the "
                          "forward; run the forward again", i, n->fn->name);
            return false;
        }
    for (int k = 0; k < QKV_SAVED_SLOTS; k++)
        if (n->saved[k].t && !n->saved[k].lazy && !unchanged(n, k)) return false;
    drop_recomputed(n); /* every consumer has run */
    qkv_tensor *g = n->grad;
    if (n->retained_out) {
        qkv__release(n->retained_out->grad);
        n->retained_out->grad = qkv__retain(qkv_clone(g));
    }
    qkv_tensor *grads_small[8] = {0};
    qkv_tensor **grads = grads_small;
    size_t gbytes = (size_t)n->n_inputs * sizeof *grads;
    if (n->n_inputs > 8) {
        grads = qkv__calloc(gbytes);
        if (!grads) return false;
    }
    /* Each node's temporaries die with its own scope: only the gradients handed on (retained
     * by their slots) outlive it, so a backward holds no more than its frontier. */
    qkv_scope_begin();
    bool had_error = qkv_error() != NULL;
    backward_depth++;
    n->fn->backward(n, g, grads);
    backward_depth--;
    for (int k = 0; k < QKV_SAVED_SLOTS; k++) qkv__saved_release(n, k);
    bool ok = (had_error || !qkv_error()) &&
              (!anomaly || check_gradients(n, grads));
    for (int i = 0; i < n->n_inputs && ok; i++) {
        qkv_tensor *in = n->inputs[i];
        if (!in || !in->requires_grad) continue;
        qkv_node *c = in->grad_fn;
        if (grads[i]) {
            qkv_tensor *gi = fit(grads[i], in);
            ok = gi && accumulate(c ? &c->grad : &in->grad, gi, !c && !grad_takeable(gi));
        }
        if (!c && in->grad_hooks && ok) qkv__hooks_contributed(in);
        if (c && --c->pending == 0 && ok) ok = push(ready, c);
    }
    qkv_scope_end();
    if (grads != grads_small) qkv__free(grads, gbytes);
    return ok;
}

bool qkv_backward_with(qkv_tensor *out, const qkv_tensor *grad, bool retain_graph) {
    if (QKV__NULL_ARGS("qkv_backward_with", out, grad) ||
        !QKV__CHECK("qkv_backward_with", out, grad)) return false;
    char a[128], b[128];
    if (!out->requires_grad) {
        qkv_set_error("qkv_backward: the tensor %s does not require grad (no input of its "
                      "graph requires grad, or it was computed in no-grad mode)",
                      qkv_shape_str(out, a, sizeof a));
        return false;
    }
    if (grad->ndim != out->ndim || memcmp(grad->shape, out->shape, sizeof(int64_t) * out->ndim)) {
        qkv_set_error("qkv_backward: gradient shape %s differs from the output's %s",
                      qkv_shape_str(grad, b, sizeof b), qkv_shape_str(out, a, sizeof a));
        return false;
    }
    qkv_scope_begin();
    qkv_no_grad_begin();
    bool ok;
    if (!out->grad_fn) {
        ok = accumulate(&out->grad, (qkv_tensor *)grad, true);
        if (ok) qkv__hooks_run(out);
    } else {
        qkv_node *root = out->grad_fn;
        node_list ready = {0}, all = {0};
        ok = count_consumers(root, ++backward_generation, &all);
        if (ok) {
            qkv__release(root->grad);
            root->grad = NULL;
            ok = accumulate(&root->grad, fit((qkv_tensor *)grad, out), false) &&
                 push(&ready, root);
        }
        while (ok && ready.n) {
            qkv_node *n = ready.items[--ready.n];
            ok = run_node(n, &ready);
            qkv__release(n->grad);
            n->grad = NULL;
            if (!retain_graph) free_graph_links(n);
        }
        /* After a failure, drop what other nodes had collected so far. */
        for (size_t i = 0; i < ready.n; i++) {
            qkv__release(ready.items[i]->grad);
            ready.items[i]->grad = NULL;
        }
        qkv__free(ready.items, ready.cap * sizeof *ready.items);
        for (size_t i = 0; i < all.n; i++) {
            drop_recomputed(all.items[i]);
            node_release(all.items[i], NULL);
        }
        qkv__free(all.items, all.cap * sizeof *all.items);
    }
    qkv_no_grad_end();
    qkv_scope_end();
    return ok;
}

bool qkv_backward(qkv_tensor *loss) {
    if (QKV__NULL_ARGS("qkv_backward", loss) || !QKV__CHECK("qkv_backward", loss)) return false;
    if (loss->numel != 1) {
        char a[128];
        qkv_set_error("qkv_backward: the loss must have one element, not %s; use "
                      "qkv_backward_with and a seed gradient", qkv_shape_str(loss, a, sizeof a));
        return false;
    }
    qkv_scope_begin();
    qkv_tensor *seed = qkv_ones(loss->dtype, loss->ndim, loss->shape);
    bool ok = seed && qkv_backward_with(loss, seed, false);
    qkv_scope_end();
    return ok;
}
