/* The activations and math ops, SwiGLU's gate silu_mul, cumsum, sort, argsort, topk,
 * multinomial, tril, triu, outer, einsum and the triangular products: values and gradients
 * against PyTorch's (ops_fixtures.h, from fixtures/gen_ops.py), gradient checks on contiguous, transposed, strided and expanded
 * inputs, the semantics torch leaves open (ties, NaN, sampling), and every refused
 * argument's message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "fixtures/ops_fixtures.h"
#include "harness.h"

static qkv_generator gen;

/* A scope of the test's own (open_scope) and the generator at its seed. */
static int setup(void **state) {
    qkv_generator_init(&gen, 1515);
    return open_scope(state);
}

/* ---- Against PyTorch --------------------------------------------------------------------- */

/* The case's op over its inputs; *index gets sort's and topk's indices. */
static qkv_tensor *run_case(const fx_op *c, qkv_tensor *const *in, qkv_tensor **index) {
    const char *op = c->op;
    double p0 = c->params[0], p1 = c->params[1];
    int axis = (int)c->ints[0];
    bool flag = c->ints[2] != 0;
    static const struct { const char *name; qkv_tensor *(*fn)(const qkv_tensor *); } plain[] = {
        {"silu", qkv_silu},   {"sin", qkv_sin},     {"cos", qkv_cos},       {"erf", qkv_erf},
        {"log1p", qkv_log1p}, {"expm1", qkv_expm1}, {"square", qkv_square}, {"floor", qkv_floor},
        {"ceil", qkv_ceil},   {"round", qkv_round}, {"sign", qkv_sign},
    };
    for (size_t k = 0; k < sizeof plain / sizeof *plain; k++)
        if (!strcmp(op, plain[k].name)) return plain[k].fn(in[0]);
    if (!strcmp(op, "softplus")) return qkv_softplus(in[0], p0, p1);
    if (!strcmp(op, "leaky_relu")) return qkv_leaky_relu(in[0], p0);
    if (!strcmp(op, "elu")) return qkv_elu(in[0], p0);
    if (!strcmp(op, "clamp")) return qkv_clamp(in[0], p0, p1);
    if (!strcmp(op, "cumsum")) return qkv_cumsum(in[0], axis);
    if (!strcmp(op, "sort")) return qkv_sort(in[0], axis, flag, index);
    if (!strcmp(op, "topk")) return qkv_topk(in[0], c->ints[1], axis, flag, index);
    if (!strcmp(op, "tril")) return qkv_tril(in[0], c->ints[0]);
    if (!strcmp(op, "triu")) return qkv_triu(in[0], c->ints[0]);
    if (!strcmp(op, "outer")) return qkv_outer(in[0], in[1]);
    if (!strcmp(op, "einsum")) return qkv_einsum(c->spec, c->n, in);
    if (!strcmp(op, "silu_mul")) return qkv_silu_mul(in[0], in[1]);
    fail_msg("no op %s", op);
    return NULL;
}

static qkv_tensor *apply_view(qkv_tensor *t, const fx_view *v) {
    switch (v->kind) {
    case 't': return qkv_transpose(t, -2, -1);
    case 's': return qkv_slice(t, -1, 0, INT64_MAX, 2);
    case 'e': return qkv_expand(t, v->ndim, v->shape);
    default: return t;
    }
}

/* Float32 transcendental results carry a few ulps of libm's and torch's own vector code's
 * differences; where a result cancels to near 0 (sin near pi, a gradient's tail) the error
 * is absolute, in ulps of the operands. */
static double rtol_of(qkv_dtype dtype) {
    return dtype == QKV_F32 ? 1e-5 : fx_rtol(dtype);
}
static double atol_of(qkv_dtype dtype) {
    return dtype == QKV_F32 ? 1e-6 : dtype == QKV_F64 ? 1e-15 : 0;
}

static void check_case(const fx_op *c) {
    char what[160];
    snprintf(what, sizeof what, "%s, %s (%s, %g, %g)", c->op, c->what, qkv_dtype_name(c->dtype),
             c->params[0], c->params[1]);
    bool grads = c->w.data != NULL;
    qkv_tensor *base[3] = {0}, *in[3] = {0}, *index = NULL;
    for (int k = 0; k < c->n; k++) {
        base[k] = fx_make(&c->in[k], c->dtype);
        if (grads) qkv_requires_grad_(base[k], true);
        in[k] = apply_view(base[k], &c->view[k]);
        assert_non_null(in[k]);
    }
    qkv_tensor *out = run_case(c, in, &index);
    fx_assert_close(out, c->dout, &c->out, rtol_of(c->dout), atol_of(c->dout), what);
    if (c->index.data) fx_assert_tensor(index, QKV_I64, &c->index, what);
    if (!grads) return;
    assert_true(qkv_backward_with(out, fx_make(&c->w, c->dout), false));
    for (int k = 0; k < c->n; k++) {
        snprintf(what, sizeof what, "%s, %s (%s): gradient of input %d", c->op, c->what,
                 qkv_dtype_name(c->dtype), k);
        fx_assert_close(base[k]->grad, c->dtype, &c->grad[k], rtol_of(c->dtype),
                        atol_of(c->dtype), what);
    }
}

/* Runs every case of the ops whose names start with one of prefixes; asserts how many. */
static void check_cases(const char *const *ops, int n_ops, int expected) {
    int n = 0;
    for (size_t i = 0; i < sizeof fx_op_cases / sizeof *fx_op_cases; i++) {
        const fx_op *c = &fx_op_cases[i];
        bool wanted = false;
        for (int k = 0; k < n_ops; k++) wanted = wanted || !strcmp(c->op, ops[k]);
        if (!wanted) continue;
        check_case(c);
        n++;
    }
    assert_int_equal(n, expected);
    assert_null(qkv_error());
}

#define CASES(expected, ...)                                                                 \
    check_cases((const char *const[]){__VA_ARGS__},                                          \
                (int)(sizeof((const char *const[]){__VA_ARGS__}) / sizeof(const char *)),    \
                expected)

static void activations_match_torch(void **state) {
    (void)state;
    CASES(7 * 3 + 7 * 2 + 7 * 2 + 7, "softplus", "leaky_relu", "elu", "silu");
}

static void math_ops_match_torch(void **state) {
    (void)state;
    CASES(7 * 6 + 2, "sin", "cos", "erf", "log1p", "expm1", "square");
}

static void clamp_matches_torch_with_either_bound(void **state) {
    (void)state;
    CASES(7 * 4 + 2, "clamp");
}

static void rounding_matches_torch_with_zero_gradients(void **state) {
    (void)state;
    CASES(8 * 4, "floor", "ceil", "round", "sign");
}

static void cumsum_matches_torch(void **state) {
    (void)state;
    CASES(14, "cumsum");
}

static void sort_matches_torch_stable_with_nan_last(void **state) {
    (void)state;
    CASES(2 * (2 * 4 + 5), "sort");
}

static void topk_matches_torch(void **state) {
    (void)state;
    CASES(2 * (2 * 5 + 3), "topk");
}

