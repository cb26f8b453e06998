/* What the module suites share for checking against PyTorch fixtures: fixtures as tensors,
 * tolerances, loading a fixture's parameters into a module by name and checking its
 * gradients and parameter names. Include after the suite's fixture header, which defines
 * nn_fixture and nn_named_fixture. */
#ifndef QKV_TESTS_NN_HARNESS_H
#define QKV_TESTS_NN_HARNESS_H

#define S(...) QKV_SHAPE(__VA_ARGS__)

/* F32 results against float64 references: 1e-5 relative to each value plus 1e-5 of the
 * tensor's largest magnitude (a negative atol asks assert_fixture for that), so entries that
 * cancel to near zero are held to their tensor's scale rather than to their own. */
#define RTOL 1e-5
#define ATOL (-1.0)

/* ---- Helpers ----------------------------------------------------------------------------- */

/* A fixture as a tensor of dtype (BOOL: nonzero is true). */
static inline qkv_tensor *fx(const nn_fixture *f, qkv_dtype dtype) {
    qkv_tensor *t = qkv_to_dtype(qkv_from_array(QKV_F64, f->ndim, f->shape, f->data), dtype);
    assert_non_null(t);
    return t;
}

static inline qkv_tensor *fx_leaf(const nn_fixture *f) {
    return qkv_requires_grad_(fx(f, QKV_F32), true);
}

/* t has f's shape and |t - f| <= atol + rtol * |f| everywhere; a negative atol means rtol
 * times the largest |f|. */
static inline void assert_fixture(const qkv_tensor *t, const nn_fixture *f, double rtol, double atol,
                           const char *what) {
    if (!t) fail_msg("%s: NULL (%s)", what, qkv_error() ? qkv_error() : "no error");
    assert_int_equal(t->ndim, f->ndim);
    for (int i = 0; i < f->ndim; i++) assert_int_equal(t->shape[i], f->shape[i]);
    if (atol < 0) {
        atol = 0;
        for (int64_t i = 0; i < t->numel; i++) atol = fmax(atol, rtol * fabs(f->data[i]));
    }
    double *v = malloc((size_t)t->numel * sizeof *v);
    assert_non_null(v);
    assert_true(qkv_copy_out(t, QKV_F64, v));
    for (int64_t i = 0; i < t->numel; i++) {
        double e = f->data[i];
        if (!(fabs(v[i] - e) <= atol + rtol * fabs(e)))
            fail_msg("%s element %lld: %.9g, expected %.9g", what, (long long)i, v[i], e);
    }
    free(v);
}

static inline void assert_values(const qkv_tensor *t, int64_t n, const double *expected, double tol) {
    assert_non_null(t);
    assert_int_equal(t->numel, n);
    double *v = malloc((size_t)n * sizeof *v);
    assert_non_null(v);
    assert_true(qkv_copy_out(t, QKV_F64, v));
    for (int64_t i = 0; i < n; i++)
        if (!(fabs(v[i] - expected[i]) <= tol))
            fail_msg("element %lld: %.9g, expected %.9g", (long long)i, v[i], expected[i]);
    free(v);
}

static inline qkv_tensor *find_param(const void *m, const char *name) {
    qkv_named_list *l = qkv_module_parameters(m);
    assert_non_null(l);
    qkv_tensor *t = NULL;
    for (int i = 0; i < l->n; i++)
        if (strcmp(l->names[i], name) == 0) t = l->tensors[i];
    qkv_named_list_free(l);
    if (!t) fail_msg("no parameter named %s", name);
    return t;
}

/* Copies PyTorch's weights into the parameters of the same names. */
static inline void load_params(const void *m, const nn_named_fixture *table) {
    for (const nn_named_fixture *e = table; e->name; e++) {
        qkv_tensor *p = find_param(m, e->name);
        assert_int_equal(p->numel, qkv_from_array(QKV_F64, e->fixture->ndim, e->fixture->shape,
                                                  e->fixture->data)->numel);
        assert_true(qkv_copy_(p, fx(e->fixture, QKV_F64)));
    }
}

/* The largest magnitude in the fixture of table named name. */
static inline double fixture_scale(const nn_named_fixture *table, const char *name) {
    for (const nn_named_fixture *e = table; e->name; e++) {
        if (strcmp(e->name, name)) continue;
        int64_t n = 1;
        for (int i = 0; i < e->fixture->ndim; i++) n *= e->fixture->shape[i];
        double scale = 0;
        for (int64_t i = 0; i < n; i++) scale = fmax(scale, fabs(e->fixture->data[i]));
        return scale;
    }
    fail_msg("no fixture named %s", name);
    return 0;
}

/* Every gradient to RTOL of its tensor's scale. The key projection's bias adds the same
 * q . b_k to a whole row of scores, which softmax ignores: its gradient is zero, both sides
 * hold rounding noise there, and it is held to the scale of the query bias's gradient. */
static inline void assert_grads(const void *m, const nn_named_fixture *table) {
    for (const nn_named_fixture *e = table; e->name; e++) {
        qkv_tensor *p = find_param(m, e->name);
        const char *k = strstr(e->name, "k_proj.bias");
        double atol = ATOL;
        if (k && k[strlen("k_proj.bias")] == '\0') {
            char q_name[128];
            snprintf(q_name, sizeof q_name, "%.*sq_proj.bias", (int)(k - e->name), e->name);
            atol = RTOL * fixture_scale(table, q_name);
        }
        assert_fixture(p->grad, e->fixture, RTOL, atol, e->name);
    }
}

/* The parameter names, in order, are exactly those of the table. */
static inline void assert_param_names(const void *m, const nn_named_fixture *table) {
    qkv_named_list *l = qkv_module_parameters(m);
    assert_non_null(l);
    int n = 0;
    for (const nn_named_fixture *e = table; e->name; e++, n++) {
        assert_true(n < l->n);
        assert_string_equal(l->names[n], e->name);
    }
    assert_int_equal(l->n, n);
    qkv_named_list_free(l);
}

/* sum(out * w): the scalar whose gradients the fixtures hold. */
static inline qkv_tensor *weighted(const qkv_tensor *out, const nn_fixture *w) {
    return qkv_sum_all(qkv_mul(out, fx(w, QKV_F32)));
}

static inline qkv_generator gen(uint64_t seed) {
    qkv_generator g;
    qkv_generator_init(&g, seed);
    return g;
}

#endif
