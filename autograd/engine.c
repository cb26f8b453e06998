/*
 * The backward engine: recording nodes, grad mode, and reverse-mode accumulation in
 * topological order without recursion.
 */
#include <math.h>
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
    return t && t->grad_fn ? t->grad_fn->op->name : NULL;
}

/* ---- Nodes ------------------------------------------------------------------------------- */

static void free_graph_links(qkv_node *n) {
    if (n->freed) return;
    n->freed = true;
    for (int i = 0; i < n->n_inputs; i++) qkv__release(n->inputs[i]);
    qkv__free(n->inputs, (size_t)n->n_inputs * sizeof(qkv_tensor *));
    n->inputs = NULL;
    for (int i = 0; i < QKV_NODE_SAVED; i++) {
        qkv__release(n->saved[i]);
        n->saved[i] = NULL;
    }
}

static void node_release(qkv_node *n, qkv_tensor *owner) {
    if (n->retained_out == owner) n->retained_out = NULL;
    if (--n->refcount > 0) return;
    free_graph_links(n);
    qkv__release(n->grad);
    qkv__release(n->recomputed);
    qkv__free(n, sizeof *n);
}

/* Anomaly mode: the first non-finite value in a float tensor. */
static bool all_finite(const qkv_tensor *t) {
    if (!t || !qkv__is_float(t->dtype) || t->numel == 0) return true;
    qkv_tensor *bad = qkv__unary(QKV_OP_ABS, t, "anomaly");
    if (!bad) return true;
    qkv_tensor *m = qkv__reduce(QKV_RED_MAX, bad, ~0u, false, 0, "anomaly");
    double v = m ? qkv_item(m) : 0;
    if (qkv_scope_depth() == 0) {
        qkv__release(m);
        qkv__release(bad);
    }
    return isfinite(v);
}

/* Whether op's backward reads the values of input i (see qkv_op_def). */
static bool reads_values(const qkv_op_def *op, int n_inputs, const qkv_tensor *const *inputs,
                         int i) {
    bool dropped = i < 32 ? (op->drop >> i) & 1 : op->drop == QKV_DROP_ALL;
    if (dropped) return false;
    if (!op->cross) return true;
    for (int j = 0; j < n_inputs; j++)
        if (j != i && qkv__needs_grad(inputs[j])) return true;
    return false;
}

/* t's shape, dtype and graph link without its storage: what a node keeps of an input whose
 * values its backward never reads. Owned by the node, never by a scope. */
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

/* Whether a consumer may hold p's output as a shell and have it recomputed. */
static bool recomputable(const qkv_node *p) {
    return p->depth >= 0 && p->depth < QKV_RECOMPUTE_DEPTH && !p->freed;
}

qkv_tensor *qkv__saved_output(qkv_node *node) {
    return node->saved[0];
}

/* The values of a shell whose maker can recompute them. What a chain of recomputations makes
 * on the way is freed at once. */
static qkv_tensor *recomputed(const qkv_tensor *t) {
    qkv_node *p = t->grad_fn;
    if (!p || p->depth < 0 || p->freed)
        return qkv_set_error("qkv_backward: the values of an input of %s are gone and cannot "
                             "be recomputed", p ? p->op->name : "a leaf");
    /* A layer norm read by three projections is recomputed once per backward: the values
     * stay with their maker while consumers that have not run yet (pending) remain. */
    qkv_tensor *v = p->recomputed;
    if (v) {
        if (p->pending <= 1) p->recomputed = NULL;
        else qkv__retain(v);
        return qkv__scope_add(v) ? v : NULL;
    }
    v = QKV_SCOPED(p->op->recompute(p));
    if (v && (v->ndim != t->ndim || memcmp(v->shape, t->shape, sizeof(int64_t) * t->ndim) ||
              v->dtype != t->dtype))
        return qkv_set_error("qkv_backward: %s recomputed a tensor of another shape",
                             p->op->name);
    if (v && p->pending > 1) p->recomputed = qkv__retain(v);
    return v;
}

