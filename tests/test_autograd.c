/* The autograd engine as a specification: accumulation, seeds, graph lifetime, deep graphs,
 * gradients through views and broadcasting, grad mode, detach, retain_grad, leaves, diamonds,
 * memory, anomaly mode and op names. Values are chosen so every expected gradient is exact. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "qkv.h"
#include "harness.h"

/* ---- Helpers ----------------------------------------------------------------------------- */

/* An F64 leaf with the given values, requiring grad. */
static qkv_tensor *param(int ndim, const int64_t *shape, const double *values) {
    qkv_tensor *t = qkv_from_array(QKV_F64, ndim, shape, values);
    assert_non_null(t);
    return qkv_requires_grad_(t, true);
}

static qkv_tensor *constant(int ndim, const int64_t *shape, const double *values) {
    qkv_tensor *t = qkv_from_array(QKV_F64, ndim, shape, values);
    assert_non_null(t);
    return t;
}

/* Asserts t holds exactly the n values want (row-major). */
static void assert_values(const qkv_tensor *t, int64_t n, const double *want) {
    assert_non_null(t);
    assert_int_equal(t->numel, n);
    double got[64];
    assert_true(n <= 64);
    assert_true(qkv_copy_out(t, QKV_F64, got));
    for (int64_t i = 0; i < n; i++)
        if (got[i] != want[i]) fail_msg("element %lld: got %.17g, want %.17g", (long long)i,
                                        got[i], want[i]);
}

#define VALUES(...) (const double[]){__VA_ARGS__}
#define ASSERT_VALUES(t, ...) \
    assert_values(t, sizeof VALUES(__VA_ARGS__) / sizeof(double), VALUES(__VA_ARGS__))

static void assert_error_contains(const char *needle) {
    const char *e = qkv_error();
    assert_non_null(e);
    if (!strstr(e, needle)) fail_msg("error \"%s\" does not contain \"%s\"", e, needle);
}

/* Backpropagates sum(y * w): the gradient reaching y is exactly w. */
static void backward_weighted(qkv_tensor *y, const qkv_tensor *w) {
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(y, w))));
}

static uint64_t live_tensors(void) {
    return qkv_memory_stats_get().live_tensors;
}

/* ---- Accumulation and seeds -------------------------------------------------------------- */

static void leaves_accumulate_across_two_backward_calls(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(3), VALUES(1, 2, 3));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(x, x))));
    ASSERT_VALUES(x->grad, 2, 4, 6);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(x, x))));
    ASSERT_VALUES(x->grad, 4, 8, 12);
    qkv_scope_end();
}

/* A later contribution is summed over the running gradient's values when nothing else holds
 * them, and into a fresh tensor when something does: a gradient the caller kept from the first
 * backward keeps its values. Broadcast contributions (a leaf used as [3] and as [2,3]) sum
 * either way. */
static void accumulation_leaves_a_held_gradient_as_it_was(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(3), VALUES(1, 2, 3));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(x, x))));
    qkv_tensor *first = x->grad;
    uint64_t v = qkv_version(first);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(x, 5))));
    assert_ptr_equal(x->grad, first); /* held by x alone: summed in place */
    assert_true(qkv_version(first) > v);
    ASSERT_VALUES(x->grad, 7, 9, 11);
    qkv_tensor *kept = qkv_retain(x->grad);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(x, 2))));
    assert_ptr_not_equal(x->grad, kept);
    ASSERT_VALUES(kept, 7, 9, 11);
    ASSERT_VALUES(x->grad, 9, 11, 13);
    qkv_release(kept);
    qkv_tensor *rows = qkv_expand(x, QKV_SHAPE(2, 3));
    assert_true(qkv_backward(qkv_sum_all(qkv_add(qkv_mul(rows, rows), x))));
    ASSERT_VALUES(x->grad, 15, 21, 27); /* + 4x + 2: both terms over two rows */
    /* bf16 sums in f32 and rounds once, in place as well: 512 + 1 rounds back to 512. */
    qkv_tensor *h = qkv_requires_grad_(qkv_to_dtype(constant(QKV_SHAPE(2), VALUES(256, 3)),
                                                    QKV_BF16), true);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(h, h))));
    first = h->grad;
    assert_true(qkv_backward(qkv_sum_all(h)));
    assert_ptr_equal(h->grad, first);
    ASSERT_VALUES(h->grad, 512, 7);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(h, 0.5))));
    ASSERT_VALUES(h->grad, 512, 7.5);
    qkv_scope_end();
}

/* A custom backward handing back a tensor its author still holds. */
static qkv_tensor *handed_back;
static void hand_back_backward(qkv_ctx *ctx, const qkv_tensor *g, qkv_tensor **gi) {
    (void)ctx;
    (void)g;
    gi[0] = handed_back;
}
static const qkv_function hand_back_fn = {.name = "hand_back", .backward = hand_back_backward};

/* A leaf's first gradient becomes its .grad without a copy when the backward made it for the
 * leaf alone; one that anything else can still reach is copied, so writing the .grad changes
 * nothing else. */
static void a_leaf_takes_its_gradient_only_when_nothing_else_holds_it(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(3), VALUES(1, 2, 3));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(x, 3))));
    ASSERT_VALUES(x->grad, 3, 3, 3);
    assert_int_equal(x->grad->refcount, 1);
    assert_int_equal(x->grad->storage->refcount, 1);
    qkv_zero_grad(x);
    /* held by this test's scope alone, as a gradient made by the node would be by its own */
    handed_back = constant(QKV_SHAPE(3), VALUES(4, 5, 6));
    qkv_ctx *ctx = qkv_function_begin(&hand_back_fn, 1, (const qkv_tensor *const[]){x}, NULL);
    assert_true(qkv_backward(qkv_sum_all(qkv_function_end(ctx, qkv_mul_scalar(x, 1)))));
    ASSERT_VALUES(x->grad, 4, 5, 6);
    assert_ptr_not_equal(x->grad->storage, handed_back->storage);
    assert_true(qkv_fill_(x->grad, 0));
    ASSERT_VALUES(handed_back, 4, 5, 6);
    /* A view of a gradient the node also hands elsewhere is copied too. */
    qkv_zero_grad(x);
    qkv_tensor *y = param(QKV_SHAPE(3), VALUES(0, 0, 0));
    assert_true(qkv_backward(qkv_sum_all(qkv_add(x, y))));
    ASSERT_VALUES(x->grad, 1, 1, 1);
    ASSERT_VALUES(y->grad, 1, 1, 1);
    assert_ptr_not_equal(x->grad->storage, y->grad->storage);
    qkv_scope_end();
}

static void zero_grad_drops_the_gradient(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(x, 3))));
    ASSERT_VALUES(x->grad, 3, 3);
    qkv_zero_grad(x);
    assert_null(x->grad);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul_scalar(x, 5))));
    ASSERT_VALUES(x->grad, 5, 5);
    qkv_scope_end();
}

static void backward_with_seeds_a_non_scalar_output(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4));
    qkv_tensor *y = qkv_mul(x, x);
    qkv_tensor *seed = constant(QKV_SHAPE(2, 2), VALUES(1, 10, 100, 1000));
    assert_true(qkv_backward_with(y, seed, false));
    ASSERT_VALUES(x->grad, 2, 40, 600, 8000);
    qkv_scope_end();
}

static void backward_requires_a_one_element_loss(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    assert_false(qkv_backward(qkv_mul_scalar(x, 2)));
    assert_error_contains("qkv_backward: the loss must have one element, not [2]");
    assert_null(x->grad);
    qkv_scope_end();
}

static void backward_with_a_seed_of_the_wrong_shape_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4));
    qkv_tensor *seed = qkv_ones(QKV_F64, QKV_SHAPE(4));
    assert_false(qkv_backward_with(qkv_mul_scalar(x, 2), seed, false));
    assert_error_contains("gradient shape [4] differs from the output's [2,2]");
    qkv_scope_end();
}

static void backward_of_a_constant_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *c = constant(QKV_SHAPE(2), VALUES(1, 2));
    assert_false(qkv_backward(qkv_sum_all(c)));
    assert_error_contains("does not require grad");
    qkv_scope_end();
}

