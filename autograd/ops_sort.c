/*
 * Ops along an axis and contractions: cumsum, sort, argsort, topk, multinomial, tril, triu,
 * outer and einsum. Only cumsum has a backward of its own. sort and topk find indices with a
 * kernel and take their values with gather, whose backward scatters the gradient back; tril
 * and triu are a where with a triangular mask; outer and einsum are products, sums and views
 * of existing ops. All of them thereby get their gradients from ops already checked.
 */
#include <string.h>

#include "autograd/autograd_internal.h"

/* The size of a's axis (already normalised), 1 for a 0-d tensor as torch counts it. */
static int64_t axis_size(const qkv_tensor *a, int axis) {
    return a->ndim ? a->shape[axis] : 1;
}

/* ---- cumsum ------------------------------------------------------------------------------ */

typedef struct axis_args {
    int axis;
} axis_args;

/* d cumsum(x)_j = sum of g_i over i >= j: g's cumulative sum from the end */
static void cumsum_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    int axis = ((const axis_args *)qkv_ctx_args(ctx))->axis;
    gi[0] = qkv__cumsum(g, axis, true, "qkv_cumsum backward");
}
static const qkv_function cumsum_fn = {.name = "cumsum", .backward = cumsum_backward,
                                       .args_size = sizeof(axis_args)};

qkv_tensor *qkv_cumsum(const qkv_tensor *a, int axis) {
    if (QKV__NULL_ARGS("qkv_cumsum", a)) return NULL;
    int ax = qkv__norm_axis("qkv_cumsum", a, axis);
    if (ax < 0) return NULL;
    qkv_ctx *ctx = qkv_function_begin(&cumsum_fn, 1, QKV_INPUTS(a), &(axis_args){ax});
    return qkv_function_end(ctx, qkv__cumsum(a, ax, false, "qkv_cumsum"));
}

/* ---- sort, argsort, topk ----------------------------------------------------------------- */

/* The values at the first k sorted positions along axis, and those positions. */
static qkv_tensor *sorted(const qkv_tensor *a, int axis, bool descending, int64_t k,
                          qkv_tensor **indices, const char *name) {
    qkv_tensor *idx = qkv__sort_indices(a, axis, descending, k, name);
    qkv_tensor *values = qkv_gather(a, axis, idx);
    if (values && indices) *indices = idx;
    return values;
}

qkv_tensor *qkv_sort(const qkv_tensor *a, int axis, bool descending, qkv_tensor **indices) {
    if (indices) *indices = NULL;
    if (QKV__NULL_ARGS("qkv_sort", a)) return NULL;
    int ax = qkv__norm_axis("qkv_sort", a, axis);
    if (ax < 0) return NULL;
    return sorted(a, ax, descending, axis_size(a, ax), indices, "qkv_sort");
}

qkv_tensor *qkv_argsort(const qkv_tensor *a, int axis, bool descending) {
    if (QKV__NULL_ARGS("qkv_argsort", a)) return NULL;
    int ax = qkv__norm_axis("qkv_argsort", a, axis);
    if (ax < 0) return NULL;
    return qkv__sort_indices(a, ax, descending, axis_size(a, ax), "qkv_argsort");
}

qkv_tensor *qkv_topk(const qkv_tensor *a, int64_t k, int axis, bool largest,
                     qkv_tensor **indices) {
    if (indices) *indices = NULL;
    if (QKV__NULL_ARGS("qkv_topk", a)) return NULL;
    int ax = qkv__norm_axis("qkv_topk", a, axis);
    if (ax < 0) return NULL;
    if (k < 0 || k > axis_size(a, ax)) {
        char s[128];
        return qkv_set_error("qkv_topk: k %lld is out of range for axis %d of %s (size %lld)",
                             (long long)k, axis, qkv_shape_str(a, s, sizeof s),
                             (long long)axis_size(a, ax));
    }
    return sorted(a, ax, largest, k, indices, "qkv_topk");
}

/* ---- multinomial ------------------------------------------------------------------------- */

qkv_tensor *qkv_multinomial(const qkv_tensor *probs, int64_t n_samples, bool replacement,
                            qkv_generator *g) {
    return qkv__multinomial(probs, n_samples, replacement, g, "qkv_multinomial");
}

/* ---- tril, triu, outer ------------------------------------------------------------------- */

static qkv_tensor *triangle(const qkv_tensor *a, int64_t diagonal, bool upper,
                            const char *name) {
    if (QKV__NULL_ARGS(name, a)) return NULL;
    if (a->ndim < 2) {
        char s[128];
        return qkv_set_error("%s: input must have at least 2 dimensions, not %s", name,
                             qkv_shape_str(a, s, sizeof s));
    }
    qkv_tensor *mask = qkv__tri_mask(a->shape[a->ndim - 2], a->shape[a->ndim - 1], diagonal,
                                     upper);
    return qkv_where(mask, a, qkv_zeros(a->dtype, 0, NULL));
}

