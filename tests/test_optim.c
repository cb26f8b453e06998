/* The optim layer: SGD, Adam, AdamW and RMSprop against torch.optim on a fixed two-layer MLP,
 * LR schedules against torch.optim.lr_scheduler, gradient clipping against torch.nn.utils,
 * allocation-free steady-state steps, state export/import and exact resumption. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "qkv.h"
#include "optim/optim.h"
#include "fixtures/optim_fixtures.h"

/* ---- Helpers ----------------------------------------------------------------------------- */

static int clear_error(void **state) {
    (void)state;
    qkv_clear_error();
    return 0;
}

static void assert_close_f32(const qkv_tensor *t, const float *expected, int64_t n,
                             double rtol, double atol) {
    assert_non_null(t);
    assert_int_equal(t->numel, n);
    const float *got = qkv_data(t);
    for (int64_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - expected[i]);
        if (err > atol + rtol * fabs(expected[i]))
            fail_msg("element %lld: got %.9g, expected %.9g", (long long)i, got[i], expected[i]);
    }
}

static void assert_close_f64(const qkv_tensor *t, const double *expected, int64_t n,
                             double rtol, double atol) {
    assert_non_null(t);
    assert_int_equal(t->numel, n);
    const double *got = qkv_data(t);
    for (int64_t i = 0; i < n; i++) {
        double err = fabs(got[i] - expected[i]);
        if (err > atol + rtol * fabs(expected[i]))
            fail_msg("element %lld: got %.17g, expected %.17g", (long long)i, got[i],
                     expected[i]);
    }
}

/* The MLP of gen_optim.py: parameters fc1.weight [5,8], fc1.bias [8], fc2.weight [8,3],
 * fc2.bias [3], held outside every scope, with the list the optimizers take. */
enum { N_PARAMS = 4 };
typedef struct mlp {
    char *names[N_PARAMS];
    qkv_tensor *params[N_PARAMS];
    qkv_named_list list;
} mlp;

static void mlp_init(mlp *m, qkv_dtype dtype) {
    static const char *names[N_PARAMS] = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};
    static const float *init[N_PARAMS] = {optim_init_fc1_weight, optim_init_fc1_bias,
                                          optim_init_fc2_weight, optim_init_fc2_bias};
    const int64_t shapes[N_PARAMS][2] = {
        {OPTIM_D_IN, OPTIM_D_HID}, {OPTIM_D_HID, 0}, {OPTIM_D_HID, OPTIM_D_OUT}, {OPTIM_D_OUT, 0}};
    for (int i = 0; i < N_PARAMS; i++) {
        int ndim = shapes[i][1] ? 2 : 1;
        qkv_scope_begin();
        qkv_tensor *t = qkv_from_array(QKV_F32, ndim, shapes[i], init[i]);
        m->params[i] = qkv_retain(qkv_to_dtype(t, dtype));
        qkv_scope_end();
        assert_non_null(m->params[i]);
        qkv_requires_grad_(m->params[i], true);
        m->names[i] = (char *)names[i];
    }
    m->list = (qkv_named_list){N_PARAMS, m->names, m->params};
}

static void mlp_free(mlp *m) {
    for (int i = 0; i < N_PARAMS; i++) qkv_release(m->params[i]);
}

/* mean((tanh(x @ W1 + b1) @ W2 + b2 - y)^2), in the scope. */
static qkv_tensor *mlp_loss(const mlp *m) {
    qkv_dtype dt = m->params[0]->dtype;
    qkv_tensor *x = qkv_to_dtype(
        qkv_from_array(QKV_F32, QKV_SHAPE(OPTIM_N, OPTIM_D_IN), optim_x), dt);
    qkv_tensor *y = qkv_to_dtype(
        qkv_from_array(QKV_F32, QKV_SHAPE(OPTIM_N, OPTIM_D_OUT), optim_y), dt);
    qkv_tensor *h = qkv_tanh(qkv_add(qkv_matmul(x, m->params[0]), m->params[1]));
    qkv_tensor *d = qkv_sub(qkv_add(qkv_matmul(h, m->params[2]), m->params[3]), y);
    return qkv_mean_all(qkv_mul(d, d));
}

/* One training step: forward, backward, (schedule), update, zero_grad, all in one scope. */
static void train_step(mlp *m, qkv_optimizer *opt, const qkv_lr_schedule *schedule) {
    qkv_scope_begin();
    qkv_tensor *loss = mlp_loss(m);
    assert_non_null(loss);
    assert_true(qkv_backward(loss));
    if (schedule) assert_true(qkv_lr_schedule_apply(schedule, opt, opt->steps));
    assert_true(qkv_optimizer_step(opt));
    qkv_optimizer_zero_grad(opt);
    qkv_scope_end();
}

