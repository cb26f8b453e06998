/* Lifetime and memory: scopes release what they own, qkv_keep and qkv_retain extend a
 * tensor's life, callers own results when no scope is open, and a steady loop of ops stops
 * going to the system allocator once the cache is warm. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qkv.h"
#include "harness.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifdef UNDER_ASAN
#include <sanitizer/asan_interface.h>
#endif

/* close_scope, and no test here leaves an error behind. */
static int close_scope_without_error(void **state) {
    assert_null(qkv_error());
    return close_scope(state);
}

static uint64_t live(void) {
    return qkv_memory_stats_get().live_tensors;
}

/* One step of work touching every kind of op: creation, random numbers, elementwise with
 * broadcasting and promotion, reductions, softmax and views. */
static void one_iteration(qkv_generator *g) {
    qkv_tensor *x = qkv_randn(QKV_F32, QKV_SHAPE(64, 33), g);
    qkv_tensor *y = qkv_add(qkv_mul(x, x), qkv_ones(QKV_F32, QKV_SHAPE(33)));
    qkv_tensor *s = qkv_sum(qkv_softmax(y, -1), 0, false);
    qkv_tensor *v = qkv_var(qkv_transpose(y, 0, 1), 1, 1, true);
    qkv_tensor *r = qkv_reshape(qkv_slice(x, 0, 0, 64, 2), QKV_SHAPE(-1));
    qkv_tensor *e = qkv_contiguous(qkv_expand(qkv_mean(x, 1, true), QKV_SHAPE(64, 33)));
    qkv_tensor *n = qkv_sum_all(qkv_to_dtype(qkv_gt_scalar(x, 0), QKV_I64));
    qkv_tensor *p = qkv_sub(qkv_arange(QKV_I64, 0, 33, 1), s); /* i64 - f32 promotes */
    assert_true(s && v && r && e && n && p);
    assert_int_equal(r->numel, 32 * 33);
}

static void steady_loop_returns_to_start_and_reuses_cached_blocks(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_memory_stats start = qkv_memory_stats_get(), warm = start;
    for (int i = 0; i < 10000; i++) {
        qkv_scope_begin();
        one_iteration(&g);
        qkv_scope_end();
        if (i == 9) warm = qkv_memory_stats_get();
    }
    qkv_memory_stats end = qkv_memory_stats_get();
    assert_int_equal(end.live_tensors, start.live_tensors);
    assert_int_equal(end.bytes_in_use, start.bytes_in_use);
    assert_int_equal(end.system_allocs, warm.system_allocs);
    assert_true(end.cache_hits - warm.cache_hits == end.allocs - warm.allocs);
    assert_true(end.allocs - warm.allocs > 9990 * 20);
}

static void scope_end_releases_everything_made_inside(void **state) {
    (void)state;
    uint64_t before = live();
    size_t bytes = qkv_memory_stats_get().bytes_in_use;
    qkv_scope_begin();
    qkv_tensor *a = qkv_ones(QKV_F64, QKV_SHAPE(100, 100));
    qkv_tensor *b = qkv_transpose(qkv_add(a, a), 0, 1);
    assert_non_null(b);
    assert_int_equal(live(), before + 3);
    qkv_scope_end();
    assert_int_equal(live(), before);
    assert_int_equal(qkv_memory_stats_get().bytes_in_use, bytes);
}

static void keep_moves_a_result_to_the_enclosing_scope(void **state) {
    (void)state;
    uint64_t before = live();
    qkv_scope_begin();
    qkv_tensor *kept;
    {
        qkv_scope_begin();
        qkv_tensor *a = qkv_full(QKV_F32, QKV_SHAPE(3), 2);
        kept = qkv_keep(qkv_mul(a, a));
        qkv_scope_end();
    }
    assert_int_equal(live(), before + 1); /* a is gone, the product stays */
    assert_int_equal(kept->refcount, 1);
    assert_true(qkv_get(kept, (const int64_t[]){2}) == 4);
    qkv_scope_end();
    assert_int_equal(live(), before);
}

