/*
 * qkv optimizers, learning-rate schedules and gradient clipping.
 *
 * An optimizer updates parameter groups: each group is a list of named leaf tensors with its own
 * hyperparameters (a qkv_optim_config). Updates follow torch.optim exactly (same formulas, same
 * order of floating-point operations, in the parameter's dtype), run in place on the parameter
 * storage with grad mode off, and skip parameters whose grad is NULL. State tensors (moments)
 * are made at a parameter's first step and held by the optimizer outside every scope until
 * qkv_optimizer_free, so later steps allocate nothing. Parameters are F32 or F64.
 *
 * Errors follow tensor.h: false or NULL, with qkv_error() naming the function and the cause.
 * An optimizer, like the parameters it updates, is used by one thread at a time.
 * A typical training step:
 *
 *     qkv_scope_begin();
 *     qkv_tensor *loss = model_loss(model, batch);
 *     qkv_backward(loss);
 *     qkv_lr_schedule_apply(&schedule, opt, opt->steps);
 *     qkv_optimizer_step(opt);
 *     qkv_optimizer_zero_grad(opt);
 *     qkv_scope_end();
 */
#ifndef QKV_OPTIM_H
#define QKV_OPTIM_H

#include "autograd/autograd.h"
#include "io/io.h"
#include "nn/nn.h"
#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Hyperparameters --------------------------------------------------------------------- */

/* One struct serves every optimizer; fields an optimizer does not use are ignored. Start from
 * the constructor of the optimizer at hand (PyTorch's defaults) and change what you need. */
typedef struct qkv_optim_config {
    double lr;
    double weight_decay; /* SGD, Adam, RMSprop: L2, wd * param added to the gradient;
                            AdamW: decoupled, param *= 1 - lr * wd before the update */
    double momentum;     /* SGD, RMSprop */
    double dampening;    /* SGD */
    bool nesterov;       /* SGD: needs momentum > 0 and dampening 0 */
    double beta1, beta2; /* Adam, AdamW */
    double eps;          /* Adam, AdamW, RMSprop */
    bool amsgrad;        /* Adam, AdamW */
    double alpha;        /* RMSprop: smoothing constant of the squared-gradient average */
    bool centered;       /* RMSprop: divide by the estimated variance instead */
} qkv_optim_config;

qkv_optim_config qkv_sgd_config(double lr);     /* no momentum, no decay */
qkv_optim_config qkv_adam_config(double lr);    /* betas (0.9, 0.999), eps 1e-8, no decay */
qkv_optim_config qkv_adamw_config(double lr);   /* as Adam, weight_decay 0.01 */
qkv_optim_config qkv_rmsprop_config(double lr); /* alpha 0.99, eps 1e-8 */

/* ---- Optimizers -------------------------------------------------------------------------- */

typedef struct qkv_optimizer qkv_optimizer;

/* The state of one parameter: its step count (updates applied to it) and up to
 * QKV_OPTIM_SLOTS state tensors of its shape and dtype (NULL when unused or not yet made). */
#define QKV_OPTIM_SLOTS 3
typedef struct qkv_param_state {
    int64_t step;
    qkv_tensor *slots[QKV_OPTIM_SLOTS];
    bool fresh; /* the slots were made for the step under way (SGD starts its buffer there) */
} qkv_param_state;

typedef struct qkv_param_group {
    int n;
    char **names;            /* copies of the names given */
    qkv_tensor **params;     /* retained by the optimizer */
    qkv_param_state *state;  /* one per parameter */
    qkv_optim_config config; /* config.lr is the current learning rate (schedules set it) */
    double initial_lr;       /* the lr the group was added with: schedules scale from it */
} qkv_param_group;

/* Optimizer state as named tensors (copies) plus metadata strings, ready for a checkpoint:
 *   "optim.state.<param>.step"   I64 0-d: updates applied to <param>
 *   "optim.state.<param>.<slot>" the slot tensors, named as in torch ("exp_avg", "exp_avg_sq",
 *                                "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg")
 * and metadata "optim.type", "optim.steps", "optim.groups", and per group g
 * "optim.group.<g>.<field>" for lr, initial_lr and every qkv_optim_config field (doubles
 * printed with 17 significant digits, so they read back exactly). Parameters that have not
 * been updated yet have no entries. Free with qkv_optim_state_free.
 * The layout is that of a checkpoint's extras: `tensors` is a named list to save beside the
 * model, and a file read back (names, tensors, meta_keys, meta_values, with their counts)
 * fills a qkv_optim_state to import field for field. */