qkv_tensor *qkv_tril(const qkv_tensor *a, int64_t diagonal) {
    return triangle(a, diagonal, false, "qkv_tril");
}
qkv_tensor *qkv_triu(const qkv_tensor *a, int64_t diagonal) {
    return triangle(a, diagonal, true, "qkv_triu");
}

qkv_tensor *qkv_outer(const qkv_tensor *a, const qkv_tensor *b) {
    if (QKV__NULL_ARGS("qkv_outer", a, b)) return NULL;
    if (a->ndim != 1 || b->ndim != 1) {
        char sa[128], sb[128];
        return qkv_set_error("qkv_outer: a and b must be 1-D, not %s and %s",
                             qkv_shape_str(a, sa, sizeof sa), qkv_shape_str(b, sb, sizeof sb));
    }
    return qkv_mul(qkv_unsqueeze(a, 1), qkv_unsqueeze(b, 0));
}

/* ---- einsum ------------------------------------------------------------------------------ */
/* Operands are contracted left to right, two at a time. Each pair is brought to one batched
 * matrix product: letters both operands share and a later operand or the output still needs
 * are batch dimensions, the other shared letters are summed by the product, and each side's
 * own letters are its rows or columns. A letter no one else needs is summed out first. */

#define EINSUM_MAX_OPERANDS 16

/* The subscripts of one operand or of a partial result: a NUL-terminated string of letters,
 * one per dimension. */
typedef struct term {
    char s[QKV_MAX_DIMS + 1];
} term;

typedef struct einsum_spec {
    const char *text;
    int n;
    term in[EINSUM_MAX_OPERANDS];
    term out;
} einsum_spec;

