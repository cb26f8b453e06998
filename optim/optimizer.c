/*
 * The optimizer base: configs, construction from a definition, parameter groups, the decay
 * rule, the step driver every optimizer shares, and the accessors of the opaque struct.
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

/* A definition's slot names must name checkpoint entries "optim.state.<param>.<slot>"
 * without ambiguity: distinct, free of '.', not the step count's name. */
static bool check_def(const qkv_optimizer_def *def) {
    const char *op = "qkv_optimizer_new";
    if (!def) return qkv_set_error("%s: NULL definition", op), false;
    if (!def->name || !def->name[0] || !def->update)
        return qkv_set_error("%s: a definition needs a name and an update function", op), false;
    for (int s = 0; s < QKV_OPTIM_SLOTS; s++) {
        const char *n = def->slot_names[s];
        if (!n) {
            for (int t = s + 1; t < QKV_OPTIM_SLOTS; t++)
                if (def->slot_names[t])
                    return qkv_set_error("%s: %s: slot %d named after the unnamed slot %d", op,
                                         def->name, t, s), false;
            break;
        }
        if (!n[0] || strchr(n, '.') || !strcmp(n, "step"))
            return qkv_set_error("%s: %s: bad slot name \"%s\" (empty, with a '.', or "
                                 "\"step\")", op, def->name, n), false;
        for (int t = 0; t < s; t++)
            if (!strcmp(def->slot_names[t], n))
                return qkv_set_error("%s: %s: two slots named \"%s\"", op, def->name, n),
                       false;
    }
    return true;
}

static qkv_optimizer *optimizer_new(const qkv_optimizer_def *def, void *ctx, bool parallel) {
    qkv_optimizer *opt = qkv__calloc(sizeof *opt);
    if (!opt) return NULL;
    opt->def = *def;
    opt->ctx = ctx;
    opt->parallel = parallel;
    return opt;
}

qkv_optimizer *qkv__optimizer_new(const qkv_optimizer_def *def) {
    return optimizer_new(def, NULL, true);
}

qkv_optimizer *qkv_optimizer_new(const qkv_optimizer_def *def, void *ctx) {
    return check_def(def) ? optimizer_new(def, ctx, false) : NULL;
}

