/*
 * Optimizer state as named tensors and metadata strings (the layout is documented in optim.h),
 * and its import, which checks everything before it changes anything.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "optim/optim_internal.h"
#include "tensor/tensor_internal.h"

#define STATE_PREFIX "optim.state."

/* The config fields saved per group, by name and place. */
typedef struct field {
    const char *name;
    size_t offset;
    bool is_bool;
} field;

static const field fields[] = {
    {"lr", offsetof(qkv_optim_config, lr), false},
    {"weight_decay", offsetof(qkv_optim_config, weight_decay), false},
    {"momentum", offsetof(qkv_optim_config, momentum), false},
    {"dampening", offsetof(qkv_optim_config, dampening), false},
    {"nesterov", offsetof(qkv_optim_config, nesterov), true},
    {"beta1", offsetof(qkv_optim_config, beta1), false},
    {"beta2", offsetof(qkv_optim_config, beta2), false},
    {"eps", offsetof(qkv_optim_config, eps), false},
    {"amsgrad", offsetof(qkv_optim_config, amsgrad), true},
    {"alpha", offsetof(qkv_optim_config, alpha), false},
    {"centered", offsetof(qkv_optim_config, centered), true},
};
#define N_FIELDS (int)(sizeof fields / sizeof fields[0])

/* ---- Export ------------------------------------------------------------------------------ */

/* Export fills arrays sized exactly by count_entries, so that free needs only the counts;
 * an entry not filled (after a failure) stays NULL. */
typedef struct builder {
    qkv_optim_state *st;
    int n_tensors, n_meta; /* filled so far */
    bool ok;
} builder;

static void add_tensor(builder *b, const char *name, qkv_tensor *t) {
    char *copy = t ? qkv__optim_strdup(name) : NULL;
    if (!copy) {
        qkv__release(t);
        b->ok = false;
        return;
    }
    b->st->tensors.names[b->n_tensors] = copy;
    b->st->tensors.tensors[b->n_tensors++] = t;
}

static void add_meta(builder *b, const char *key, const char *value) {
    char *k = qkv__optim_strdup(key), *v = qkv__optim_strdup(value);
    if (!k || !v) {
        qkv__optim_free_str(k);
        qkv__optim_free_str(v);
        b->ok = false;
        return;
    }
    b->st->meta_keys[b->n_meta] = k;
    b->st->meta_values[b->n_meta++] = v;
}

static void count_entries(const qkv_optimizer *opt, int *n_tensors, int *n_meta) {
    *n_tensors = 0;
    *n_meta = 3 + opt->n_groups * (N_FIELDS + 2);
    for (int g = 0; g < opt->n_groups; g++)
        for (int i = 0; i < opt->groups[g].n; i++) {
            const qkv_param_state *ps = &opt->groups[g].state[i];
            if (ps->step == 0) continue;
            ++*n_tensors;
            for (int s = 0; s < QKV_OPTIM_SLOTS; s++) *n_tensors += ps->slots[s] != NULL;
        }
}

/* The group's parameter names joined by commas, for checking that groups line up. */
static char *joined_names(const qkv_param_group *g) {
    size_t len = 1;
    for (int i = 0; i < g->n; i++) len += strlen(g->names[i]) + 1;
    char *s = qkv__alloc(len);
    if (!s) return NULL;
    s[0] = '\0';
    for (int i = 0; i < g->n; i++) {
        if (i) strcat(s, ",");
        strcat(s, g->names[i]);
    }
    return s;
}

