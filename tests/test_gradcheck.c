/* Every differentiable op against central differences (qkv_gradcheck in F64): elementwise,
 * reductions, softmax, matmul, views, indexing and dropout, on random shapes from a seeded
 * generator, with broadcasting in every position and inputs that are transposed, strided or
 * expanded views. Also: gradcheck reports a wrong gradient. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "qkv.h"
#include "autograd/autograd_internal.h"
#include "harness.h"

#define EPS 1e-6
#define ATOL 1e-7
#define RTOL 1e-6

static qkv_generator gen;

/* A scope of the test's own (open_scope) and the generator at its seed. */
static int setup(void **state) {
    qkv_generator_init(&gen, 2024);
    return open_scope(state);
}

/* ---- Inputs ------------------------------------------------------------------------------ */

#include "leaf_inputs.h"

static qkv_tensor *leaf(int ndim, const int64_t *shape, values v) {
    return input(ndim, shape, v, CONTIGUOUS);
}

/* A random shape of 1 to 3 dims, sizes 1 to 4. */
static int random_shape(int64_t *shape) {
    int ndim = 1 + (int)qkv_generator_below(&gen, 3);
    for (int i = 0; i < ndim; i++) shape[i] = 1 + (int64_t)qkv_generator_below(&gen, 4);
    return ndim;
}

/* A shape that broadcasts to full: some leading dims dropped, some others set to 1. */
static int broadcast_from(int ndim, const int64_t *full, int64_t *shape) {
    int drop = (int)qkv_generator_below(&gen, (uint64_t)ndim + 1);
    for (int i = drop; i < ndim; i++)
        shape[i - drop] = qkv_generator_below(&gen, 3) == 0 ? 1 : full[i];
    return ndim - drop;
}

static void check(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx) {
    qkv_scope_begin();
    bool ok = qkv_gradcheck(fn, inputs, n, ctx, EPS, ATOL, RTOL);
    qkv_scope_end();
    if (!ok) {
        char s[128];
        fail_msg("%s (input 0 %s)", qkv_error() ? qkv_error() : "no error",
                 qkv_shape_str(inputs[0], s, sizeof s));
    }
}

#define CHECK(fn, ctx, ...)                                                                  \
    check(fn, (qkv_tensor *const[]){__VA_ARGS__},                                            \
          (int)(sizeof((qkv_tensor *const[]){__VA_ARGS__}) / sizeof(qkv_tensor *)), ctx)

/* ---- Binary ops with broadcasting -------------------------------------------------------- */

typedef qkv_tensor *(*binary_fn)(const qkv_tensor *, const qkv_tensor *);
typedef struct binary_op {
    binary_fn f;
    values a, b;
} binary_op;

static qkv_tensor *call_binary(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    return ((const binary_op *)ctx)->f(in[0], in[1]);
}

typedef struct shape_pair {
    int na, nb;
    int64_t a[3], b[3];
} shape_pair;

/* Broadcasting in every position: leading dims missing on either side, size-1 dims on
 * either side and on both, 0-d operands. */
static const shape_pair fixed_pairs[] = {
    {2, 2, {2, 3}, {2, 3}},
    {2, 1, {2, 3}, {3}},
    {1, 2, {3}, {2, 3}},
    {3, 2, {2, 1, 4}, {3, 1}},
    {3, 3, {1, 3, 1}, {2, 1, 4}},
    {2, 2, {2, 1}, {1, 3}},
    {0, 2, {0}, {2, 3}},
    {2, 0, {2, 3}, {0}},
};

static void check_binary(binary_fn f, values va, values vb) {
    binary_op op = {f, va, vb};
    int n_fixed = (int)(sizeof fixed_pairs / sizeof *fixed_pairs);
    for (int p = 0; p < n_fixed + 6; p++) {
        shape_pair s;
        if (p < n_fixed) {
            s = fixed_pairs[p];
        } else {
            int64_t full[3];
            int nd = random_shape(full);
            s.na = broadcast_from(nd, full, s.a);
            s.nb = broadcast_from(nd, full, s.b);
            if (p % 2) {
                s.na = nd;
                memcpy(s.a, full, sizeof full);
            }
        }
        for (int l = 0; l < N_LAYOUTS; l++) {
            qkv_tensor *a = input(s.na, s.a, va, (layout)l);
            qkv_tensor *b = input(s.nb, s.b, vb, (layout)((l + 1) % N_LAYOUTS));
            CHECK(call_binary, &op, a, b);
        }
    }
}