static void tril_triu_outer_match_torch(void **state) {
    (void)state;
    CASES(2 * (6 * 3 + 4) + 3, "tril", "triu", "outer");
}

static void einsum_matches_torch(void **state) {
    (void)state;
    CASES(20 + 2, "einsum");
}

static void silu_mul_matches_torch_broadcast_and_strided(void **state) {
    (void)state;
    CASES(2 * 3 + 4, "silu_mul");
}

/* ---- Gradient checks --------------------------------------------------------------------- */

#define EPS 1e-6
#define ATOL 1e-7
#define RTOL 1e-6

#include "leaf_inputs.h"

static void check(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx,
                  const char *what) {
    qkv_scope_begin();
    bool ok = qkv_gradcheck(fn, inputs, n, ctx, EPS, ATOL, RTOL);
    qkv_scope_end();
    if (!ok) fail_msg("%s: %s", what, qkv_error() ? qkv_error() : "no error");
}

typedef struct math_op {
    const char *name;
    values v;
    double p0, p1;
} math_op;

static qkv_tensor *call_math(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const math_op *m = ctx;
    fx_op c = {.op = m->name, .params = {m->p0, m->p1}};
    return run_case(&c, in, NULL);
}

static void math_ops_pass_gradcheck_on_every_layout(void **state) {
    (void)state;
    /* Random values land within EPS of a kink, a threshold or a bound with probability about
     * 1e-6 each. */
    const math_op ops[] = {
        {"silu", ANY, 0, 0},          {"softplus", ANY, 1, 20},     {"softplus", ANY, 2, 3},
        {"softplus", ANY, -1.5, 20},  {"leaky_relu", NONZERO, 0.01, 0},
        {"leaky_relu", NONZERO, -0.5, 0}, {"elu", NONZERO, 1, 0}, {"elu", NONZERO, 0.3, 0},
        {"sin", ANY, 0, 0},           {"cos", ANY, 0, 0},           {"erf", ANY, 0, 0},
        {"log1p", POSITIVE, 0, 0},    {"expm1", ANY, 0, 0},         {"square", ANY, 0, 0},
        {"clamp", ANY, -0.5, 1.25},   {"clamp", ANY, 0.3, NAN},     {"clamp", ANY, NAN, -0.3},
        {"clamp", ANY, 1, -1},        {"floor", ANY, 0, 0},         {"ceil", ANY, 0, 0},
        {"round", ANY, 0, 0},         {"sign", NONZERO, 0, 0},
    };
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            qkv_tensor *x = input(QKV_SHAPE(3, 4), ops[i].v, (layout)l);
            check(call_math, &x, 1, (void *)&ops[i], ops[i].name);
        }
    qkv_tensor *x0 = input(0, NULL, ANY, CONTIGUOUS); /* a 0-d input */
    check(call_math, &x0, 1, (void *)&ops[0], "silu 0-d");
}

typedef struct axis_call {
    int which; /* 0 cumsum, 1 sort, 2 topk */
    int axis;
    bool flag;
    int64_t k;
} axis_call;

static qkv_tensor *call_axis(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const axis_call *a = ctx;
    if (a->which == 0) return qkv_cumsum(in[0], a->axis);
    if (a->which == 1) return qkv_sort(in[0], a->axis, a->flag, NULL);
    return qkv_topk(in[0], a->k, a->axis, a->flag, NULL);
}

static void axis_ops_pass_gradcheck_on_every_layout(void **state) {
    (void)state;
    for (int which = 0; which < 3; which++)
        for (int axis = -1; axis < 3; axis++)
            for (int l = 0; l < N_LAYOUTS; l++) {
                axis_call a = {which, axis, (axis + l) % 2 == 0, 1 + (axis + 3) % 2};
                qkv_tensor *x = input(QKV_SHAPE(2, 3, 4), ANY, (layout)l);
                check(call_axis, &x, 1, &a, which == 0 ? "cumsum" : which == 1 ? "sort"
                                                                               : "topk");
            }
    axis_call cumsum0 = {0, 0, false, 0};
    qkv_tensor *x0 = input(0, NULL, ANY, CONTIGUOUS);
    check(call_axis, &x0, 1, &cumsum0, "cumsum 0-d");
}

typedef struct product_call {
    const char *op; /* "tril", "triu", "outer", or einsum subscripts */
    int64_t diagonal;
} product_call;

static qkv_tensor *call_product(qkv_tensor *const *in, int n, void *ctx) {
    const product_call *p = ctx;
    if (!strcmp(p->op, "tril")) return qkv_tril(in[0], p->diagonal);
    if (!strcmp(p->op, "triu")) return qkv_triu(in[0], p->diagonal);
    if (!strcmp(p->op, "outer")) return qkv_outer(in[0], in[1]);
    return qkv_einsum(p->op, n, in);
}

static void triangles_and_outer_pass_gradcheck(void **state) {
    (void)state;
    for (int64_t d = -2; d <= 2; d++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            product_call lo = {"tril", d}, up = {"triu", d};
            qkv_tensor *x = input(QKV_SHAPE(2, 3, 4), ANY, (layout)l);
            check(call_product, &x, 1, &lo, "tril");
            check(call_product, &x, 1, &up, "triu");
        }
    product_call outer = {"outer", 0};
    for (int l = 0; l < N_LAYOUTS; l++) {
        qkv_tensor *ab[2] = {input(QKV_SHAPE(3), ANY, (layout)l),
                             input(QKV_SHAPE(4), ANY, (layout)((l + 1) % N_LAYOUTS))};
        check(call_product, ab, 2, &outer, "outer");
    }
}

static const qkv_tri tris[] = {QKV_TRIL_OUT, QKV_TRIU_OUT, QKV_TRIL_A, QKV_TRIU_A};

static qkv_tensor *call_tri(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    return qkv_matmul_tri(in[0], in[1], *(const qkv_tri *)ctx);
}

/* Every kind on every layout, square and rectangular either way round, and with a batch
 * dimension broadcast on either side (its gradient summed over the broadcast). */