static void scoped_keeps_only_the_result(void **state) {
    (void)state;
    uint64_t before = live();
    qkv_tensor *a = qkv_full(QKV_F32, QKV_SHAPE(3), 2);
    int depth = qkv_scope_depth();
    /* the sum, the product and the constant made inside are released at once */
    qkv_tensor *r = QKV_SCOPED(qkv_mul(qkv_add(a, a), qkv_full(QKV_F32, QKV_SHAPE(3), 3)));
    assert_int_equal(qkv_scope_depth(), depth);
    assert_int_equal(live(), before + 2); /* a and r */
    assert_int_equal(r->refcount, 1);     /* owned by the test's scope */
    assert_true(qkv_get(r, (const int64_t[]){1}) == 12);
    assert_null(QKV_SCOPED(qkv_mul(a, NULL)));
    assert_string_equal(qkv_error(), "qkv_mul: tensor argument 2 is NULL");
    qkv_clear_error();
    assert_int_equal(qkv_scope_depth(), depth);
    assert_int_equal(live(), before + 2);
}

static void keep_in_the_outermost_scope_hands_the_result_to_the_caller(void **state) {
    (void)state;
    qkv_scope_end(); /* leave the test's scope: depth 0 */
    uint64_t before = live();
    qkv_scope_begin();
    qkv_tensor *t = qkv_keep(qkv_arange(QKV_F32, 0, 5, 1));
    qkv_scope_end();
    assert_int_equal(live(), before + 1);
    assert_true(qkv_get(t, (const int64_t[]){4}) == 4);
    qkv_release(t);
    assert_int_equal(live(), before);
    qkv_scope_begin(); /* for the teardown */
}

static void retain_and_release_count_references(void **state) {
    (void)state;
    uint64_t before = live();
    qkv_scope_begin();
    qkv_tensor *t = qkv_retain(qkv_full(QKV_I64, QKV_SHAPE(4), 7));
    assert_int_equal(t->refcount, 2);
    qkv_scope_end();
    assert_int_equal(t->refcount, 1);
    assert_int_equal(live(), before + 1);
    assert_true(qkv_get(t, (const int64_t[]){3}) == 7);
    qkv_retain(t);
    qkv_release(t);
    assert_int_equal(live(), before + 1);
    qkv_release(t);
    assert_int_equal(live(), before);
}

static void without_a_scope_the_caller_owns_results(void **state) {
    (void)state;
    qkv_scope_end(); /* leave the test's scope: depth 0 */
    assert_int_equal(qkv_scope_depth(), 0);
    qkv_memory_stats start = qkv_memory_stats_get();
    qkv_tensor *a = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    qkv_tensor *i = qkv_arange(QKV_I64, 0, 3, 1);
    qkv_tensor *b = qkv_add(a, i); /* promotion runs in a scope of its own inside */
    qkv_tensor *v = qkv_transpose(b, 0, 1);
    assert_int_equal(a->refcount, 1);
    assert_int_equal(b->refcount, 1);
    assert_int_equal(live(), start.live_tensors + 4);
    assert_true(qkv_get(v, (const int64_t[]){2, 1}) == 3);
    qkv_release(b); /* the view still holds the storage */
    assert_true(qkv_get(v, (const int64_t[]){2, 0}) == 3);
    qkv_release(v);
    qkv_release(i);
    qkv_release(a);
    assert_int_equal(live(), start.live_tensors);
    assert_int_equal(qkv_memory_stats_get().bytes_in_use, start.bytes_in_use);
    qkv_scope_begin(); /* for the teardown */
}

static void nested_scopes_release_innermost_first(void **state) {
    (void)state;
    uint64_t before = live();
    qkv_tensor *outer = qkv_ones(QKV_F32, QKV_SHAPE(8));
    qkv_scope_begin();
    assert_int_equal(qkv_scope_depth(), 2);
    qkv_tensor *mid = qkv_add_scalar(outer, 1);
    qkv_scope_begin();
    qkv_tensor *inner = qkv_mul(mid, outer);
    assert_non_null(inner);
    assert_int_equal(live(), before + 3);
    qkv_scope_end();
    assert_int_equal(live(), before + 2);
    assert_true(qkv_get(mid, (const int64_t[]){0}) == 2);
    qkv_scope_end();
    assert_int_equal(live(), before + 1);
    assert_true(qkv_get(outer, (const int64_t[]){7}) == 1);
}