static void gradcheck_add(void **state) { (void)state; check_binary(qkv_add, ANY, ANY); }
static void gradcheck_sub(void **state) { (void)state; check_binary(qkv_sub, ANY, ANY); }
static void gradcheck_mul(void **state) { (void)state; check_binary(qkv_mul, ANY, ANY); }
static void gradcheck_div(void **state) { (void)state; check_binary(qkv_div, ANY, NONZERO); }
static void gradcheck_pow(void **state) { (void)state; check_binary(qkv_pow, POSITIVE, ANY); }
/* Continuous random values: no ties, and no two within EPS of each other. */
static void gradcheck_maximum(void **state) { (void)state; check_binary(qkv_maximum, ANY, ANY); }
static void gradcheck_minimum(void **state) { (void)state; check_binary(qkv_minimum, ANY, ANY); }

/* ---- Tensor-scalar and unary ops --------------------------------------------------------- */

typedef struct unary_op {
    const char *name;
    qkv_tensor *(*f)(const qkv_tensor *, double);
    double s;
    values v;
} unary_op;

static qkv_tensor *call_unary(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const unary_op *op = ctx;
    return op->f(in[0], op->s);
}

static void check_unary(const unary_op *op) {
    for (int trial = 0; trial < 3 * N_LAYOUTS; trial++) {
        int64_t shape[3];
        int nd = random_shape(shape);
        qkv_tensor *x = input(nd, shape, op->v, (layout)(trial % N_LAYOUTS));
        qkv_scope_begin();
        bool ok = qkv_gradcheck(call_unary, &x, 1, (void *)op, EPS, ATOL, RTOL);
        qkv_scope_end();
        if (!ok) fail_msg("%s: %s", op->name, qkv_error());
    }
    qkv_tensor *x0 = leaf(0, NULL, op->v); /* a 0-d input */
    CHECK(call_unary, (void *)op, x0);
}

static qkv_tensor *rsub(const qkv_tensor *a, double s) { return qkv_rsub_scalar(s, a); }
static qkv_tensor *rdiv(const qkv_tensor *a, double s) { return qkv_rdiv_scalar(s, a); }

static void gradcheck_scalar_variants(void **state) {
    (void)state;
    const unary_op ops[] = {
        {"add_scalar", qkv_add_scalar, 1.5, ANY},
        {"sub_scalar", qkv_sub_scalar, 1.5, ANY},
        {"rsub_scalar", rsub, 1.5, ANY},
        {"mul_scalar", qkv_mul_scalar, -2.5, ANY},
        {"div_scalar", qkv_div_scalar, -2.5, ANY},
        {"rdiv_scalar", rdiv, 3.0, NONZERO},
        {"pow_scalar", qkv_pow_scalar, 2.5, POSITIVE},
        {"pow_scalar", qkv_pow_scalar, -1.5, POSITIVE},
        {"pow_scalar", qkv_pow_scalar, 3.0, ANY},
        /* a sampled value lands within EPS of the threshold 0.1 with probability ~1e-6 */
        {"maximum_scalar", qkv_maximum_scalar, 0.1, ANY},
        {"minimum_scalar", qkv_minimum_scalar, 0.1, ANY},
    };
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++) check_unary(&ops[i]);
}

static qkv_tensor *neg(const qkv_tensor *a, double s) { (void)s; return qkv_neg(a); }
static qkv_tensor *exp_(const qkv_tensor *a, double s) { (void)s; return qkv_exp(a); }
static qkv_tensor *log_(const qkv_tensor *a, double s) { (void)s; return qkv_log(a); }
static qkv_tensor *sqrt_(const qkv_tensor *a, double s) { (void)s; return qkv_sqrt(a); }
static qkv_tensor *rsqrt(const qkv_tensor *a, double s) { (void)s; return qkv_rsqrt(a); }
static qkv_tensor *abs_(const qkv_tensor *a, double s) { (void)s; return qkv_abs(a); }
static qkv_tensor *tanh_(const qkv_tensor *a, double s) { (void)s; return qkv_tanh(a); }
static qkv_tensor *sigmoid(const qkv_tensor *a, double s) { (void)s; return qkv_sigmoid(a); }
static qkv_tensor *relu(const qkv_tensor *a, double s) { (void)s; return qkv_relu(a); }
static qkv_tensor *gelu(const qkv_tensor *a, double tanh_form) {
    return qkv_gelu(a, tanh_form != 0);
}

static void gradcheck_unary(void **state) {
    (void)state;
    const unary_op ops[] = {
        {"neg", neg, 0, ANY},         {"exp", exp_, 0, ANY},
        {"log", log_, 0, POSITIVE},   {"sqrt", sqrt_, 0, POSITIVE},
        {"rsqrt", rsqrt, 0, POSITIVE}, {"abs", abs_, 0, NONZERO},
        {"tanh", tanh_, 0, ANY},      {"sigmoid", sigmoid, 0, ANY},
        {"relu", relu, 0, NONZERO},   {"gelu erf", gelu, 0, ANY},
        {"gelu tanh", gelu, 1, ANY},
    };
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++) check_unary(&ops[i]);
}