static void triangular_products_pass_gradcheck_on_every_layout(void **state) {
    (void)state;
    static const int64_t shapes[][2][3] = {
        {{2, 4, 4}, {2, 4, 4}}, {{2, 3, 5}, {2, 5, 4}}, {{2, 5, 3}, {2, 3, 2}},
        {{1, 4, 4}, {3, 4, 3}}, {{3, 4, 2}, {1, 2, 5}},
    };
    for (size_t t = 0; t < 4; t++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
            for (int l = 0; l < N_LAYOUTS; l++) {
                qkv_tensor *ab[2] = {input(3, shapes[s][0], ANY, (layout)l),
                                     input(3, shapes[s][1], ANY, (layout)((l + s) % N_LAYOUTS))};
                check(call_tri, ab, 2, (void *)&tris[t], "qkv_matmul_tri");
            }
}

static void assert_same_values(const qkv_tensor *got, const qkv_tensor *want, const char *what) {
    assert_non_null(got);
    assert_non_null(want);
    assert_int_equal(got->numel, want->numel);
    qkv_tensor *g = qkv_to_dtype(got, QKV_F64), *w = qkv_to_dtype(want, QKV_F64);
    qkv_tensor *gc = qkv_contiguous(g), *wc = qkv_contiguous(w);
    const double *gd = qkv_data(gc), *wd = qkv_data(wc);
    for (int64_t i = 0; i < got->numel; i++)
        if (!(gd[i] == wd[i])) fail_msg("%s: element %lld is %.17g, want %.17g", what,
                                        (long long)i, gd[i], wd[i]);
}

/* The products and both gradients equal, value for value, those of the composition with
 * qkv_tril / qkv_triu (the same sums in the same order without the zeros), in f32 (the
 * triangular GEMM), f64, and bf16 (which masks and multiplies whole). */
static void triangular_products_equal_the_masked_compositions(void **state) {
    (void)state;
    static const qkv_dtype dtypes[] = {QKV_F32, QKV_F64, QKV_BF16};
    qkv_generator g;
    qkv_generator_init(&g, 11);
    for (size_t d = 0; d < 3; d++)
        for (size_t t = 0; t < 4; t++) {
            qkv_tensor *a = qkv_requires_grad_(
                qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 37, 29), &g), dtypes[d]), true);
            qkv_tensor *b = qkv_requires_grad_(
                qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(3, 29, 41), &g), dtypes[d]), true);
            qkv_tensor *grad = qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(2, 3, 37, 41), &g),
                                            dtypes[d]);
            bool lower = tris[t] == QKV_TRIL_OUT || tris[t] == QKV_TRIL_A;
            bool out_kind = tris[t] == QKV_TRIL_OUT || tris[t] == QKV_TRIU_OUT;
            qkv_tensor *got = qkv_matmul_tri(a, b, tris[t]), *want;
            if (out_kind)
                want = lower ? qkv_tril(qkv_matmul(a, b), 0) : qkv_triu(qkv_matmul(a, b), 0);
            else
                want = qkv_matmul(lower ? qkv_tril(a, 0) : qkv_triu(a, 0), b);
            assert_same_values(got, want, "product");
            qkv_tensor *ga[2], *gb[2];
            assert_true(qkv_backward_with(got, grad, false));
            ga[0] = qkv_detach(a->grad);
            gb[0] = qkv_detach(b->grad);
            qkv_zero_grad(a);
            qkv_zero_grad(b);
            assert_true(qkv_backward_with(want, grad, false));
            ga[1] = a->grad;
            gb[1] = b->grad;
            assert_same_values(ga[0], ga[1], "gradient of a");
            assert_same_values(gb[0], gb[1], "gradient of b");
        }
}

typedef struct einsum_case {
    const char *spec;
    int n;
    int ndim[3];
    int64_t shape[3][4];
} einsum_case;