static void backward_propagates_a_null_loss_as_failure(void **state) {
    (void)state;
    assert_false(qkv_backward(NULL));
    assert_false(qkv_backward_with(NULL, NULL, false));
}

/* ---- Graph lifetime ---------------------------------------------------------------------- */

static void retain_graph_allows_a_second_backward(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *loss = qkv_sum_all(qkv_mul(x, x));
    qkv_tensor *seed = qkv_ones(QKV_F64, 0, NULL);
    assert_true(qkv_backward_with(loss, seed, true));
    ASSERT_VALUES(x->grad, 2, 4);
    assert_true(qkv_backward_with(loss, seed, true));
    ASSERT_VALUES(x->grad, 4, 8);
    assert_true(qkv_backward(loss)); /* the last one may free the graph */
    ASSERT_VALUES(x->grad, 6, 12);
    qkv_scope_end();
}

static void second_backward_without_retain_graph_is_an_error_naming_the_op(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *loss = qkv_sum_all(qkv_exp(x));
    assert_true(qkv_backward(loss));
    assert_false(qkv_backward(loss));
    assert_error_contains("qkv_backward: the graph through sum was already freed");
    assert_error_contains("retain_graph");
    qkv_scope_end();
}

static void backward_releases_what_the_graph_held(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *y = qkv_exp(x);
    qkv_tensor *z = qkv_mul(y, y);
    qkv_tensor *loss = qkv_sum_all(z);
    assert_int_equal(x->refcount, 2); /* the scope and exp's node */
    assert_int_equal(y->refcount, 1); /* the scope: mul's node recomputes y from exp's */
    assert_int_equal(z->refcount, 1); /* the scope: sum's backward reads no values */
    assert_true(qkv_backward(loss));
    assert_int_equal(x->refcount, 1);
    assert_int_equal(y->refcount, 1);
    assert_int_equal(z->refcount, 1);
    qkv_scope_end();
}

/* softmax(2x C + C 2x) + 4x^2, with C a constant: products where only one factor needs a
 * gradient, so the nodes hold shells of the others. */
static qkv_tensor *shell_composition(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    const qkv_tensor *c = ctx;
    qkv_tensor *a = qkv_mul_scalar(in[0], 2);
    qkv_tensor *s = qkv_softmax(qkv_add(qkv_matmul(a, c), qkv_matmul(c, a)), -1);
    return qkv_add(s, qkv_mul(a, a));
}

/* A node holds an input's values only where its backward reads them. */
static void nodes_hold_only_the_values_their_backward_reads(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 2), VALUES(0.1, -0.2, 0.3, 0.4));
    qkv_tensor *c = constant(QKV_SHAPE(2, 2), VALUES(1, 2, -1, 0.5));
    qkv_tensor *a = qkv_mul_scalar(x, 2);
    /* da reads c; c needs no gradient, so a is unread. The node holds c twice: as the saved
     * value and as its link to that input. */
    qkv_tensor *p = qkv_matmul(a, c);
    assert_non_null(p);
    assert_int_equal(a->refcount, 1);
    assert_int_equal(c->refcount, 3);
    qkv_tensor *q = qkv_matmul(c, a);
    assert_non_null(q);
    assert_int_equal(a->refcount, 1);
    assert_int_equal(c->refcount, 5);
    qkv_tensor *r = qkv_mul(a, a);        /* each factor's gradient reads the other */
    assert_non_null(r);
    assert_int_equal(a->refcount, 3);
    qkv_tensor *sum = qkv_add(p, q);
    qkv_tensor *s = qkv_softmax(sum, -1); /* softmax keeps its output, not its input */
    assert_non_null(s);
    assert_int_equal(sum->refcount, 1);
    assert_int_equal(x->refcount, 2);     /* a leaf that requires grad is always held whole */
    /* and the gradients through the shells are right */
    assert_true(qkv_gradcheck(shell_composition, &x, 1, c, 1e-6, 1e-8, 1e-6));
    qkv_scope_end();
}

/* Intermediates made in an inner scope and not read by the backward are freed at its end. */
static qkv_tensor *inner_forward(const qkv_tensor *x) {
    qkv_scope_begin();
    qkv_tensor *h = qkv_mul_scalar(qkv_add_scalar(x, 1), 3); /* read by no backward */
    qkv_tensor *y = qkv_keep(qkv_tanh(h));                 /* tanh keeps its output */
    qkv_scope_end();
    return y;
}

/* gelu(gelu(gelu(gelu(x)))) @ dropout(gelu(x)), with the same dropout mask at every call */
static qkv_tensor *recomputed_chain(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    qkv_generator g;
    qkv_generator_init(&g, 7);
    qkv_tensor *x = in[0];
    qkv_tensor *d = qkv_dropout(qkv_gelu(x, false), 0.4, true, &g);
    qkv_tensor *c = qkv_gelu(qkv_gelu(qkv_gelu(qkv_gelu(x, false), true), false), true);
    return qkv_matmul(c, d);
}

/* one GELU output read by two dropouts, each read by a product: the GELU's recomputed
 * output is shared by both and must not be overwritten by the first dropout's */
static qkv_tensor *shared_recomputation(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    (void)ctx;
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *h = qkv_gelu(in[0], false);
    qkv_tensor *a = qkv_matmul(qkv_dropout(h, 0.3, true, &g), in[1]);
    qkv_tensor *b = qkv_matmul(qkv_dropout(h, 0.5, true, &g), in[1]);
    return qkv_add(a, qkv_mul_scalar(b, 2));
}

#define CHAIN_X VALUES(0.5, -1, 2, 0.25, -0.75, 1.5, 0.1, -2, 3, 0.3, -0.4, 1, 0.7, -0.2, 0, 1.2)

/* Outputs of cheap ops are recomputed for the backward instead of held: at most
 * QKV_RECOMPUTE_DEPTH ops deep, and with the same gradients as if they were held. */
static void cheap_outputs_are_recomputed_not_held(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(4, 4), CHAIN_X);
    qkv_generator g;
    qkv_generator_init(&g, 7);
    qkv_tensor *g1 = qkv_gelu(x, false);
    qkv_tensor *g2 = qkv_gelu(g1, true);     /* recomputes g1 from x */
    qkv_tensor *g3 = qkv_gelu(g2, false);    /* g2 from g1 from x: two deep */
    qkv_tensor *g4 = qkv_gelu(g3, true);     /* g3 would be three deep: held */
    qkv_tensor *d = qkv_dropout(qkv_gelu(x, false), 0.4, true, &g);
    qkv_tensor *y = qkv_matmul(g4, d);       /* g4 from g3; d from its mask and a gelu */
    assert_non_null(y);
    assert_int_equal(g1->refcount, 1);       /* the scope only */
    assert_int_equal(g2->refcount, 1);
    assert_int_equal(g3->refcount, 2);       /* the scope and g4's node */
    assert_int_equal(g4->refcount, 1);
    assert_int_equal(d->refcount, 1);
    assert_int_equal(d->storage->refcount, 1);
    qkv_scope_end();
    qkv_scope_begin();
    qkv_tensor *in = param(QKV_SHAPE(4, 4), CHAIN_X);
    assert_true(qkv_gradcheck(recomputed_chain, &in, 1, NULL, 1e-6, 1e-8, 1e-6));
    qkv_tensor *w = param(QKV_SHAPE(4, 4), CHAIN_X);
    assert_true(qkv_gradcheck(shared_recomputation, (qkv_tensor *const[]){in, w}, 2, NULL,
                              1e-6, 1e-8, 1e-6));
    qkv_scope_end();
}

/* layer_norm(x) W: the norm's output is recomputed from x for W's gradient */
static qkv_tensor *normed_product(qkv_tensor *const *in, int n, void *ctx) {
    (void)n;
    qkv_layer_norm *ln = ctx;
    return qkv_matmul(qkv_layer_norm_forward(ln, in[0]), in[1]);
}

