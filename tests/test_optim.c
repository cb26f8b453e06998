/* The optim layer: SGD, Adam, AdamW and RMSprop against torch.optim on a fixed two-layer MLP,
 * LR schedules against torch.optim.lr_scheduler, gradient clipping against torch.nn.utils,
 * allocation-free steady-state steps, state export/import and exact resumption. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"
#include "optim/optim.h"
#include "fixtures/optim_fixtures.h"
#include "harness.h"

/* ---- Helpers ----------------------------------------------------------------------------- */

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
    if (schedule) assert_true(qkv_lr_schedule_apply(schedule, opt, qkv_optimizer_steps(opt)));
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
    assert_int_equal(qkv_optimizer_steps(opt), OPTIM_STEPS);
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
    check_against_torch(qkv_adam_new(), qkv_adam_config(0.01), QKV_F64, EXPECTED(adam));
}

static void adam_amsgrad_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_adam_config(0.01);
    c.amsgrad = true;
    check_against_torch(qkv_adam_new(), c, QKV_F64, EXPECTED(adam_amsgrad));
}

static void adam_l2_weight_decay_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_adam_config(0.01);
    c.weight_decay = 0.05;
    check_against_torch(qkv_adam_new(), c, QKV_F64, EXPECTED(adam_wd));
}

static void adamw_decoupled_decay_matches_torch(void **state) {
    (void)state;
    qkv_optim_config c = qkv_adamw_config(0.01);
    c.weight_decay = 0.1;
    check_against_torch(qkv_adamw_new(), c, QKV_F64, EXPECTED(adamw));
}

/* Adam, AdamW and RMSprop in F64: see gen_optim.py for why F32 cannot promise 1e-6 against
 * PyTorch there. */
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

/* ---- Closed forms ------------------------------------------------------------------------ */

/* At step 1, m = (1 - b1) g and v = (1 - b2) g^2, so bias correction leaves
 * param -= lr * g / (|g| + eps): a step of lr against the sign of the gradient. */
static void adam_first_step_moves_each_element_by_lr_against_the_gradient(void **state) {
    (void)state;
    qkv_tensor *p = qkv_requires_grad_(
        qkv_from_array(QKV_F64, QKV_SHAPE(3), (double[]){1, 2, 3}), true);
    char *names[] = {"w"};
    qkv_named_list list = {1, names, &p};
    qkv_optimizer *opt = qkv_adam_new();
    assert_true(qkv_optimizer_add_group(opt, &list, qkv_adam_config(0.5)));
    p->grad = qkv_from_array(QKV_F64, QKV_SHAPE(3), (double[]){4, -0.25, 0});
    assert_true(qkv_optimizer_step(opt));
    const double *v = qkv_data(p);
    assert_true(fabs(v[0] - (1 - 0.5 * 4 / (4 + 1e-8))) < 1e-15);
    assert_true(fabs(v[1] - (2 + 0.5 * 0.25 / (0.25 + 1e-8))) < 1e-15);
    assert_true(v[2] == 3);
    assert_int_equal(qkv_optimizer_param_steps(opt, 0, 0), 1);
    qkv_optimizer_free(opt);
    qkv_release(p);
}

static void sgd_plain_step_is_param_minus_lr_times_grad(void **state) {
    (void)state;
    qkv_tensor *p = qkv_requires_grad_(
        qkv_from_array(QKV_F32, QKV_SHAPE(2), (float[]){1, -1}), true);
    char *names[] = {"w"};
    qkv_named_list list = {1, names, &p};
    qkv_optimizer *opt = qkv_sgd_new();
    assert_true(qkv_optimizer_add_group(opt, &list, qkv_sgd_config(0.5)));
    p->grad = qkv_from_array(QKV_F32, QKV_SHAPE(2), (float[]){2, 4});
    assert_true(qkv_optimizer_step(opt));
    assert_true(((float *)qkv_data(p))[0] == 0.0f);
    assert_true(((float *)qkv_data(p))[1] == -3.0f);
    assert_null(qkv_optimizer_state(opt, 0, 0, "momentum_buffer")); /* no momentum, no buffer */
    qkv_optimizer_free(opt);
    qkv_release(p);
}