static void drop_recomputed(qkv_node *n) {
    qkv__release(n->recomputed);
    n->recomputed = NULL;
}

qkv_tensor *qkv__values(qkv_node *node, int i) {
    qkv_tensor *t = node->inputs[i];
    if (!t || t->storage) return t;
    return recomputed(t);
}

/* Gives a shell the storage and geometry of its recomputed values, for one backward. The shell
 * alone holds them, so qkv__release_values can free them before the backward ends. */
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

static void detach_values(qkv_tensor *t) {
    qkv__storage_release(t->storage);
    t->storage = NULL;
}

void qkv__release_values(qkv_node *node, int i) {
    if (i < 32 && (node->materialize >> i) & 1) detach_values(node->inputs[i]);
}

/* Releases the first k inputs of a node that is being abandoned half built. */
static void free_graph_links_upto(qkv_node *n, int k) {
    for (int i = 0; i < k; i++) qkv__release(n->inputs[i]);
    qkv__free(n->inputs, (size_t)(n->n_inputs ? n->n_inputs : 1) * sizeof(qkv_tensor *));
    qkv__free(n, sizeof *n);
}

qkv_tensor *qkv__record(qkv_tensor *out, const qkv_op_def *op, int n_inputs,
                        const qkv_tensor *const *inputs) {
    if (!out) return NULL;
    /* Ops called by a backward are checked as that backward's gradients, under its name. */
    if (anomaly && backward_depth == 0 && !all_finite(out)) {
        qkv_set_error("qkv anomaly: %s produced a non-finite value in its forward", op->name);
        goto fail;
    }
    if (no_grad_depth > 0) return out;
    bool any = false;
    for (int i = 0; i < n_inputs; i++) any = any || qkv__needs_grad(inputs[i]);
    if (!any) return out;
    qkv_node *n = qkv__calloc(sizeof *n);
    if (!n) goto fail;
    n->inputs = qkv__alloc((size_t)(n_inputs ? n_inputs : 1) * sizeof(qkv_tensor *));
    if (!n->inputs) {
        qkv__free(n, sizeof *n);
        goto fail;
    }
    n->base.release = node_release;
    n->op = op;
    n->refcount = 1;
    n->n_inputs = n_inputs;
    n->depth = op->recompute ? 0 : -1;
    for (int i = 0; i < n_inputs; i++) {
        const qkv_tensor *in = inputs[i];
        bool read = reads_values(op, n_inputs, inputs, i);
        bool recompute_reads = op->recompute && i < 32 && (op->recompute_reads >> i) & 1;
        bool lazy = in && in->grad_fn && i < 32 && recomputable(in->grad_fn);
        bool whole = !in || (in->requires_grad && !in->grad_fn) || (read && !lazy);
        n->inputs[i] = whole ? qkv__retain((qkv_tensor *)in) : shell(in);
        if (!n->inputs[i] && in) {
            free_graph_links_upto(n, i);
            goto fail;
        }
        if (!whole && lazy && read) n->materialize |= 1u << i;
        if (i < 32 && qkv__needs_grad(in)) n->needed_grad |= 1u << i;
        if (recompute_reads && n->depth >= 0 && !whole)
            n->depth = !lazy ? -1 : in->grad_fn->depth + 1 > n->depth ? in->grad_fn->depth + 1
                                                                          : n->depth;
    }
    n->out_ndim = out->ndim;
    memcpy(n->out_shape, out->shape, sizeof n->out_shape);
    n->out_dtype = out->dtype;
    out->grad_fn = n;
    out->requires_grad = true;
    return out;
fail:
    if (qkv_scope_depth() == 0) qkv__release(out);
    return NULL;
}

bool qkv__save(qkv_node *node, int slot, const qkv_tensor *t) {
    if (!node || !t) return false;
    node->saved[slot] = qkv__retain((qkv_tensor *)t);
    return true;
}