/* Trains 20 steps from the fixture's initial weights in dtype and checks every parameter
 * against PyTorch's (float or double arrays, as dtype) to 1e-6 relative (1e-7 absolute for
 * values near zero). */
static void check_against_torch(qkv_optimizer *opt, qkv_optim_config config,
                                qkv_dtype dtype, const void *const expected[N_PARAMS]) {
    uint64_t live = qkv_memory_stats_get().live_tensors;
    mlp m;
    mlp_init(&m, dtype);
    assert_non_null(opt);
    assert_true(qkv_optimizer_add_group(opt, &m.list, config));
    for (int s = 0; s < OPTIM_STEPS; s++) train_step(&m, opt, NULL);
    assert_int_equal(opt->steps, OPTIM_STEPS);
    for (int i = 0; i < N_PARAMS; i++) {
        if (dtype == QKV_F32)
            assert_close_f32(m.params[i], expected[i], m.params[i]->numel, 1e-6, 1e-7);
        else
            assert_close_f64(m.params[i], expected[i], m.params[i]->numel, 1e-6, 1e-7);
    }
    qkv_optimizer_free(opt);
    mlp_free(&m);
    assert_null(qkv_error());
    assert_int_equal(qkv_memory_stats_get().live_tensors, live);
}

#define EXPECTED(name)                                                                     \
    (const void *const[N_PARAMS]) {                                                       \
        optim_##name##_fc1_weight, optim_##name##_fc1_bias, optim_##name##_fc2_weight,     \
            optim_##name##_fc2_bias                                                        \
    }

/* ---- Optimizers against torch.optim ------------------------------------------------------ */

static void sgd_plain_matches_torch(void **state) {
    (void)state;
    check_against_torch(qkv_sgd_new(), qkv_sgd_config(0.1), QKV_F32, EXPECTED(sgd_plain));
}

static void sgd_nesterov_with_weight_decay_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_sgd_config(0.05);
    c.momentum = 0.9, c.nesterov = true, c.weight_decay = 0.01;
    check_against_torch(qkv_sgd_new(), c, QKV_F32, EXPECTED(sgd_nesterov_wd));
}

static void sgd_momentum_with_dampening_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_sgd_config(0.05);
    c.momentum = 0.8, c.dampening = 0.3;
    check_against_torch(qkv_sgd_new(), c, QKV_F32, EXPECTED(sgd_dampening));
}

static void adam_matches_torch(void **state) {
    (void)state;
    check_against_torch(qkv_adam_new(), qkv_adam_config(0.01), QKV_F32, EXPECTED(adam));
}

static void adam_amsgrad_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_adam_config(0.01);
    c.amsgrad = true;
    check_against_torch(qkv_adam_new(), c, QKV_F32, EXPECTED(adam_amsgrad));
}

static void adam_l2_weight_decay_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_adam_config(0.01);
    c.weight_decay = 0.05;
    check_against_torch(qkv_adam_new(), c, QKV_F32, EXPECTED(adam_wd));
}

static void adamw_decoupled_decay_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_adamw_config(0.01);
    c.weight_decay = 0.1;
    check_against_torch(qkv_adamw_new(), c, QKV_F32, EXPECTED(adamw));
}

/* RMSprop in F64: see gen_optim.py for why F32 cannot promise 1e-6 against PyTorch here. */
static void rmsprop_plain_matches_torch(void **state) {
    (void)state;
    check_against_torch(qkv_rmsprop_new(), qkv_rmsprop_config(0.01), QKV_F64,
                        EXPECTED(rmsprop_plain));
}

static void rmsprop_centered_with_momentum_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_rmsprop_config(0.005);
    c.alpha = 0.95, c.momentum = 0.9, c.centered = true;
    check_against_torch(qkv_rmsprop_new(), c, QKV_F64, EXPECTED(rmsprop_centered_momentum));
}

int main(void) {
#define T(name) cmocka_unit_test_setup(name, clear_error)
    const struct CMUnitTest tests[] = {
        T(sgd_plain_matches_torch),
        T(sgd_nesterov_with_weight_decay_matches_torch),
        T(sgd_momentum_with_dampening_matches_torch),
        T(adam_matches_torch),
        T(adam_amsgrad_matches_torch),
        T(adam_l2_weight_decay_matches_torch),
        T(adamw_decoupled_decay_matches_torch),
        T(rmsprop_plain_matches_torch),
        T(rmsprop_centered_with_momentum_matches_torch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