static void parameters_without_grad_are_skipped_and_get_no_state(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = qkv_adam_new();
    assert_true(qkv_optimizer_add_group(opt, &m.list, qkv_adam_config(0.1)));
    m.params[1]->grad = qkv_ones(QKV_F32, QKV_SHAPE(OPTIM_D_HID));
    float before = ((float *)qkv_data(m.params[0]))[0];
    assert_true(qkv_optimizer_step(opt));
    assert_true(((float *)qkv_data(m.params[0]))[0] == before);
    assert_int_equal(qkv_optimizer_param_steps(opt, 0, 0), 0);
    assert_null(qkv_optimizer_state(opt, 0, 0, "exp_avg"));
    assert_int_equal(qkv_optimizer_param_steps(opt, 0, 1), 1);
    assert_non_null(qkv_optimizer_state(opt, 0, 1, "exp_avg"));
    assert_null(qkv_optimizer_state(opt, 0, 1, "max_exp_avg_sq")); /* only with amsgrad */
    qkv_optimizer_zero_grad(opt);
    assert_null(m.params[1]->grad);
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

/* ---- Steady state ------------------------------------------------------------------------ */

/* After the first step made the moments, a step allocates nothing at all. */
static void steady_state_steps_make_no_allocation(void **state) {
    (void)state;
    qkv_optim_config adam = qkv_adam_config(0.01), sgd = qkv_sgd_config(0.01);
    qkv_optim_config rms = qkv_rmsprop_config(0.01);
    adam.amsgrad = true, adam.weight_decay = 0.1;
    sgd.momentum = 0.9, sgd.nesterov = true;
    rms.momentum = 0.5, rms.centered = true;
    qkv_optimizer *opts[4] = {qkv_adam_new(), qkv_adamw_new(), qkv_sgd_new(), qkv_rmsprop_new()};
    qkv_optim_config configs[4] = {adam, qkv_adamw_config(0.01), sgd, rms};
    for (int k = 0; k < 4; k++) {
        mlp m;
        mlp_init(&m, QKV_F32);
        assert_true(qkv_optimizer_add_decay_groups(opts[k], &m.list, configs[k]));
        for (int s = 0; s < 5; s++) {
            qkv_scope_begin();
            assert_true(qkv_backward(mlp_loss(&m)));
            qkv_memory_stats before = qkv_memory_stats_get();
            assert_true(qkv_optimizer_step(opts[k]));
            qkv_memory_stats after = qkv_memory_stats_get();
            if (s >= 1) {
                assert_int_equal(after.allocs, before.allocs);
                assert_int_equal(after.system_allocs, before.system_allocs);
                assert_int_equal(after.live_tensors, before.live_tensors);
            }
            qkv_optimizer_zero_grad(opts[k]);
            qkv_scope_end();
        }
        qkv_optimizer_free(opts[k]);
        mlp_free(&m);
    }
}

/* Large tensors are updated by several threads; each element's update is independent, so the
 * result is the same bits as on one thread. */
static void threaded_update_equals_single_thread_update(void **state) {
    (void)state;
    int threads = qkv_get_num_threads();
    qkv_generator gen;
    float *results[2];
    int64_t n = 1 << 18;
    for (int run = 0; run < 2; run++) {
        qkv_set_num_threads(run == 0 ? 1 : 4);
        qkv_generator_init(&gen, 7);
        qkv_tensor *p = qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(n), &gen), true);
        char *names[] = {"w"};
        qkv_named_list list = {1, names, &p};
        qkv_optimizer *opt = qkv_adamw_new();
        assert_true(qkv_optimizer_add_group(opt, &list, qkv_adamw_config(0.01)));
        for (int s = 0; s < 3; s++) {
            p->grad = qkv_randn(QKV_F32, QKV_SHAPE(n), &gen);
            assert_true(qkv_optimizer_step(opt));
            qkv_optimizer_zero_grad(opt);
        }
        results[run] = malloc((size_t)n * sizeof(float));
        memcpy(results[run], qkv_data(p), (size_t)n * sizeof(float));
        qkv_optimizer_free(opt);
        qkv_release(p);
    }
    qkv_set_num_threads(threads);
    assert_memory_equal(results[0], results[1], (size_t)n * sizeof(float));
    free(results[0]);
    free(results[1]);
}

/* ---- Parameter groups -------------------------------------------------------------------- */

static void decay_rule_exempts_biases_norms_and_vectors(void **state) {
    (void)state;
    qkv_tensor *matrix = qkv_zeros(QKV_F32, QKV_SHAPE(2, 2));
    qkv_tensor *vector = qkv_zeros(QKV_F32, QKV_SHAPE(2));
    assert_true(qkv_param_takes_decay("blocks.0.attn.q_proj.weight", matrix));
    assert_true(qkv_param_takes_decay("embedding.weight", matrix));
    assert_false(qkv_param_takes_decay("blocks.0.attn.q_proj.bias", matrix));
    assert_false(qkv_param_takes_decay("blocks.0.norm1.weight", matrix));
    assert_false(qkv_param_takes_decay("ln.layer_norm.gain", matrix));
    assert_false(qkv_param_takes_decay("scale", vector));
    qkv_release(matrix);
    qkv_release(vector);
}