bool qkv__save_output(qkv_node *node, int slot, const qkv_tensor *out) {
    if (!node || !out) return false;
    qkv_tensor *v = qkv__view(out, out->ndim, out->shape, out->strides, out->offset);
    if (!v) return false;
    node->saved[slot] = qkv_scope_depth() ? qkv__retain(v) : v;
    return true;
}

/* ---- Leaves ------------------------------------------------------------------------------ */

qkv_tensor *qkv_requires_grad_(qkv_tensor *t, bool requires_grad) {
    if (!t || !QKV__CHECK("qkv_requires_grad_", t)) return NULL;
    if (t->grad_fn) {
        qkv_set_error("qkv_requires_grad_: only a leaf can be set; %s made this tensor",
                      t->grad_fn->op->name);
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
    if (!t || !QKV__CHECK("qkv_zero_grad", t)) return;
    qkv__release(t->grad);
    t->grad = NULL;
}

void qkv_retain_grad(qkv_tensor *t) {
    if (!t || !QKV__CHECK("qkv_retain_grad", t)) return;
    t->retains_grad = true;
    if (t->grad_fn) t->grad_fn->retained_out = t;
}

qkv_tensor *qkv_detach(const qkv_tensor *t) {
    if (!t || !QKV__CHECK("qkv_detach", t)) return NULL;
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

static bool accumulate(qkv_tensor **slot, qkv_tensor *g, bool fresh_copy) {
    qkv_tensor *sum;
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
        if (grads[i] && !all_finite(grads[i])) {
            qkv_set_error("qkv anomaly: the backward of %s produced a non-finite gradient for "
                          "its input %d", n->op->name, i);
            return false;
        }
    return true;
}

/* Runs one node's backward and hands each input its gradient: a leaf accumulates it, an
 * inner node collects it and becomes ready once all its consumers have run. */
static bool run_node(qkv_node *n, node_list *ready) {
    if (n->freed) {
        qkv_set_error("qkv_backward: the graph through %s was already freed by a backward; "
                      "pass retain_graph to backpropagate twice", n->op->name);
        return false;
    }
    /* What the node kept was chosen by which inputs required grad; a leaf switched on since
     * would have its gradient computed from values that were not kept. */
    for (int i = 0; i < n->n_inputs && i < 32; i++)
        if (qkv__needs_grad(n->inputs[i]) && !((n->needed_grad >> i) & 1)) {
            qkv_set_error("qkv_backward: input %d of %s was set to require grad after the "
                          "forward; run the forward again", i, n->op->name);
            return false;
        }
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
    uint32_t attached = 0;
    bool values_ok = true;
    for (int i = 0; i < n->n_inputs && i < 32 && values_ok; i++)
        if ((n->materialize >> i) & 1) {
            values_ok = attach_values(n->inputs[i]);
            if (values_ok) attached |= 1u << i;
        }
    backward_depth++;
    if (values_ok) n->op->backward(n, g, grads);
    backward_depth--;
    for (int i = 0; i < n->n_inputs && i < 32; i++)
        if ((attached >> i) & 1) detach_values(n->inputs[i]);
    bool ok = values_ok && (had_error || !qkv_error()) &&
              (!anomaly || check_gradients(n, grads));
    for (int i = 0; i < n->n_inputs && ok; i++) {
        qkv_tensor *in = n->inputs[i];
        if (!in || !in->requires_grad) continue;
        qkv_node *c = in->grad_fn;
        if (grads[i]) {
            qkv_tensor *gi = fit(grads[i], in);
            ok = gi && accumulate(c ? &c->grad : &in->grad, gi, !c);
        }
        if (c && --c->pending == 0 && ok) ok = push(ready, c);
    }
    qkv_scope_end();
    if (grads != grads_small) qkv__free(grads, gbytes);
    return ok;
}

bool qkv_backward_with(qkv_tensor *out, const qkv_tensor *grad, bool retain_graph) {
    if (!out || !grad || !QKV__CHECK("qkv_backward_with", out, grad)) return false;
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
    if (!loss || !QKV__CHECK("qkv_backward", loss)) return false;
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