typedef struct qkv_optim_state {
    qkv_named_list tensors;
    int n_meta;
    char **meta_keys;
    char **meta_values;
} qkv_optim_state;

/* The vtable. The built-in optimizers share zero_grad, state export/import and free; a new
 * optimizer supplies step and describes its slots. */
typedef struct qkv_optimizer_vtable {
    const char *name;                                /* "sgd", "adam", "adamw", "rmsprop" */
    const char *slot_names[QKV_OPTIM_SLOTS];         /* NULL past the last slot */
    bool (*slot_used)(const qkv_optim_config *c, int slot); /* given the group's config */
    bool (*step)(qkv_optimizer *opt);
    void (*zero_grad)(qkv_optimizer *opt);
    qkv_optim_state *(*state_export)(const qkv_optimizer *opt);
    bool (*state_import)(qkv_optimizer *opt, const qkv_optim_state *state);
    void (*free)(qkv_optimizer *opt);
} qkv_optimizer_vtable;

struct qkv_optimizer {
    const qkv_optimizer_vtable *vtable;
    int n_groups, cap_groups;
    qkv_param_group *groups;
    int64_t steps;           /* qkv_optimizer_step calls that succeeded */
};

/* An optimizer with no parameter groups yet. */
qkv_optimizer *qkv_sgd_new(void);     /* torch.optim.SGD */
qkv_optimizer *qkv_adam_new(void);    /* torch.optim.Adam */
qkv_optimizer *qkv_adamw_new(void);   /* torch.optim.AdamW */
qkv_optimizer *qkv_rmsprop_new(void); /* torch.optim.RMSprop */

/* Adds a group of the listed parameters (F32 or F64 leaves) with config, checked as torch
 * checks it (lr, eps, weight_decay, momentum >= 0, betas in [0, 1), nesterov needs momentum and
 * no dampening). A parameter (by name or by tensor) may belong to one group only. */
bool qkv_optimizer_add_group(qkv_optimizer *opt, const qkv_named_list *params,
                             qkv_optim_config config);

/* The decay rule: a parameter takes no weight decay when its name ends with "bias", its name
 * contains "norm" (layer-norm gains and biases: "ln_norm.weight", "norm1.bias"), or it is 1-D
 * or 0-D. Everything else (weight matrices, embeddings) decays. */
bool qkv_param_takes_decay(const char *name, const qkv_tensor *t);
/* Adds up to two groups: the parameters that take decay with config, then the others with
 * config but weight_decay 0. A group that would be empty is not added. On failure neither is. */
bool qkv_optimizer_add_decay_groups(qkv_optimizer *opt, const qkv_named_list *params,
                                    qkv_optim_config config);

/* One update of every parameter that has a grad. */
bool qkv_optimizer_step(qkv_optimizer *opt);
/* Sets every parameter's grad to NULL (qkv_zero_grad). */
void qkv_optimizer_zero_grad(qkv_optimizer *opt);
void qkv_optimizer_free(qkv_optimizer *opt); /* NULL is ignored */

/* ---- State save / load ------------------------------------------------------------------- */

qkv_optim_state *qkv_optimizer_state_export(const qkv_optimizer *opt);
/* Restores a state exported from an optimizer of the same type with the same groups and
 * parameter names: names, shapes and dtypes are checked before anything changes. Entries not
 * starting with "optim." are ignored, so the tensors of a whole checkpoint may be passed.
 * Hyperparameters and opt->steps are restored from the metadata. */
bool qkv_optimizer_state_import(qkv_optimizer *opt, const qkv_optim_state *state);
void qkv_optim_state_free(qkv_optim_state *state); /* NULL is ignored */

/* ---- Training checkpoints ---------------------------------------------------------------- */

/* qkv_module_save with the optimizer's state (qkv_optimizer_state_export) and the module's
 * generators (qkv_module_generators) among the extras, so that training resumes exactly: N
 * steps, save, load, N more steps give the same bits as 2N steps. opt may be NULL (the module
 * and its generators). Names starting with "optim." or "rng." are the checkpoint's own: extras
 * that use them are refused. */