static void a_view_kept_alone_keeps_its_storage(void **state) {
    (void)state;
    uint64_t before = live();
    qkv_scope_begin();
    qkv_tensor *v = qkv_keep(qkv_slice(qkv_arange(QKV_F64, 0, 10, 1), 0, 5, 10, 2));
    qkv_scope_end();
    assert_int_equal(live(), before + 1);
    assert_true(qkv_get(v, (const int64_t[]){2}) == 9);
}

static void scope_end_frees_the_graph(void **state) {
    (void)state;
    qkv_tensor *p = qkv_requires_grad_(qkv_full(QKV_F32, QKV_SHAPE(5), 3), true);
    uint64_t before = live();
    qkv_scope_begin();
    qkv_tensor *loss = qkv_sum_all(qkv_mul(qkv_exp(p), p));
    assert_non_null(loss->grad_fn);
    qkv_scope_end();
    assert_int_equal(live(), before); /* loss, its graph and the saved exp are gone */
    qkv_scope_begin();
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(p, p))));
    qkv_scope_end();
    assert_int_equal(live(), before + 1); /* the gradient, owned by p */
    assert_true(qkv_get(p->grad, (const int64_t[]){0}) == 6);
    qkv_zero_grad(p);
    assert_int_equal(live(), before);
}

static void peak_tracks_the_largest_use(void **state) {
    (void)state;
    qkv_memory_reset_peak();
    size_t base = qkv_memory_stats_get().bytes_in_use;
    qkv_scope_begin();
    assert_non_null(qkv_empty(QKV_F64, QKV_SHAPE(1 << 16)));
    qkv_scope_end();
    qkv_memory_stats s = qkv_memory_stats_get();
    assert_int_equal(s.bytes_in_use, base);
    assert_true(s.peak_bytes >= base + (8u << 16));
    qkv_memory_reset_peak();
    assert_int_equal(qkv_memory_stats_get().peak_bytes, base);
    qkv_memory_trim();
    assert_int_equal(qkv_memory_stats_get().cached_bytes, 0);
}

/* Large blocks share their memory across sizes: two freed neighbours serve one request of
 * twice the size, and one freed block serves two of half its size, with no system
 * allocation. */
static void freed_large_blocks_serve_other_sizes(void **state) {
    (void)state;
    qkv_scope_begin();
    assert_non_null(qkv_empty(QKV_F32, QKV_SHAPE(1 << 18))); /* 1 MiB each */
    assert_non_null(qkv_empty(QKV_F32, QKV_SHAPE(1 << 18)));
    qkv_scope_end();
    qkv_memory_stats before = qkv_memory_stats_get();
    qkv_scope_begin();
    assert_non_null(qkv_empty(QKV_F32, QKV_SHAPE(1 << 19)));
    qkv_memory_stats after = qkv_memory_stats_get();
    assert_int_equal(after.system_allocs, before.system_allocs);
    assert_true(before.cached_bytes - after.cached_bytes >= (2u << 20));
    qkv_scope_end();
    qkv_scope_begin();
    assert_non_null(qkv_empty(QKV_F32, QKV_SHAPE(1 << 18)));
    assert_non_null(qkv_empty(QKV_F32, QKV_SHAPE(1 << 18)));
    assert_int_equal(qkv_memory_stats_get().system_allocs, before.system_allocs);
    /* whole pages: a request just over 1 MiB takes 1 MiB and one page */
    size_t in_use = qkv_memory_stats_get().bytes_in_use;
    assert_non_null(qkv_empty(QKV_BOOL, QKV_SHAPE((1 << 20) + 1)));
    assert_true(qkv_memory_stats_get().bytes_in_use - in_use >= (1u << 20) + 4096);
    assert_true(qkv_memory_stats_get().bytes_in_use - in_use < (1u << 20) + 8192);
    qkv_scope_end();
    /* trim gives back free pages even beside a block in use; they serve later requests */
    qkv_tensor *live = qkv_retain(qkv_full(QKV_F32, QKV_SHAPE(1 << 18), 3));
    qkv_scope_begin();
    assert_non_null(qkv_empty(QKV_F32, QKV_SHAPE(1 << 20)));
    qkv_scope_end();
    qkv_memory_trim();
    assert_int_equal(qkv_memory_stats_get().cached_bytes, 0);
    qkv_memory_stats trimmed = qkv_memory_stats_get();
    qkv_scope_begin();
    qkv_tensor *again = qkv_full(QKV_F32, QKV_SHAPE(1 << 20), 2);
    assert_non_null(again);
    assert_true(qkv_get(again, (const int64_t[]){12345}) == 2);
    assert_true(qkv_memory_stats_get().system_allocs > trimmed.system_allocs);
    qkv_scope_end();
    assert_true(qkv_get(live, (const int64_t[]){(1 << 18) - 1}) == 3);
    qkv_release(live);
}