/* ---- where, masked_fill ------------------------------------------------------------------ */

static qkv_tensor *call_where(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    return qkv_where(ctx, in[0], in[1]);
}

static void gradcheck_where(void **state) {
    (void)state;
    /* cond [2,1,4], a [3,1], b [2,3,4] (strided); then cond broadcast the other way */
    qkv_tensor *cond = qkv_gt_scalar(filled(QKV_SHAPE(2, 1, 4), ANY), 0);
    CHECK(call_where, cond, leaf(QKV_SHAPE(3, 1), ANY),
          input(QKV_SHAPE(2, 3, 4), ANY, STRIDED));
    qkv_tensor *row = qkv_gt_scalar(filled(QKV_SHAPE(3), ANY), 0);
    CHECK(call_where, row, input(QKV_SHAPE(4, 3), ANY, TRANSPOSED), leaf(0, NULL, ANY));
}

static qkv_tensor *call_masked_fill(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    return qkv_masked_fill(in[0], ctx, -7.5);
}

static void gradcheck_masked_fill(void **state) {
    (void)state;
    qkv_tensor *mask = qkv_gt_scalar(filled(QKV_SHAPE(1, 4), ANY), 0);
    CHECK(call_masked_fill, mask, leaf(QKV_SHAPE(3, 4), ANY));
    CHECK(call_masked_fill, mask, input(QKV_SHAPE(3, 4), ANY, TRANSPOSED));
    qkv_tensor *full = qkv_gt_scalar(filled(QKV_SHAPE(2, 3, 4), ANY), 0);
    CHECK(call_masked_fill, full, input(QKV_SHAPE(2, 3, 4), ANY, EXPANDED));
}

/* ---- Reductions -------------------------------------------------------------------------- */

typedef enum reduction { SUM, MEAN, VAR_UNBIASED, VAR_BIASED, MAX, MIN } reduction;

typedef struct reduce_args {
    reduction r;
    int naxes; /* -1: all elements */
    int axes[3];
    bool keepdim;
} reduce_args;

static qkv_tensor *call_reduce(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const reduce_args *a = ctx;
    qkv_tensor *x = in[0];
    bool all = a->naxes < 0;
    switch (a->r) {
    case SUM: return all ? qkv_sum_all(x) : qkv_sum_axes(x, a->naxes, a->axes, a->keepdim);
    case MEAN: return all ? qkv_mean_all(x) : qkv_mean_axes(x, a->naxes, a->axes, a->keepdim);
    case VAR_UNBIASED: return qkv_var_axes(x, a->naxes, a->axes, 1, a->keepdim);
    case VAR_BIASED: return qkv_var_axes(x, a->naxes, a->axes, 0, a->keepdim);
    case MAX:
        return all ? qkv_max_all(x) : a->naxes == 1 ? qkv_max(x, a->axes[0], a->keepdim)
                                    : qkv_max_axes(x, a->naxes, a->axes, a->keepdim);
    case MIN:
        return all ? qkv_min_all(x) : a->naxes == 1 ? qkv_min(x, a->axes[0], a->keepdim)
                                    : qkv_min_axes(x, a->naxes, a->axes, a->keepdim);
    }
    return NULL;
}

/* Axis choices: one axis (first, middle, last by a negative index), two axes, all three. */
static const reduce_args axis_choices[] = {
    {SUM, 1, {0}, false}, {SUM, 1, {1}, false}, {SUM, 1, {-1}, false},
    {SUM, 2, {0, 2}, false}, {SUM, 2, {-1, 1}, false}, {SUM, 3, {0, 1, 2}, false},
};

static void check_reduction(reduction r, layout l) {
    for (size_t c = 0; c < sizeof axis_choices / sizeof *axis_choices; c++)
        for (int keep = 0; keep < 2; keep++) {
            reduce_args a = axis_choices[c];
            a.r = r;
            a.keepdim = keep;
            CHECK(call_reduce, &a, input(QKV_SHAPE(2, 3, 4), ANY, l));
        }
}