static void layer_norm_output_is_recomputed_for_its_consumer(void **state) {
    (void)state;
    qkv_layer_norm *ln = qkv_layer_norm_new(1, (const int64_t[]){4}, 1e-5, true);
    assert_non_null(ln);
    qkv_module_to_dtype(QKV_MODULE(ln), QKV_F64);
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(3, 4), CHAIN_X);
    qkv_tensor *w = param(QKV_SHAPE(4, 2), VALUES(0.5, -1, 2, 0.25, -0.75, 1.5, 0.1, -2));
    qkv_tensor *h = qkv_layer_norm_forward(ln, x);
    assert_non_null(qkv_matmul(h, w));
    assert_int_equal(h->refcount, 1);
    assert_true(qkv_gradcheck(normed_product, (qkv_tensor *const[]){x, w}, 2, ln, 1e-6, 1e-8,
                              1e-6));
    qkv_scope_end();
    qkv_module_free(QKV_MODULE(ln));
}

/* The node of x W with W constant keeps no values of x; switching W on afterwards is an
 * error naming the op, not a gradient made from values that were not kept. */
static void requiring_grad_after_the_forward_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4));
    qkv_tensor *w = constant(QKV_SHAPE(2, 2), VALUES(1, 0, 0, 1));
    qkv_tensor *loss = qkv_sum_all(qkv_matmul(qkv_mul_scalar(x, 2), w));
    assert_non_null(qkv_requires_grad_(w, true));
    assert_false(qkv_backward(loss));
    assert_error_contains("qkv_backward: input 1 of matmul was set to require grad after the "
                          "forward");
    qkv_scope_end();
}

static void inner_scopes_free_what_the_backward_does_not_read(void **state) {
    (void)state;
    qkv_tensor *x = qkv_requires_grad_(qkv_zeros(QKV_F64, QKV_SHAPE(1024)), true);
    assert_non_null(x);
    qkv_scope_begin();
    size_t base = qkv_memory_stats_get().bytes_in_use;
    qkv_tensor *y = inner_forward(x);
    assert_non_null(y);
    size_t held = qkv_memory_stats_get().bytes_in_use - base;
    /* y and tanh's saved view of it share one 8 KiB storage; both 8 KiB temporaries are gone,
     * and the graph's bookkeeping is far below 8 KiB. */
    assert_true(held >= 8192);
    assert_true(held < 2 * 8192);
    assert_true(qkv_backward(qkv_sum_all(y)));
    double t = tanh(3.0);
    assert_true(fabs(((const double *)qkv_data(x->grad))[7] - 3 * (1 - t * t)) < 1e-12);
    qkv_scope_end();
    qkv_release(x);
}

/* A node whose only links are shells held by its consumers stays alive through the backward
 * until its own turn, though the first consumer processed lets go of its shell. */
static qkv_tensor *two_consumers(const qkv_tensor *x) {
    qkv_scope_begin();
    qkv_tensor *a = qkv_exp(x);
    qkv_tensor *z = qkv_keep(qkv_add(qkv_add_scalar(a, 1), qkv_mul_scalar(a, 2)));
    qkv_scope_end();
    return z;
}

static void backward_holds_nodes_whose_tensors_are_gone(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(0.5, -1));
    qkv_tensor *z = two_consumers(x);
    assert_true(qkv_backward(qkv_sum_all(z)));
    ASSERT_VALUES(x->grad, 3 * exp(0.5), 3 * exp(-1.0));
    qkv_scope_end();
}

static void scope_end_frees_a_graph_and_its_gradients(void **state) {
    (void)state;
    uint64_t baseline = live_tensors();
    size_t bytes = qkv_memory_stats_get().bytes_in_use;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 3), VALUES(1, 2, 3, 4, 5, 6));
    qkv_tensor *h = qkv_softmax(qkv_tanh(qkv_mul_scalar(x, 0.5)), 1);
    assert_true(qkv_backward(qkv_mean_all(qkv_log(h))));
    assert_non_null(x->grad);
    assert_true(live_tensors() > baseline);
    qkv_scope_end();
    assert_int_equal(live_tensors(), baseline);
    assert_int_equal(qkv_memory_stats_get().bytes_in_use, bytes);
}

static void scope_end_frees_a_graph_never_backpropagated(void **state) {
    (void)state;
    uint64_t baseline = live_tensors();
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(3), VALUES(1, 2, 3));
    qkv_sum_all(qkv_sigmoid(qkv_matmul(x, x)));
    qkv_scope_end();
    assert_int_equal(live_tensors(), baseline);
}

/* ---- Deep graphs ------------------------------------------------------------------------- */

#define DEEP 100000

/* y = x, then DEEP ops cycling through +1, *2, +1, *0.5: each cycle adds 1.5 to y and the
 * gradient's factors multiply to exactly 1. */
static qkv_tensor *deep_chain(qkv_tensor *x) {
    qkv_tensor *y = x;
    for (int i = 0; i < DEEP; i++) {
        if (i % 2 == 0) y = qkv_add_scalar(y, 1);
        else y = qkv_mul_scalar(y, i % 4 == 1 ? 2.0 : 0.5);
    }
    return y;
}

static void chain_of_100000_ops_backpropagates_without_recursion(void **state) {
    (void)state;
    uint64_t baseline = live_tensors();
    qkv_scope_begin();
    qkv_tensor *x = param(0, NULL, VALUES(1));
    qkv_tensor *y = deep_chain(x);
    assert_true(qkv_item(y) == 1 + 1.5 * (DEEP / 4));
    assert_true(qkv_backward(y));
    ASSERT_VALUES(x->grad, 1);
    qkv_scope_end();
    assert_int_equal(live_tensors(), baseline);
}

static void releasing_a_100000_op_graph_does_not_recurse(void **state) {
    (void)state;
    uint64_t baseline = live_tensors();
    qkv_scope_begin();
    qkv_tensor *x = param(0, NULL, VALUES(1));
    /* The inner scope lets go of every intermediate, so each lives only through the node of
     * the op after it: releasing the last one releases the whole chain in turn. */
    qkv_scope_begin();
    qkv_tensor *y = qkv_retain(deep_chain(x));
    qkv_scope_end();
    assert_int_equal(live_tensors(), baseline + DEEP + 1);
    qkv_release(y);
    assert_int_equal(live_tensors(), baseline + 1);
    qkv_scope_end();
    assert_int_equal(live_tensors(), baseline);
}

/* ---- Views ------------------------------------------------------------------------------- */

static void gradient_flows_through_reshape_and_flatten(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 3), VALUES(0, 0, 0, 0, 0, 0));
    backward_weighted(qkv_reshape(x, QKV_SHAPE(3, -1)),
                      constant(QKV_SHAPE(3, 2), VALUES(1, 2, 3, 4, 5, 6)));
    ASSERT_VALUES(x->grad, 1, 2, 3, 4, 5, 6);

    qkv_tensor *c = param(QKV_SHAPE(2, 2, 2), VALUES(0, 0, 0, 0, 0, 0, 0, 0));
    qkv_tensor *f = qkv_flatten(c, 1, 2);
    assert_int_equal(f->ndim, 2);
    assert_int_equal(f->shape[1], 4);
    backward_weighted(f, constant(QKV_SHAPE(2, 4), VALUES(1, 2, 3, 4, 5, 6, 7, 8)));
    ASSERT_VALUES(c->grad, 1, 2, 3, 4, 5, 6, 7, 8);
    qkv_scope_end();
}

static void gradient_flows_through_transpose_and_permute(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 3), VALUES(0, 0, 0, 0, 0, 0));
    backward_weighted(qkv_transpose(x, 0, 1),
                      constant(QKV_SHAPE(3, 2), VALUES(1, 2, 3, 4, 5, 6)));
    ASSERT_VALUES(x->grad, 1, 3, 5, 2, 4, 6);

    /* p[k][i][j] = x[i][j][k], so x's gradient at [i][j][k] is w[k][i][j]. */
    qkv_tensor *y = param(QKV_SHAPE(2, 1, 3), VALUES(0, 0, 0, 0, 0, 0));
    backward_weighted(qkv_permute(y, (const int[]){2, 0, 1}),
                      constant(QKV_SHAPE(3, 2, 1), VALUES(1, 2, 3, 4, 5, 6)));
    ASSERT_VALUES(y->grad, 1, 3, 5, 2, 4, 6);
    qkv_scope_end();
}