bool qkv__slot_used(const qkv_optimizer *opt, const qkv_optim_config *c, int s) {
    return !opt->def.slot_used || opt->def.slot_used(c, s);
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

void qkv_optimizer_free(qkv_optimizer *opt) {
    if (!opt) return;
    for (int g = 0; g < opt->n_groups; g++) group_free(&opt->groups[g]);
    qkv__free(opt->groups, (size_t)opt->cap_groups * sizeof *opt->groups);
    qkv__free(opt, sizeof *opt);
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
    if (!qkv__optim_check_config(op, opt->def.name, &config) || !check_params(opt, params))
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

void qkv_optimizer_zero_grad(qkv_optimizer *opt) {
    if (qkv__null_object("qkv_optimizer_zero_grad", "optimizer", opt)) return;
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

/* A parameter's state made before the parameter changed: converted to its new dtype, as
 * torch's load_state_dict casts state to its parameter's dtype (a moment keeps its meaning in
 * either precision); refused for a new shape, which no conversion gives a meaning. */
static bool fit_state(const qkv_optimizer *opt, int gi, int i) {
    qkv_param_group *g = &opt->groups[gi];
    qkv_tensor *p = g->params[i];
    qkv_param_state *st = &g->state[i];
    for (int s = 0; s < QKV_OPTIM_SLOTS; s++) {
        qkv_tensor *t = st->slots[s];
        if (!t) continue;
        if (t->ndim != p->ndim || memcmp(t->shape, p->shape, (size_t)p->ndim * sizeof *p->shape)) {
            char a[128], b[128];
            qkv_set_error("qkv_optimizer_step: %s: parameter %d of group %d (\"%s\") is %s but "
                          "its state %s is %s: a parameter must keep its shape under an "
                          "optimizer", opt->def.name, i, gi, g->names[i],
                          qkv_shape_str(p, a, sizeof a), opt->def.slot_names[s],
                          qkv_shape_str(t, b, sizeof b));
            return false;
        }
        if (t->dtype == p->dtype) continue;
        qkv_tensor *converted = qkv__own(qkv__to_dtype(t, p->dtype));
        if (!converted) return false;
        qkv__release(t);
        st->slots[s] = converted;
    }
    return true;
}

/* Everything that can fail, before any parameter changes. */
static bool prepare(qkv_optimizer *opt) {
    const qkv_optimizer_def *def = &opt->def;
    for (int gi = 0; gi < opt->n_groups; gi++) {
        qkv_param_group *g = &opt->groups[gi];
        for (int i = 0; i < g->n; i++) {
            qkv_tensor *p = g->params[i];
            if (!p->grad) continue;
            if (!qkv__fit_grad("qkv_optimizer_step", g->names[i], p) || !fit_state(opt, gi, i))
                return false;
            qkv_param_state *st = &g->state[i];
            st->fresh = false;
            for (int s = 0; s < QKV_OPTIM_SLOTS && def->slot_names[s]; s++) {
                if (st->slots[s] || !qkv__slot_used(opt, &g->config, s)) continue;
                st->slots[s] = qkv__held_zeros_like(p);
                if (!st->slots[s]) return false;
                st->fresh = true;
            }
        }
    }
    return true;
}

/* Calls the update for every parameter with a grad (steps already counted). In a parallel
 * region every thread walks all parameters, and the built-in updates share out the elements
 * (QKV__UPDATE_FOR); an update of the user's runs on the calling thread alone. */
static void run_updates(qkv_optimizer *opt) {
    for (int gi = 0; gi < opt->n_groups; gi++) {
        qkv_param_group *g = &opt->groups[gi];
        for (int i = 0; i < g->n; i++) {
            qkv_tensor *p = g->params[i];
            if (!p->grad) continue;
            qkv_param_state *st = &g->state[i];
            qkv_param_update u = {.n = p->numel, .dtype = p->dtype, .param = qkv_data(p),
                                  .grad = qkv_data(p->grad), .first = st->fresh};
            for (int s = 0; s < QKV_OPTIM_SLOTS; s++)
                u.slot[s] = st->slots[s] ? qkv_data(st->slots[s]) : NULL;
            opt->def.update(&g->config, st->step, &u, opt->ctx);
        }
    }
}

/* The parameters and state an update wrote in place: a graph that kept a parameter's values
 * for a backward not yet run sees it changed (see qkv_version). */
static void bump_versions(qkv_optimizer *opt) {
    for (int gi = 0; gi < opt->n_groups; gi++) {
        qkv_param_group *g = &opt->groups[gi];
        for (int i = 0; i < g->n; i++) {
            if (!g->params[i]->grad) continue;
            qkv__bump_version(g->params[i]);
            for (int s = 0; s < QKV_OPTIM_SLOTS; s++) qkv__bump_version(g->state[i].slots[s]);
        }
    }
}

bool qkv_optimizer_step(qkv_optimizer *opt) {
    if (!opt) return qkv_set_error("qkv_optimizer_step: NULL optimizer"), false;
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
    int threads = opt->parallel ? qkv__threads_for(total * 8) : 1;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    run_updates(opt);
    qkv_no_grad_end();
    bump_versions(opt);
    opt->steps++;
    return true;
}

/* ---- Accessors --------------------------------------------------------------------------- */

/* The group, or NULL with an error naming op. */
static qkv_param_group *group_at(const qkv_optimizer *opt, int group, const char *op) {
    if (!opt) return qkv_set_error("%s: NULL optimizer", op);
    if (group < 0 || group >= opt->n_groups)
        return qkv_set_error("%s: group %d out of range for %d groups", op, group,
                             opt->n_groups);
    return &opt->groups[group];
}

/* The group holding the parameter, or NULL with an error naming op. */
static qkv_param_group *param_group_at(const qkv_optimizer *opt, int group, int index,
                                       const char *op) {
    qkv_param_group *g = group_at(opt, group, op);
    if (g && (index < 0 || index >= g->n))
        return qkv_set_error("%s: index %d out of range for the %d parameters of group %d", op,
                             index, g->n, group);
    return g;
}

const char *qkv_optimizer_name(const qkv_optimizer *opt) {
    return opt ? opt->def.name : qkv_set_error("qkv_optimizer_name: NULL optimizer");
}

int64_t qkv_optimizer_steps(const qkv_optimizer *opt) {
    if (!opt) return qkv_set_error("qkv_optimizer_steps: NULL optimizer"), -1;
    return opt->steps;
}

int qkv_optimizer_num_groups(const qkv_optimizer *opt) {
    if (!opt) return qkv_set_error("qkv_optimizer_num_groups: NULL optimizer"), -1;
    return opt->n_groups;
}

int qkv_optimizer_num_params(const qkv_optimizer *opt, int group) {
    const qkv_param_group *g = group_at(opt, group, "qkv_optimizer_num_params");
    return g ? g->n : -1;
}

const qkv_optim_config *qkv_optimizer_config(const qkv_optimizer *opt, int group) {
    const qkv_param_group *g = group_at(opt, group, "qkv_optimizer_config");
    return g ? &g->config : NULL;
}

double qkv_optimizer_lr(const qkv_optimizer *opt, int group) {
    const qkv_param_group *g = group_at(opt, group, "qkv_optimizer_lr");
    return g ? g->config.lr : NAN;
}

double qkv_optimizer_initial_lr(const qkv_optimizer *opt, int group) {
    const qkv_param_group *g = group_at(opt, group, "qkv_optimizer_initial_lr");
    return g ? g->initial_lr : NAN;
}

bool qkv_optimizer_set_lr(qkv_optimizer *opt, int group, double lr) {
    const char *op = "qkv_optimizer_set_lr";
    if (!(lr >= 0) || isinf(lr)) return qkv_set_error("%s: invalid lr %g", op, lr), false;
    if (opt && group == -1) {
        for (int g = 0; g < opt->n_groups; g++) opt->groups[g].config.lr = lr;
        return true;
    }
    qkv_param_group *g = group_at(opt, group, op);
    if (g) g->config.lr = lr;
    return g != NULL;
}

const char *qkv_optimizer_param_name(const qkv_optimizer *opt, int group, int index) {
    const qkv_param_group *g = param_group_at(opt, group, index, "qkv_optimizer_param_name");
    return g ? g->names[index] : NULL;
}

qkv_tensor *qkv_optimizer_param(const qkv_optimizer *opt, int group, int index) {
    const qkv_param_group *g = param_group_at(opt, group, index, "qkv_optimizer_param");
    return g ? g->params[index] : NULL;
}

int64_t qkv_optimizer_param_steps(const qkv_optimizer *opt, int group, int index) {
    const qkv_param_group *g = param_group_at(opt, group, index, "qkv_optimizer_param_steps");
    return g ? g->state[index].step : -1;
}

qkv_tensor *qkv_optimizer_state(const qkv_optimizer *opt, int group, int index,
                                const char *slot) {
    const char *op = "qkv_optimizer_state";
    const qkv_param_group *g = param_group_at(opt, group, index, op);
    if (!g) return NULL;
    for (int s = 0; s < QKV_OPTIM_SLOTS && opt->def.slot_names[s]; s++)
        if (slot && !strcmp(slot, opt->def.slot_names[s])) return g->state[index].slots[s];
    return qkv_set_error("%s: %s keeps no state named \"%s\"", op, opt->def.name,
                         slot ? slot : "(null)");
}