/* ---- Lifetime mistakes ------------------------------------------------------------------- */
/* Each is an error with a message and changes nothing; none aborts or leaks. The messages are
 * those of the unchecked mode, which these tests switch to whatever QKV_DEBUG says. */

static bool debug_was;

static int open_unchecked_scope(void **state) {
    debug_was = qkv_is_debug();
    qkv_debug(false);
    return open_scope(state);
}

static int close_unchecked_scope(void **state) {
    int r = close_scope(state);
    qkv_debug(debug_was);
    return r;
}

static void release_of_a_tensor_its_scope_owns_is_refused(void **state) {
    (void)state;
    uint64_t before = live();
    qkv_tensor *t = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    qkv_release(t);
    assert_string_equal(qkv_error(),
                        "qkv_release: the tensor [2,3] is owned by its scope and you hold no "
                        "reference to it; qkv_scope_end frees it (qkv_retain first to keep "
                        "it longer)");
    qkv_clear_error();
    assert_int_equal(t->refcount, 1);
    assert_int_equal(live(), before + 1);
    /* the next tensors get addresses of their own */
    qkv_tensor *u = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    qkv_tensor *v = qkv_zeros(QKV_F32, QKV_SHAPE(2, 3));
    assert_true(u != t && v != t && u != v);
    /* a reference of one's own can be released, once */
    qkv_release(qkv_retain(t));
    assert_null(qkv_error());
    qkv_release(t);
    assert_non_null(qkv_error());
    qkv_clear_error();
    assert_true(qkv_item(qkv_sum_all(t)) == 6);
}

static void release_of_a_gradient_held_only_by_its_tensor_is_refused(void **state) {
    (void)state;
    qkv_tensor *p = qkv_requires_grad_(qkv_ones(QKV_F32, QKV_SHAPE(3)), true);
    qkv_scope_begin();
    assert_true(qkv_backward(qkv_sum_all(qkv_mul(p, p))));
    qkv_scope_end();
    uint64_t before = live();
    qkv_release(p->grad);
    assert_string_equal(qkv_error(),
                        "qkv_release: the tensor [3] is held only by the library (a module's "
                        "parameter, a gradient, a graph) and you hold no reference to it");
    qkv_clear_error();
    assert_int_equal(live(), before);
    assert_true(qkv_get(p->grad, (const int64_t[]){2}) == 2);
}

static void scope_end_with_no_scope_open_is_an_error(void **state) {
    (void)state;
    qkv_scope_end(); /* the test's own scope */
    qkv_scope_end();
    assert_string_equal(qkv_error(), "qkv_scope_end: no scope is open (more qkv_scope_end "
                                     "calls than qkv_scope_begin)");
    qkv_clear_error();
    assert_int_equal(qkv_scope_depth(), 0);
    qkv_scope_begin(); /* for the teardown */
}

static void keep_with_no_scope_open_is_an_error_and_leaks_nothing(void **state) {
    (void)state;
    qkv_scope_end(); /* leave the test's scope: depth 0 */
    uint64_t before = live();
    qkv_tensor *t = qkv_ones(QKV_F32, QKV_SHAPE(2));
    assert_ptr_equal(qkv_keep(t), t);
    assert_string_equal(qkv_error(), "qkv_keep: no scope is open, so the tensor is already "
                                     "yours to release; qkv_keep changed nothing");
    qkv_clear_error();
    assert_int_equal(t->refcount, 1);
    qkv_release(t);
    assert_null(qkv_error());
    assert_int_equal(live(), before);
    qkv_scope_begin(); /* for the teardown */
}