static void gradient_of_a_strided_slice_lands_on_the_picked_elements(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(7), VALUES(0, 0, 0, 0, 0, 0, 0));
    qkv_tensor *s = qkv_slice(x, 0, 1, 100, 2); /* elements 1, 3, 5 */
    assert_int_equal(s->shape[0], 3);
    backward_weighted(s, constant(QKV_SHAPE(3), VALUES(10, 20, 30)));
    ASSERT_VALUES(x->grad, 0, 10, 0, 20, 0, 30, 0);

    qkv_tensor *m = param(QKV_SHAPE(2, 4), VALUES(0, 0, 0, 0, 0, 0, 0, 0));
    backward_weighted(qkv_slice(m, -1, -3, 4, 2), constant(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4)));
    ASSERT_VALUES(m->grad, 0, 1, 0, 2, 0, 3, 0, 4);
    qkv_scope_end();
}

static void gradient_flows_through_narrow_and_select(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 4), VALUES(0, 0, 0, 0, 0, 0, 0, 0));
    backward_weighted(qkv_narrow(x, 1, 1, 2), constant(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4)));
    ASSERT_VALUES(x->grad, 0, 1, 2, 0, 0, 3, 4, 0);

    qkv_tensor *y = param(QKV_SHAPE(3, 2), VALUES(0, 0, 0, 0, 0, 0));
    qkv_tensor *row = qkv_select(y, 0, -1);
    assert_int_equal(row->ndim, 1);
    backward_weighted(row, constant(QKV_SHAPE(2), VALUES(5, 7)));
    ASSERT_VALUES(y->grad, 0, 0, 0, 0, 5, 7);

    qkv_tensor *z = param(QKV_SHAPE(2, 3), VALUES(0, 0, 0, 0, 0, 0));
    backward_weighted(qkv_select(z, 1, 1), constant(QKV_SHAPE(2), VALUES(5, 7)));
    ASSERT_VALUES(z->grad, 0, 5, 0, 0, 7, 0);
    qkv_scope_end();
}

static void gradient_of_expand_sums_over_the_expanded_dims(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 1), VALUES(0, 0));
    backward_weighted(qkv_expand(x, QKV_SHAPE(2, 3)),
                      constant(QKV_SHAPE(2, 3), VALUES(1, 2, 3, 4, 5, 6)));
    ASSERT_VALUES(x->grad, 6, 15);

    qkv_tensor *y = param(QKV_SHAPE(3), VALUES(0, 0, 0));
    backward_weighted(qkv_expand(y, QKV_SHAPE(2, -1)),
                      constant(QKV_SHAPE(2, 3), VALUES(1, 2, 3, 4, 5, 6)));
    ASSERT_VALUES(y->grad, 5, 7, 9);
    qkv_scope_end();
}

static void gradient_flows_through_squeeze_and_unsqueeze(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 1), VALUES(0, 0));
    backward_weighted(qkv_squeeze(x, 1), constant(QKV_SHAPE(2), VALUES(3, 4)));
    ASSERT_VALUES(x->grad, 3, 4);
    assert_int_equal(x->grad->ndim, 2);

    qkv_tensor *y = param(QKV_SHAPE(1, 2, 1), VALUES(0, 0));
    backward_weighted(qkv_squeeze_all(y), constant(QKV_SHAPE(2), VALUES(3, 4)));
    ASSERT_VALUES(y->grad, 3, 4);

    qkv_tensor *z = param(QKV_SHAPE(2), VALUES(0, 0));
    backward_weighted(qkv_unsqueeze(z, -1), constant(QKV_SHAPE(2, 1), VALUES(3, 4)));
    ASSERT_VALUES(z->grad, 3, 4);
    assert_int_equal(z->grad->ndim, 1);
    qkv_scope_end();
}

static void gradient_flows_through_a_chain_of_views(void **state) {
    (void)state;
    qkv_scope_begin();
    /* x [2,3,2] -> transpose(0,2) [2,3,2] -> every other row of axis 1 [2,2,2] -> select
     * axis 0 index 1 [2,2] -> expand [3,2,2]: y[r][j][i] = x[i][2j][1], summed 3 times. */
    qkv_tensor *x = param(QKV_SHAPE(2, 3, 2), VALUES(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
    qkv_tensor *v = qkv_select(qkv_slice(qkv_transpose(x, 0, 2), 1, 0, 3, 2), 0, 1);
    qkv_tensor *y = qkv_expand(v, QKV_SHAPE(3, 2, 2));
    backward_weighted(y, qkv_expand(constant(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4)),
                                    QKV_SHAPE(3, 2, 2)));
    /* x[i][2j][1] gets 3 * w[j][i] */
    ASSERT_VALUES(x->grad, 0, 3, 0, 0, 0, 9, 0, 6, 0, 0, 0, 12);
    qkv_scope_end();
}

/* ---- Broadcasting ------------------------------------------------------------------------ */

static void broadcast_gradients_are_summed_to_each_input_shape(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(2, 3), VALUES(1, 2, 3, 4, 5, 6));
    qkv_tensor *b = param(QKV_SHAPE(3), VALUES(10, 20, 30));
    qkv_tensor *c = param(QKV_SHAPE(2, 1), VALUES(7, 8));
    qkv_tensor *s = param(0, NULL, VALUES(2));
    /* loss = sum((a*b + c) * s) */
    qkv_tensor *y = qkv_mul(qkv_add(qkv_mul(a, b), c), s);
    assert_true(qkv_backward(qkv_sum_all(y)));
    ASSERT_VALUES(a->grad, 20, 40, 60, 20, 40, 60);
    ASSERT_VALUES(b->grad, 10, 14, 18);
    ASSERT_VALUES(c->grad, 6, 6);
    /* sum(a*b + c) = 1*10+2*20+3*30 + 4*10+5*20+6*30 + 3*7 + 3*8 */
    ASSERT_VALUES(s->grad, 140 + 320 + 45);
    assert_int_equal(s->grad->ndim, 0);
    qkv_scope_end();
}

static void broadcasting_on_both_sides_reduces_each(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(2, 1), VALUES(1, 2));
    qkv_tensor *b = param(QKV_SHAPE(1, 3), VALUES(3, 4, 5));
    backward_weighted(qkv_sub(a, b), constant(QKV_SHAPE(2, 3), VALUES(1, 2, 3, 4, 5, 6)));
    ASSERT_VALUES(a->grad, 6, 15);
    ASSERT_VALUES(b->grad, -5, -7, -9);
    qkv_scope_end();
}

/* ---- Grad mode, detach, retain_grad, leaves ---------------------------------------------- */

static void no_grad_records_nothing(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    assert_true(qkv_is_grad_enabled());
    qkv_no_grad_begin();
    qkv_no_grad_begin();
    qkv_no_grad_end();
    assert_false(qkv_is_grad_enabled()); /* still inside the outer pair */
    qkv_tensor *y = qkv_exp(qkv_mul(x, x));
    assert_null(y->grad_fn);
    assert_false(y->requires_grad);
    assert_null(qkv_grad_fn_name(y));
    qkv_no_grad_end();
    assert_true(qkv_is_grad_enabled());
    qkv_tensor *z = qkv_mul(x, x);
    assert_non_null(z->grad_fn);
    assert_true(z->requires_grad);
    qkv_scope_end();
}

static void detach_cuts_the_graph(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *d = qkv_detach(qkv_mul_scalar(x, 3));
    assert_false(d->requires_grad);
    assert_null(d->grad_fn);
    ASSERT_VALUES(d, 3, 6);
    /* d is a constant: d(d * x)/dx = d, not 2 * 3x */
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(d, x))));
    ASSERT_VALUES(x->grad, 3, 6);
    qkv_scope_end();
}

static void detach_shares_storage(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *d = qkv_detach(x);
    assert_ptr_equal(d->storage, x->storage);
    assert_true(qkv_fill_(d, 9));
    ASSERT_VALUES(x, 9, 9);
    qkv_scope_end();
}

static void retain_grad_keeps_a_non_leaf_gradient(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *h = qkv_mul_scalar(x, 3);
    qkv_tensor *other = qkv_add_scalar(h, 1);
    qkv_retain_grad(h);
    assert_true(h->retains_grad);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(other, h))));
    /* loss = sum((h + 1) * h): dloss/dh = 2h + 1 */
    ASSERT_VALUES(h->grad, 7, 13);
    ASSERT_VALUES(x->grad, 21, 39);
    assert_null(other->grad);
    qkv_scope_end();
}