static void einsum_passes_gradcheck_on_every_layout(void **state) {
    (void)state;
    const einsum_case cases[] = {
        {"bhtd,bhsd->bhts", 2, {4, 4}, {{2, 2, 3, 4}, {2, 2, 5, 4}}},
        {"bhts,bhsd->bhtd", 2, {4, 4}, {{2, 2, 3, 5}, {2, 2, 5, 4}}},
        {"ij,jk->ik", 2, {2, 2}, {{3, 4}, {4, 2}}},
        {"i,j->ij", 2, {1, 1}, {{3}, {4}}},
        {"bij,bjk->bik", 2, {3, 3}, {{2, 3, 4}, {2, 4, 2}}},
        {"ij,jk,kl->il", 3, {2, 2, 2}, {{2, 3}, {3, 4}, {4, 2}}},
        {"ijk,ikl->lj", 2, {3, 3}, {{2, 3, 4}, {2, 4, 3}}},
        {"ij->", 1, {2}, {{3, 4}}},
        {"ij,j", 2, {2, 1}, {{3, 4}, {4}}},
        {"bij,bjk->bik", 2, {3, 3}, {{1, 3, 4}, {2, 4, 2}}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            const einsum_case *e = &cases[c];
            qkv_tensor *in[3];
            for (int k = 0; k < e->n; k++)
                in[k] = input(e->ndim[k], e->shape[k], ANY, (layout)((l + k) % N_LAYOUTS));
            product_call p = {e->spec, 0};
            check(call_product, in, e->n, &p, e->spec);
        }
}

/* ---- Semantics --------------------------------------------------------------------------- */

static qkv_tensor *vec(int64_t n, const double *v) {
    return qkv_from_array(QKV_F64, 1, (const int64_t[]){n}, v);
}
#define VEC(...) vec(sizeof((double[]){__VA_ARGS__}) / sizeof(double), (double[]){__VA_ARGS__})

static void assert_values(const qkv_tensor *t, int64_t n, const double *want) {
    assert_non_null(t);
    assert_int_equal(t->numel, n);
    double got[64];
    assert_true(n <= 64 && qkv_copy_out(t, QKV_F64, got));
    for (int64_t i = 0; i < n; i++)
        if (!(got[i] == want[i] || (isnan(got[i]) && isnan(want[i]))))
            fail_msg("element %lld is %g, expected %g", (long long)i, got[i], want[i]);
}
#define ASSERT_VALUES(t, ...)                                                                \
    assert_values(t, sizeof((double[]){__VA_ARGS__}) / sizeof(double), (double[]){__VA_ARGS__})

static void topk_takes_the_lower_index_among_equal_values(void **state) {
    (void)state;
    qkv_tensor *x = VEC(1, 3, 3, 2, 3, 1), *idx;
    ASSERT_VALUES(qkv_topk(x, 2, 0, true, &idx), 3, 3);
    ASSERT_VALUES(idx, 1, 2);
    ASSERT_VALUES(qkv_topk(x, 3, -1, false, &idx), 1, 1, 2);
    ASSERT_VALUES(idx, 0, 5, 3);
    qkv_tensor *none = qkv_topk(x, 0, 0, true, &idx); /* k = 0: empty, not an error */
    assert_int_equal(none->numel, 0);
    assert_int_equal(idx->numel, 0);
    assert_int_equal(idx->ndim, 1);
    assert_int_equal(idx->dtype, QKV_I64);
    /* a 0-d input keeps its element for k = 0 too, as torch.topk does */
    ASSERT_VALUES(qkv_topk(qkv_scalar(QKV_F64, 3), 0, 0, true, &idx), 3);
    ASSERT_VALUES(idx, 0);
    assert_null(qkv_error());
}

static void sort_is_stable_and_puts_nan_above_everything(void **state) {
    (void)state;
    qkv_tensor *x = VEC(2, NAN, -INFINITY, 2, NAN, 0, INFINITY), *idx;
    ASSERT_VALUES(qkv_sort(x, 0, false, &idx), -INFINITY, 0, 2, 2, INFINITY, NAN, NAN);
    ASSERT_VALUES(idx, 2, 5, 0, 3, 6, 1, 4);
    ASSERT_VALUES(qkv_sort(x, 0, true, &idx), NAN, NAN, INFINITY, 2, 2, 0, -INFINITY);
    ASSERT_VALUES(idx, 1, 4, 6, 0, 3, 5, 2);
    ASSERT_VALUES(qkv_argsort(x, -1, true), 1, 4, 6, 0, 3, 5, 2);
    assert_null(qkv_sort(x, 0, false, NULL)->grad_fn); /* no input requires grad */
    assert_null(qkv_error());
}

static void argsort_gives_sort_indices_in_every_dtype(void **state) {
    (void)state;
    qkv_tensor *x = qkv_randint(-3, 3, QKV_SHAPE(4, 6), &gen);
    qkv_tensor *xs[] = {x, qkv_to_dtype(x, QKV_F32), qkv_gt_scalar(x, 0)};
    for (int k = 0; k < 3; k++)
        for (int axis = 0; axis < 2; axis++) {
            qkv_tensor *idx, *values = qkv_sort(xs[k], axis, k == 1, &idx);
            assert_non_null(values);
            assert_int_equal(values->dtype, xs[k]->dtype);
            assert_true(qkv_item(qkv_sum_all(qkv_ne(idx, qkv_argsort(xs[k], axis, k == 1))))
                        == 0);
            /* sorted: no step down along the axis, and the indices gather the values */
            qkv_tensor *f = qkv_to_dtype(values, QKV_F64);
            qkv_tensor *step = qkv_sub(qkv_narrow(f, axis, 1, f->shape[axis] - 1),
                                       qkv_narrow(f, axis, 0, f->shape[axis] - 1));
            qkv_tensor *bad = k == 1 ? qkv_gt_scalar(step, 0) : qkv_lt_scalar(step, 0);
            assert_true(qkv_item(qkv_sum_all(bad)) == 0);
            assert_true(qkv_item(qkv_sum_all(qkv_ne(qkv_gather(xs[k], axis, idx), values)))
                        == 0);
        }
    assert_null(qkv_error());
}

static void rounding_ops_give_zero_gradients_not_none(void **state) {
    (void)state;
    qkv_tensor *(*fns[])(const qkv_tensor *) = {qkv_floor, qkv_ceil, qkv_round, qkv_sign};
    const char *names[] = {"floor", "ceil", "round", "sign"};
    for (int k = 0; k < 4; k++) {
        qkv_tensor *x = qkv_requires_grad_(VEC(0.5, -1.5, 2.5), true);
        qkv_tensor *y = fns[k](x);
        assert_string_equal(qkv_grad_fn_name(y), names[k]);
        assert_true(qkv_backward(qkv_sum_all(y)));
        ASSERT_VALUES(x->grad, 0, 0, 0);
    }
    ASSERT_VALUES(qkv_round(VEC(0.5, 1.5, 2.5, -0.5, -2.5, 3.5)), 0, 2, 2, -0.0, -2, 4);
    assert_null(qkv_error());
}

static void clamp_gradient_passes_at_the_bounds_and_is_selected(void **state) {
    (void)state;
    qkv_tensor *x = qkv_requires_grad_(VEC(-1, -0.5, 0, 1, 2, NAN), true);
    qkv_tensor *y = qkv_clamp(x, -0.5, 1);
    ASSERT_VALUES(y, -0.5, -0.5, 0, 1, 1, NAN);
    /* an infinite incoming gradient outside the bounds gives 0, not NaN */
    assert_true(qkv_backward_with(y, VEC(INFINITY, 1, 1, 1, INFINITY, 1), false));
    ASSERT_VALUES(x->grad, 0, 1, 1, 1, 0, 0);
    ASSERT_VALUES(qkv_clamp(VEC(-3, 0, 3), 2, -2), -2, -2, -2); /* min > max: max */
    ASSERT_VALUES(qkv_clamp(VEC(-3, 0, 3), NAN, 1), -3, 0, 1);
    ASSERT_VALUES(qkv_clamp(VEC(-3, 0, 3), -INFINITY, INFINITY), -3, 0, 3);
    assert_null(qkv_error());
}

/* Each op that saves its input (expm1: its output) recomputes its output for a consumer
 * rather than have it held, and the recomputed values are the forward's, bit for bit. */
static void cheap_outputs_are_recomputed_bit_for_bit(void **state) {
    (void)state;
    const math_op ops[] = {
        {"silu", ANY, 0, 0},   {"softplus", ANY, 2, 1}, {"leaky_relu", ANY, 0.1, 0},
        {"elu", ANY, 0.7, 0},  {"sin", ANY, 0, 0},      {"cos", ANY, 0, 0},
        {"erf", ANY, 0, 0},    {"log1p", POSITIVE, 0, 0}, {"expm1", ANY, 0, 0},
        {"square", ANY, 0, 0}, {"clamp", ANY, -0.5, 0.5},
    };
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++) {
        qkv_scope_begin();
        qkv_tensor *x = qkv_to_dtype(filled(QKV_SHAPE(5, 7), ops[i].v), QKV_F32);
        qkv_requires_grad_(x, true);
        qkv_tensor *w = qkv_requires_grad_(qkv_ones(QKV_F32, QKV_SHAPE(5, 7)), true);
        qkv_tensor *y = call_math(&x, 1, (void *)&ops[i]);
        qkv_tensor *z = qkv_mul(y, w);
        if (y->refcount != 1) fail_msg("%s: its output is held by mul", ops[i].name);
        assert_true(qkv_backward(qkv_sum_all(z)));
        qkv_tensor *same = qkv_eq(w->grad, y);
        if (qkv_item(qkv_sum_all(same)) != 35)
            fail_msg("%s: recomputed values differ from the forward's", ops[i].name);
        qkv_scope_end();
    }
    assert_null(qkv_error());
}

static void integer_inputs_follow_torch_dtypes(void **state) {
    (void)state;
    qkv_tensor *i = qkv_arange(QKV_I64, -2, 3, 1), *b = qkv_gt_scalar(i, 0);
    assert_int_equal(qkv_floor(i)->dtype, QKV_I64);
    assert_int_equal(qkv_square(i)->dtype, QKV_I64);
    assert_int_equal(qkv_clamp(i, 0, NAN)->dtype, QKV_I64);
    assert_int_equal(qkv_clamp(i, 0.5, NAN)->dtype, QKV_F32);
    assert_int_equal(qkv_sin(i)->dtype, QKV_F32);
    assert_int_equal(qkv_cumsum(b, 0)->dtype, QKV_I64);
    ASSERT_VALUES(qkv_cumsum(b, 0), 0, 0, 0, 1, 2);
    ASSERT_VALUES(qkv_square(qkv_full(QKV_I64, QKV_SHAPE(1), 3037000500.0)),
                  (double)(int64_t)((uint64_t)3037000500 * 3037000500u)); /* wraps */
    assert_null(qkv_error());
}

