/*
 * The optimizer base: configs, parameter groups, the decay rule, the shared step driver and the
 * vtable entries every built-in optimizer shares (zero_grad, free).
 */
#include <math.h>
#include <string.h>

#include "optim/optim_internal.h"
#include "tensor/tensor_internal.h"

/* ---- Configs (PyTorch's defaults) -------------------------------------------------------- */

qkv_optim_config qkv_sgd_config(double lr) {
    return (qkv_optim_config){.lr = lr};
}

qkv_optim_config qkv_adam_config(double lr) {
    return (qkv_optim_config){.lr = lr, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
}

qkv_optim_config qkv_adamw_config(double lr) {
    qkv_optim_config c = qkv_adam_config(lr);
    c.weight_decay = 1e-2;
    return c;
}

qkv_optim_config qkv_rmsprop_config(double lr) {
    return (qkv_optim_config){.lr = lr, .alpha = 0.99, .eps = 1e-8};
}

/* torch.optim's constructor checks, plus finiteness (a NaN lr would poison every parameter). */
bool qkv__optim_check_config(const char *op, const char *type, const qkv_optim_config *c) {
    const char *bad = NULL;
    if (!(c->lr >= 0) || isinf(c->lr)) bad = "lr";
    else if (!(c->weight_decay >= 0) || isinf(c->weight_decay)) bad = "weight_decay";
    else if (!(c->momentum >= 0) || isinf(c->momentum)) bad = "momentum";
    else if (!(c->dampening >= 0) || isinf(c->dampening)) bad = "dampening";
    else if (!(c->beta1 >= 0 && c->beta1 < 1)) bad = "beta1";
    else if (!(c->beta2 >= 0 && c->beta2 < 1)) bad = "beta2";
    else if (!(c->eps >= 0) || isinf(c->eps)) bad = "eps";
    else if (!(c->alpha >= 0) || isinf(c->alpha)) bad = "alpha";
    if (bad) {
        qkv_set_error("%s: invalid %s for %s", op, bad, type);
        return false;
    }
    if (c->nesterov && (c->momentum <= 0 || c->dampening != 0)) {
        qkv_set_error("%s: nesterov needs momentum > 0 and dampening 0", op);
        return false;
    }
    return true;
}

/* ---- Helpers ----------------------------------------------------------------------------- */

char *qkv__optim_strdup(const char *s) {
    size_t len = strlen(s) + 1;
    char *d = qkv__alloc(len);
    if (d) memcpy(d, s, len);
    return d;
}

void qkv__optim_free_str(char *s) {
    if (s) qkv__free(s, strlen(s) + 1);
}

qkv_tensor *qkv__own(qkv_tensor *t) {
    return qkv_scope_depth() > 0 ? qkv__retain(t) : t;
}

qkv_tensor *qkv__held_zeros_like(const qkv_tensor *t) {
    return qkv__own(qkv_zeros_like(t));
}

/* ---- Construction ------------------------------------------------------------------------ */

qkv_optimizer *qkv__optimizer_new(const qkv_optimizer_vtable *vtable) {
    qkv_optimizer *opt = qkv__calloc(sizeof *opt);
    if (opt) opt->vtable = vtable;
    return opt;
}

static void group_free(qkv_param_group *g) {
    for (int i = 0; i < g->n; i++) {
        qkv__optim_free_str(g->names[i]);
        qkv__release(g->params[i]);
        for (int s = 0; s < QKV_OPTIM_SLOTS; s++) qkv__release(g->state[i].slots[s]);
    }
    qkv__free(g->names, (size_t)g->n * sizeof *g->names);
    qkv__free(g->params, (size_t)g->n * sizeof *g->params);
    qkv__free(g->state, (size_t)g->n * sizeof *g->state);
}

void qkv__optimizer_free(qkv_optimizer *opt) {
    for (int g = 0; g < opt->n_groups; g++) group_free(&opt->groups[g]);
    qkv__free(opt->groups, (size_t)opt->cap_groups * sizeof *opt->groups);
    qkv__free(opt, sizeof *opt);
}

void qkv_optimizer_free(qkv_optimizer *opt) {
    if (opt) opt->vtable->free(opt);
}

/* Whether a parameter with this name or this tensor is already in a group of opt, or earlier
 * in the list being added. */
static bool already_added(const qkv_optimizer *opt, const qkv_named_list *list, int upto) {
    const char *name = list->names[upto];
    const qkv_tensor *t = list->tensors[upto];
    for (int i = 0; i < upto; i++)
        if (!strcmp(list->names[i], name) || list->tensors[i] == t) return true;
    for (int g = 0; g < opt->n_groups; g++)
        for (int i = 0; i < opt->groups[g].n; i++)
            if (!strcmp(opt->groups[g].names[i], name) || opt->groups[g].params[i] == t)
                return true;
    return false;
}

static bool check_params(const qkv_optimizer *opt, const qkv_named_list *params) {
    for (int i = 0; i < params->n; i++) {
        const qkv_tensor *t = params->tensors[i];
        const char *name = params->names[i];
        if (!name || !t) {
            qkv_set_error("qkv_optimizer_add_group: parameter %d is NULL", i);
            return false;
        }
        if (t->dtype != QKV_F32 && t->dtype != QKV_F64) {
            qkv_set_error("qkv_optimizer_add_group: %s is %s; parameters must be f32 or f64",
                          name, qkv_dtype_name(t->dtype));
            return false;
        }
        if (!qkv_is_contiguous(t) || t->grad_fn) {
            qkv_set_error("qkv_optimizer_add_group: %s is not a contiguous leaf tensor", name);
            return false;
        }
        if (already_added(opt, params, i)) {
            qkv_set_error("qkv_optimizer_add_group: %s appears in more than one group", name);
            return false;
        }
    }
    return true;
}

bool qkv_optimizer_add_group(qkv_optimizer *opt, const qkv_named_list *params,
                             qkv_optim_config config) {
    if (!opt || !params) {
        qkv_set_error("qkv_optimizer_add_group: NULL %s", opt ? "parameter list" : "optimizer");
        return false;
    }
    const char *op = "qkv_optimizer_add_group";
    if (!qkv__optim_check_config(op, opt->vtable->name, &config) || !check_params(opt, params))
        return false;
    size_t cap = (size_t)opt->cap_groups;
    if (!qkv__reserve((void **)&opt->groups, &cap, (size_t)opt->n_groups + 1,
                      sizeof *opt->groups))
        return false;
    opt->cap_groups = (int)cap;
    qkv_param_group g = {.n = params->n, .config = config, .initial_lr = config.lr};
    size_t n = (size_t)params->n;
    g.names = qkv__calloc(n * sizeof *g.names);
    g.params = qkv__calloc(n * sizeof *g.params);
    g.state = qkv__calloc(n * sizeof *g.state);
    if (!g.names || !g.params || !g.state) goto fail;
    for (int i = 0; i < params->n; i++) {
        g.names[i] = qkv__optim_strdup(params->names[i]);
        if (!g.names[i]) goto fail;
        g.params[i] = qkv__retain(params->tensors[i]);
    }
    opt->groups[opt->n_groups++] = g;
    return true;
fail:
    if (g.names) for (int i = 0; i < params->n; i++) qkv__optim_free_str(g.names[i]);
    if (g.params) for (int i = 0; i < params->n; i++) qkv__release(g.params[i]);
    qkv__free(g.names, n * sizeof *g.names);
    qkv__free(g.params, n * sizeof *g.params);
    qkv__free(g.state, n * sizeof *g.state);
    return false;
}

/* ---- Decay groups ------------------------------------------------------------------------ */

bool qkv_param_takes_decay(const char *name, const qkv_tensor *t) {
    size_t len = name ? strlen(name) : 0;
    if (len >= 4 && !strcmp(name + len - 4, "bias")) return false;
    if (name && strstr(name, "norm")) return false;
    return !t || t->ndim >= 2;
}

bool qkv_optimizer_add_decay_groups(qkv_optimizer *opt, const qkv_named_list *params,
                                    qkv_optim_config config) {
    if (!opt || !params) {
        qkv_set_error("qkv_optimizer_add_decay_groups: NULL %s",
                      opt ? "parameter list" : "optimizer");
        return false;
    }
    size_t n = (size_t)params->n;
    int n_before = opt->n_groups;
    qkv_named_list part = {0};
    part.names = qkv__alloc((n ? n : 1) * sizeof *part.names);
    part.tensors = qkv__alloc((n ? n : 1) * sizeof *part.tensors);
    bool ok = part.names && part.tensors;
    for (int pass = 0; ok && pass < 2; pass++) {
        bool decay = pass == 0;
        part.n = 0;
        for (int i = 0; i < params->n; i++) {
            if (qkv_param_takes_decay(params->names[i], params->tensors[i]) != decay) continue;
            part.names[part.n] = params->names[i];
            part.tensors[part.n++] = params->tensors[i];
        }
        qkv_optim_config c = config;
        if (!decay) c.weight_decay = 0;
        if (part.n) ok = qkv_optimizer_add_group(opt, &part, c);
    }
    qkv__free(part.names, (n ? n : 1) * sizeof *part.names);
    qkv__free(part.tensors, (n ? n : 1) * sizeof *part.tensors);
    while (!ok && opt->n_groups > n_before) group_free(&opt->groups[--opt->n_groups]);
    return ok;
}

/* ---- Step, zero_grad --------------------------------------------------------------------- */

bool qkv_optimizer_step(qkv_optimizer *opt) {
    if (!opt) return qkv_set_error("qkv_optimizer_step: NULL optimizer"), false;
    if (!opt->vtable->step(opt)) return false;
    opt->steps++;
    return true;
}

void qkv_optimizer_zero_grad(qkv_optimizer *opt) {
    if (opt) opt->vtable->zero_grad(opt);
}

void qkv__optimizer_zero_grad(qkv_optimizer *opt) {
    for (int g = 0; g < opt->n_groups; g++)
        for (int i = 0; i < opt->groups[g].n; i++) qkv_zero_grad(opt->groups[g].params[i]);
}

bool qkv__fit_grad(const char *op, const char *name, qkv_tensor *p) {
    qkv_tensor *g = p->grad;
    if (g->ndim != p->ndim || memcmp(g->shape, p->shape, (size_t)p->ndim * sizeof *p->shape)) {
        char a[128], b[128];
        qkv_set_error("%s: grad of %s has shape %s, the parameter %s", op, name,
                      qkv_shape_str(g, a, sizeof a), qkv_shape_str(p, b, sizeof b));
        return false;
    }
    if (g->dtype == p->dtype && qkv_is_contiguous(g)) return true;
    qkv_tensor *converted = qkv__own(qkv_to_dtype(g, p->dtype));
    qkv_tensor *fitted = qkv__own(qkv_contiguous(converted));
    qkv__release(converted);
    if (!fitted) return false;
    qkv__release(p->grad);
    p->grad = fitted;
    return true;
}

/* Everything that can fail, before any parameter changes. */
static bool prepare(qkv_optimizer *opt) {
    const qkv_optimizer_vtable *vt = opt->vtable;
    for (int gi = 0; gi < opt->n_groups; gi++) {
        qkv_param_group *g = &opt->groups[gi];
        for (int i = 0; i < g->n; i++) {
            qkv_tensor *p = g->params[i];
            if (!p->grad) continue;
            if (!qkv__fit_grad("qkv_optimizer_step", g->names[i], p)) return false;
            qkv_param_state *st = &g->state[i];
            st->fresh = false;
            for (int s = 0; s < QKV_OPTIM_SLOTS && vt->slot_names[s]; s++) {
                if (st->slots[s] || !vt->slot_used(&g->config, s)) continue;
                st->slots[s] = qkv__held_zeros_like(p);
                if (!st->slots[s]) return false;
                st->fresh = true;
            }
        }
    }
    return true;
}

/* Calls fn for every parameter with a grad (steps already counted). Every thread of the
 * region walks all parameters; the loops inside fn share out the elements (QKV__UPDATE_FOR). */
static void run_updates(qkv_optimizer *opt, qkv__update_fn fn) {
    for (int gi = 0; gi < opt->n_groups; gi++) {
        qkv_param_group *g = &opt->groups[gi];
        for (int i = 0; i < g->n; i++) {
            qkv_tensor *p = g->params[i];
            if (!p->grad) continue;
            qkv_param_state *st = &g->state[i];
            qkv__update u = {.n = p->numel, .dtype = p->dtype, .param = qkv_data(p),
                             .grad = qkv_data(p->grad), .first = st->fresh};
            for (int s = 0; s < QKV_OPTIM_SLOTS; s++)
                u.slot[s] = st->slots[s] ? qkv_data(st->slots[s]) : NULL;
            fn(&g->config, st->step, &u);
        }
    }
}

bool qkv__optimizer_step(qkv_optimizer *opt, qkv__update_fn fn) {
    if (!prepare(opt)) return false;
    qkv_no_grad_begin();
    int64_t total = 0;
    for (int gi = 0; gi < opt->n_groups; gi++) {
        qkv_param_group *g = &opt->groups[gi];
        for (int i = 0; i < g->n; i++) {
            if (!g->params[i]->grad) continue;
            g->state[i].step++;
            total += g->params[i]->numel;
        }
    }
    int threads = qkv__threads_for(total * 8);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    run_updates(opt, fn);
    qkv_no_grad_end();
    return true;
}