static bool is_letter(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool has(const char *s, char c) {
    return c && strchr(s, c) != NULL;
}

/* Reads letters into t up to a stop character; false with an error on anything else. */
static bool read_term(const einsum_spec *sp, const char **p, const char *stops, term *t,
                      const char *what) {
    int len = 0;
    for (; **p && !strchr(stops, **p); (*p)++) {
        char c = **p;
        if (c == ' ') continue;
        if (c == '.')
            return qkv_set_error("qkv_einsum: ellipsis ('...') is not supported: \"%s\"",
                                 sp->text), false;
        if (!is_letter(c))
            return qkv_set_error("qkv_einsum: bad character '%c' in \"%s\"", c, sp->text),
                   false;
        if (len == QKV_MAX_DIMS)
            return qkv_set_error("qkv_einsum: %s has more than %d subscripts in \"%s\"", what,
                                 QKV_MAX_DIMS, sp->text), false;
        if (memchr(t->s, c, (size_t)len))
            return qkv_set_error("qkv_einsum: subscript '%c' repeats in %s of \"%s\": "
                                 "diagonals are not supported", c, what, sp->text), false;
        t->s[len++] = c;
    }
    t->s[len] = '\0';
    return true;
}

/* torch's implicit output: the letters used once, in alphabetical (ASCII) order. */
static bool implicit_output(einsum_spec *sp) {
    int len = 0;
    for (int c = 'A'; c <= 'z'; c++) {
        int uses = 0;
        for (int k = 0; k < sp->n; k++) uses += has(sp->in[k].s, (char)c);
        if (uses != 1) continue;
        if (len == QKV_MAX_DIMS)
            return qkv_set_error("qkv_einsum: the output of \"%s\" would have more than %d "
                                 "dimensions", sp->text, QKV_MAX_DIMS), false;
        sp->out.s[len++] = (char)c;
    }
    sp->out.s[len] = '\0';
    return true;
}

static bool parse(einsum_spec *sp, int n_given) {
    const char *p = sp->text;
    char what[32];
    for (sp->n = 0;; p++) {
        if (sp->n == EINSUM_MAX_OPERANDS)
            return qkv_set_error("qkv_einsum: more than %d operands in \"%s\"",
                                 EINSUM_MAX_OPERANDS, sp->text), false;
        snprintf(what, sizeof what, "operand %d", sp->n);
        if (!read_term(sp, &p, ",-", &sp->in[sp->n++], what)) return false;
        if (*p != ',') break;
    }
    if (sp->n != n_given)
        return qkv_set_error("qkv_einsum: \"%s\" names %d operands but %d were given",
                             sp->text, sp->n, n_given), false;
    if (!*p) return implicit_output(sp);
    if (p[1] != '>')
        return qkv_set_error("qkv_einsum: bad character '-' in \"%s\"", sp->text), false;
    p += 2;
    if (!read_term(sp, &p, "", &sp->out, "the output")) return false;
    for (const char *c = sp->out.s; *c; c++) {
        bool found = false;
        for (int k = 0; k < sp->n && !found; k++) found = has(sp->in[k].s, *c);
        if (!found)
            return qkv_set_error("qkv_einsum: output subscript '%c' is in no operand of "
                                 "\"%s\"", *c, sp->text), false;
    }
    return true;
}

/* Checks each operand's dimensions against its subscripts, and that a letter's sizes agree
 * (or are 1, which broadcasts, as in torch). */
static bool check_sizes(const einsum_spec *sp, qkv_tensor *const *ops) {
    int64_t size[128];
    int at[128]; /* the operand that gave the size; -1: the letter is not seen yet */
    memset(at, -1, sizeof at);
    char s[128];
    for (int k = 0; k < sp->n; k++) {
        const qkv_tensor *t = ops[k];
        if ((size_t)t->ndim != strlen(sp->in[k].s))
            return qkv_set_error("qkv_einsum: operand %d is %s but its subscripts \"%s\" name "
                                 "%d dimensions", k, qkv_shape_str(t, s, sizeof s),
                                 sp->in[k].s, (int)strlen(sp->in[k].s)), false;
        for (int i = 0; i < t->ndim; i++) {
            int c = sp->in[k].s[i];
            int64_t d = t->shape[i];
            if (at[c] < 0 || (size[c] == 1 && d != 1)) {
                size[c] = d;
                at[c] = k;
            } else if (d != 1 && d != size[c]) {
                return qkv_set_error("qkv_einsum: subscript '%c' has size %lld in operand %d "
                                     "but %lld in operand %d", c, (long long)size[c], at[c],
                                     (long long)d, k), false;
            }
        }
    }
    return true;
}

/* Letters of several terms side by side (repeats allowed: only membership is asked). */
typedef struct letters {
    char s[EINSUM_MAX_OPERANDS * QKV_MAX_DIMS + QKV_MAX_DIMS + 1];
} letters;

/* t summed over its letters (in *tt) that keep lacks; *tt loses them. */
static qkv_tensor *sum_out(qkv_tensor *t, term *tt, const char *keep) {
    int axes[QKV_MAX_DIMS], n = 0, len = 0;
    term kept;
    for (int i = 0; tt->s[i]; i++) {
        if (has(keep, tt->s[i])) kept.s[len++] = tt->s[i];
        else axes[n++] = i;
    }
    kept.s[len] = '\0';
    *tt = kept;
    return n ? qkv_sum_axes(t, n, axes, false) : t;
}

/* t (letters tt) with its dimensions in the order of the letters of order; *tt follows. */
static qkv_tensor *arrange(qkv_tensor *t, term *tt, const char *order) {
    int axes[QKV_MAX_DIMS], n = (int)strlen(order);
    bool identity = true;
    for (int i = 0; i < n; i++) {
        axes[i] = (int)(strchr(tt->s, order[i]) - tt->s);
        identity = identity && axes[i] == i;
    }
    strcpy(tt->s, order);
    return identity ? t : qkv_permute(t, axes);
}

/* t with each letter it shares with other (size 1 on its side) broadcast to other's size. */
static qkv_tensor *broadcast_shared(qkv_tensor *t, const term *tt, const qkv_tensor *other,
                                    const term *to) {
    if (!t || !other) return NULL;
    int64_t shape[QKV_MAX_DIMS];
    bool same = true;
    for (int i = 0; i < t->ndim; i++) {
        const char *at = strchr(to->s, tt->s[i]);
        int64_t d = at ? other->shape[at - to->s] : 1;
        shape[i] = t->shape[i] == 1 && at ? d : t->shape[i];
        same = same && shape[i] == t->shape[i];
    }
    return same ? t : qkv_expand(t, t->ndim, shape);
}

static int64_t product(const int64_t *shape, int from, int to) {
    int64_t p = 1;
    for (int i = from; i < to; i++) p *= shape[i];
    return p;
}

/* t's first nb dims kept, the next two runs of n1 and n2 dims each folded into one. */
static qkv_tensor *fold(qkv_tensor *t, int nb, int n1, int n2) {
    if (!t) return NULL;
    int64_t shape[QKV_MAX_DIMS];
    memcpy(shape, t->shape, (size_t)nb * sizeof *shape);
    shape[nb] = product(t->shape, nb, nb + n1);
    shape[nb + 1] = product(t->shape, nb + n1, nb + n1 + n2);
    return qkv_reshape(t, nb + 2, shape);
}

/* The letters of a pair of operands by role: shared and needed later (batch), shared and not
 * (summed by the product), a's own (left) and b's own (right). */
typedef struct roles {
    char batch[QKV_MAX_DIMS + 1], sum[QKV_MAX_DIMS + 1];
    char left[QKV_MAX_DIMS + 1], right[QKV_MAX_DIMS + 1];
} roles;

static void add_letter(char *s, char c) {
    size_t n = strlen(s);
    s[n] = c;
    s[n + 1] = '\0';
}

static roles split(const term *ta, const term *tb, const char *need) {
    roles r = {"", "", "", ""};
    for (int i = 0; ta->s[i]; i++) {
        char c = ta->s[i];
        add_letter(!has(tb->s, c) ? r.left : has(need, c) ? r.batch : r.sum, c);
    }
    for (int i = 0; tb->s[i]; i++)
        if (!has(ta->s, tb->s[i])) add_letter(r.right, tb->s[i]);
    return r;
}

/* a (letters ta) contracted with b (letters tb) as one batched matrix product, keeping the
 * letters need holds; *tr gets the result's letters: batch, then a's own, then b's own. */
static qkv_tensor *contract(qkv_tensor *a, term ta, qkv_tensor *b, term tb, const char *need,
                            term *tr) {
    letters keep_a, keep_b, order_a, order_b;
    snprintf(keep_a.s, sizeof keep_a.s, "%s%s", tb.s, need);
    snprintf(keep_b.s, sizeof keep_b.s, "%s%s", ta.s, need);
    a = sum_out(a, &ta, keep_a.s);
    b = sum_out(b, &tb, keep_b.s);
    a = broadcast_shared(a, &ta, b, &tb);
    b = broadcast_shared(b, &tb, a, &ta);
    if (!a || !b) return NULL;
    roles r = split(&ta, &tb, need);
    int nb = (int)strlen(r.batch), nl = (int)strlen(r.left), nk = (int)strlen(r.sum),
        nr = (int)strlen(r.right);
    if (nb + nl + nr > QKV_MAX_DIMS || nb + 2 > QKV_MAX_DIMS)
        return qkv_set_error("qkv_einsum: an intermediate result would have more than %d "
                             "dimensions", QKV_MAX_DIMS);
    snprintf(order_a.s, sizeof order_a.s, "%s%s%s", r.batch, r.left, r.sum);
    snprintf(order_b.s, sizeof order_b.s, "%s%s%s", r.batch, r.sum, r.right);
    a = arrange(a, &ta, order_a.s);
    b = arrange(b, &tb, order_b.s);
    if (!a || !b) return NULL;
    int64_t shape[QKV_MAX_DIMS];
    memcpy(shape, a->shape, (size_t)(nb + nl) * sizeof *shape);
    memcpy(shape + nb + nl, b->shape + nb + nk, (size_t)nr * sizeof *shape);
    qkv_tensor *out = qkv_matmul(fold(a, nb, nl, nk), fold(b, nb, nk, nr));
    snprintf(tr->s, sizeof tr->s, "%s%s%s", r.batch, r.left, r.right);
    return qkv_reshape(out, nb + nl + nr, shape);
}

qkv_tensor *qkv_einsum(const char *subscripts, int n, qkv_tensor *const *operands) {
    if (!subscripts) return qkv_set_error("qkv_einsum: subscripts is NULL");
    if (n <= 0 || !operands) return qkv_set_error("qkv_einsum: no operands");
    if (qkv__null_args("qkv_einsum", n, (const void *const *)operands)) return NULL;
    einsum_spec sp = {.text = subscripts};
    if (!parse(&sp, n) || !check_sizes(&sp, operands)) return NULL;
    qkv_scope_begin();
    qkv_tensor *cur = operands[0];
    term tc = sp.in[0];
    for (int k = 1; k < sp.n && cur; k++) {
        letters need = {""};
        strcat(need.s, sp.out.s);
        for (int j = k + 1; j < sp.n; j++) strcat(need.s, sp.in[j].s);
        cur = contract(cur, tc, operands[k], sp.in[k], need.s, &tc);
    }
    cur = cur ? arrange(sum_out(cur, &tc, sp.out.s), &tc, sp.out.s) : NULL;
    /* The operand itself (as for "ij->ij") is returned as a view of it, as torch does. */
    if (cur == operands[0]) cur = qkv_reshape(cur, cur->ndim, cur->shape);
    qkv_tensor *out = qkv_keep(cur);
    qkv_scope_end();
    return out;
}