static void einsum_of_one_operand_is_a_new_view(void **state) {
    (void)state;
    qkv_tensor *x = qkv_requires_grad_(filled(QKV_SHAPE(2, 3), ANY), true);
    qkv_tensor *y = qkv_einsum("ij->ij", 1, &x);
    assert_non_null(y);
    assert_ptr_not_equal(y, x);
    assert_ptr_equal(qkv_data(y), qkv_data(x));
    qkv_tensor *t = qkv_einsum("ij->ji", 1, &x);
    assert_int_equal(t->shape[0], 3);
    assert_ptr_equal(qkv_data(t), qkv_data(x)); /* a transposed view */
    assert_true(qkv_backward(qkv_add(qkv_sum_all(y), qkv_sum_all(t))));
    ASSERT_VALUES(x->grad, 2, 2, 2, 2, 2, 2);
    assert_null(qkv_error());
}

/* ---- silu_mul: SwiGLU's gate ------------------------------------------------------------- */

static qkv_tensor *call_silu_mul(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return qkv_silu_mul(in[0], in[1]);
}

static void silu_mul_passes_gradcheck_on_every_layout(void **state) {
    (void)state;
    static const int64_t shapes[][2][2] = {{{3, 4}, {3, 4}}, {{3, 1}, {3, 4}}, {{3, 4}, {1, 4}}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            qkv_tensor *ab[2] = {input(2, shapes[s][0], ANY, (layout)l),
                                 input(2, shapes[s][1], ANY, (layout)((l + 1) % N_LAYOUTS))};
            check(call_silu_mul, ab, 2, NULL, "qkv_silu_mul");
        }
    qkv_tensor *lower_rank[2] = {input(QKV_SHAPE(2, 3), ANY, CONTIGUOUS),
                                 input(QKV_SHAPE(3), ANY, CONTIGUOUS)};
    check(call_silu_mul, lower_rank, 2, NULL, "qkv_silu_mul of [2,3] and [3]");
    qkv_tensor *zero_d[2] = {input(0, NULL, ANY, CONTIGUOUS), input(QKV_SHAPE(3), ANY, STRIDED)};
    check(call_silu_mul, zero_d, 2, NULL, "qkv_silu_mul of [] and [3]");
}

/* Its value and both gradients are those of qkv_mul(qkv_silu(a), b), value for value: in f32
 * (whole vectors and a tail), f64, and bf16 (whose gate is rounded before the product, as
 * the composition stores it). */
static void silu_mul_equals_the_composition(void **state) {
    (void)state;
    static const qkv_dtype dtypes[] = {QKV_F32, QKV_F64, QKV_BF16};
    qkv_generator g;
    qkv_generator_init(&g, 12);
    for (size_t d = 0; d < 3; d++) {
        qkv_tensor *a = qkv_requires_grad_(
            qkv_to_dtype(qkv_mul_scalar(qkv_randn(QKV_F32, QKV_SHAPE(5, 37), &g), 4), dtypes[d]),
            true);
        qkv_tensor *b = qkv_requires_grad_(
            qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(5, 37), &g), dtypes[d]), true);
        qkv_tensor *grad = qkv_to_dtype(qkv_randn(QKV_F32, QKV_SHAPE(5, 37), &g), dtypes[d]);
        qkv_tensor *got = qkv_silu_mul(a, b), *want = qkv_mul(qkv_silu(a), b);
        assert_int_equal(got->dtype, dtypes[d]);
        assert_same_values(got, want, "silu(a) * b");
        assert_true(qkv_backward_with(got, grad, false));
        qkv_tensor *ga = qkv_detach(a->grad), *gb = qkv_detach(b->grad);
        qkv_zero_grad(a);
        qkv_zero_grad(b);
        assert_true(qkv_backward_with(want, grad, false));
        assert_same_values(ga, a->grad, "gradient of a");
        assert_same_values(gb, b->grad, "gradient of b");
    }
    assert_null(qkv_error());
}

/* Every layout computes with the same vector code: a transposed, sliced or broadcast f32
 * operand gives the values of its contiguous copy, bit for bit. */
static void silu_mul_values_do_not_depend_on_the_layout(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 13);
    qkv_tensor *a = qkv_mul_scalar(qkv_randn(QKV_F32, QKV_SHAPE(19, 23), &g), 4);
    qkv_tensor *b = qkv_randn(QKV_F32, QKV_SHAPE(23, 38), &g);
    qkv_tensor *at = qkv_transpose(a, 0, 1), *bs = qkv_slice(b, 1, 0, 38, 2);
    qkv_tensor *row = qkv_slice(b, 0, 0, 1, 1), *c = qkv_randn(QKV_F32, QKV_SHAPE(19, 38), &g);
    assert_same_values(qkv_silu_mul(at, bs), qkv_silu_mul(qkv_contiguous(at), qkv_contiguous(bs)),
                       "transposed a, sliced b");
    qkv_tensor *rows = qkv_contiguous(qkv_expand(row, QKV_SHAPE(19, 38)));
    assert_same_values(qkv_silu_mul(row, c), qkv_silu_mul(rows, c), "a broadcast row");
    assert_same_values(qkv_silu_mul(c, row), qkv_silu_mul(c, rows), "b broadcast row");
    assert_null(qkv_error());
}

/* Its output is held by its consumer rather than recomputed for it: the consumer's backward
 * reads the forward's values without another pass. */
static void silu_mul_output_is_held_by_its_consumer(void **state) {
    (void)state;
    qkv_tensor *a = qkv_requires_grad_(qkv_to_dtype(filled(QKV_SHAPE(5, 7), ANY), QKV_F32), true);
    qkv_tensor *b = qkv_requires_grad_(qkv_to_dtype(filled(QKV_SHAPE(5, 7), ANY), QKV_F32), true);
    qkv_tensor *w = qkv_requires_grad_(qkv_ones(QKV_F32, QKV_SHAPE(5, 7)), true);
    qkv_tensor *y = qkv_silu_mul(a, b);
    qkv_tensor *z = qkv_mul(y, w);
    assert_int_equal(y->refcount, 2); /* its scope's and mul's node's */
    assert_true(qkv_backward(qkv_sum_all(z)));
    assert_same_values(w->grad, y, "the held output");
    assert_null(qkv_error());
}

/* ---- multinomial ------------------------------------------------------------------------- */

/* Counts of each category over all draws. */
static void count(const qkv_tensor *s, int64_t n_cat, int64_t *counts) {
    memset(counts, 0, (size_t)n_cat * sizeof *counts);
    const int64_t *d = qkv_data(s);
    for (int64_t i = 0; i < s->numel; i++) {
        assert_true(d[i] >= 0 && d[i] < n_cat);
        counts[d[i]]++;
    }
}

/* |count - n p| within 5 standard deviations of a binomial count. */
static void assert_frequencies(const int64_t *counts, const double *p, int n_cat, int64_t n) {
    for (int j = 0; j < n_cat; j++) {
        double mean = (double)n * p[j], sd = sqrt((double)n * p[j] * (1 - p[j]));
        if (fabs((double)counts[j] - mean) > 5 * sd + 1e-9)
            fail_msg("category %d drawn %lld times, expected %.0f +- %.0f", j,
                     (long long)counts[j], mean, sd);
    }
}