static void requires_grad_on_a_non_leaf_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *y = qkv_mul(x, x);
    assert_null(qkv_requires_grad_(y, false));
    assert_error_contains("qkv_requires_grad_: only a leaf can be set; mul made this tensor");
    assert_true(y->requires_grad);
    qkv_scope_end();
}

static void requires_grad_on_an_integer_tensor_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *i = qkv_arange(QKV_I64, 0, 3, 1);
    assert_null(qkv_requires_grad_(i, true));
    assert_error_contains("qkv_requires_grad_: i64 tensors cannot require grad");
    assert_false(i->requires_grad);
    qkv_clear_error();
    assert_null(qkv_requires_grad_(qkv_gt_scalar(i, 1), true));
    assert_error_contains("bool tensors cannot require grad");
    assert_null(qkv_requires_grad_(NULL, true));
    qkv_scope_end();
}

static void integer_and_mask_inputs_get_no_gradient(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(3), VALUES(1, 2, 3));
    qkv_tensor *keep = qkv_gt_scalar(x, 1.5);
    assert_false(keep->requires_grad);
    qkv_tensor *y = qkv_where(keep, x, qkv_mul_scalar(x, 10));
    assert_true(qkv_backward(qkv_sum_all(y)));
    ASSERT_VALUES(x->grad, 10, 1, 1);
    qkv_scope_end();
}

/* ---- Graph shapes ------------------------------------------------------------------------ */

static void diamond_graph_accumulates_every_path(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *b = qkv_mul_scalar(a, 3);   /* 3a */
    qkv_tensor *c = qkv_mul(a, b);          /* 3a^2: a reaches c directly and through b */
    qkv_tensor *loss = qkv_sum_all(qkv_add(c, b));
    assert_true(qkv_backward(loss));
    ASSERT_VALUES(a->grad, 9, 15);          /* 6a + 3 */
    qkv_scope_end();
}

static void the_same_tensor_as_both_inputs_counts_twice(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(2), VALUES(3, -4));
    qkv_tensor *b = qkv_exp(qkv_mul_scalar(a, 0)); /* ones, through a graph */
    qkv_tensor *s = qkv_add(b, b);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(qkv_mul(a, a), s))));
    /* loss = sum(2 a^2) + 0 from b's path (mul by 0) */
    ASSERT_VALUES(a->grad, 12, -16);
    qkv_scope_end();
}

static void train_like_loop_of_1000_steps_leaks_nothing(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 7);
    uint64_t baseline = live_tensors();
    qkv_scope_begin();
    qkv_tensor *w = qkv_requires_grad_(qkv_zeros(QKV_F64, QKV_SHAPE(3, 1)), true);
    qkv_tensor *target_w = constant(QKV_SHAPE(3, 1), VALUES(1, -2, 0.5));
    uint64_t live_after_first = 0;
    size_t bytes_after_first = 0;
    double first_loss = 0, last_loss = 0;
    for (int step = 0; step < 1000; step++) {
        qkv_scope_begin();
        qkv_tensor *x = qkv_randn(QKV_F64, QKV_SHAPE(8, 3), &g);
        qkv_tensor *err = qkv_sub(qkv_matmul(x, w), qkv_matmul(x, target_w));
        qkv_tensor *loss = qkv_mean_all(qkv_mul(err, err));
        assert_true(qkv_backward(loss));
        last_loss = qkv_item(loss);
        if (step == 0) first_loss = last_loss;
        qkv_no_grad_begin();
        assert_true(qkv_copy_(w, qkv_sub(w, qkv_mul_scalar(w->grad, 0.05))));
        qkv_no_grad_end();
        qkv_zero_grad(w);
        qkv_scope_end();
        if (step == 0) {
            live_after_first = live_tensors();
            bytes_after_first = qkv_memory_stats_get().bytes_in_use;
        }
        assert_int_equal(live_tensors(), live_after_first);
        assert_int_equal(qkv_memory_stats_get().bytes_in_use, bytes_after_first);
    }
    assert_true(last_loss < 1e-12 * first_loss);
    qkv_scope_end();
    assert_int_equal(live_tensors(), baseline);
}

/* ---- Anomaly mode ------------------------------------------------------------------------ */

static int anomaly_off(void **state) {
    (void)state;
    qkv_set_detect_anomaly(false);
    qkv_clear_error();
    return 0;
}

static void anomaly_mode_names_the_op_making_nan_in_forward(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(-1, 2));
    assert_false(qkv_is_anomaly_enabled());
    qkv_tensor *quiet = qkv_log(x);
    assert_non_null(quiet); /* off: NaN flows through silently */
    assert_true(isnan(qkv_get(quiet, (const int64_t[]){0})));
    qkv_set_detect_anomaly(true);
    assert_true(qkv_is_anomaly_enabled());
    qkv_tensor *zero = qkv_log(qkv_mul_scalar(x, 0)); /* -inf: no error, as masks make them */
    assert_non_null(zero);
    assert_true(isinf(qkv_get(zero, (const int64_t[]){0})));
    assert_null(qkv_log(qkv_mul_scalar(x, 1)));
    assert_string_equal(qkv_error(), "qkv anomaly: log produced NaN in its forward");
    qkv_set_detect_anomaly(false);
    qkv_scope_end();
}

static void anomaly_mode_names_the_op_making_inf_in_backward(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(0, 4));
    qkv_set_detect_anomaly(true);
    qkv_tensor *y = qkv_sqrt(x); /* finite forward: 0 and 2 */
    assert_non_null(y);
    assert_false(qkv_backward(qkv_sum_all(qkv_mul_scalar(y, 3))));
    assert_error_contains("qkv anomaly: the backward of sqrt produced a non-finite gradient "
                          "for its input 0");
    assert_null(x->grad);
    qkv_set_detect_anomaly(false);
    qkv_scope_end();
}

static void without_anomaly_mode_the_inf_gradient_is_returned(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(0, 4));
    assert_true(qkv_backward(qkv_sum_all(qkv_sqrt(x))));
    ASSERT_VALUES(x->grad, INFINITY, 0.25);
    qkv_scope_end();
}

/* ---- Ties ------------------------------------------------------------------------------- */

static void max_over_an_axis_sends_the_gradient_to_the_first_tied_element(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(2, 3), VALUES(4, 7, 7, -1, -1, -1));
    backward_weighted(qkv_max(a, 1, false), constant(QKV_SHAPE(2), VALUES(10, 20)));
    ASSERT_VALUES(a->grad, 0, 10, 0, 20, 0, 0);
    qkv_tensor *b = param(QKV_SHAPE(2, 3), VALUES(4, 7, 7, -1, -1, -1));
    backward_weighted(qkv_min(b, 0, true), constant(QKV_SHAPE(1, 3), VALUES(1, 2, 3)));
    ASSERT_VALUES(b->grad, 0, 0, 0, 1, 2, 3);
    qkv_scope_end();
}

static void max_over_all_or_several_axes_sends_the_gradient_to_the_first_in_row_major_order(
    void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(2, 2), VALUES(1, 5, 5, 5));
    assert_true(qkv_backward(qkv_max_all(a)));
    ASSERT_VALUES(a->grad, 0, 1, 0, 0);
    qkv_tensor *b = param(QKV_SHAPE(3), VALUES(-2, 0, -2));
    assert_true(qkv_backward(qkv_min_all(b)));
    ASSERT_VALUES(b->grad, 1, 0, 0);
    /* over axes 0 and 2 of [2,2,2]: per middle index, the first tied element in row-major
     * order among the four it covers */
    qkv_tensor *c = param(QKV_SHAPE(2, 2, 2), VALUES(1, 3, 2, 0, 3, 3, 0, 2));
    backward_weighted(qkv_max_axes(c, 2, (const int[]){0, -1}, false),
                      constant(QKV_SHAPE(2), VALUES(10, 20)));
    ASSERT_VALUES(c->grad, 0, 10, 20, 0, 0, 0, 0, 0);
    qkv_scope_end();
}

