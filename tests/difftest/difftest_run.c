/*
 * difftest_run: the qkv half of the differential tester against PyTorch (difftest.py).
 *
 * Reads graphs in the text format of tests/difftest/README.md on stdin, builds each one with
 * the public API only, runs its forward and backward, and prints the output and every leaf's
 * gradient in hex floats (%a, exact), or the error that made qkv refuse it. Each graph lives
 * in a scope of its own and the error is cleared after it, so one refused graph cannot leak
 * into the next. Output is flushed after every graph: when a graph crashes the process, the
 * driver knows which one it was from the last "end" line it read.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

#define MAX_VALUES 256
#define MAX_ARGS 64

/* ---- Tokens ------------------------------------------------------------------------------ */

typedef struct reader {
    char *buf;
    char *pos;
} reader;

static char *read_all(FILE *f) {
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger) free(buf);
            buf = bigger;
            cap *= 2;
        }
    }
    if (buf) buf[len] = '\0';
    return buf;
}

/* The next whitespace-separated token, or NULL at the end of the input. */
static char *next_token(reader *r) {
    char *p = r->pos;
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
    if (!*p) return r->pos = p, NULL;
    char *start = p;
    while (*p && *p != ' ' && *p != '\n' && *p != '\t' && *p != '\r') p++;
    if (*p) *p++ = '\0';
    r->pos = p;
    return start;
}

/* A malformed spec is the driver's bug, not qkv's: stop loudly rather than guess. */
static _Noreturn void bad_spec(const char *what) {
    fprintf(stderr, "difftest_run: malformed spec: %s\n", what);
    exit(2);
}

static long long tok_int(reader *r) {
    char *t = next_token(r), *end;
    if (!t) bad_spec("expected an integer, got the end");
    long long v = strtoll(t, &end, 10);
    if (*end) bad_spec(t);
    return v;
}

static double tok_double(reader *r) {
    char *t = next_token(r), *end;
    if (!t) bad_spec("expected a number, got the end");
    double v = strtod(t, &end);
    if (*end) bad_spec(t);
    return v;
}

static const char *tok_word(reader *r) {
    char *t = next_token(r);
    if (!t) bad_spec("expected a word, got the end");
    return t;
}

static qkv_dtype tok_dtype(reader *r) {
    const char *t = tok_word(r);
    for (int d = QKV_F32; d <= QKV_BF16; d++)
        if (!strcmp(t, qkv_dtype_name((qkv_dtype)d))) return (qkv_dtype)d;
    bad_spec(t);
}

static int tok_shape(reader *r, int64_t *shape) {
    long long ndim = tok_int(r);
    if (ndim < 0 || ndim > QKV_MAX_DIMS) bad_spec("ndim");
    for (int i = 0; i < ndim; i++) shape[i] = tok_int(r);
    return (int)ndim;
}

/* ---- Printing ---------------------------------------------------------------------------- */

/* "<dtype> <ndim> <shape...> <numel> <values...>", values converted to double and printed
 * exactly. */
static void print_tensor(const qkv_tensor *t) {
    printf("%s %d", qkv_dtype_name(t->dtype), t->ndim);
    for (int i = 0; i < t->ndim; i++) printf(" %lld", (long long)t->shape[i]);
    printf(" %lld", (long long)t->numel);
    double *v = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *v);
    if (!v || !qkv_copy_out(t, QKV_F64, v)) {
        printf(" copy_out_failed\n");
        free(v);
        return;
    }
    for (int64_t i = 0; i < t->numel; i++) printf(" %a", v[i]);
    printf("\n");
    free(v);
}

/* Errors are one line of words; a newline inside one would break the format. */
static void print_refusal(const char *stage) {
    const char *e = qkv_error();
    printf("%s ", stage);
    for (const char *p = e ? e : "(no error recorded)"; *p; p++)
        putchar(*p == '\n' ? ' ' : *p);
    printf("\n");
}

/* ---- Leaves ------------------------------------------------------------------------------ */

static qkv_tensor *from_values(qkv_dtype dtype, int ndim, const int64_t *shape, int64_t numel,
                               const double *v) {
    size_t n = (size_t)(numel ? numel : 1);
    void *data = malloc(n * qkv_dtype_size(dtype));
    if (!data) return NULL;
    for (int64_t i = 0; i < numel; i++) {
        switch (dtype) {
        case QKV_F32: ((float *)data)[i] = (float)v[i]; break;
        case QKV_F64: ((double *)data)[i] = v[i]; break;
        case QKV_I64: ((int64_t *)data)[i] = (int64_t)v[i]; break;
        case QKV_BOOL: ((bool *)data)[i] = v[i] != 0; break;
        case QKV_BF16: ((uint16_t *)data)[i] = qkv_f32_to_bf16((float)v[i]); break;
        }
    }
    qkv_tensor *t = qkv_from_array(dtype, ndim, shape, data);
    free(data);
    return t;
}