static void gradcheck_sum_mean_var(void **state) {
    (void)state;
    for (reduction r = SUM; r <= VAR_BIASED; r++)
        for (int l = 0; l < N_LAYOUTS; l++) check_reduction(r, (layout)l);
    reduce_args all_sum = {SUM, -1, {0}, false}, all_mean = {MEAN, -1, {0}, false};
    CHECK(call_reduce, &all_sum, input(QKV_SHAPE(3, 4), ANY, TRANSPOSED));
    CHECK(call_reduce, &all_mean, input(QKV_SHAPE(3, 4), ANY, EXPANDED));
    CHECK(call_reduce, &all_sum, leaf(0, NULL, ANY));
}

/* A leaf holding distinct values 0.1 apart in random order, so max and min have one clear
 * winner per row whatever EPS does. */
static qkv_tensor *distinct(int ndim, const int64_t *shape, layout l) {
    qkv_tensor *t = input(ndim, shape, ANY, l);
    int64_t n = t->numel;
    double v[64];
    assert_true(n <= 64);
    for (int64_t i = 0; i < n; i++) v[i] = 0.1 * (double)i - 1;
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)qkv_generator_below(&gen, (uint64_t)i + 1);
        double s = v[i];
        v[i] = v[j];
        v[j] = s;
    }
    qkv_no_grad_begin();
    assert_true(qkv_copy_(t, qkv_reshape(qkv_from_array(QKV_F64, QKV_SHAPE(n), v), t->ndim,
                                         t->shape)));
    qkv_no_grad_end();
    return t;
}

static void gradcheck_max_min(void **state) {
    (void)state;
    for (reduction r = MAX; r <= MIN; r++) {
        for (int axis = -1; axis < 3; axis++)
            for (int keep = 0; keep < 2; keep++) {
                reduce_args a = {r, 1, {axis}, keep};
                CHECK(call_reduce, &a, distinct(QKV_SHAPE(2, 3, 4), CONTIGUOUS));
                CHECK(call_reduce, &a, distinct(QKV_SHAPE(2, 3, 4), TRANSPOSED));
            }
        for (int keep = 0; keep < 2; keep++) {
            reduce_args two = {r, 2, {-1, 0}, keep}, three = {r, 3, {0, 1, 2}, keep};
            CHECK(call_reduce, &two, distinct(QKV_SHAPE(2, 3, 4), STRIDED));
            CHECK(call_reduce, &three, distinct(QKV_SHAPE(2, 3, 4), TRANSPOSED));
        }
        reduce_args all = {r, -1, {0}, false};
        CHECK(call_reduce, &all, distinct(QKV_SHAPE(3, 4), CONTIGUOUS));
        CHECK(call_reduce, &all, distinct(QKV_SHAPE(3, 4), STRIDED));
        CHECK(call_reduce, &all, distinct(QKV_SHAPE(5), CONTIGUOUS));
    }
}

/* ---- softmax, log_softmax ---------------------------------------------------------------- */

typedef struct axis_op {
    qkv_tensor *(*f)(const qkv_tensor *, int);
    int axis;
} axis_op;

static qkv_tensor *call_axis_op(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const axis_op *op = ctx;
    return op->f(in[0], op->axis);
}

static void gradcheck_softmax_and_log_softmax(void **state) {
    (void)state;
    qkv_tensor *(*fs[])(const qkv_tensor *, int) = {qkv_softmax, qkv_log_softmax};
    for (int f = 0; f < 2; f++)
        for (int axis = -1; axis < 3; axis++)
            for (int l = 0; l < N_LAYOUTS; l++) {
                axis_op op = {fs[f], axis};
                CHECK(call_axis_op, &op, input(QKV_SHAPE(2, 3, 4), ANY, (layout)l));
            }
}

/* ---- causal softmax ---------------------------------------------------------------------- */

static qkv_tensor *call_causal_softmax(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    return qkv_causal_softmax(in[0], *(const int64_t *)ctx);
}

/* Square scores, more queries than keys (rows past the keys see them all) and a cached past. */
static void gradcheck_causal_softmax(void **state) {
    (void)state;
    static const int64_t pasts[] = {0, 0, 2};
    static const int64_t shapes[][3] = {{2, 5, 5}, {1, 6, 4}, {2, 3, 7}};
    for (int c = 0; c < 3; c++)
        for (int l = 0; l < N_LAYOUTS; l++)
            CHECK(call_causal_softmax, (void *)&pasts[c],
                  input(QKV_SHAPE(shapes[c][0], shapes[c][1], shapes[c][2]), ANY, (layout)l));
}

/* ---- matmul ------------------------------------------------------------------------------ */

static qkv_tensor *call_matmul(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return qkv_matmul(in[0], in[1]);
}