static void decay_groups_split_weights_from_biases(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = qkv_adamw_new();
    assert_true(qkv_optimizer_add_decay_groups(opt, &m.list, qkv_adamw_config(0.01)));
    assert_int_equal(qkv_optimizer_num_groups(opt), 2);
    assert_int_equal(qkv_optimizer_num_params(opt, 0), 2);
    assert_string_equal(qkv_optimizer_param_name(opt, 0, 0), "fc1.weight");
    assert_string_equal(qkv_optimizer_param_name(opt, 0, 1), "fc2.weight");
    assert_true(qkv_optimizer_config(opt, 0)->weight_decay == 0.01);
    assert_int_equal(qkv_optimizer_num_params(opt, 1), 2);
    assert_string_equal(qkv_optimizer_param_name(opt, 1, 0), "fc1.bias");
    assert_string_equal(qkv_optimizer_param_name(opt, 1, 1), "fc2.bias");
    assert_true(qkv_optimizer_config(opt, 1)->weight_decay == 0);
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

static void add_group_rejects_bad_configs_and_repeated_parameters(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = qkv_sgd_new();
    qkv_optim_config c = qkv_sgd_config(-0.1);
    assert_false(qkv_optimizer_add_group(opt, &m.list, c));
    assert_string_equal(qkv_error(), "qkv_optimizer_add_group: invalid lr for sgd");
    qkv_clear_error();
    c = qkv_sgd_config(0.1);
    c.nesterov = true;
    assert_false(qkv_optimizer_add_group(opt, &m.list, c));
    assert_string_equal(qkv_error(),
                        "qkv_optimizer_add_group: nesterov needs momentum > 0 and dampening 0");
    qkv_clear_error();
    assert_true(qkv_optimizer_add_group(opt, &m.list, qkv_sgd_config(0.1)));
    qkv_named_list again = {1, m.names + 2, m.params + 2};
    assert_false(qkv_optimizer_add_group(opt, &again, qkv_sgd_config(0.1)));
    assert_string_equal(qkv_error(),
                        "qkv_optimizer_add_group: fc2.weight appears in more than one group");
    qkv_clear_error();
    qkv_tensor *ids = qkv_zeros(QKV_I64, QKV_SHAPE(2));
    char *id_name[] = {"ids"};
    qkv_named_list ints = {1, id_name, &ids};
    assert_false(qkv_optimizer_add_group(opt, &ints, qkv_sgd_config(0.1)));
    assert_string_equal(qkv_error(), "qkv_optimizer_add_group: ids is i64; parameters must be "
                                     "f32 or f64");
    qkv_clear_error();
    assert_false(qkv_optimizer_add_group(opt, NULL, qkv_sgd_config(0.1)));
    assert_false(qkv_optimizer_step(NULL));
    qkv_optimizer_free(NULL);
    assert_int_equal(qkv_optimizer_num_groups(opt), 1);
    qkv_release(ids);
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

/* ---- LR schedules against torch.optim.lr_scheduler --------------------------------------- */

static void assert_schedule(qkv_lr_schedule s, const double *expected) {
    for (int64_t step = 0; step < SCHED_STEPS; step++) {
        double lr = qkv_lr_at(&s, 0.1, step);
        if (fabs(lr - expected[step]) > 1e-9 * fabs(expected[step]) + 1e-15)
            fail_msg("step %lld: lr %.17g, torch %.17g", (long long)step, lr, expected[step]);
    }
}

static void step_schedule_matches_torch_step_lr(void **state) {
    (void)state;
    assert_schedule(qkv_lr_step(7, 0.5), sched_step);
}

static void exponential_schedule_matches_torch_exponential_lr(void **state) {
    (void)state;
    assert_schedule(qkv_lr_exponential(0.9), sched_exponential);
}

/* 30 steps with t_max 12 also cover torch's climb back up after t_max. */
static void cosine_schedule_matches_torch_cosine_annealing_lr(void **state) {
    (void)state;
    assert_schedule(qkv_lr_cosine(12, 0.001), sched_cosine);
}

static void warmup_cosine_schedule_matches_torch_lambda_lr(void **state) {
    (void)state;
    assert_schedule(qkv_lr_warmup_cosine(5, 25, 0.01), sched_warmup_cosine);
}

static void warmup_linear_schedule_matches_torch_lambda_lr(void **state) {
    (void)state;
    assert_schedule(qkv_lr_warmup_linear(5, 25, 0.01), sched_warmup_linear);
}

static void schedule_apply_scales_each_group_from_its_initial_lr(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = qkv_sgd_new();
    qkv_named_list a = {2, m.names, m.params}, b = {2, m.names + 2, m.params + 2};
    assert_true(qkv_optimizer_add_group(opt, &a, qkv_sgd_config(0.1)));
    assert_true(qkv_optimizer_add_group(opt, &b, qkv_sgd_config(1.0)));
    qkv_lr_schedule s = qkv_lr_step(2, 0.5);
    assert_true(qkv_lr_schedule_apply(&s, opt, 5));
    assert_true(qkv_optimizer_config(opt, 0)->lr == 0.1 * 0.25);
    assert_true(qkv_optimizer_config(opt, 1)->lr == 0.25);
    assert_true(qkv_optimizer_initial_lr(opt, 1) == 1.0);
    qkv_lr_schedule bad = qkv_lr_step(0, 0.5);
    assert_false(qkv_lr_schedule_apply(&bad, opt, 1));
    assert_string_equal(qkv_error(), "qkv_lr_schedule_apply: step_size must be positive");
    qkv_clear_error();
    assert_true(isnan(qkv_lr_at(&s, 0.1, -1)));
    assert_string_equal(qkv_error(), "qkv_lr_at: step is negative");
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

/* ---- Gradient clipping against torch.nn.utils -------------------------------------------- */

typedef struct clip_params {
    qkv_tensor *t[2];
    char *names[2];
    qkv_named_list list;
} clip_params;

static void clip_params_init(clip_params *c) {
    c->t[0] = qkv_requires_grad_(qkv_zeros(QKV_F32, QKV_SHAPE(3, 4)), true);
    c->t[1] = qkv_requires_grad_(qkv_zeros(QKV_F32, QKV_SHAPE(5)), true);
    c->t[0]->grad = qkv_from_array(QKV_F32, QKV_SHAPE(3, 4), clip_g1);
    c->t[1]->grad = qkv_from_array(QKV_F32, QKV_SHAPE(5), clip_g2);
    c->names[0] = "a", c->names[1] = "b";
    c->list = (qkv_named_list){2, c->names, c->t};
}

static void clip_params_free(clip_params *c) {
    qkv_release(c->t[0]);
    qkv_release(c->t[1]);
}

static void clip_grad_norm_scales_grads_above_max_norm_as_torch(void **state) {
    (void)state;
    clip_params c;
    clip_params_init(&c);
    double norm = qkv_clip_grad_norm(&c.list, clip_clipped_max_norm);
    assert_true(fabs(norm - clip_clipped_norm) <= 1e-6 * clip_clipped_norm);
    assert_close_f32(c.t[0]->grad, clip_clipped_g1, 12, 1e-6, 1e-7);
    assert_close_f32(c.t[1]->grad, clip_clipped_g2, 5, 1e-6, 1e-7);
    clip_params_free(&c);
}

static void clip_grad_norm_below_max_norm_leaves_grads_alone(void **state) {
    (void)state;
    clip_params c;
    clip_params_init(&c);
    double norm = qkv_clip_grad_norm(&c.list, clip_unclipped_max_norm);
    assert_true(fabs(norm - clip_unclipped_norm) <= 1e-6 * clip_unclipped_norm);
    assert_memory_equal(qkv_data(c.t[0]->grad), clip_g1, sizeof clip_g1);
    assert_memory_equal(qkv_data(c.t[1]->grad), clip_g2, sizeof clip_g2);
    qkv_zero_grad(c.t[0]);
    qkv_zero_grad(c.t[1]);
    assert_true(qkv_clip_grad_norm(&c.list, 1.0) == 0);
    clip_params_free(&c);
}

static void clip_grad_value_clamps_as_torch(void **state) {
    (void)state;
    clip_params c;
    clip_params_init(&c);
    assert_true(qkv_clip_grad_value(&c.list, 0.5));
    assert_memory_equal(qkv_data(c.t[0]->grad), clip_value_g1, sizeof clip_value_g1);
    assert_memory_equal(qkv_data(c.t[1]->grad), clip_value_g2, sizeof clip_value_g2);
    assert_false(qkv_clip_grad_value(&c.list, -1));
    assert_string_equal(qkv_error(), "qkv_clip_grad_value: clip -1 < 0");
    qkv_clear_error();
    assert_true(isnan(qkv_clip_grad_norm(NULL, 1)));
    clip_params_free(&c);
}

/* ---- State export / import --------------------------------------------------------------- */

/* An AdamW (amsgrad) over decay groups with a warmup-cosine schedule. */
static qkv_optimizer *resumable_optimizer(mlp *m) {
    qkv_optim_config c = qkv_adamw_config(0.02);
    c.amsgrad = true;
    qkv_optimizer *opt = qkv_adamw_new();
    assert_true(qkv_optimizer_add_decay_groups(opt, &m->list, c));
    return opt;
}

static qkv_tensor *state_tensor(const qkv_optim_state *st, const char *name) {
    for (int i = 0; i < st->tensors.n; i++)
        if (!strcmp(st->tensors.names[i], name)) return st->tensors.tensors[i];
    return NULL;
}

static const char *state_meta(const qkv_optim_state *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta_keys[i], key)) return st->meta_values[i];
    return NULL;
}

static void export_names_moments_steps_and_hyperparameters(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = resumable_optimizer(&m);
    train_step(&m, opt, NULL);
    train_step(&m, opt, NULL);
    qkv_optim_state *st = qkv_optimizer_state_export(opt);
    assert_non_null(st);
    assert_int_equal(st->tensors.n, 4 * 4); /* step + three moments per parameter */
    qkv_tensor *step = state_tensor(st, "optim.state.fc1.bias.step");
    assert_non_null(step);
    assert_int_equal(step->dtype, QKV_I64);
    assert_true(qkv_item(step) == 2);
    qkv_tensor *exp_avg = state_tensor(st, "optim.state.fc2.weight.exp_avg");
    assert_non_null(exp_avg);
    assert_memory_equal(qkv_data(exp_avg), qkv_data(qkv_optimizer_state(opt, 0, 1, "exp_avg")),
                        OPTIM_D_HID * OPTIM_D_OUT * sizeof(float));
    assert_non_null(state_tensor(st, "optim.state.fc1.weight.max_exp_avg_sq"));
    assert_string_equal(state_meta(st, "optim.type"), "adamw");
    assert_string_equal(state_meta(st, "optim.steps"), "2");
    assert_string_equal(state_meta(st, "optim.groups"), "2");
    assert_string_equal(state_meta(st, "optim.group.0.params"), "fc1.weight,fc2.weight");
    assert_string_equal(state_meta(st, "optim.group.1.weight_decay"), "0");
    assert_string_equal(state_meta(st, "optim.group.0.weight_decay"), "0.01");
    assert_string_equal(state_meta(st, "optim.group.0.beta2"), "0.999");
    assert_string_equal(state_meta(st, "optim.group.1.amsgrad"), "true");
    qkv_optim_state_free(st);
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

/* 2N steps in one run equal N steps, an export, an import into a fresh model and optimizer,
 * and N more steps: bit for bit, schedule included. */
static void resumed_training_is_bitwise_identical(void **state) {
    (void)state;
    uint64_t live = qkv_memory_stats_get().live_tensors;
    enum { N = 6 };
    qkv_lr_schedule schedule = qkv_lr_warmup_cosine(3, 2 * N, 0.001);
    mlp straight;
    mlp_init(&straight, QKV_F32);
    qkv_optimizer *opt = resumable_optimizer(&straight);
    for (int s = 0; s < 2 * N; s++) train_step(&straight, opt, &schedule);
    qkv_optimizer_free(opt);

    mlp first, second;
    mlp_init(&first, QKV_F32);
    opt = resumable_optimizer(&first);
    for (int s = 0; s < N; s++) train_step(&first, opt, &schedule);
    qkv_optim_state *st = qkv_optimizer_state_export(opt);
    assert_non_null(st);
    qkv_optimizer_free(opt);
    mlp_init(&second, QKV_F32);
    for (int i = 0; i < N_PARAMS; i++) assert_true(qkv_copy_(second.params[i], first.params[i]));
    mlp_free(&first);
    opt = resumable_optimizer(&second);
    assert_true(qkv_optimizer_set_lr(opt, 0, 123)); /* the import restores what the state says */
    assert_true(qkv_optimizer_state_import(opt, st));
    qkv_optim_state_free(st);
    assert_int_equal(qkv_optimizer_steps(opt), N);
    for (int s = 0; s < N; s++) train_step(&second, opt, &schedule);
    qkv_optimizer_free(opt);

    for (int i = 0; i < N_PARAMS; i++)
        assert_memory_equal(qkv_data(straight.params[i]), qkv_data(second.params[i]),
                            (size_t)straight.params[i]->numel * sizeof(float));
    mlp_free(&straight);
    mlp_free(&second);
    assert_null(qkv_error());
    assert_int_equal(qkv_memory_stats_get().live_tensors, live);
}

/* Replaces the tensor called name in st (the state owns its tensors). */
static void replace_tensor(qkv_optim_state *st, const char *name, qkv_tensor *t) {
    for (int i = 0; i < st->tensors.n; i++)
        if (!strcmp(st->tensors.names[i], name)) {
            qkv_release(st->tensors.tensors[i]);
            st->tensors.tensors[i] = t;
            return;
        }
    fail_msg("no %s", name);
}

static void import_checks_type_groups_names_and_shapes_before_changing_anything(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = resumable_optimizer(&m);
    train_step(&m, opt, NULL);
    qkv_optim_state *st = qkv_optimizer_state_export(opt);
    qkv_tensor *kept = qkv_optimizer_state(opt, 0, 0, "exp_avg");

    qkv_optimizer *adam = qkv_adam_new();
    assert_true(qkv_optimizer_add_decay_groups(adam, &m.list, qkv_adam_config(0.1)));
    assert_false(qkv_optimizer_state_import(adam, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: state of adamw, optimizer is "
                                     "adam");
    qkv_clear_error();
    qkv_optimizer_free(adam);

    qkv_optimizer *one_group = qkv_adamw_new();
    assert_true(qkv_optimizer_add_group(one_group, &m.list, qkv_adamw_config(0.1)));
    assert_false(qkv_optimizer_state_import(one_group, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: state has 2 groups, "
                                     "optimizer 1");
    qkv_clear_error();
    qkv_optimizer_free(one_group);

    /* a step count past int64 (a hostile file's) is refused, never cast */
    for (int i = 0; i < st->n_meta; i++) {
        if (strcmp(st->meta_keys[i], "optim.steps")) continue;
        char *steps = st->meta_values[i];
        st->meta_values[i] = (char *)"1e300";
        assert_false(qkv_optimizer_state_import(opt, st));
        assert_string_equal(qkv_error(), "qkv_optimizer_state_import: optim.steps is not a "
                                         "step count");
        qkv_clear_error();
        st->meta_values[i] = steps;
    }
    replace_tensor(st, "optim.state.fc1.weight.exp_avg", qkv_zeros(QKV_F32, QKV_SHAPE(8, 5)));
    assert_false(qkv_optimizer_state_import(opt, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: "
                                     "optim.state.fc1.weight.exp_avg has shape [8,5], the "
                                     "parameter [5,8]");
    qkv_clear_error();
    replace_tensor(st, "optim.state.fc1.weight.exp_avg", NULL);
    assert_false(qkv_optimizer_state_import(opt, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: "
                                     "optim.state.fc1.weight.exp_avg is NULL");
    qkv_clear_error();
    qkv_optim_state_free(st);

    st = qkv_optimizer_state_export(opt);
    char *name = st->tensors.names[1];
    assert_string_equal(name, "optim.state.fc1.weight.exp_avg");
    memcpy(name + strlen("optim.state."), "fc9", 3);
    assert_false(qkv_optimizer_state_import(opt, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: entry "
                                     "optim.state.fc9.weight.exp_avg names no parameter of the "
                                     "optimizer");
    qkv_clear_error();
    memcpy(name + strlen("optim.state."), "fc1", 3);
    memcpy(name + strlen(name) - 7, "exp_avx", 7);
    assert_false(qkv_optimizer_state_import(opt, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: unknown entry "
                                     "optim.state.fc1.weight.exp_avx for adamw");
    qkv_clear_error();
    memcpy(name + strlen(name) - 7, "zzzzzzz", 7); /* now fc1.weight lacks its exp_avg */
    name[strlen("optim.")] = 'x';                  /* and this entry is not state */
    assert_false(qkv_optimizer_state_import(opt, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: unknown entry "
                                     "optim.xtate.fc1.weight.zzzzzzz");
    qkv_clear_error();
    name[0] = 'X';                                 /* not ours at all: ignored */
    assert_false(qkv_optimizer_state_import(opt, st));
    assert_string_equal(qkv_error(), "qkv_optimizer_state_import: fc1.weight has state but "
                                     "no exp_avg");
    qkv_clear_error();
    assert_ptr_equal(qkv_optimizer_state(opt, 0, 0, "exp_avg"), kept);
    assert_int_equal(qkv_optimizer_param_steps(opt, 0, 0), 1);
    qkv_optim_state_free(st);
    assert_false(qkv_optimizer_state_import(opt, NULL));
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

/* ---- With nn modules --------------------------------------------------------------------- */

/* A module's parameter list goes straight into decay groups: the linear weights ("0.weight",
 * "2.weight") decay; biases and the layer norm's 1-D gain do not. Training then lowers the loss
 * and, after the first step, allocates nothing in the optimizer. */
static void module_parameters_train_in_decay_groups(void **state) {
    (void)state;
    uint64_t live = qkv_memory_stats_get().live_tensors;
    qkv_generator gen;
    qkv_generator_init(&gen, 3);
    qkv_sequential *net = qkv_sequential_new();
    qkv_sequential_add(net, QKV_MODULE(qkv_linear_new(4, 6, true, &gen)));
    qkv_sequential_add(net, QKV_MODULE(qkv_layer_norm_new(QKV_SHAPE(6), 1e-5, true)));
    qkv_sequential_add(net, QKV_MODULE(qkv_linear_new(6, 2, true, &gen)));
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(net));
    assert_non_null(params);
    qkv_optimizer *opt = qkv_adamw_new();
    assert_true(qkv_optimizer_add_decay_groups(opt, params, qkv_adamw_config(0.05)));
    qkv_named_list_free(params);
    assert_int_equal(qkv_optimizer_num_params(opt, 0), 2);
    assert_string_equal(qkv_optimizer_param_name(opt, 0, 0), "0.weight");
    assert_string_equal(qkv_optimizer_param_name(opt, 0, 1), "2.weight");
    assert_int_equal(qkv_optimizer_num_params(opt, 1), 4);
    assert_string_equal(qkv_optimizer_param_name(opt, 1, 1), "1.weight");

    qkv_tensor *x = qkv_randn(QKV_F32, QKV_SHAPE(32, 4), &gen);
    qkv_tensor *y = qkv_randn(QKV_F32, QKV_SHAPE(32, 2), &gen);
    double first = 0, last = 0;
    for (int s = 0; s < 30; s++) {
        qkv_scope_begin();
        qkv_tensor *loss = qkv_mse_loss(qkv_sequential_forward(net, x), y, QKV_REDUCTION_MEAN);
        assert_true(qkv_backward(loss));
        if (s == 0) first = qkv_item(loss);
        last = qkv_item(loss);
        uint64_t allocs = qkv_memory_stats_get().allocs;
        assert_true(qkv_optimizer_step(opt));
        if (s > 0) assert_int_equal(qkv_memory_stats_get().allocs, allocs);
        qkv_optimizer_zero_grad(opt);
        qkv_scope_end();
    }
    assert_true(last < 0.8 * first);
    qkv_optimizer_free(opt);
    qkv_module_free(QKV_MODULE(net));
    qkv_release(x);
    qkv_release(y);
    assert_null(qkv_error());
    assert_int_equal(qkv_memory_stats_get().live_tensors, live);
}

/* ---- Allocation failures ----------------------------------------------------------------- */

/* Gives every parameter a grad of ones, the first one transposed (so that the step and the
 * clipping make a contiguous copy first); false when that fails. */
static bool set_grads(mlp *m) {
    bool ok = true;
    for (int i = 0; i < N_PARAMS; i++) {
        qkv_tensor *g = qkv_ones_like(m->params[i]);
        if (i == 0 && g) {
            qkv_tensor *t = qkv_ones(QKV_F32, QKV_SHAPE(OPTIM_D_HID, OPTIM_D_IN));
            qkv_release(g);
            g = qkv_transpose(t, 0, 1);
            qkv_release(t);
        }
        m->params[i]->grad = g;
        ok = ok && g;
    }
    return ok;
}

static void drop_grads(mlp *m) {
    for (int i = 0; i < N_PARAMS; i++) qkv_zero_grad(m->params[i]);
}

/* Groups, a first step, an export and an import into a second optimizer. */
static bool step_export_import(mlp *m) {
    qkv_optim_config c = qkv_adam_config(0.01);
    c.amsgrad = true;
    qkv_optimizer *opt = qkv_adam_new(), *again = qkv_adam_new();
    qkv_optim_state *st = NULL;
    bool ok = set_grads(m) && opt && again && qkv_optimizer_add_decay_groups(opt, &m->list, c) &&
              qkv_optimizer_add_decay_groups(again, &m->list, c) && qkv_optimizer_step(opt) &&
              (st = qkv_optimizer_state_export(opt)) && qkv_optimizer_state_import(again, st);
    qkv_optim_state_free(st);
    qkv_optimizer_free(opt);
    qkv_optimizer_free(again);
    drop_grads(m);
    return ok;
}

static bool clip(mlp *m) {
    bool ok = set_grads(m) && !isnan(qkv_clip_grad_norm(&m->list, 0.1)) &&
              qkv_clip_grad_value(&m->list, 0.01);
    drop_grads(m);
    return ok;
}

static void every_allocation_failure_is_reported_and_leaks_nothing(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    assert_every_allocation_failure_is_clean(step_export_import(&m));
    assert_every_allocation_failure_is_clean(clip(&m));
    mlp_free(&m);
}

/* ---- Optimizers of one's own, parameters that change ------------------------------------- */

/* Signum (sign SGD with momentum, Bernstein et al. 2018), written as a user would:
 * m = beta1 m + (1 - beta1) g, param -= lr sign(m). ctx counts the updates. */
enum { SIGNUM_MOMENTUM };

static void signum_update(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                          void *ctx) {
    (void)step;
    ++*(int *)ctx;
    assert_int_equal(u->dtype, QKV_F64);
    double *p = u->param, *m = u->slot[SIGNUM_MOMENTUM];
    const double *g = u->grad;
    for (int64_t i = 0; i < u->n; i++) {
        m[i] = c->beta1 * m[i] + (1 - c->beta1) * g[i];
        p[i] -= c->lr * (double)((m[i] > 0) - (m[i] < 0));
    }
}

static const qkv_optimizer_def signum_def = {
    .name = "signum",
    .slot_names = {"momentum"},
    .update = signum_update,
};

static void a_user_defined_optimizer_steps_and_saves_its_state(void **state) {
    (void)state;
    qkv_tensor *p = qkv_requires_grad_(
        qkv_from_array(QKV_F64, QKV_SHAPE(3), (double[]){1, 2, 3}), true);
    qkv_named_list list = {1, (char *[]){"w"}, &p};
    int updates = 0;
    qkv_optimizer *opt = qkv_optimizer_new(&signum_def, &updates);
    qkv_optim_config config = qkv_sgd_config(0.25);
    config.beta1 = 0.5;
    assert_true(qkv_optimizer_add_group(opt, &list, config));
    assert_string_equal(qkv_optimizer_name(opt), "signum");
    assert_null(qkv_optimizer_state(opt, 0, 0, "momentum")); /* made at the first step */

    p->grad = qkv_from_array(QKV_F64, QKV_SHAPE(3), (double[]){0.5, -2, 0});
    assert_true(qkv_optimizer_step(opt));
    const double *v = qkv_data(p);
    assert_true(v[0] == 0.75 && v[1] == 2.25 && v[2] == 3);
    const double *m = qkv_data(qkv_optimizer_state(opt, 0, 0, "momentum"));
    assert_true(m[0] == 0.25 && m[1] == -1 && m[2] == 0);
    qkv_optimizer_zero_grad(opt);
    p->grad = qkv_from_array(QKV_F64, QKV_SHAPE(3), (double[]){-1, -1, -1});
    assert_true(qkv_optimizer_step(opt));
    assert_true(v[0] == 1 && v[1] == 2.5 && v[2] == 3.25); /* m = -0.375, -1, -0.5 */
    assert_int_equal(updates, 2);
    assert_int_equal(qkv_optimizer_steps(opt), 2);
    assert_int_equal(qkv_optimizer_param_steps(opt, 0, 0), 2);
    assert_int_equal(qkv_version(p), 2);

    qkv_optim_state *st = qkv_optimizer_state_export(opt);
    assert_non_null(st);
    assert_string_equal(st->tensors.names[1], "optim.state.w.momentum");
    assert_string_equal(st->meta_values[0], "signum");
    qkv_optim_state_free(st);
    qkv_optimizer_free(opt);
    qkv_release(p);
    assert_null(qkv_error());
}

static void a_definition_with_bad_names_is_refused(void **state) {
    (void)state;
    qkv_optimizer_def def = signum_def;
    def.slot_names[0] = "step";
    assert_null(qkv_optimizer_new(&def, NULL));
    assert_string_equal(qkv_error(), "qkv_optimizer_new: signum: bad slot name \"step\" "
                                     "(empty, with a '.', or \"step\")");
    qkv_clear_error();
    def.slot_names[0] = "m";
    def.slot_names[1] = "m";
    assert_null(qkv_optimizer_new(&def, NULL));
    assert_string_equal(qkv_error(), "qkv_optimizer_new: signum: two slots named \"m\"");
    qkv_clear_error();
    def.update = NULL;
    assert_null(qkv_optimizer_new(&def, NULL));
    assert_string_equal(qkv_error(), "qkv_optimizer_new: a definition needs a name and an "
                                     "update function");
}

static void accessors_read_groups_and_set_the_lr(void **state) {
    (void)state;
    mlp m;
    mlp_init(&m, QKV_F32);
    qkv_optimizer *opt = qkv_adamw_new();
    assert_true(qkv_optimizer_add_decay_groups(opt, &m.list, qkv_adamw_config(0.5)));
    assert_int_equal(qkv_optimizer_num_groups(opt), 2);
    assert_ptr_equal(qkv_optimizer_param(opt, 0, 1), m.params[2]);
    assert_true(qkv_optimizer_set_lr(opt, -1, 0.25));
    assert_true(qkv_optimizer_lr(opt, 0) == 0.25 && qkv_optimizer_lr(opt, 1) == 0.25);
    assert_true(qkv_optimizer_initial_lr(opt, 1) == 0.5);
    assert_true(qkv_optimizer_set_lr(opt, 1, 0.125));
    assert_true(qkv_optimizer_config(opt, 1)->lr == 0.125);
    assert_false(qkv_optimizer_set_lr(opt, 0, NAN));
    assert_string_equal(qkv_error(), "qkv_optimizer_set_lr: invalid lr nan");
    qkv_clear_error();
    assert_null(qkv_optimizer_param(opt, 1, 2));
    assert_string_equal(qkv_error(), "qkv_optimizer_param: index 2 out of range for the 2 "
                                     "parameters of group 1");
    qkv_clear_error();
    assert_true(isnan(qkv_optimizer_lr(opt, 2)));
    assert_string_equal(qkv_error(), "qkv_optimizer_lr: group 2 out of range for 2 groups");
    qkv_clear_error();
    assert_null(qkv_optimizer_state(opt, 0, 0, "momentum_buffer"));
    assert_string_equal(qkv_error(), "qkv_optimizer_state: adamw keeps no state named "
                                     "\"momentum_buffer\"");
    qkv_optimizer_free(opt);
    mlp_free(&m);
}

/* One Adam step of sum(l(x)) for a [2,2] linear layer in x's dtype. */
static void linear_adam_step(qkv_linear *l, qkv_optimizer *opt, qkv_dtype dtype) {
    qkv_scope_begin();
    qkv_tensor *x = qkv_from_array(QKV_F64, QKV_SHAPE(1, 2), (double[]){0.5, -2});
    assert_true(qkv_backward(qkv_sum_all(qkv_linear_forward(l, qkv_to_dtype(x, dtype)))));
    assert_true(qkv_optimizer_step(opt));
    qkv_optimizer_zero_grad(opt);
    qkv_scope_end();
}

static qkv_optimizer *adam_over(qkv_linear *l) {
    qkv_named_list *params = qkv_module_parameters(QKV_MODULE(l));
    qkv_optimizer *opt = qkv_adam_new();
    assert_true(qkv_optimizer_add_group(opt, params, qkv_adam_config(0.1)));
    qkv_named_list_free(params);
    return opt;
}

/* After qkv_module_to_dtype the moments follow their parameters' dtype at the next step, as a
 * state loaded into the converted model would (torch's load_state_dict casts state). */
static void state_follows_a_parameter_converted_to_another_dtype(void **state) {
    (void)state;
    qkv_generator g;
    qkv_generator_init(&g, 5);
    qkv_linear *l = qkv_linear_new(2, 2, true, &g);
    qkv_optimizer *opt = adam_over(l);
    linear_adam_step(l, opt, QKV_F32);
    qkv_optim_state *st = qkv_optimizer_state_export(opt);
    assert_true(qkv_module_to_dtype(QKV_MODULE(l), QKV_F64));
    assert_int_equal(qkv_optimizer_state(opt, 0, 0, "exp_avg")->dtype, QKV_F32);

    qkv_linear *ref = qkv_linear_new(2, 2, true, &g);
    assert_true(qkv_module_to_dtype(QKV_MODULE(ref), QKV_F64));
    assert_true(qkv_copy_(ref->weight, l->weight) && qkv_copy_(ref->bias, l->bias));
    qkv_optimizer *ref_opt = adam_over(ref);
    assert_true(qkv_optimizer_state_import(ref_opt, st));
    qkv_optim_state_free(st);

    linear_adam_step(l, opt, QKV_F64);
    linear_adam_step(ref, ref_opt, QKV_F64);
    for (int s = 0; s < 2; s++) {
        const char *slot = s ? "exp_avg_sq" : "exp_avg";
        assert_int_equal(qkv_optimizer_state(opt, 0, 0, slot)->dtype, QKV_F64);
        assert_memory_equal(qkv_data(qkv_optimizer_state(opt, 0, 0, slot)),
                            qkv_data(qkv_optimizer_state(ref_opt, 0, 0, slot)),
                            4 * sizeof(double));
    }
    assert_memory_equal(qkv_data(l->weight), qkv_data(ref->weight), 4 * sizeof(double));
    assert_memory_equal(qkv_data(l->bias), qkv_data(ref->bias), 2 * sizeof(double));
    qkv_optimizer_free(opt);
    qkv_optimizer_free(ref_opt);
    qkv_module_free(QKV_MODULE(l));
    qkv_module_free(QKV_MODULE(ref));
    assert_null(qkv_error());
}

/* No function reshapes a tensor in place; a program that changes the fields is told. */
static void a_parameter_that_changed_shape_is_refused(void **state) {
    (void)state;
    qkv_tensor *p = qkv_requires_grad_(qkv_ones(QKV_F32, QKV_SHAPE(2, 2)), true);
    qkv_named_list list = {1, (char *[]){"w"}, &p};
    qkv_optimizer *opt = qkv_adam_new();
    assert_true(qkv_optimizer_add_group(opt, &list, qkv_adam_config(0.1)));
    p->grad = qkv_ones(QKV_F32, QKV_SHAPE(2, 2));
    assert_true(qkv_optimizer_step(opt));
    qkv_optimizer_zero_grad(opt);
    float before[4];
    memcpy(before, qkv_data(p), sizeof before);
    p->ndim = 1;
    p->shape[0] = 4;
    p->strides[0] = 1;
    p->grad = qkv_ones(QKV_F32, QKV_SHAPE(4));
    assert_false(qkv_optimizer_step(opt));
    assert_string_equal(qkv_error(), "qkv_optimizer_step: adam: parameter 0 of group 0 (\"w\") "
                                     "is [4] but its state exp_avg is [2,2]: a parameter must "
                                     "keep its shape under an optimizer");
    assert_memory_equal(qkv_data(p), before, sizeof before);
    assert_int_equal(qkv_optimizer_steps(opt), 1);
    qkv_optimizer_free(opt);
    qkv_release(p);
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
        T(adam_first_step_moves_each_element_by_lr_against_the_gradient),
        T(sgd_plain_step_is_param_minus_lr_times_grad),
        T(parameters_without_grad_are_skipped_and_get_no_state),
        T(steady_state_steps_make_no_allocation),
        T(threaded_update_equals_single_thread_update),
        T(decay_rule_exempts_biases_norms_and_vectors),
        T(decay_groups_split_weights_from_biases),
        T(add_group_rejects_bad_configs_and_repeated_parameters),
        T(step_schedule_matches_torch_step_lr),
        T(exponential_schedule_matches_torch_exponential_lr),
        T(cosine_schedule_matches_torch_cosine_annealing_lr),
        T(warmup_cosine_schedule_matches_torch_lambda_lr),
        T(warmup_linear_schedule_matches_torch_lambda_lr),
        T(schedule_apply_scales_each_group_from_its_initial_lr),
        T(clip_grad_norm_scales_grads_above_max_norm_as_torch),
        T(clip_grad_norm_below_max_norm_leaves_grads_alone),
        T(clip_grad_value_clamps_as_torch),
        T(export_names_moments_steps_and_hyperparameters),
        T(resumed_training_is_bitwise_identical),
        T(import_checks_type_groups_names_and_shapes_before_changing_anything),
        T(module_parameters_train_in_decay_groups),
        T(every_allocation_failure_is_reported_and_leaks_nothing),
        T(a_user_defined_optimizer_steps_and_saves_its_state),
        T(a_definition_with_bad_names_is_refused),
        T(accessors_read_groups_and_set_the_lr),
        T(state_follows_a_parameter_converted_to_another_dtype),
        T(a_parameter_that_changed_shape_is_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