bool qkv_checkpoint_save(const qkv_module *module, const qkv_optimizer *opt, const char *path,
                         const qkv_checkpoint_contents *extras);
/* Reads the file, checks the generators' states, imports the optimizer's state (opt may be
 * NULL; qkv_optimizer_state_import checks it all first), then loads the module
 * (qkv_module_load_safetensors with opts) and sets the generators. Each part checks before it
 * changes anything, and the optimizer's part fails for a file of another model, so a failure
 * leaves module and optimizer as they were, except when the optimizer's state fits and the
 * module's load then fails (a partial-load mismatch): the optimizer then holds the file's
 * state. Errors name the file. */
bool qkv_checkpoint_load(qkv_module *module, qkv_optimizer *opt, const char *path,
                         const qkv_load_options *opts);

/* ---- Learning-rate schedules ------------------------------------------------------------- */

typedef enum qkv_lr_kind {
    QKV_LR_CONSTANT,
    QKV_LR_STEP,          /* torch StepLR: base * gamma^floor(step / step_size) */
    QKV_LR_EXPONENTIAL,   /* torch ExponentialLR: base * gamma^step */
    QKV_LR_COSINE,        /* torch CosineAnnealingLR: eta_min + (base - eta_min) *
                             (1 + cos(pi * step / t_max)) / 2, periodic past t_max as torch */
    QKV_LR_WARMUP_COSINE, /* the common warmup + cosine form (Hugging Face's
                             get_cosine_schedule_with_warmup, with a floor): base * step /
                             warmup_steps while step < warmup_steps, then min_lr + (base -
                             min_lr) * (1 + cos(pi * p)) / 2 with p = (step - warmup_steps) /
                             (total_steps - warmup_steps) clamped to [0, 1] */
    QKV_LR_WARMUP_LINEAR, /* the same warmup, then min_lr + (base - min_lr) * (1 - p) */
} qkv_lr_kind;

typedef struct qkv_lr_schedule {
    qkv_lr_kind kind;
    int64_t step_size;    /* STEP */
    double gamma;         /* STEP, EXPONENTIAL */
    int64_t t_max;        /* COSINE */
    int64_t warmup_steps; /* WARMUP_* */
    int64_t total_steps;  /* WARMUP_* */
    double min_lr;        /* COSINE (torch's eta_min) and WARMUP_*: the lowest lr */
} qkv_lr_schedule;

qkv_lr_schedule qkv_lr_step(int64_t step_size, double gamma);
qkv_lr_schedule qkv_lr_exponential(double gamma);
qkv_lr_schedule qkv_lr_cosine(int64_t t_max, double eta_min);
qkv_lr_schedule qkv_lr_warmup_cosine(int64_t warmup_steps, int64_t total_steps, double min_lr);
qkv_lr_schedule qkv_lr_warmup_linear(int64_t warmup_steps, int64_t total_steps, double min_lr);

/* The lr for optimizer step `step` (0-based: the value torch's scheduler holds after `step`
 * calls of scheduler.step()) of a group whose initial lr is base_lr. NAN and an error for a
 * bad schedule (step_size, t_max, warmup_steps or total_steps out of range). */
double qkv_lr_at(const qkv_lr_schedule *s, double base_lr, int64_t step);
/* Sets every group's lr to qkv_lr_at(s, group.initial_lr, step). */
bool qkv_lr_schedule_apply(const qkv_lr_schedule *s, qkv_optimizer *opt, int64_t step);

/* ---- Gradient clipping ------------------------------------------------------------------- */

/* torch.nn.utils.clip_grad_norm_: the L2 norm of all grads taken together; when
 * max_norm / (norm + 1e-6) < 1 every grad is scaled in place by that factor. Returns the norm
 * before clipping (0 when no parameter has a grad), or NAN with an error. */
double qkv_clip_grad_norm(const qkv_named_list *params, double max_norm);
/* torch.nn.utils.clip_grad_value_: clamps every grad element to [-clip, clip] in place. */
bool qkv_clip_grad_value(const qkv_named_list *params, double clip);

#ifdef __cplusplus
}
#endif
#endif
