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
 * A step writes its parameters in place, so it adds one to their versions (qkv_version): a
 * graph recorded before the step and backpropagated after it is an error, as in PyTorch. A
 * parameter whose dtype changed since its state was made (qkv_module_to_dtype after a step)
 * has its state converted to the new dtype at the next step, as torch's load_state_dict
 * casts state to its parameter's dtype; one whose shape changed is an error, since no
 * conversion keeps the meaning of a moment.
 *
 * An optimizer is opaque: its groups, hyperparameters and state are read with the accessors
 * below. A new optimizer is a qkv_optimizer_def (its name, the state it keeps per parameter
 * and one parameter's update) given to qkv_optimizer_new; it then has groups, checkpoints,
 * state conversion and version counting as the built-in ones do.
 *
 * Errors follow tensor.h: false or NULL, with qkv_error() naming the function and the cause.
 * An optimizer, like the parameters it updates, is used by one thread at a time.
 * A typical training step:
 *
 *     qkv_scope_begin();
 *     qkv_tensor *loss = model_loss(model, batch);
 *     qkv_backward(loss);
 *     qkv_lr_schedule_apply(&schedule, opt, qkv_optimizer_steps(opt));
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

/* One update of every parameter that has a grad. Everything that can fail (a grad of the
 * wrong shape, a parameter whose shape changed since its state was made, memory for new
 * state) fails before any parameter changes. */
bool qkv_optimizer_step(qkv_optimizer *opt);
/* Sets every parameter's grad to NULL (qkv_zero_grad). */
void qkv_optimizer_zero_grad(qkv_optimizer *opt);
void qkv_optimizer_free(qkv_optimizer *opt); /* NULL is ignored */

/* ---- Reading and changing an optimizer --------------------------------------------------- */

/* Groups are numbered from 0 in the order they were added, parameters within a group in the
 * order of their list. An index out of range is an error: NULL, -1 or NAN as the type allows.
 * Pointers returned stay valid until qkv_optimizer_free. */
const char *qkv_optimizer_name(const qkv_optimizer *opt);     /* "sgd", "adam", ... */
int64_t qkv_optimizer_steps(const qkv_optimizer *opt);        /* qkv_optimizer_step calls that
                                                                 succeeded */
int qkv_optimizer_num_groups(const qkv_optimizer *opt);
int qkv_optimizer_num_params(const qkv_optimizer *opt, int group);
/* The group's hyperparameters; config->lr is its current learning rate. */
const qkv_optim_config *qkv_optimizer_config(const qkv_optimizer *opt, int group);
double qkv_optimizer_lr(const qkv_optimizer *opt, int group);
double qkv_optimizer_initial_lr(const qkv_optimizer *opt, int group); /* schedules scale it */
/* Sets the current lr of one group, or of every group when group is -1 (as writing
 * param_group["lr"] in torch; the initial lr stays). lr must be finite and >= 0. */
bool qkv_optimizer_set_lr(qkv_optimizer *opt, int group, double lr);
const char *qkv_optimizer_param_name(const qkv_optimizer *opt, int group, int index);
qkv_tensor *qkv_optimizer_param(const qkv_optimizer *opt, int group, int index);
/* Updates applied to the parameter so far (torch's state[p]["step"]). */
int64_t qkv_optimizer_param_steps(const qkv_optimizer *opt, int group, int index);
/* The parameter's state tensor of that slot name ("exp_avg", "momentum_buffer", ...), held by
 * the optimizer; NULL without an error when the slot is not made yet or its config does not
 * use it, NULL with an error for a name the optimizer does not have. */
qkv_tensor *qkv_optimizer_state(const qkv_optimizer *opt, int group, int index,
                                const char *slot);

/* ---- Optimizers of your own -------------------------------------------------------------- */

/* The state an optimizer keeps per parameter: up to QKV_OPTIM_SLOTS tensors of the
 * parameter's shape and dtype, made as zeros before the parameter's first update. */
#define QKV_OPTIM_SLOTS 3

/* One parameter's update, as raw contiguous arrays of n elements of dtype (F32 or F64). */
typedef struct qkv_param_update {
    int64_t n;
    qkv_dtype dtype;
    void *param;                 /* updated in place */
    const void *grad;            /* the parameter's gradient, same dtype */
    void *slot[QKV_OPTIM_SLOTS]; /* the state's elements; NULL for slots not in use */
    bool first;                  /* the slots were just made (zeros) for this step */
} qkv_param_update;

/* What makes an optimizer. update is called once per parameter that has a grad, with the
 * group's config, the parameter's step count (1 at its first update) and ctx; it cannot fail,
 * since everything that can was done before. slot_names name the state in checkpoints
 * ("optim.state.<param>.<slot>"): distinct, without '.', not "step"; NULL past the last.
 * slot_used says which slots a config needs (NULL: all named slots). name is the optimizer's
 * type in checkpoints. The strings must outlive the optimizer; the struct is copied. */
typedef struct qkv_optimizer_def {
    const char *name;
    const char *slot_names[QKV_OPTIM_SLOTS];
    bool (*slot_used)(const qkv_optim_config *c, int slot);
    void (*update)(const qkv_optim_config *c, int64_t step, const qkv_param_update *u,
                   void *ctx);
} qkv_optimizer_def;

/* An optimizer with no parameter groups yet that updates through def, passing ctx (which
 * the caller owns and keeps alive) to every update. Updates run on the calling thread. */
qkv_optimizer *qkv_optimizer_new(const qkv_optimizer_def *def, void *ctx);

/* ---- State save / load ------------------------------------------------------------------- */

qkv_optim_state *qkv_optimizer_state_export(const qkv_optimizer *opt);
/* Restores a state exported from an optimizer of the same type with the same groups and
 * parameter names: names, shapes and dtypes are checked before anything changes. Entries not
 * starting with "optim." are ignored, so the tensors of a whole checkpoint may be passed.
 * Hyperparameters and the step count (qkv_optimizer_steps) are restored from the metadata. */
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