static void multinomial_draws_in_proportion_to_weights(void **state) {
    (void)state;
    /* unnormalised weights, a zero among them */
    qkv_tensor *probs = VEC(1, 0, 2, 3, 4);
    qkv_tensor *s = qkv_multinomial(probs, 50000, true, &gen);
    assert_non_null(s);
    assert_int_equal(s->dtype, QKV_I64);
    assert_int_equal(s->ndim, 1);
    int64_t counts[5];
    count(s, 5, counts);
    assert_int_equal(counts[1], 0);
    assert_frequencies(counts, (double[]){0.1, 0, 0.2, 0.3, 0.4}, 5, 50000);
    /* 2-D, rows independent, a transposed (strided) probs read in place */
    qkv_tensor *p2 = qkv_transpose(qkv_from_array(QKV_F32, QKV_SHAPE(3, 2),
                                                  (float[]){0, 5, 1, 0, 3, 5}), 0, 1);
    qkv_tensor *s2 = qkv_multinomial(p2, 20000, true, &gen);
    assert_int_equal(s2->shape[0], 2);
    assert_int_equal(s2->shape[1], 20000);
    count(qkv_select(s2, 0, 0), 3, counts);
    assert_frequencies(counts, (double[]){0, 0.25, 0.75}, 3, 20000);
    count(qkv_select(s2, 0, 1), 3, counts);
    assert_frequencies(counts, (double[]){0.5, 0, 0.5}, 3, 20000);
    assert_null(qkv_error());
}

static void multinomial_without_replacement_draws_distinct_categories(void **state) {
    (void)state;
    qkv_tensor *probs = VEC(1, 0, 2, 3, 4);
    int64_t first[5] = {0}, n = 20000;
    for (int64_t t = 0; t < n; t++) {
        qkv_scope_begin();
        qkv_tensor *s = qkv_multinomial(probs, 4, false, &gen);
        assert_non_null(s);
        const int64_t *d = qkv_data(s);
        bool seen[5] = {0};
        for (int k = 0; k < 4; k++) {
            assert_false(seen[d[k]]);
            assert_int_not_equal(d[k], 1); /* the zero weight never comes */
            seen[d[k]] = true;
        }
        first[d[0]]++;
        qkv_scope_end();
    }
    assert_frequencies(first, (double[]){0.1, 0, 0.2, 0.3, 0.4}, 5, n);
    assert_null(qkv_error());
}

static void multinomial_is_deterministic_per_seed(void **state) {
    (void)state;
    qkv_tensor *probs = qkv_rand(QKV_F64, QKV_SHAPE(3, 50), &gen);
    for (int replacement = 0; replacement < 2; replacement++) {
        qkv_generator a, b, c;
        qkv_generator_init(&a, 7);
        qkv_generator_init(&b, 7);
        qkv_generator_init(&c, 8);
        qkv_tensor *sa = qkv_multinomial(probs, 20, replacement, &a);
        qkv_tensor *sb = qkv_multinomial(probs, 20, replacement, &b);
        qkv_tensor *sc = qkv_multinomial(probs, 20, replacement, &c);
        assert_true(qkv_item(qkv_sum_all(qkv_ne(sa, sb))) == 0);
        assert_true(qkv_item(qkv_sum_all(qkv_ne(sa, sc))) > 0);
        /* one uniform per sample: 60 in all */
        qkv_generator d;
        qkv_generator_init(&d, 7);
        for (int k = 0; k < 60; k++) qkv_generator_uniform(&d);
        assert_true(a.state == d.state && a.inc == d.inc);
    }
    assert_null(qkv_error());
}

/* ---- Refused arguments ------------------------------------------------------------------- */

/* expr must give NULL with exactly the error message want. */
#define ASSERT_REFUSED(expr, want)                                                           \
    do {                                                                                     \
        qkv_clear_error();                                                                   \
        if ((expr) != NULL) fail_msg("%s was accepted", #expr);                              \
        if (!qkv_error() || strcmp(qkv_error(), (want)))                                     \
            fail_msg("%s: error \"%s\", expected \"%s\"", #expr,                             \
                     qkv_error() ? qkv_error() : "(none)", (want));                          \
        qkv_clear_error();                                                                   \
    } while (0)

static void bad_axes_and_k_are_errors(void **state) {
    (void)state;
    qkv_tensor *x = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)), *idx = x;
    ASSERT_REFUSED(qkv_cumsum(x, 2), "qkv_cumsum: axis 2 out of range for [2,3]");
    ASSERT_REFUSED(qkv_sort(x, -3, false, &idx), "qkv_sort: axis -3 out of range for [2,3]");
    assert_null(idx); /* set to NULL on failure */
    ASSERT_REFUSED(qkv_argsort(x, 5, true), "qkv_argsort: axis 5 out of range for [2,3]");
    ASSERT_REFUSED(qkv_topk(x, 1, 2, true, NULL), "qkv_topk: axis 2 out of range for [2,3]");
    ASSERT_REFUSED(qkv_topk(x, 4, 1, true, &idx),
                   "qkv_topk: k 4 is out of range for axis 1 of [2,3] (size 3)");
    ASSERT_REFUSED(qkv_topk(x, -1, -1, false, NULL),
                   "qkv_topk: k -1 is out of range for axis -1 of [2,3] (size 3)");
    ASSERT_REFUSED(qkv_tril(qkv_zeros(QKV_F32, QKV_SHAPE(3)), 0),
                   "qkv_tril: input must have at least 2 dimensions, not [3]");
    ASSERT_REFUSED(qkv_triu(qkv_scalar(QKV_F32, 1), 0),
                   "qkv_triu: input must have at least 2 dimensions, not []");
    ASSERT_REFUSED(qkv_outer(x, qkv_zeros(QKV_F32, QKV_SHAPE(3))),
                   "qkv_outer: a and b must be 1-D, not [2,3] and [3]");
    ASSERT_REFUSED(qkv_clamp(x, NAN, NAN),
                   "qkv_clamp: at least one of min and max must be a bound, not NAN");
}

static void bad_triangular_products_are_errors(void **state) {
    (void)state;
    qkv_tensor *x = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)), *v = qkv_zeros(QKV_F32, QKV_SHAPE(3));
    ASSERT_REFUSED(qkv_matmul_tri(x, v, QKV_TRIL_A),
                   "qkv_matmul_tri: a triangular product needs matrices: [2,3] @ [3]");
    ASSERT_REFUSED(qkv_matmul_tri(x, x, QKV_TRIL_OUT),
                   "qkv_matmul_tri: inner dimensions differ: [2,3] @ [2,3]");
    ASSERT_REFUSED(qkv_matmul_tri(x, qkv_transpose(x, 0, 1), (qkv_tri)9),
                   "qkv_matmul_tri: 9 is not a qkv_tri");
}