static void gradcheck_matmul(void **state) {
    (void)state;
    static const shape_pair pairs[] = {
        {1, 1, {4}, {4}},                 /* dot product */
        {2, 2, {3, 4}, {4, 2}},
        {1, 2, {4}, {4, 2}},              /* vector @ matrix */
        {2, 1, {3, 4}, {4}},              /* matrix @ vector */
        {3, 3, {2, 3, 4}, {2, 4, 2}},     /* batched */
        {3, 2, {2, 3, 4}, {4, 2}},        /* one matrix for the batch */
        {2, 3, {3, 4}, {2, 4, 2}},
        {3, 1, {2, 3, 4}, {4}},
        {1, 3, {4}, {2, 4, 2}},
        {3, 3, {2, 1, 4}, {1, 4, 3}},     /* batch dims broadcast both ways */
    };
    for (size_t p = 0; p < sizeof pairs / sizeof *pairs; p++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            const shape_pair *s = &pairs[p];
            qkv_tensor *a = input(s->na, s->a, ANY, (layout)l);
            qkv_tensor *b = input(s->nb, s->b, ANY, (layout)((l + 2) % N_LAYOUTS));
            CHECK(call_matmul, NULL, a, b);
        }
    /* [2,1,3,4] @ [5,4,2] -> [2,5,3,2] */
    CHECK(call_matmul, NULL, leaf(QKV_SHAPE(2, 1, 3, 4), ANY), leaf(QKV_SHAPE(5, 4, 2), ANY));
    CHECK(call_matmul, NULL, input(QKV_SHAPE(2, 1, 3, 4), ANY, TRANSPOSED),
          input(QKV_SHAPE(5, 4, 2), ANY, EXPANDED));
}

static qkv_tensor *call_baddbmm(qkv_tensor *const *in, int n, void *ctx) {
    return qkv_baddbmm(n > 2 ? in[2] : NULL, in[0], in[1], *(const double *)ctx);
}

/* input + alpha (a @ b) for each form of input: one row per matrix (which the product adds as
 * it stores, when contiguous), one row for all, a full matrix, none; every layout of the
 * operands and of the input. */
static void gradcheck_baddbmm(void **state) {
    (void)state;
    static const double alpha = -0.75;
    for (int l = 0; l < N_LAYOUTS; l++) {
        qkv_tensor *a = input(QKV_SHAPE(2, 3, 4), ANY, (layout)l);
        qkv_tensor *b = input(QKV_SHAPE(2, 4, 5), ANY, (layout)((l + 2) % N_LAYOUTS));
        CHECK(call_baddbmm, (void *)&alpha, a, b, input(QKV_SHAPE(2, 1, 5), ANY, (layout)l));
        CHECK(call_baddbmm, (void *)&alpha, a, b, leaf(QKV_SHAPE(5), ANY));
        CHECK(call_baddbmm, (void *)&alpha, a, b, input(QKV_SHAPE(3, 5), ANY, (layout)l));
        CHECK(call_baddbmm, (void *)&alpha, a, b);
    }
    /* a key mask over per-head scores, b shared by the batch */
    CHECK(call_baddbmm, (void *)&alpha, leaf(QKV_SHAPE(2, 2, 3, 4), ANY),
          leaf(QKV_SHAPE(4, 5), ANY), leaf(QKV_SHAPE(2, 1, 1, 5), ANY));
}

static qkv_tensor *call_affine(qkv_tensor *const *in, int n, void *ctx) {
    (void)ctx;
    return qkv_affine(in[0], in[1], n > 2 ? in[2] : NULL);
}

/* x W^T + b for inputs of 1 to 3 dimensions, every layout of x and W, with and without b */
static void gradcheck_affine(void **state) {
    (void)state;
    static const int64_t xs[3][3] = {{4}, {3, 4}, {2, 3, 4}};
    for (int nd = 1; nd <= 3; nd++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            qkv_tensor *x = input(nd, xs[nd - 1], ANY, (layout)l);
            qkv_tensor *w = input(QKV_SHAPE(5, 4), ANY, (layout)((l + 1) % N_LAYOUTS));
            CHECK(call_affine, NULL, x, w, leaf(QKV_SHAPE(5), ANY));
            CHECK(call_affine, NULL, x, w);
        }
}

/* ---- Views and copies -------------------------------------------------------------------- */

typedef enum view_kind {
    RESHAPE, FLATTEN, TRANSPOSE, PERMUTE, SLICE, NARROW, SELECT, EXPAND, SQUEEZE, SQUEEZE_ALL,
    UNSQUEEZE, CONTIGUOUS_OP, CLONE, TO_F64, TO_F32, N_VIEWS,
} view_kind;

static const char *const view_names[] = {
    "reshape", "flatten", "transpose", "permute", "slice", "narrow", "select", "expand",
    "squeeze", "squeeze_all", "unsqueeze", "contiguous", "clone", "to_dtype f64",
    "to_dtype f32",
};