/* One view step of a leaf: T transpose, N narrow, S slice, E expand, P permute, R reshape. */
static qkv_tensor *apply_view(reader *r, qkv_tensor *t) {
    const char *kind = tok_word(r);
    int64_t shape[QKV_MAX_DIMS];
    if (!strcmp(kind, "T")) {
        int a = (int)tok_int(r), b = (int)tok_int(r);
        return qkv_transpose(t, a, b);
    }
    if (!strcmp(kind, "N")) {
        int axis = (int)tok_int(r);
        int64_t start = tok_int(r), len = tok_int(r);
        return qkv_narrow(t, axis, start, len);
    }
    if (!strcmp(kind, "S")) {
        int axis = (int)tok_int(r);
        int64_t start = tok_int(r), end = tok_int(r), step = tok_int(r);
        return qkv_slice(t, axis, start, end, step);
    }
    if (!strcmp(kind, "E")) {
        int n = tok_shape(r, shape);
        return qkv_expand(t, n, shape);
    }
    if (!strcmp(kind, "P")) {
        int n = tok_shape(r, shape), axes[QKV_MAX_DIMS];
        for (int i = 0; i < n; i++) axes[i] = (int)shape[i];
        return qkv_permute(t, axes);
    }
    if (!strcmp(kind, "R")) {
        int n = tok_shape(r, shape);
        return qkv_reshape(t, n, shape);
    }
    bad_spec(kind);
}

/* leaf <dtype> <shape> <numel> <values> <requires_grad> <grad_on_view> <nviews> <views>.
 * With grad_on_view the views are made without recording and the last one is the leaf that
 * requires grad (a non-contiguous leaf); otherwise the base requires grad and the views are
 * recorded ops. *grad_of receives the tensor whose gradient is reported. */
static qkv_tensor *make_leaf(reader *r, qkv_tensor **grad_of) {
    qkv_dtype dtype = tok_dtype(r);
    int64_t shape[QKV_MAX_DIMS];
    int ndim = tok_shape(r, shape);
    long long numel = tok_int(r);
    if (numel < 0) bad_spec("numel");
    double *v = malloc((size_t)(numel ? numel : 1) * sizeof *v);
    if (!v) bad_spec("out of memory");
    for (long long i = 0; i < numel; i++) v[i] = tok_double(r);
    bool rg = tok_int(r), on_view = tok_int(r);
    long long nviews = tok_int(r);
    qkv_tensor *t = from_values(dtype, ndim, shape, numel, v);
    free(v);
    if (rg && !on_view) qkv_requires_grad_(t, true);
    *grad_of = rg && !on_view ? t : NULL;
    if (on_view) qkv_no_grad_begin();
    for (long long i = 0; i < nviews; i++) t = apply_view(r, t);
    if (on_view) qkv_no_grad_end();
    if (rg && on_view) *grad_of = qkv_requires_grad_(t, true);
    return t;
}

/* ---- Ops --------------------------------------------------------------------------------- */

typedef struct op_args {
    const char *name;
    int nin;
    qkv_tensor *in[MAX_ARGS];
    int nint;
    long long i[MAX_ARGS];
    int nfloat;
    double f[MAX_ARGS];
} op_args;

typedef qkv_tensor *(*unary_fn)(const qkv_tensor *);
typedef qkv_tensor *(*binary_fn)(const qkv_tensor *, const qkv_tensor *);
typedef qkv_tensor *(*scalar_fn)(const qkv_tensor *, double);
typedef qkv_tensor *(*axis_fn)(const qkv_tensor *, int, bool);
typedef qkv_tensor *(*axes_fn)(const qkv_tensor *, int, const int *, bool);

static qkv_tensor *rsub_scalar(const qkv_tensor *a, double s) { return qkv_rsub_scalar(s, a); }
static qkv_tensor *rdiv_scalar(const qkv_tensor *a, double s) { return qkv_rdiv_scalar(s, a); }