static void bad_einsum_subscripts_are_errors(void **state) {
    (void)state;
    qkv_tensor *a = qkv_zeros(QKV_F64, QKV_SHAPE(2, 3)), *b = qkv_zeros(QKV_F64, QKV_SHAPE(3, 4));
    qkv_tensor *ab[] = {a, b};
    ASSERT_REFUSED(qkv_einsum("...ij,jk->ik", 2, ab),
                   "qkv_einsum: ellipsis ('...') is not supported: \"...ij,jk->ik\"");
    ASSERT_REFUSED(qkv_einsum("ij,j1->i", 2, ab),
                   "qkv_einsum: bad character '1' in \"ij,j1->i\"");
    ASSERT_REFUSED(qkv_einsum("ij,jk-ik", 2, ab),
                   "qkv_einsum: bad character '-' in \"ij,jk-ik\"");
    ASSERT_REFUSED(qkv_einsum("ij->i", 2, ab),
                   "qkv_einsum: \"ij->i\" names 1 operands but 2 were given");
    ASSERT_REFUSED(qkv_einsum("ij,jk,kl->il", 2, ab),
                   "qkv_einsum: \"ij,jk,kl->il\" names 3 operands but 2 were given");
    ASSERT_REFUSED(qkv_einsum("ij,jkl->il", 2, ab),
                   "qkv_einsum: operand 1 is [3,4] but its subscripts \"jkl\" name 3 "
                   "dimensions");
    ASSERT_REFUSED(qkv_einsum("ij,ik->jk", 2, ab),
                   "qkv_einsum: subscript 'i' has size 2 in operand 0 but 3 in operand 1");
    ASSERT_REFUSED(qkv_einsum("ii,jk->ik", 2, ab),
                   "qkv_einsum: subscript 'i' repeats in operand 0 of \"ii,jk->ik\": "
                   "diagonals are not supported");
    ASSERT_REFUSED(qkv_einsum("ij,jk->iz", 2, ab),
                   "qkv_einsum: output subscript 'z' is in no operand of \"ij,jk->iz\"");
    ASSERT_REFUSED(qkv_einsum("ij,jk->ii", 2, ab),
                   "qkv_einsum: subscript 'i' repeats in the output of \"ij,jk->ii\": "
                   "diagonals are not supported");
    qkv_tensor *v[17], *five = qkv_zeros(QKV_F64, QKV_SHAPE(1, 1, 1, 1, 1));
    for (int k = 0; k < 17; k++) v[k] = qkv_zeros(QKV_F64, QKV_SHAPE(2));
    ASSERT_REFUSED(qkv_einsum("a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a->a", 17, v),
                   "qkv_einsum: more than 16 operands in "
                   "\"a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a,a->a\"");
    ASSERT_REFUSED(qkv_einsum("abcde,fghij", 2, (qkv_tensor *[]){five, five}),
                   "qkv_einsum: the output of \"abcde,fghij\" would have more than 8 "
                   "dimensions");
    qkv_tensor *eight = qkv_zeros(QKV_F64, QKV_SHAPE(1, 1, 1, 1, 1, 1, 1, 1));
    ASSERT_REFUSED(qkv_einsum("abcdefgh,abcdefgh->abcdefgh", 2, (qkv_tensor *[]){eight, eight}),
                   "qkv_einsum: an intermediate result would have more than 8 dimensions");
    ASSERT_REFUSED(qkv_einsum(NULL, 2, ab), "qkv_einsum: subscripts is NULL");
    ASSERT_REFUSED(qkv_einsum("ij", 0, ab), "qkv_einsum: no operands");
}

static void bad_multinomial_arguments_are_errors_and_draw_nothing(void **state) {
    (void)state;
    qkv_generator before = gen;
    qkv_tensor *p = VEC(0.5, 0, 0.5);
    ASSERT_REFUSED(qkv_multinomial(p, -1, true, &gen),
                   "qkv_multinomial: n_samples must be positive, not -1");
    ASSERT_REFUSED(qkv_multinomial(p, 0, true, &gen),
                   "qkv_multinomial: n_samples must be positive, not 0");
    ASSERT_REFUSED(qkv_multinomial(VEC(0.5, -0.1), 1, true, &gen),
                   "qkv_multinomial: probs [2] has -0.1 at row 0, column 1: every entry must "
                   "be finite and non-negative");
    ASSERT_REFUSED(qkv_multinomial(VEC(NAN, 1), 1, true, &gen),
                   "qkv_multinomial: probs [2] has nan at row 0, column 0: every entry must be "
                   "finite and non-negative");
    ASSERT_REFUSED(qkv_multinomial(VEC(INFINITY, 1), 1, true, &gen),
                   "qkv_multinomial: probs [2] has inf at row 0, column 0: every entry must be "
                   "finite and non-negative");
    qkv_tensor *rows = qkv_from_array(QKV_F64, QKV_SHAPE(2, 2), (double[]){1, 2, 0, 0});
    ASSERT_REFUSED(qkv_multinomial(rows, 1, true, &gen),
                   "qkv_multinomial: row 1 of probs [2,2] sums to zero");
    ASSERT_REFUSED(qkv_multinomial(p, 3, false, &gen),
                   "qkv_multinomial: cannot draw 3 samples without replacement from row 0 of "
                   "probs [3], which has 2 nonzero entries");
    ASSERT_REFUSED(qkv_multinomial(qkv_zeros(QKV_F32, QKV_SHAPE(1, 2, 2)), 1, true, &gen),
                   "qkv_multinomial: probs must be 1-D or 2-D, not [1,2,2]");
    ASSERT_REFUSED(qkv_multinomial(qkv_ones(QKV_I64, QKV_SHAPE(2)), 1, true, &gen),
                   "qkv_multinomial: probs must be f32, f64 or bf16, not i64");
    ASSERT_REFUSED(qkv_multinomial(qkv_zeros(QKV_F32, QKV_SHAPE(2, 0)), 1, true, &gen),
                   "qkv_multinomial: probs [2,0] has no categories");
    ASSERT_REFUSED(qkv_multinomial(p, 1, true, NULL),
                   "qkv_multinomial: the generator is NULL");
    assert_true(gen.state == before.state); /* nothing drawn by a refused call */
    assert_non_null(qkv_multinomial(p, 2, false, &gen)); /* exactly the nonzero count */
}

static void silu_mul_refuses_shapes_that_do_not_broadcast(void **state) {
    (void)state;
    qkv_tensor *x = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    ASSERT_REFUSED(qkv_silu_mul(x, qkv_zeros(QKV_F32, QKV_SHAPE(4))),
                   "qkv_silu_mul: shapes do not broadcast: [2,3] and [4]");
    ASSERT_REFUSED(qkv_silu_mul(qkv_zeros(QKV_F64, QKV_SHAPE(3, 2)), x),
                   "qkv_silu_mul: shapes do not broadcast: [3,2] and [2,3]");
    assert_int_equal(qkv_silu_mul(qkv_arange(QKV_I64, 0, 3, 1), x)->dtype, QKV_F32);
    assert_int_equal(qkv_silu_mul(x, qkv_zeros(QKV_F64, QKV_SHAPE(3)))->dtype, QKV_F64);
}

/* NULL gives NULL, and an error naming the function when none is pending (tensor.h). */
static void assert_null_named(qkv_tensor *t, const char *message) {
    assert_null(t);
    assert_string_equal(qkv_error(), message);
    qkv_clear_error();
}