static void maximum_and_minimum_split_the_gradient_of_a_tie_in_half(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *a = param(QKV_SHAPE(3), VALUES(1, 2, 3));
    qkv_tensor *b = param(QKV_SHAPE(3), VALUES(3, 2, 1));
    backward_weighted(qkv_maximum(a, b), constant(QKV_SHAPE(3), VALUES(4, 4, 4)));
    ASSERT_VALUES(a->grad, 0, 2, 4);
    ASSERT_VALUES(b->grad, 4, 2, 0);
    qkv_zero_grad(a);
    qkv_zero_grad(b);
    backward_weighted(qkv_minimum(a, b), constant(QKV_SHAPE(3), VALUES(4, 4, 4)));
    ASSERT_VALUES(a->grad, 4, 2, 0);
    ASSERT_VALUES(b->grad, 0, 2, 4);
    qkv_tensor *c = param(QKV_SHAPE(3), VALUES(-1, 0, 1));
    backward_weighted(qkv_maximum_scalar(c, 0), constant(QKV_SHAPE(3), VALUES(4, 4, 4)));
    ASSERT_VALUES(c->grad, 0, 2, 4);
    qkv_scope_end();
}

/* ---- Op names ---------------------------------------------------------------------------- */

static void grad_fn_name_names_the_op(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4));
    assert_null(qkv_grad_fn_name(x));
    assert_null(qkv_grad_fn_name(NULL));
    assert_string_equal(qkv_grad_fn_name(qkv_add(x, x)), "add");
    assert_string_equal(qkv_grad_fn_name(qkv_mul(x, x)), "mul");
    assert_string_equal(qkv_grad_fn_name(qkv_matmul(x, x)), "matmul");
    assert_string_equal(qkv_grad_fn_name(qkv_sum_all(x)), "sum");
    assert_string_equal(qkv_grad_fn_name(qkv_mean(x, 0, false)), "mean");
    assert_string_equal(qkv_grad_fn_name(qkv_softmax(x, -1)), "softmax");
    assert_string_equal(qkv_grad_fn_name(qkv_log_softmax(x, -1)), "log_softmax");
    assert_string_equal(qkv_grad_fn_name(qkv_reshape(x, QKV_SHAPE(4))), "reshape");
    assert_string_equal(qkv_grad_fn_name(qkv_transpose(x, 0, 1)), "permute");
    assert_string_equal(qkv_grad_fn_name(qkv_slice(x, 0, 0, 1, 1)), "slice");
    assert_string_equal(qkv_grad_fn_name(qkv_expand(x, QKV_SHAPE(3, 2, 2))), "expand");
    assert_string_equal(qkv_grad_fn_name(qkv_add_scalar(x, 1)), "add_scalar");
    assert_string_equal(qkv_grad_fn_name(qkv_gelu(x, true)), "gelu");
    assert_null(qkv_grad_fn_name(qkv_gt(x, x))); /* comparisons record nothing */
    assert_null(qkv_grad_fn_name(qkv_add(qkv_detach(x), qkv_detach(x))));
    qkv_scope_end();
}

/* sqrt's gradient at 0 is +inf; relu, maximum and minimum select the incoming gradient
 * rather than multiply it by 0, so x = -1 gets 0 as in torch, not inf * 0 = NaN. Ties of
 * maximum still split the gradient in half. */
static void masking_backwards_select_instead_of_multiplying(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = qkv_requires_grad_(constant(QKV_SHAPE(3), VALUES(-1, 4, 0)), true);
    qkv_tensor *zero = qkv_scalar(QKV_F64, 0);
    qkv_tensor *ys[] = {qkv_relu(x), qkv_maximum_scalar(x, 0), qkv_maximum(x, zero),
                        qkv_neg(qkv_minimum_scalar(qkv_neg(x), 0)),
                        qkv_neg(qkv_minimum(qkv_neg(x), zero))};
    for (size_t i = 0; i < sizeof ys / sizeof *ys; i++) {
        qkv_tensor *y = qkv_narrow(ys[i], 0, 0, 2);
        qkv_zero_grad(x);
        assert_true(qkv_backward(qkv_sum_all(qkv_sqrt(y))));
        ASSERT_VALUES(x->grad, 0, 0.25, 0);
    }
    qkv_zero_grad(x);
    assert_true(qkv_backward(qkv_sum_all(qkv_maximum_scalar(x, 0))));
    ASSERT_VALUES(x->grad, 0, 1, 0.5);
    qkv_scope_end();
}

/* ---- Values changed in place between forward and backward ------------------------------- */

#define CHANGED(what, op, meta, purpose, now, seen)                                            \
    "qkv_backward: " what " of " op " (" meta "), saved for " purpose ", was modified in "     \
    "place: its storage is at version " now ", the forward saw version " seen "; modify it "  \
    "after the backward, or run the forward again"

static void assert_error_is(const char *want) {
    assert_non_null(qkv_error());
    assert_string_equal(qkv_error(), want);
}

/* d(w v)/dv = w: a w changed before the backward would give its new value, 100, not 3 */
static void a_parameter_filled_before_the_backward_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *w = param(QKV_SHAPE(1), VALUES(3));
    qkv_tensor *v = param(QKV_SHAPE(1), VALUES(2));
    qkv_tensor *loss = qkv_sum_all(qkv_mul(w, v));
    assert_int_equal(qkv_version(w), 0);
    assert_true(qkv_fill_(w, 100));
    assert_int_equal(qkv_version(w), 1);
    assert_false(qkv_backward(loss));
    assert_error_is(CHANGED("input 0", "mul", "f64 [1]", "its backward", "1", "0"));
    assert_null(v->grad);
    assert_null(w->grad);
    qkv_scope_end();
}

static void without_a_change_the_gradient_is_right(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *w = param(QKV_SHAPE(1), VALUES(3));
    qkv_tensor *v = param(QKV_SHAPE(1), VALUES(2));
    qkv_tensor *loss = qkv_sum_all(qkv_mul(w, v));
    assert_true(qkv_backward(loss));
    ASSERT_VALUES(v->grad, 3);
    ASSERT_VALUES(w->grad, 2);
    assert_true(qkv_fill_(w, 100)); /* after the backward: nothing holds the old values */
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(w, v))));
    ASSERT_VALUES(v->grad, 103);
    qkv_scope_end();
}

static void copying_into_a_view_of_a_saved_parameter_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *w = param(QKV_SHAPE(2, 2), VALUES(1, 2, 3, 4));
    qkv_tensor *x = param(QKV_SHAPE(2, 2), VALUES(1, 0, 0, 1));
    qkv_tensor *loss = qkv_sum_all(qkv_matmul(x, w));
    qkv_tensor *row = qkv_select(qkv_detach(w), 0, 1); /* shares w's storage */
    assert_true(qkv_copy_(row, constant(QKV_SHAPE(2), VALUES(7, 8))));
    assert_int_equal(qkv_version(w), 1);
    assert_int_equal(qkv_version(row), 1);
    assert_false(qkv_backward(loss));
    assert_error_is(CHANGED("input 1", "matmul", "f64 [2,2]", "its backward", "1", "0"));
    qkv_scope_end();
}

/* a step between the forward and the backward, as in a training loop with the step moved up */
static void an_optimizer_step_before_the_backward_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *w = param(QKV_SHAPE(1), VALUES(3));
    qkv_tensor *v = param(QKV_SHAPE(1), VALUES(2));
    qkv_named_list params = {2, (char *[]){"w", "v"}, (qkv_tensor *[]){w, v}};
    qkv_optimizer *opt = qkv_sgd_new();
    assert_true(qkv_optimizer_add_group(opt, &params, qkv_sgd_config(0.5)));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(w, v))));
    qkv_tensor *loss = qkv_sum_all(qkv_mul(w, v));
    assert_true(qkv_optimizer_step(opt));
    assert_int_equal(qkv_version(w), 1);
    assert_int_equal(qkv_version(v), 1);
    assert_false(qkv_backward(loss));
    assert_error_is(CHANGED("input 0", "mul", "f64 [1]", "its backward", "1", "0"));
    qkv_optimizer_free(opt);
    qkv_scope_end();
}