static const struct { const char *name; unary_fn fn; } unary_ops[] = {
    {"neg", qkv_neg}, {"exp", qkv_exp}, {"log", qkv_log}, {"sqrt", qkv_sqrt},
    {"rsqrt", qkv_rsqrt}, {"abs", qkv_abs}, {"tanh", qkv_tanh}, {"sigmoid", qkv_sigmoid},
    {"relu", qkv_relu}, {"sum_all", qkv_sum_all}, {"mean_all", qkv_mean_all},
    {"max_all", qkv_max_all}, {"min_all", qkv_min_all}, {"squeeze_all", qkv_squeeze_all},
    {"contiguous", qkv_contiguous}, {"clone", qkv_clone},
    {"silu", qkv_silu}, {"sin", qkv_sin}, {"cos", qkv_cos}, {"erf", qkv_erf},
    {"log1p", qkv_log1p}, {"expm1", qkv_expm1}, {"square", qkv_square}, {"floor", qkv_floor},
    {"ceil", qkv_ceil}, {"round", qkv_round}, {"sign", qkv_sign},
};

static const struct { const char *name; binary_fn fn; } binary_ops[] = {
    {"add", qkv_add}, {"sub", qkv_sub}, {"mul", qkv_mul}, {"div", qkv_div}, {"pow", qkv_pow},
    {"maximum", qkv_maximum}, {"minimum", qkv_minimum}, {"eq", qkv_eq}, {"ne", qkv_ne},
    {"lt", qkv_lt}, {"le", qkv_le}, {"gt", qkv_gt}, {"ge", qkv_ge}, {"matmul", qkv_matmul},
    {"silu_mul", qkv_silu_mul},
};

static const struct { const char *name; scalar_fn fn; } scalar_ops[] = {
    {"add_scalar", qkv_add_scalar}, {"sub_scalar", qkv_sub_scalar},
    {"rsub_scalar", rsub_scalar}, {"mul_scalar", qkv_mul_scalar},
    {"div_scalar", qkv_div_scalar}, {"rdiv_scalar", rdiv_scalar},
    {"pow_scalar", qkv_pow_scalar}, {"maximum_scalar", qkv_maximum_scalar},
    {"minimum_scalar", qkv_minimum_scalar}, {"eq_scalar", qkv_eq_scalar},
    {"ne_scalar", qkv_ne_scalar}, {"lt_scalar", qkv_lt_scalar}, {"le_scalar", qkv_le_scalar},
    {"gt_scalar", qkv_gt_scalar}, {"ge_scalar", qkv_ge_scalar},
};

static const struct { const char *name; axis_fn fn; } axis_ops[] = {
    {"sum", qkv_sum}, {"mean", qkv_mean}, {"max", qkv_max}, {"min", qkv_min},
    {"argmax", qkv_argmax}, {"argmin", qkv_argmin},
};