static void more_than_128_scopes_is_an_error_naming_where_they_open(void **state) {
    (void)state;
    qkv_scope_end(); /* leave the test's scope: depth 0 */
    uint64_t before = live();
    int line = 0;
    for (int i = 0; i < 200; i++) {
        line = __LINE__ + 1;
        qkv_scope_begin(); /* a qkv_scope_end forgotten in a loop */
        qkv_ones(QKV_F32, QKV_SHAPE(1));
    }
    char want[256];
    snprintf(want, sizeof want, "qkv_scope_begin: more than 128 scopes open at once; is a "
             "qkv_scope_end missing? (scope 128 was opened at %s:%d)", __FILE__, line);
    assert_string_equal(qkv_error(), want);
    qkv_clear_error();
    assert_int_equal(qkv_scope_depth(), 200);
    assert_int_equal(live(), before + 200);
    for (int i = 0; i < 200; i++) qkv_scope_end();
    assert_null(qkv_error());
    assert_int_equal(live(), before);
    qkv_scope_begin(); /* for the teardown */
}

static void freed_small_blocks_are_poisoned_under_asan(void **state) {
    (void)state;
#ifdef UNDER_ASAN
    qkv_tensor *t = qkv_retain(qkv_ones(QKV_F32, QKV_SHAPE(4)));
    float *data = qkv_data(t);
    qkv_scope_end(); /* the scope's reference */
    assert_false(__asan_address_is_poisoned(data));
    assert_false(__asan_address_is_poisoned(&t->refcount));
    qkv_release(t); /* the last: the tensor object and its 16 bytes go back to the cache */
    assert_true(__asan_address_is_poisoned(data));
    assert_true(__asan_address_is_poisoned(&data[3]));
    assert_true(__asan_address_is_poisoned(&t->refcount));
    qkv_scope_begin(); /* for the teardown */
#else
    skip();
#endif
}

/* ---- Checked mode ------------------------------------------------------------------------ */

static int open_checked_scope(void **state) {
    debug_was = qkv_is_debug();
    qkv_debug(true);
    return open_scope(state);
}

static void use_after_scope_end_names_where_the_tensor_was_made(void **state) {
    (void)state;
    int line = __LINE__ + 1;
    qkv_scope_begin();
    qkv_tensor *t = qkv_ones(QKV_F32, QKV_SHAPE(2, 3));
    qkv_tensor *u = qkv_exp(t);
    qkv_scope_end();
    qkv_tensor *r = qkv_add(u, u); /* u is gone: its values would be another tensor's */
    assert_null(r);
    char want[256];
    snprintf(want, sizeof want, "), freed by the qkv_scope_end of the scope opened at %s:%d; "
             "a tensor lives until its scope ends or its last reference is released",
             __FILE__, line);
    const char *e = qkv_error();
    const char *head = "qkv_add: a freed tensor was passed: it was made by qkv_exp (tensor #";
    assert_non_null(e);
    assert_memory_equal(e, head, strlen(head));
    assert_non_null(strstr(e, want));
    qkv_clear_error();
    assert_true(isnan(qkv_item(qkv_sum_all(t))));
    assert_non_null(strstr(qkv_error(), "qkv_sum_all: a freed tensor was passed: it was made by "
                                        "qkv_ones (tensor #"));
    qkv_clear_error();
}

static void a_second_release_names_the_first(void **state) {
    (void)state;
    qkv_scope_end(); /* leave the test's scope: depth 0 */
    uint64_t before = live();
    qkv_tensor *t = qkv_zeros(QKV_F32, QKV_SHAPE(4));
    qkv_release(t);
    assert_int_equal(live(), before);
    qkv_release(t);
    const char *e = qkv_error();
    assert_non_null(e);
    assert_non_null(strstr(e, "qkv_release: a freed tensor was passed: it was made by qkv_zeros "
                              "(tensor #"));
    assert_non_null(strstr(e, "), freed by qkv_release; a tensor lives"));
    qkv_clear_error();
    assert_int_equal(live(), before);
    qkv_scope_begin(); /* for the teardown */
}