/* the sum's backward reads no values, so a change to x cannot make its gradient wrong */
static void a_change_to_a_value_no_backward_reads_is_allowed(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *loss = qkv_sum_all(qkv_add(x, x));
    assert_true(qkv_fill_(x, 5));
    assert_true(qkv_backward(loss));
    ASSERT_VALUES(x->grad, 2, 2);
    qkv_scope_end();
}

/* softmax keeps its own output; changing that output changes what its backward would read */
static void changing_an_output_its_op_saved_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(0, 0));
    qkv_tensor *s = qkv_softmax(x, 0);
    qkv_tensor *loss = qkv_sum_all(qkv_mul(s, constant(QKV_SHAPE(2), VALUES(1, 2))));
    assert_true(qkv_fill_(s, 0));
    assert_false(qkv_backward(loss));
    assert_error_is(CHANGED("saved value 0", "softmax", "f64 [2]", "its backward", "1", "0"));
    qkv_scope_end();
}

/* mul holds gelu(x) as a shell and recomputes it from x for w's gradient: a changed x would
 * give a product with another gelu(x) than the forward's */
static void recomputing_from_a_changed_input_is_an_error(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 2));
    qkv_tensor *w = param(QKV_SHAPE(2), VALUES(3, 4));
    qkv_tensor *h = qkv_gelu(x, false);
    qkv_tensor *loss = qkv_sum_all(qkv_mul(h, w));
    assert_int_equal(h->refcount, 1); /* the scope: mul holds a shell */
    assert_true(qkv_fill_(x, -1));
    assert_false(qkv_backward(loss));
    assert_error_is(CHANGED("input 0", "gelu", "f64 [2]", "recomputing its output", "1", "0"));
    assert_null(w->grad);
    qkv_scope_end();
}

/* a dropout over a value a node holds copies; over a value nothing else reads, it writes in
 * place and counts the write */
static void dropout_in_place_counts_its_write_and_spares_saved_values(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_generator g;
    qkv_generator_init(&g, 3);
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(0, 0));
    qkv_tensor *s = qkv_softmax(x, 0);
    qkv_tensor *d = qkv_dropout_(s, 0.5, true, &g);
    assert_ptr_not_equal(d->storage, s->storage);
    assert_int_equal(qkv_version(s), 0);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(d, constant(QKV_SHAPE(2), VALUES(1, 2))))));
    qkv_tensor *a = qkv_mul_scalar(constant(QKV_SHAPE(2), VALUES(1, 2)), 2);
    qkv_tensor *e = qkv_dropout_(a, 0.5, true, &g);
    assert_ptr_equal(e->storage, a->storage);
    assert_int_equal(qkv_version(a), 1);
    qkv_scope_end();
}

/* a dtype conversion gives the parameter new storage: a version further than the old one */
static void converting_a_module_before_the_backward_is_an_error(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_linear *l = qkv_linear_new(2, 1, false, &g);
    assert_non_null(l);
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(1, 2), VALUES(1, 2));
    qkv_module_to_dtype(QKV_MODULE(l), QKV_F64);
    qkv_tensor *loss = qkv_sum_all(qkv_linear_forward(l, x));
    uint64_t seen = qkv_version(l->weight); /* its initialisation and conversion wrote it */
    assert_true(qkv_module_to_dtype(QKV_MODULE(l), QKV_F32));
    assert_int_equal(qkv_version(l->weight), seen + 1);
    assert_false(qkv_backward(loss));
    char want[160];
    snprintf(want, sizeof want, "its storage is at version %llu, the forward saw version %llu",
             (unsigned long long)seen + 1, (unsigned long long)seen);
    assert_error_contains(want);
    qkv_scope_end();
    qkv_module_free(QKV_MODULE(l));
}


/* ---- Gradient hooks ---------------------------------------------------------------------- */

typedef struct hook_log {
    int calls;
    int order[4];      /* the ids of the hooks called, in call order */
    double seen[4];    /* leaf->grad's first element at each call */
    bool other_had_grad[4];
    const qkv_tensor *other; /* a leaf whose grad is looked at during the call */
} hook_log;

typedef struct hook_ctx {
    hook_log *log;
    int id;
    bool take;
    qkv_tensor *taken;
} hook_ctx;

static void log_hook(qkv_tensor *leaf, void *ctx) {
    hook_ctx *c = ctx;
    hook_log *l = c->log;
    if (l->calls < 4) {
        l->order[l->calls] = c->id;
        l->seen[l->calls] = leaf->grad ? ((double *)qkv_data(leaf->grad))[0] : NAN;
        l->other_had_grad[l->calls] = l->other && l->other->grad;
    }
    l->calls++;
    if (c->take) {
        c->taken = qkv_retain(leaf->grad);
        qkv_zero_grad(leaf);
    }
}

/* x reaches the loss through three input slots: the hook runs once, after the last. */
static void grad_hook_runs_once_when_the_grad_is_final(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(1), VALUES(2));
    hook_log log = {0};
    hook_ctx c = {.log = &log, .id = 1};
    assert_non_null(qkv_register_grad_hook(x, log_hook, &c));
    qkv_tensor *loss = qkv_add(qkv_sum_all(qkv_mul(x, x)), qkv_sum_all(qkv_mul_scalar(x, 3)));
    assert_true(qkv_backward(loss));
    assert_int_equal(log.calls, 1);
    assert_true(log.seen[0] == 7.0); /* 2x + 3 */
    assert_true(((double *)qkv_data(x->grad))[0] == 7.0);
    qkv_scope_end();
}

/* loss = sum((w1 * a) * w2): w2's gradient is final after the last op's backward, before w1
 * has any; the hooks run in that order, during the backward. */
static void grad_hooks_run_during_the_backward_as_each_leaf_is_done(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *w1 = param(QKV_SHAPE(1), VALUES(3)), *w2 = param(QKV_SHAPE(1), VALUES(5));
    qkv_tensor *a = constant(QKV_SHAPE(1), VALUES(2));
    hook_log log = {.other = w1};
    hook_ctx c1 = {.log = &log, .id = 1}, c2 = {.log = &log, .id = 2};
    assert_non_null(qkv_register_grad_hook(w1, log_hook, &c1));
    assert_non_null(qkv_register_grad_hook(w2, log_hook, &c2));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(qkv_mul(w1, a), w2))));
    assert_int_equal(log.calls, 2);
    assert_int_equal(log.order[0], 2);
    assert_true(log.seen[0] == 6.0); /* d/dw2 = w1 a */
    assert_false(log.other_had_grad[0]);
    assert_int_equal(log.order[1], 1);
    assert_true(log.seen[1] == 10.0); /* d/dw1 = a w2 */
    qkv_scope_end();
}

/* Each backward counts afresh: a graph kept with retain_graph and run twice calls the hook
 * once per backward, with the gradient accumulated so far. */
static void grad_hooks_run_once_per_backward(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(1), VALUES(3));
    hook_log log = {0};
    hook_ctx c = {.log = &log, .id = 1};
    assert_non_null(qkv_register_grad_hook(x, log_hook, &c));
    qkv_tensor *y = qkv_add(qkv_mul(x, x), x);
    qkv_tensor *seed = qkv_ones(QKV_F64, QKV_SHAPE(1));
    assert_true(qkv_backward_with(y, seed, true));
    assert_true(qkv_backward_with(y, seed, false));
    assert_int_equal(log.calls, 2);
    assert_true(log.seen[0] == 7.0);  /* 2x + 1 */
    assert_true(log.seen[1] == 14.0); /* accumulated */
    qkv_scope_end();
}

static void removed_hooks_and_unreached_leaves_get_no_call(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(1), VALUES(2)), *z = param(QKV_SHAPE(1), VALUES(1));
    hook_log log = {0};
    hook_ctx c1 = {.log = &log, .id = 1}, c2 = {.log = &log, .id = 2}, c3 = {.log = &log, .id = 3};
    qkv_grad_hook *h1 = qkv_register_grad_hook(x, log_hook, &c1);
    assert_non_null(qkv_register_grad_hook(x, log_hook, &c2));
    assert_non_null(qkv_register_grad_hook(z, log_hook, &c3));
    qkv_remove_grad_hook(h1);
    qkv_remove_grad_hook(NULL);
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(x, x))));
    assert_int_equal(log.calls, 1);
    assert_int_equal(log.order[0], 2);
    /* A backward started from the leaf itself calls its hooks at once. */
    assert_true(qkv_backward_with(z, qkv_ones(QKV_F64, QKV_SHAPE(1)), false));
    assert_int_equal(log.calls, 2);
    assert_int_equal(log.order[1], 3);
    qkv_scope_end();
}