/* Each view of a [2,3,4] input (for squeeze, of [2,1,4]); outputs are followed by an op so
 * that a view of a view and the output's own geometry are both exercised. */
static qkv_tensor *call_view(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const qkv_tensor *x = in[0];
    switch (*(const view_kind *)ctx) {
    case RESHAPE: return qkv_reshape(x, QKV_SHAPE(4, -1));
    case FLATTEN: return qkv_flatten(x, 0, 1);
    case TRANSPOSE: return qkv_transpose(x, 0, 2);
    case PERMUTE: return qkv_permute(x, (const int[]){1, 2, 0});
    case SLICE: return qkv_slice(qkv_slice(x, 2, 1, 4, 2), 1, -2, 3, 1);
    case NARROW: return qkv_narrow(x, 1, 1, 2);
    case SELECT: return qkv_select(qkv_select(x, 2, -1), 0, 1);
    case EXPAND: return qkv_expand(qkv_unsqueeze(x, 1), QKV_SHAPE(2, 3, 3, 4));
    case SQUEEZE: return qkv_squeeze(x, 1);
    case SQUEEZE_ALL: return qkv_squeeze_all(x);
    case UNSQUEEZE: return qkv_unsqueeze(x, -1);
    case CONTIGUOUS_OP: return qkv_contiguous(x);
    case CLONE: return qkv_clone(x);
    case TO_F64: return qkv_to_dtype(x, QKV_F64);
    case TO_F32: return qkv_to_dtype(x, QKV_F32);
    default: return NULL;
    }
}

static void gradcheck_views_and_copies(void **state) {
    (void)state;
    for (view_kind v = RESHAPE; v < N_VIEWS; v++)
        for (int l = 0; l < N_LAYOUTS; l++) {
            bool squeeze = v == SQUEEZE || v == SQUEEZE_ALL;
            qkv_tensor *x = squeeze ? input(QKV_SHAPE(2, 1, 4), ANY, (layout)l)
                                    : input(QKV_SHAPE(2, 3, 4), ANY, (layout)l);
            /* F32 keeps 24 bits: a larger step keeps the rounding out of the difference
             * quotient (the function is linear, so the step costs nothing else). */
            double eps = v == TO_F32 ? 1e-2 : EPS, atol = v == TO_F32 ? 1e-4 : ATOL;
            qkv_scope_begin();
            bool ok = qkv_gradcheck(call_view, &x, 1, &v, eps, atol, RTOL);
            qkv_scope_end();
            if (!ok) fail_msg("%s, layout %d: %s", view_names[v], l, qkv_error());
        }
}

/* ---- Indexing ---------------------------------------------------------------------------- */

typedef struct index_args {
    int axis;
    const qkv_tensor *index;
} index_args;

static qkv_tensor *call_index_select(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const index_args *a = ctx;
    return qkv_index_select(in[0], a->axis, a->index);
}

static qkv_tensor *call_gather(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const index_args *a = ctx;
    return qkv_gather(in[0], a->axis, a->index);
}

static qkv_tensor *indices(int ndim, const int64_t *shape, const int64_t *values) {
    qkv_tensor *t = qkv_from_array(QKV_I64, ndim, shape, values);
    assert_non_null(t);
    return t;
}

/* Repeated indices: the gradient of a picked entry is the sum over every time it was picked. */
static void gradcheck_index_select(void **state) {
    (void)state;
    index_args rows = {0, indices(QKV_SHAPE(5), (const int64_t[]){2, 0, 2, 3, 2})};
    index_args cols = {-1, indices(QKV_SHAPE(5), (const int64_t[]){1, 1, 0, 2, 1})};
    index_args table = {0, indices(QKV_SHAPE(2, 3), (const int64_t[]){3, 1, 3, 0, 3, 3})};
    for (int l = 0; l < N_LAYOUTS; l++) {
        CHECK(call_index_select, &rows, input(QKV_SHAPE(4, 3), ANY, (layout)l));
        CHECK(call_index_select, &cols, input(QKV_SHAPE(4, 3), ANY, (layout)l));
        CHECK(call_index_select, &table, input(QKV_SHAPE(4, 3), ANY, (layout)l));
    }
}

static void gradcheck_gather(void **state) {
    (void)state;
    index_args along1 = {1, indices(QKV_SHAPE(3, 5), (const int64_t[]){
        0, 0, 3, 1, 0, 2, 2, 2, 2, 1, 3, 0, 1, 3, 3})};
    index_args along0 = {0, indices(QKV_SHAPE(2, 4), (const int64_t[]){
        2, 2, 0, 1, 2, 0, 0, 1})};
    for (int l = 0; l < N_LAYOUTS; l++) {
        CHECK(call_gather, &along1, input(QKV_SHAPE(3, 4), ANY, (layout)l));
        CHECK(call_gather, &along0, input(QKV_SHAPE(3, 4), ANY, (layout)l));
    }
}