static const struct { const char *name; axes_fn fn; } axes_ops[] = {
    {"sum_axes", qkv_sum_axes}, {"mean_axes", qkv_mean_axes}, {"max_axes", qkv_max_axes},
    {"min_axes", qkv_min_axes},
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* Tries the ops that fit one of the tables; *found says whether one did. */
static qkv_tensor *table_op(const op_args *o, bool *found) {
    *found = true;
    for (size_t k = 0; k < COUNT(unary_ops); k++)
        if (!strcmp(o->name, unary_ops[k].name)) return unary_ops[k].fn(o->in[0]);
    for (size_t k = 0; k < COUNT(binary_ops); k++)
        if (!strcmp(o->name, binary_ops[k].name)) return binary_ops[k].fn(o->in[0], o->in[1]);
    for (size_t k = 0; k < COUNT(scalar_ops); k++)
        if (!strcmp(o->name, scalar_ops[k].name)) return scalar_ops[k].fn(o->in[0], o->f[0]);
    for (size_t k = 0; k < COUNT(axis_ops); k++)
        if (!strcmp(o->name, axis_ops[k].name))
            return axis_ops[k].fn(o->in[0], (int)o->i[0], o->i[1]);
    for (size_t k = 0; k < COUNT(axes_ops); k++) {
        if (strcmp(o->name, axes_ops[k].name)) continue;
        int axes[MAX_ARGS];
        for (int j = 1; j < o->nint; j++) axes[j - 1] = (int)o->i[j];
        return axes_ops[k].fn(o->in[0], o->nint - 1, axes, o->i[0]);
    }
    *found = false;
    return NULL;
}

static qkv_tensor *shape_op(const op_args *o, bool *found) {
    int64_t shape[MAX_ARGS];
    int axes[MAX_ARGS];
    for (int j = 0; j < o->nint; j++) shape[j] = o->i[j], axes[j] = (int)o->i[j];
    const qkv_tensor *a = o->in[0];
    *found = true;
    if (!strcmp(o->name, "reshape")) return qkv_reshape(a, o->nint, shape);
    if (!strcmp(o->name, "expand")) return qkv_expand(a, o->nint, shape);
    if (!strcmp(o->name, "permute")) return qkv_permute(a, axes);
    if (!strcmp(o->name, "flatten")) return qkv_flatten(a, axes[0], axes[1]);
    if (!strcmp(o->name, "transpose")) return qkv_transpose(a, axes[0], axes[1]);
    if (!strcmp(o->name, "slice")) return qkv_slice(a, axes[0], shape[1], shape[2], shape[3]);
    if (!strcmp(o->name, "narrow")) return qkv_narrow(a, axes[0], shape[1], shape[2]);
    if (!strcmp(o->name, "select")) return qkv_select(a, axes[0], shape[1]);
    if (!strcmp(o->name, "squeeze")) return qkv_squeeze(a, axes[0]);
    if (!strcmp(o->name, "unsqueeze")) return qkv_unsqueeze(a, axes[0]);
    if (!strcmp(o->name, "softmax")) return qkv_softmax(a, axes[0]);
    if (!strcmp(o->name, "log_softmax")) return qkv_log_softmax(a, axes[0]);
    if (!strcmp(o->name, "to_dtype")) return qkv_to_dtype(a, (qkv_dtype)axes[0]);
    if (!strcmp(o->name, "gelu")) return qkv_gelu(a, axes[0]);
    if (!strcmp(o->name, "var")) return qkv_var(a, axes[0], o->f[0], axes[1]);
    if (!strcmp(o->name, "var_axes")) return qkv_var_axes(a, o->nint - 1, axes + 1, o->f[0],
                                                          axes[0]);
    *found = false;
    return NULL;
}

static qkv_tensor *other_op(const op_args *o, bool *found) {
    qkv_tensor *const *in = o->in;
    *found = true;
    if (!strcmp(o->name, "where")) return qkv_where(in[0], in[1], in[2]);
    if (!strcmp(o->name, "softplus")) return qkv_softplus(in[0], o->f[0], o->f[1]);
    if (!strcmp(o->name, "leaky_relu")) return qkv_leaky_relu(in[0], o->f[0]);
    if (!strcmp(o->name, "elu")) return qkv_elu(in[0], o->f[0]);
    if (!strcmp(o->name, "clamp")) return qkv_clamp(in[0], o->f[0], o->f[1]);
    if (!strcmp(o->name, "masked_fill")) return qkv_masked_fill(in[0], in[1], o->f[0]);
    if (!strcmp(o->name, "affine")) return qkv_affine(in[0], in[1], o->nin > 2 ? in[2] : NULL);
    if (!strcmp(o->name, "matmul_tri")) return qkv_matmul_tri(in[0], in[1], (qkv_tri)o->i[0]);
    if (!strcmp(o->name, "causal_softmax")) return qkv_causal_softmax(in[0], o->i[0]);
    if (!strcmp(o->name, "baddbmm"))
        return qkv_baddbmm(o->nin > 2 ? in[2] : NULL, in[0], in[1], o->f[0]);
    if (!strcmp(o->name, "index_select")) return qkv_index_select(in[0], (int)o->i[0], in[1]);
    if (!strcmp(o->name, "gather")) return qkv_gather(in[0], (int)o->i[0], in[1]);
    if (!strcmp(o->name, "concat")) return qkv_concat(o->nin, in, (int)o->i[0]);
    if (!strcmp(o->name, "stack")) return qkv_stack(o->nin, in, (int)o->i[0]);
    if (!strcmp(o->name, "cross_entropy"))
        return qkv_cross_entropy(in[0], in[1], (qkv_reduction)o->i[0], o->i[1], o->f[0]);
    if (!strcmp(o->name, "nll_loss"))
        return qkv_nll_loss(in[0], in[1], (qkv_reduction)o->i[0], o->i[1]);
    if (!strcmp(o->name, "mse_loss")) return qkv_mse_loss(in[0], in[1], (qkv_reduction)o->i[0]);
    if (!strcmp(o->name, "bce_with_logits"))
        return qkv_binary_cross_entropy_with_logits(in[0], in[1], (qkv_reduction)o->i[0]);
    *found = false;
    return NULL;
}

/* op <name> <nin> <value indices> <nint> <ints> <nfloat> <floats> */
static qkv_tensor *run_op(reader *r, qkv_tensor **values, int nvalues) {
    op_args o;
    o.name = tok_word(r);
    o.nin = (int)tok_int(r);
    if (o.nin < 0 || o.nin > MAX_ARGS) bad_spec("nin");
    for (int j = 0; j < o.nin; j++) {
        long long k = tok_int(r);
        if (k < 0 || k >= nvalues) bad_spec("value index");
        o.in[j] = values[k];
    }
    o.nint = (int)tok_int(r);
    if (o.nint < 0 || o.nint > MAX_ARGS) bad_spec("nint");
    for (int j = 0; j < o.nint; j++) o.i[j] = tok_int(r);
    o.nfloat = (int)tok_int(r);
    if (o.nfloat < 0 || o.nfloat > MAX_ARGS) bad_spec("nfloat");
    for (int j = 0; j < o.nfloat; j++) o.f[j] = tok_double(r);
    bool found;
    qkv_tensor *out = table_op(&o, &found);
    if (!found) out = shape_op(&o, &found);
    if (!found) out = other_op(&o, &found);
    if (!found) bad_spec(o.name);
    return out;
}

/* ---- Graphs ------------------------------------------------------------------------------ */

typedef struct graph {
    qkv_tensor *values[MAX_VALUES];
    int nvalues;
    qkv_tensor *grad_of[MAX_VALUES]; /* per value: the leaf whose gradient is reported */
    bool is_leaf[MAX_VALUES];
} graph;

/* out <index> <backward passes> <nseed> <seed values>: backward passes 0 to 2, all but the
 * last with retain_graph. */
static void finish(reader *r, graph *g) {
    long long k = tok_int(r), passes = tok_int(r), nseed = tok_int(r);
    if (k < 0 || k >= g->nvalues || nseed < 0) bad_spec("out");
    double *seed = malloc((size_t)(nseed ? nseed : 1) * sizeof *seed);
    if (!seed) bad_spec("out of memory");
    for (long long i = 0; i < nseed; i++) seed[i] = tok_double(r);
    qkv_tensor *out = g->values[k];
    if (!out || qkv_error()) {
        print_refusal("fwd_refused");
    } else {
        printf("out ");
        print_tensor(out);
        if (!out->requires_grad) {
            printf("nograd\n");
        } else if (nseed != out->numel) {
            printf("seed_mismatch\n");
        } else {
            qkv_tensor *s = from_values(out->dtype, out->ndim, out->shape, nseed, seed);
            bool ok = s != NULL;
            for (long long p = 0; p < passes && ok; p++)
                ok = qkv_backward_with(out, s, p + 1 < passes);
            if (!ok || qkv_error()) print_refusal("bwd_refused");
            for (int j = 0; j < g->nvalues && ok && !qkv_error(); j++) {
                if (!g->is_leaf[j] || !g->grad_of[j]) continue;
                printf("grad %d ", j);
                if (g->grad_of[j]->grad) print_tensor(g->grad_of[j]->grad);
                else printf("none\n");
            }
        }
    }
    free(seed);
}

/* graph <id> <inner scope>: leaves, then ops, then out, then "end". With inner scope the
 * ops run in a scope of their own and only the output is kept out of it. */
static void run_graph(reader *r) {
    const char *id = tok_word(r);
    bool inner = tok_int(r);
    printf("graph %s\n", id);
    static graph g;
    memset(&g, 0, sizeof g);
    qkv_scope_begin();
    bool in_inner = false;
    for (;;) {
        const char *kw = tok_word(r);
        if (g.nvalues >= MAX_VALUES && strcmp(kw, "out") && strcmp(kw, "end"))
            bad_spec("too many values");
        if (!strcmp(kw, "leaf")) {
            g.is_leaf[g.nvalues] = true;
            g.values[g.nvalues] = make_leaf(r, &g.grad_of[g.nvalues]);
            g.nvalues++;
        } else if (!strcmp(kw, "op")) {
            if (inner && !in_inner) qkv_scope_begin(), in_inner = true;
            g.values[g.nvalues] = run_op(r, g.values, g.nvalues);
            g.nvalues++;
        } else if (!strcmp(kw, "out")) {
            if (in_inner) {
                /* The output is the last value; keep it past the inner scope. */
                qkv_tensor *last = g.values[g.nvalues - 1];
                qkv_scope_end_keep(last);
                for (int j = 0; j < g.nvalues - 1; j++)
                    if (!g.is_leaf[j]) g.values[j] = NULL;
                in_inner = false;
            }
            finish(r, &g);
        } else if (!strcmp(kw, "end")) {
            break;
        } else {
            bad_spec(kw);
        }
    }
    qkv_scope_end();
    qkv_clear_error();
    printf("end %s\n", id);
    fflush(stdout);
}

int main(void) {
    reader r;
    r.buf = r.pos = read_all(stdin);
    if (!r.buf) bad_spec("cannot read stdin");
    const char *kw;
    while ((kw = next_token(&r)) != NULL) {
        if (strcmp(kw, "graph")) bad_spec(kw);
        run_graph(&r);
    }
    free(r.buf);
    return 0;
}