static void export_group(builder *b, const qkv_optimizer_def *def, int gi,
                         const qkv_param_group *g) {
    char key[256], value[64], *names = joined_names(g);
    for (int f = 0; f < N_FIELDS && b->ok; f++) {
        const char *p = (const char *)&g->config + fields[f].offset;
        if (fields[f].is_bool) snprintf(value, sizeof value, "%s", *(bool *)p ? "true" : "false");
        else snprintf(value, sizeof value, "%.17g", *(const double *)p);
        snprintf(key, sizeof key, "optim.group.%d.%s", gi, fields[f].name);
        add_meta(b, key, value);
    }
    snprintf(key, sizeof key, "optim.group.%d.initial_lr", gi);
    snprintf(value, sizeof value, "%.17g", g->initial_lr);
    if (b->ok) add_meta(b, key, value);
    snprintf(key, sizeof key, "optim.group.%d.params", gi);
    if (names && b->ok) add_meta(b, key, names);
    else b->ok = false;
    if (names) qkv__free(names, strlen(names) + 1);
    for (int i = 0; i < g->n && b->ok; i++) {
        const qkv_param_state *ps = &g->state[i];
        if (ps->step == 0) continue;
        size_t len = strlen(STATE_PREFIX) + strlen(g->names[i]) + 32;
        char *name = qkv__alloc(len);
        if (!name) { b->ok = false; break; }
        snprintf(name, len, STATE_PREFIX "%s.step", g->names[i]);
        add_tensor(b, name, qkv__own(qkv_scalar(QKV_I64, (double)ps->step)));
        for (int s = 0; s < QKV_OPTIM_SLOTS && def->slot_names[s]; s++) {
            if (!ps->slots[s]) continue;
            snprintf(name, len, STATE_PREFIX "%s.%s", g->names[i], def->slot_names[s]);
            add_tensor(b, name, qkv__own(qkv_clone(ps->slots[s])));
        }
        qkv__free(name, len);
    }
}

qkv_optim_state *qkv_optimizer_state_export(const qkv_optimizer *opt) {
    if (!opt) return qkv_set_error("qkv_optimizer_state_export: NULL optimizer");
    qkv_optim_state *st = qkv__calloc(sizeof *st);
    if (!st) return NULL;
    count_entries(opt, &st->tensors.n, &st->n_meta);
    size_t nt = (size_t)st->tensors.n, nm = (size_t)st->n_meta;
    st->tensors.names = qkv__calloc((nt ? nt : 1) * sizeof(char *));
    st->tensors.tensors = qkv__calloc((nt ? nt : 1) * sizeof(qkv_tensor *));
    st->meta_keys = qkv__calloc(nm * sizeof(char *));
    st->meta_values = qkv__calloc(nm * sizeof(char *));
    builder b = {.st = st, .ok = st->tensors.names && st->tensors.tensors && st->meta_keys &&
                                  st->meta_values};
    char value[32];
    if (b.ok) add_meta(&b, "optim.type", opt->def.name);
    snprintf(value, sizeof value, "%lld", (long long)opt->steps);
    if (b.ok) add_meta(&b, "optim.steps", value);
    snprintf(value, sizeof value, "%d", opt->n_groups);
    if (b.ok) add_meta(&b, "optim.groups", value);
    for (int g = 0; g < opt->n_groups && b.ok; g++)
        export_group(&b, &opt->def, g, &opt->groups[g]);
    if (!b.ok) {
        qkv_optim_state_free(st);
        return NULL;
    }
    return st;
}

void qkv_optim_state_free(qkv_optim_state *st) {
    if (!st) return;
    size_t nt = (size_t)st->tensors.n, nm = (size_t)st->n_meta;
    for (size_t i = 0; i < nt; i++) {
        if (st->tensors.names) qkv__optim_free_str(st->tensors.names[i]);
        if (st->tensors.tensors) qkv__release(st->tensors.tensors[i]);
    }
    for (size_t i = 0; i < nm; i++) {
        if (st->meta_keys) qkv__optim_free_str(st->meta_keys[i]);
        if (st->meta_values) qkv__optim_free_str(st->meta_values[i]);
    }
    qkv__free(st->tensors.names, (nt ? nt : 1) * sizeof(char *));
    qkv__free(st->tensors.tensors, (nt ? nt : 1) * sizeof(qkv_tensor *));
    qkv__free(st->meta_keys, nm * sizeof(char *));
    qkv__free(st->meta_values, nm * sizeof(char *));
    qkv__free(st, sizeof *st);
}