static void null_inputs_give_null_and_name_the_function(void **state) {
    (void)state;
    qkv_tensor *idx = (qkv_tensor *)1, *none[2] = {NULL, NULL};
    qkv_tensor *(*plain[])(const qkv_tensor *) = {
        qkv_silu, qkv_sin,   qkv_cos,  qkv_erf,   qkv_log1p, qkv_expm1,
        qkv_square, qkv_floor, qkv_ceil, qkv_round, qkv_sign,
    };
    for (size_t k = 0; k < sizeof plain / sizeof *plain; k++) {
        assert_null(plain[k](NULL));
        assert_non_null(strstr(qkv_error(), ": tensor argument 1 is NULL"));
        qkv_clear_error();
    }
    assert_null_named(qkv_softplus(NULL, 1, 20), "qkv_softplus: tensor argument 1 is NULL");
    assert_null_named(qkv_leaky_relu(NULL, 0.01), "qkv_leaky_relu: tensor argument 1 is NULL");
    assert_null_named(qkv_elu(NULL, 1), "qkv_elu: tensor argument 1 is NULL");
    assert_null_named(qkv_clamp(NULL, 0, 1), "qkv_clamp: tensor argument 1 is NULL");
    assert_null_named(qkv_cumsum(NULL, 0), "qkv_cumsum: tensor argument 1 is NULL");
    assert_null_named(qkv_sort(NULL, 0, false, &idx), "qkv_sort: tensor argument 1 is NULL");
    assert_null(idx);
    assert_null_named(qkv_argsort(NULL, 0, false), "qkv_argsort: tensor argument 1 is NULL");
    assert_null_named(qkv_topk(NULL, 1, 0, true, NULL), "qkv_topk: tensor argument 1 is NULL");
    assert_null_named(qkv_tril(NULL, 0), "qkv_tril: tensor argument 1 is NULL");
    assert_null_named(qkv_triu(NULL, 0), "qkv_triu: tensor argument 1 is NULL");
    assert_null_named(qkv_outer(NULL, NULL), "qkv_outer: tensor argument 1 is NULL");
    qkv_tensor *one = qkv_ones(QKV_F32, QKV_SHAPE(1));
    assert_null_named(qkv_silu_mul(NULL, one), "qkv_silu_mul: tensor argument 1 is NULL");
    assert_null_named(qkv_silu_mul(one, NULL), "qkv_silu_mul: tensor argument 2 is NULL");
    assert_null_named(qkv_einsum("ij,jk->ik", 2, none), "qkv_einsum: tensor argument 1 is NULL");
    assert_null_named(qkv_multinomial(NULL, 1, true, &gen),
                      "qkv_multinomial: tensor argument 1 is NULL");
    qkv_set_error("an earlier failure");
    assert_null(qkv_multinomial(NULL, 1, true, &gen));
    assert_string_equal(qkv_error(), "an earlier failure"); /* the first error stays */
}

/* Forward and backward of the differentiable ops here, on small inputs made inside. */
static bool ops_with_backward(void) {
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *x = qkv_requires_grad_(qkv_randn(QKV_F64, QKV_SHAPE(3, 4), &g), true);
    qkv_tensor *xy[] = {x, qkv_transpose(x, 0, 1)};
    qkv_tensor *math = qkv_silu_mul(qkv_transpose(xy[1], 0, 1),
                                    qkv_mul(qkv_silu(x), qkv_clamp(qkv_expm1(x), -1, NAN)));
    qkv_tensor *axis = qkv_topk(qkv_sort(qkv_cumsum(x, 1), 0, true, NULL), 2, 1, true, NULL);
    qkv_tensor *prod = qkv_matmul_tri(qkv_tril(qkv_einsum("ij,jk->ik", 2, xy), -1), x,
                                      QKV_TRIU_A);
    qkv_tensor *loss = qkv_add(qkv_add(qkv_sum_all(math), qkv_sum_all(axis)),
                               qkv_sum_all(prod));
    bool ok = qkv_backward(loss);
    qkv_zero_grad(x);
    return ok;
}

static bool draws(void) {
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *p = qkv_rand(QKV_F32, QKV_SHAPE(2, 5), &g);
    return qkv_multinomial(p, 3, false, &g) && qkv_multinomial(p, 9, true, &g) &&
           qkv_argsort(p, 1, false);
}

static void every_allocation_failure_is_clean(void **state) {
    (void)state;
    assert_every_allocation_failure_is_clean_in_a_scope(ops_with_backward());
    assert_every_allocation_failure_is_clean_in_a_scope(draws());
}

#define TEST(f) cmocka_unit_test_setup_teardown(f, setup, close_scope)

int main(void) {
    const struct CMUnitTest tests[] = {
        TEST(activations_match_torch),
        TEST(math_ops_match_torch),
        TEST(clamp_matches_torch_with_either_bound),
        TEST(rounding_matches_torch_with_zero_gradients),
        TEST(cumsum_matches_torch),
        TEST(sort_matches_torch_stable_with_nan_last),
        TEST(topk_matches_torch),
        TEST(tril_triu_outer_match_torch),
        TEST(einsum_matches_torch),
        TEST(silu_mul_matches_torch_broadcast_and_strided),
        TEST(math_ops_pass_gradcheck_on_every_layout),
        TEST(axis_ops_pass_gradcheck_on_every_layout),
        TEST(triangles_and_outer_pass_gradcheck),
        TEST(einsum_passes_gradcheck_on_every_layout),
        TEST(triangular_products_pass_gradcheck_on_every_layout),
        TEST(triangular_products_equal_the_masked_compositions),
        TEST(bad_triangular_products_are_errors),
        TEST(topk_takes_the_lower_index_among_equal_values),
        TEST(sort_is_stable_and_puts_nan_above_everything),
        TEST(argsort_gives_sort_indices_in_every_dtype),
        TEST(rounding_ops_give_zero_gradients_not_none),
        TEST(clamp_gradient_passes_at_the_bounds_and_is_selected),
        TEST(cheap_outputs_are_recomputed_bit_for_bit),
        TEST(integer_inputs_follow_torch_dtypes),
        TEST(einsum_of_one_operand_is_a_new_view),
        TEST(silu_mul_passes_gradcheck_on_every_layout),
        TEST(silu_mul_equals_the_composition),
        TEST(silu_mul_values_do_not_depend_on_the_layout),
        TEST(silu_mul_output_is_held_by_its_consumer),
        TEST(silu_mul_refuses_shapes_that_do_not_broadcast),
        TEST(multinomial_draws_in_proportion_to_weights),
        TEST(multinomial_without_replacement_draws_distinct_categories),
        TEST(multinomial_is_deterministic_per_seed),
        TEST(bad_axes_and_k_are_errors),
        TEST(bad_einsum_subscripts_are_errors),
        TEST(bad_multinomial_arguments_are_errors_and_draw_nothing),
        TEST(null_inputs_give_null_and_name_the_function),
        TEST(every_allocation_failure_is_clean),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