static qkv_tensor *call_concat(qkv_tensor *const *in, int n, void *ctx) {
    return qkv_concat(n, in, *(const int *)ctx);
}

static qkv_tensor *call_stack(qkv_tensor *const *in, int n, void *ctx) {
    return qkv_stack(n, in, *(const int *)ctx);
}

static void gradcheck_concat_and_stack(void **state) {
    (void)state;
    for (int l = 0; l < N_LAYOUTS; l++) {
        layout a = (layout)l, b = (layout)((l + 1) % N_LAYOUTS);
        layout c = (layout)((l + 2) % N_LAYOUTS);
        int first = 0, last = -1, middle = 1;
        CHECK(call_concat, &first, input(QKV_SHAPE(2, 3), ANY, a),
              input(QKV_SHAPE(1, 3), ANY, b), input(QKV_SHAPE(4, 3), ANY, c));
        CHECK(call_concat, &last, input(QKV_SHAPE(3, 2), ANY, a),
              input(QKV_SHAPE(3, 1), ANY, b), input(QKV_SHAPE(3, 4), ANY, c));
        CHECK(call_stack, &first, input(QKV_SHAPE(2, 3), ANY, a),
              input(QKV_SHAPE(2, 3), ANY, b), input(QKV_SHAPE(2, 3), ANY, c));
        CHECK(call_stack, &middle, input(QKV_SHAPE(2, 3), ANY, a),
              input(QKV_SHAPE(2, 3), ANY, b));
        CHECK(call_stack, &last, input(QKV_SHAPE(2, 3), ANY, a),
              input(QKV_SHAPE(2, 3), ANY, b), input(QKV_SHAPE(2, 3), ANY, c));
    }
}

/* ---- dropout ----------------------------------------------------------------------------- */

typedef struct dropout_args {
    double p;
    bool training;
} dropout_args;

/* A fresh generator with the same seed on every call gives every evaluation the same mask. */
static qkv_tensor *call_dropout(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const dropout_args *a = ctx;
    qkv_generator g;
    qkv_generator_init(&g, 99);
    return qkv_dropout(in[0], a->p, a->training, &g);
}

/* over a fresh product of the input, which qkv_dropout_ overwrites */
static qkv_tensor *call_dropout_in_place(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const dropout_args *a = ctx;
    qkv_generator g;
    qkv_generator_init(&g, 99);
    return qkv_dropout_(qkv_mul_scalar(in[0], 1.5), a->p, a->training, &g);
}

static void gradcheck_dropout(void **state) {
    (void)state;
    const dropout_args cases[] = {{0.0, true}, {0.3, true}, {0.7, true}, {0.5, false}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
        for (int l = 0; l < N_LAYOUTS; l++)
            CHECK(call_dropout, (void *)&cases[c], input(QKV_SHAPE(3, 5), ANY, (layout)l));
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++)
        CHECK(call_dropout_in_place, (void *)&cases[c], input(QKV_SHAPE(3, 5), ANY, CONTIGUOUS));
}

/* ---- Composition ------------------------------------------------------------------------- */

/* A small attention-like graph using many ops at once: softmax(q k^T / 2) v, layer-normed. */
static qkv_tensor *call_composite(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    qkv_tensor *scores = qkv_div_scalar(qkv_matmul(in[0], qkv_transpose(in[1], -1, -2)), 2);
    qkv_tensor *h = qkv_matmul(qkv_softmax(scores, -1), in[2]);
    qkv_tensor *centered = qkv_sub(h, qkv_mean(h, -1, true));
    return qkv_mul(centered, qkv_rsqrt(qkv_add_scalar(qkv_var(h, -1, 0, true), 1e-5)));
}

static void gradcheck_composite_attention(void **state) {
    (void)state;
    CHECK(call_composite, NULL, input(QKV_SHAPE(2, 3, 4), ANY, TRANSPOSED),
          input(QKV_SHAPE(2, 5, 4), ANY, STRIDED), input(QKV_SHAPE(2, 5, 3), ANY, EXPANDED));
}

/* ---- gradcheck itself -------------------------------------------------------------------- */

/* An identity whose backward doubles the gradient: a deliberately wrong op, defined through
 * the public contract for functions with their own backward. */