/* ---- Import ------------------------------------------------------------------------------ */

#define IMPORT "qkv_optimizer_state_import"

static const char *meta(const qkv_optim_state *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (st->meta_keys[i] && !strcmp(st->meta_keys[i], key)) return st->meta_values[i];
    return NULL;
}

/* Reads metadata key as a double (or a bool "true"/"false"); false with an error. */
static bool meta_value(const qkv_optim_state *st, const char *key, bool is_bool, void *out) {
    const char *v = meta(st, key);
    if (!v) return qkv_set_error(IMPORT ": metadata %s is missing", key), false;
    if (is_bool) {
        bool b = !strcmp(v, "true");
        if (!b && strcmp(v, "false"))
            return qkv_set_error(IMPORT ": metadata %s is not a bool: %s", key, v), false;
        *(bool *)out = b;
        return true;
    }
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (end == v || *end || errno)
        return qkv_set_error(IMPORT ": metadata %s is not a number: %s", key, v), false;
    *(double *)out = d;
    return true;
}

/* The groups' configs and initial lrs from the metadata, after checking that the type and the
 * groups (their parameter names, in order) are the optimizer's. */
static bool read_groups(const qkv_optimizer *opt, const qkv_optim_state *st,
                        qkv_optim_config *configs, double *initial_lr, double *steps) {
    const char *type = meta(st, "optim.type");
    if (!type) return qkv_set_error(IMPORT ": no optim.type: not an optimizer state"), false;
    if (strcmp(type, opt->def.name))
        return qkv_set_error(IMPORT ": state of %s, optimizer is %s", type, opt->def.name),
               false;
    double n_groups;
    if (!meta_value(st, "optim.groups", false, &n_groups) ||
        !meta_value(st, "optim.steps", false, steps))
        return false;
    /* range first: casting a double past INT64_MAX (a hostile file's 1e300) is undefined */
    if (!(*steps >= 0 && *steps < 0x1p63 && *steps == (double)(int64_t)*steps))
        return qkv_set_error(IMPORT ": optim.steps is not a step count"), false;
    if (n_groups != opt->n_groups)
        return qkv_set_error(IMPORT ": state has %g groups, optimizer %d", n_groups,
                             opt->n_groups), false;
    char key[256];
    for (int g = 0; g < opt->n_groups; g++) {
        snprintf(key, sizeof key, "optim.group.%d.params", g);
        const char *names = meta(st, key);
        char *ours = joined_names(&opt->groups[g]);
        bool same = names && ours && !strcmp(names, ours);
        if (ours) qkv__free(ours, strlen(ours) + 1);
        if (!same)
            return qkv_set_error(IMPORT ": group %d has other parameters than the state's", g),
                   false;
        configs[g] = opt->groups[g].config;
        for (int f = 0; f < N_FIELDS; f++) {
            snprintf(key, sizeof key, "optim.group.%d.%s", g, fields[f].name);
            if (!meta_value(st, key, fields[f].is_bool,
                            (char *)&configs[g] + fields[f].offset))
                return false;
        }
        snprintf(key, sizeof key, "optim.group.%d.initial_lr", g);
        if (!meta_value(st, key, false, &initial_lr[g]) ||
            !qkv__optim_check_config(IMPORT, type, &configs[g]))
            return false;
    }
    return true;
}

/* Where an "optim.state.<param>.<slot>" entry goes: the flat parameter index (over all groups
 * in order) and the slot (QKV_OPTIM_SLOTS for "step"). False with an error if it fits nowhere. */