static void a_grad_hook_can_take_the_gradient(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(2), VALUES(1, 4));
    hook_log log = {0};
    hook_ctx c = {.log = &log, .id = 1, .take = true};
    assert_non_null(qkv_register_grad_hook(x, log_hook, &c));
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(x, x))));
    assert_null(x->grad);
    assert_non_null(c.taken);
    assert_true(((double *)qkv_data(c.taken))[1] == 8.0);
    qkv_release(c.taken);
    qkv_scope_end();
}

static void a_grad_hook_goes_on_a_leaf_that_requires_grad(void **state) {
    (void)state;
    qkv_scope_begin();
    qkv_tensor *x = param(QKV_SHAPE(1), VALUES(2));
    hook_log log = {0};
    hook_ctx c = {.log = &log};
    assert_null(qkv_register_grad_hook(qkv_mul(x, x), log_hook, &c));
    assert_error_contains("this tensor was made by an op");
    qkv_clear_error();
    assert_null(qkv_register_grad_hook(constant(QKV_SHAPE(1), VALUES(1)), log_hook, &c));
    assert_error_contains("this one does not require grad");
    qkv_clear_error();
    assert_null(qkv_register_grad_hook(x, NULL, &c));
    assert_error_contains("the hook function is NULL");
    qkv_scope_end();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(leaves_accumulate_across_two_backward_calls, clear_error),
        cmocka_unit_test_setup(accumulation_leaves_a_held_gradient_as_it_was, clear_error),
        cmocka_unit_test_setup(masking_backwards_select_instead_of_multiplying, clear_error),
        cmocka_unit_test_setup(a_leaf_takes_its_gradient_only_when_nothing_else_holds_it,
                               clear_error),
        cmocka_unit_test_setup(zero_grad_drops_the_gradient, clear_error),
        cmocka_unit_test_setup(backward_with_seeds_a_non_scalar_output, clear_error),
        cmocka_unit_test_setup(backward_requires_a_one_element_loss, clear_error),
        cmocka_unit_test_setup(backward_with_a_seed_of_the_wrong_shape_is_an_error,
                               clear_error),
        cmocka_unit_test_setup(backward_of_a_constant_is_an_error, clear_error),
        cmocka_unit_test_setup(backward_propagates_a_null_loss_as_failure, clear_error),
        cmocka_unit_test_setup(retain_graph_allows_a_second_backward, clear_error),
        cmocka_unit_test_setup(second_backward_without_retain_graph_is_an_error_naming_the_op,
                               clear_error),
        cmocka_unit_test_setup(backward_releases_what_the_graph_held, clear_error),
        cmocka_unit_test_setup(nodes_hold_only_the_values_their_backward_reads, clear_error),
        cmocka_unit_test_setup(cheap_outputs_are_recomputed_not_held, clear_error),
        cmocka_unit_test_setup(layer_norm_output_is_recomputed_for_its_consumer, clear_error),
        cmocka_unit_test_setup(requiring_grad_after_the_forward_is_an_error, clear_error),
        cmocka_unit_test_setup(inner_scopes_free_what_the_backward_does_not_read, clear_error),
        cmocka_unit_test_setup(backward_holds_nodes_whose_tensors_are_gone, clear_error),
        cmocka_unit_test_setup(scope_end_frees_a_graph_and_its_gradients, clear_error),
        cmocka_unit_test_setup(scope_end_frees_a_graph_never_backpropagated, clear_error),
        cmocka_unit_test_setup(chain_of_100000_ops_backpropagates_without_recursion,
                               clear_error),
        cmocka_unit_test_setup(releasing_a_100000_op_graph_does_not_recurse, clear_error),
        cmocka_unit_test_setup(gradient_flows_through_reshape_and_flatten, clear_error),
        cmocka_unit_test_setup(gradient_flows_through_transpose_and_permute, clear_error),
        cmocka_unit_test_setup(gradient_of_a_strided_slice_lands_on_the_picked_elements,
                               clear_error),
        cmocka_unit_test_setup(gradient_flows_through_narrow_and_select, clear_error),
        cmocka_unit_test_setup(gradient_of_expand_sums_over_the_expanded_dims, clear_error),
        cmocka_unit_test_setup(gradient_flows_through_squeeze_and_unsqueeze, clear_error),
        cmocka_unit_test_setup(gradient_flows_through_a_chain_of_views, clear_error),
        cmocka_unit_test_setup(broadcast_gradients_are_summed_to_each_input_shape, clear_error),
        cmocka_unit_test_setup(broadcasting_on_both_sides_reduces_each, clear_error),
        cmocka_unit_test_setup(no_grad_records_nothing, clear_error),
        cmocka_unit_test_setup(detach_cuts_the_graph, clear_error),
        cmocka_unit_test_setup(detach_shares_storage, clear_error),
        cmocka_unit_test_setup(retain_grad_keeps_a_non_leaf_gradient, clear_error),
        cmocka_unit_test_setup(requires_grad_on_a_non_leaf_is_an_error, clear_error),
        cmocka_unit_test_setup(requires_grad_on_an_integer_tensor_is_an_error, clear_error),
        cmocka_unit_test_setup(integer_and_mask_inputs_get_no_gradient, clear_error),
        cmocka_unit_test_setup(diamond_graph_accumulates_every_path, clear_error),
        cmocka_unit_test_setup(the_same_tensor_as_both_inputs_counts_twice, clear_error),
        cmocka_unit_test_setup(train_like_loop_of_1000_steps_leaks_nothing, clear_error),
        cmocka_unit_test_setup_teardown(anomaly_mode_names_the_op_making_nan_in_forward,
                                        clear_error, anomaly_off),
        cmocka_unit_test_setup_teardown(anomaly_mode_names_the_op_making_inf_in_backward,
                                        clear_error, anomaly_off),
        cmocka_unit_test_setup(without_anomaly_mode_the_inf_gradient_is_returned, clear_error),
        cmocka_unit_test_setup(max_over_an_axis_sends_the_gradient_to_the_first_tied_element,
                               clear_error),
        cmocka_unit_test_setup(
            max_over_all_or_several_axes_sends_the_gradient_to_the_first_in_row_major_order,
            clear_error),
        cmocka_unit_test_setup(maximum_and_minimum_split_the_gradient_of_a_tie_in_half,
                               clear_error),
        cmocka_unit_test_setup(grad_fn_name_names_the_op, clear_error),
        cmocka_unit_test_setup(a_parameter_filled_before_the_backward_is_an_error, clear_error),
        cmocka_unit_test_setup(without_a_change_the_gradient_is_right, clear_error),
        cmocka_unit_test_setup(copying_into_a_view_of_a_saved_parameter_is_an_error,
                               clear_error),
        cmocka_unit_test_setup(an_optimizer_step_before_the_backward_is_an_error, clear_error),
        cmocka_unit_test_setup(a_change_to_a_value_no_backward_reads_is_allowed, clear_error),
        cmocka_unit_test_setup(changing_an_output_its_op_saved_is_an_error, clear_error),
        cmocka_unit_test_setup(recomputing_from_a_changed_input_is_an_error, clear_error),
        cmocka_unit_test_setup(dropout_in_place_counts_its_write_and_spares_saved_values,
                               clear_error),
        cmocka_unit_test_setup(converting_a_module_before_the_backward_is_an_error,
                               clear_error),
        cmocka_unit_test_setup(grad_hook_runs_once_when_the_grad_is_final, clear_error),
        cmocka_unit_test_setup(grad_hooks_run_during_the_backward_as_each_leaf_is_done,
                               clear_error),
        cmocka_unit_test_setup(grad_hooks_run_once_per_backward, clear_error),
        cmocka_unit_test_setup(removed_hooks_and_unreached_leaves_get_no_call, clear_error),
        cmocka_unit_test_setup(a_grad_hook_can_take_the_gradient, clear_error),
        cmocka_unit_test_setup(a_grad_hook_goes_on_a_leaf_that_requires_grad, clear_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