static void report_lists_live_tensors_and_open_scopes(void **state) {
    (void)state;
    qkv_scope_end(); /* leave the test's scope: depth 0 */
    FILE *f = tmpfile();
    assert_non_null(f);
    assert_int_equal(qkv_debug_report(f), 0);
    qkv_tensor *t = qkv_arange(QKV_F32, 0, 3, 1);
    int line = __LINE__ + 1;
    qkv_scope_begin();
    qkv_tensor *k = qkv_keep(qkv_mul_scalar(qkv_retain(t), 2));
    assert_int_equal(qkv_debug_report(f), 3);
    char got[1024] = {0};
    rewind(f);
    assert_true(fread(got, 1, sizeof got - 1, f) > 0);
    fclose(f);
    char want[1024];
    snprintf(want, sizeof want,
             "qkv: 1 scope open (each qkv_scope_begin needs a qkv_scope_end):\n"
             "  scope 1 opened at %s:%d\n"
             "qkv: 2 tensors alive (made in checked mode):\n"
             "  f32 [3] made by qkv_arange (tensor #", __FILE__, line);
    assert_memory_equal(got, want, strlen(want));
    assert_non_null(strstr(got, "), held by you (2)\n  f32 [3] made by qkv_mul_scalar (tensor #"));
    assert_non_null(strstr(got, "), held by you (1), a scope (1)\n"));
    qkv_scope_end();
    qkv_release(k);
    qkv_release(t);
    qkv_release(t);
    assert_null(qkv_error());
    qkv_scope_begin(); /* for the teardown */
}

/* A program that ends with a tensor alive and a scope open has them listed on stderr. */
static void exit_report_names_what_was_left(void **state) {
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    int line = __LINE__ + 6;
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        while (qkv_scope_depth() > 0) qkv_scope_end();
        qkv_tensor *leaked = qkv_ones(QKV_F64, QKV_SHAPE(2, 2));
        qkv_scope_begin();
        exit(leaked ? 0 : 1);
    }
    close(fds[1]);
    char got[4096] = {0};
    size_t n = 0;
    ssize_t r;
    while (n < sizeof got - 1 && (r = read(fds[0], got + n, sizeof got - 1 - n)) > 0)
        n += (size_t)r;
    close(fds[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    char want[512];
    snprintf(want, sizeof want,
             "qkv: 1 scope open (each qkv_scope_begin needs a qkv_scope_end):\n"
             "  scope 1 opened at %s:%d\n"
             "qkv: 1 tensor alive (made in checked mode):\n"
             "  f64 [2,2] made by qkv_ones (tensor #", __FILE__, line);
    assert_non_null(strstr(got, want));
    assert_non_null(strstr(got, "), held by you (1)\n"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, open_scope, close_scope_without_error)
        T(scope_end_releases_everything_made_inside),
        T(keep_moves_a_result_to_the_enclosing_scope),
        T(scoped_keeps_only_the_result),
        T(keep_in_the_outermost_scope_hands_the_result_to_the_caller),
        T(retain_and_release_count_references),
        T(without_a_scope_the_caller_owns_results),
        T(nested_scopes_release_innermost_first),
        T(a_view_kept_alone_keeps_its_storage),
        T(scope_end_frees_the_graph),
        T(peak_tracks_the_largest_use),
#undef T
#define T(f) cmocka_unit_test_setup_teardown(f, open_unchecked_scope, close_unchecked_scope)
        /* the allocator's counters are those of the unchecked mode, which reuses tensors */
        T(steady_loop_returns_to_start_and_reuses_cached_blocks),
        T(freed_large_blocks_serve_other_sizes),
        T(release_of_a_tensor_its_scope_owns_is_refused),
        T(release_of_a_gradient_held_only_by_its_tensor_is_refused),
        T(scope_end_with_no_scope_open_is_an_error),
        T(keep_with_no_scope_open_is_an_error_and_leaks_nothing),
        T(more_than_128_scopes_is_an_error_naming_where_they_open),
        T(freed_small_blocks_are_poisoned_under_asan),
#undef T
#define T(f) cmocka_unit_test_setup_teardown(f, open_checked_scope, close_unchecked_scope)
        T(use_after_scope_end_names_where_the_tensor_was_made),
        T(a_second_release_names_the_first),
        T(report_lists_live_tensors_and_open_scopes),
        T(exit_report_names_what_was_left),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