static bool locate(const qkv_optimizer *opt, const char *entry, int *flat, int *slot) {
    const char *rest = entry + strlen(STATE_PREFIX), *dot = strrchr(rest, '.');
    if (!dot) return qkv_set_error(IMPORT ": unknown entry %s", entry), false;
    size_t len = (size_t)(dot - rest);
    const char *slot_name = dot + 1;
    *slot = -1;
    if (!strcmp(slot_name, "step")) *slot = QKV_OPTIM_SLOTS;
    for (int s = 0; s < QKV_OPTIM_SLOTS && opt->def.slot_names[s]; s++)
        if (!strcmp(slot_name, opt->def.slot_names[s])) *slot = s;
    int k = 0;
    for (int g = 0; g < opt->n_groups; g++)
        for (int i = 0; i < opt->groups[g].n; i++, k++) {
            const char *name = opt->groups[g].names[i];
            if (strlen(name) != len || strncmp(name, rest, len)) continue;
            if (*slot < 0)
                return qkv_set_error(IMPORT ": unknown entry %s for %s", entry,
                                     opt->def.name), false;
            *flat = k;
            return true;
        }
    return qkv_set_error(IMPORT ": entry %s names no parameter of the optimizer", entry), false;
}

static qkv_tensor *param_at(const qkv_optimizer *opt, int flat, const qkv_param_group **group,
                            int *index) {
    for (int g = 0; g < opt->n_groups; g++) {
        if (flat < opt->groups[g].n) {
            *group = &opt->groups[g];
            *index = flat;
            return opt->groups[g].params[flat];
        }
        flat -= opt->groups[g].n;
    }
    return NULL;
}

/* Checks one entry against its parameter and records it in found (n_params x (slots + 1)). */
static bool check_entry(const qkv_optimizer *opt, const char *name, const qkv_tensor *t,
                        const qkv_tensor **found) {
    int flat, slot, index;
    const qkv_param_group *g;
    if (!locate(opt, name, &flat, &slot)) return false;
    const qkv_tensor *p = param_at(opt, flat, &g, &index);
    const qkv_tensor **cell = &found[flat * (QKV_OPTIM_SLOTS + 1) + slot];
    if (!t) return qkv_set_error(IMPORT ": %s is NULL", name), false;
    if (*cell) return qkv_set_error(IMPORT ": %s appears twice", name), false;
    char a[128], b[128];
    if (slot == QKV_OPTIM_SLOTS) {
        if (t->dtype != QKV_I64 || t->numel != 1 || qkv_item(t) < 1)
            return qkv_set_error(IMPORT ": %s must be one positive i64", name), false;
    } else if (t->ndim != p->ndim ||
               memcmp(t->shape, p->shape, (size_t)p->ndim * sizeof *p->shape)) {
        return qkv_set_error(IMPORT ": %s has shape %s, the parameter %s", name,
                             qkv_shape_str(t, a, sizeof a), qkv_shape_str(p, b, sizeof b)),
               false;
    } else if (!qkv__is_float(t->dtype)) {
        return qkv_set_error(IMPORT ": %s is %s, not a float tensor", name,
                             qkv_dtype_name(t->dtype)), false;
    }
    *cell = t;
    return true;
}

/* Every parameter has either no entry, or a step and exactly the slots its config uses. */
static bool check_complete(const qkv_optimizer *opt, const qkv_optim_config *configs,
                           const qkv_tensor **found) {
    int k = 0;
    for (int g = 0; g < opt->n_groups; g++)
        for (int i = 0; i < opt->groups[g].n; i++, k++) {
            const qkv_tensor **row = &found[k * (QKV_OPTIM_SLOTS + 1)];
            bool any = false;
            for (int s = 0; s <= QKV_OPTIM_SLOTS; s++) any |= row[s] != NULL;
            if (!any) continue;
            const char *missing = row[QKV_OPTIM_SLOTS] ? NULL : "step";
            for (int s = 0; s < QKV_OPTIM_SLOTS && opt->def.slot_names[s]; s++) {
                bool used = qkv__slot_used(opt, &configs[g], s);
                if (used && !row[s]) missing = opt->def.slot_names[s];
                if (!used && row[s])
                    return qkv_set_error(IMPORT ": %s has %s, which its config does not use",
                                         opt->groups[g].names[i],
                                         opt->def.slot_names[s]), false;
            }
            if (missing)
                return qkv_set_error(IMPORT ": %s has state but no %s", opt->groups[g].names[i],
                                     missing), false;
        }
    return true;
}