static void doubled_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    gi[0] = qkv_mul_scalar(g, 2);
}
static const qkv_function doubled_fn = {.name = "doubled_identity", .backward = doubled_backward};

static qkv_tensor *doubled_identity(const qkv_tensor *a) {
    qkv_ctx *ctx = qkv_function_begin(&doubled_fn, 1, (const qkv_tensor *const[]){a}, NULL);
    return qkv_function_end(ctx, qkv_mul_scalar(a, 1));
}

static qkv_tensor *call_with_wrong_gradient(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    return qkv_mul(in[0], doubled_identity(in[1]));
}

static void gradcheck_reports_a_wrong_gradient(void **state) {
    (void)state;
    qkv_tensor *a = leaf(QKV_SHAPE(2, 2), ANY);
    qkv_tensor *b = leaf(QKV_SHAPE(2, 2), ANY);
    assert_false(qkv_gradcheck(call_with_wrong_gradient, (qkv_tensor *const[]){a, b}, 2, NULL,
                               EPS, ATOL, RTOL));
    const char *e = qkv_error();
    assert_non_null(e);
    /* The message names input 1 and its first element, gives both values (the analytic one
     * doubled), their difference and the tolerances. */
    double analytic, numeric, difference, atol, rtol;
    int fields = sscanf(e, "qkv_gradcheck: input 1 element 0: analytic %lf, numeric %lf, "
                        "difference %lf (atol %lf, rtol %lf)", &analytic, &numeric,
                        &difference, &atol, &rtol);
    if (fields != 5) fail_msg("%s", e);
    assert_true(numeric != 0 && fabs(analytic - 2 * numeric) <= 1e-6 * fabs(numeric));
    assert_true(fabs(difference - fabs(numeric)) <= 1e-2 * fabs(numeric));
    assert_true(atol == ATOL && rtol == RTOL);
    /* input 0's gradient is right and passes; the inputs' gradients are restored */
    assert_null(a->grad);
    assert_null(b->grad);
}

static void gradcheck_rejects_f32_and_non_leaf_inputs(void **state) {
    (void)state;
    qkv_tensor *f = qkv_requires_grad_(qkv_ones(QKV_F32, QKV_SHAPE(2)), true);
    view_kind v = CLONE;
    assert_false(qkv_gradcheck(call_view, &f, 1, &v, EPS, ATOL, RTOL));
    assert_string_equal(qkv_error(), "qkv_gradcheck: input 0 is f32; gradcheck needs f64");
    qkv_clear_error();
    qkv_tensor *inner = qkv_mul_scalar(leaf(QKV_SHAPE(2), ANY), 2);
    assert_false(qkv_gradcheck(call_view, &inner, 1, &v, EPS, ATOL, RTOL));
    assert_string_equal(qkv_error(), "qkv_gradcheck: input 0 is not a leaf");
}

static void gradcheck_keeps_existing_gradients(void **state) {
    (void)state;
    qkv_tensor *x = leaf(QKV_SHAPE(2), ANY);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(x, 3))));
    qkv_tensor *before = x->grad;
    view_kind v = CLONE;
    assert_true(qkv_gradcheck(call_view, &x, 1, &v, EPS, ATOL, RTOL));
    assert_ptr_equal(x->grad, before);
    assert_true(qkv_get(x->grad, (const int64_t[]){1}) == 3);
}

#define TEST(f) cmocka_unit_test_setup_teardown(f, setup, close_scope)

int main(void) {
    const struct CMUnitTest tests[] = {
        TEST(gradcheck_add),
        TEST(gradcheck_sub),
        TEST(gradcheck_mul),
        TEST(gradcheck_div),
        TEST(gradcheck_pow),
        TEST(gradcheck_maximum),
        TEST(gradcheck_minimum),
        TEST(gradcheck_scalar_variants),
        TEST(gradcheck_unary),
        TEST(gradcheck_where),
        TEST(gradcheck_masked_fill),
        TEST(gradcheck_sum_mean_var),
        TEST(gradcheck_max_min),
        TEST(gradcheck_softmax_and_log_softmax),
        TEST(gradcheck_causal_softmax),
        TEST(gradcheck_matmul),
        TEST(gradcheck_baddbmm),
        TEST(gradcheck_affine),
        TEST(gradcheck_views_and_copies),
        TEST(gradcheck_index_select),
        TEST(gradcheck_gather),
        TEST(gradcheck_concat_and_stack),
        TEST(gradcheck_dropout),
        TEST(gradcheck_composite_attention),
        TEST(gradcheck_reports_a_wrong_gradient),
        TEST(gradcheck_rejects_f32_and_non_leaf_inputs),
        TEST(gradcheck_keeps_existing_gradients),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