/* Copies of the found slot tensors in their parameters' dtypes, held outside every scope. */
static bool make_slots(const qkv_optimizer *opt, const qkv_tensor **found, qkv_tensor **made,
                       int n_flat) {
    for (int k = 0; k < n_flat; k++) {
        const qkv_param_group *g;
        int index;
        const qkv_tensor *p = param_at(opt, k, &g, &index);
        for (int s = 0; s < QKV_OPTIM_SLOTS; s++) {
            const qkv_tensor *src = found[k * (QKV_OPTIM_SLOTS + 1) + s];
            if (!src) continue;
            qkv_tensor *t = qkv__held_zeros_like(p);
            made[k * QKV_OPTIM_SLOTS + s] = t;
            if (!t || !qkv_copy_(t, src)) return false;
        }
    }
    return true;
}

static void commit(qkv_optimizer *opt, const qkv_optim_config *configs, const double *initial_lr,
                   double steps, const qkv_tensor **found, qkv_tensor **made) {
    int k = 0;
    for (int g = 0; g < opt->n_groups; g++) {
        qkv_param_group *grp = &opt->groups[g];
        grp->config = configs[g];
        grp->initial_lr = initial_lr[g];
        for (int i = 0; i < grp->n; i++, k++) {
            qkv_param_state *ps = &grp->state[i];
            const qkv_tensor *step = found[k * (QKV_OPTIM_SLOTS + 1) + QKV_OPTIM_SLOTS];
            ps->step = step ? *(const int64_t *)qkv_data(step) : 0;
            for (int s = 0; s < QKV_OPTIM_SLOTS; s++) {
                qkv__release(ps->slots[s]);
                ps->slots[s] = made[k * QKV_OPTIM_SLOTS + s];
            }
        }
    }
    opt->steps = (int64_t)steps;
}

bool qkv_optimizer_state_import(qkv_optimizer *opt, const qkv_optim_state *st) {
    if (!opt || !st)
        return qkv_set_error(IMPORT ": NULL %s", opt ? "state" : "optimizer"), false;
    int n_flat = 0;
    for (int g = 0; g < opt->n_groups; g++) n_flat += opt->groups[g].n;
    size_t ng = (size_t)(opt->n_groups ? opt->n_groups : 1), nf = (size_t)(n_flat ? n_flat : 1);
    size_t found_bytes = nf * (QKV_OPTIM_SLOTS + 1) * sizeof(qkv_tensor *);
    size_t made_bytes = nf * QKV_OPTIM_SLOTS * sizeof(qkv_tensor *);
    qkv_optim_config *configs = qkv__calloc(ng * sizeof *configs);
    double *initial_lr = qkv__calloc(ng * sizeof *initial_lr), steps = 0;
    const qkv_tensor **found = qkv__calloc(found_bytes);
    qkv_tensor **made = qkv__calloc(made_bytes);
    bool ok = configs && initial_lr && found && made &&
              read_groups(opt, st, configs, initial_lr, &steps);
    for (int i = 0; ok && i < st->tensors.n; i++) {
        const char *name = st->tensors.names[i];
        if (!name || strncmp(name, "optim.", 6)) continue;
        if (strncmp(name, STATE_PREFIX, strlen(STATE_PREFIX)))
            ok = qkv_set_error(IMPORT ": unknown entry %s", name) != NULL;
        else
            ok = check_entry(opt, name, st->tensors.tensors[i], found);
    }
    ok = ok && check_complete(opt, configs, found) && make_slots(opt, found, made, n_flat);
    if (ok) commit(opt, configs, initial_lr, steps, found, made);
    else if (made)
        for (size_t i = 0; i < nf * QKV_OPTIM_SLOTS; i++) qkv__release(made[i]);
    qkv__free(configs, ng * sizeof *configs);
    qkv__free(initial_lr, ng * sizeof *initial_lr);
    qkv__free(found, found_bytes);
    qkv__free(made, made_bytes);
    return ok;
}
