/*
 * qkv neural-network modules: named parameters, layers, losses.
 *
 * A module is a struct whose first member is a qkv_module named base; the qkv_module_*
 * functions take a qkv_module *, which QKV_MODULE(m) gives for any such struct. It owns its
 * parameters (leaf tensors that require grad, held outside every scope) and its submodules;
 * qkv_module_free releases all of it. Forward functions follow tensor.h's conventions: results
 * belong to the innermost scope, errors return NULL with qkv_error() set.
 *
 * Parameters have PyTorch-style dotted names built from the submodule names
 * ("blocks.0.attn.q_proj.weight"), so checkpoints line up with PyTorch's state_dict.
 *
 * A module is used by one thread at a time: its parameters are tensors, and its dropout layers
 * draw from generators of their own. To run a model on several threads, give each thread its
 * own copy.
 *
 * docs/guide.md writes a module of one's own, step by step, from qkv_module_new on.
 */
#ifndef QKV_NN_H
#define QKV_NN_H

#include "autograd/autograd.h"
#include "io/io.h"
#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Modules ----------------------------------------------------------------------------- */

typedef struct qkv_module qkv_module;

/* A module's forward over one input: x -> y, following tensor.h's conventions. */
typedef qkv_tensor *(*qkv_forward_fn)(qkv_module *m, const qkv_tensor *x);

typedef struct qkv_module_entry {
    char *name;
    qkv_tensor *tensor;   /* for parameters and buffers */
    qkv_module *module;   /* for submodules */
    qkv_generator *generator; /* for random generators */
} qkv_module_entry;

struct qkv_module {
    const char *type;             /* "linear", "multi_head_attention", a user's own name */
    bool training;
    int n_params, n_buffers, n_modules, n_generators;
    qkv_module_entry *params;     /* own parameters, in registration order */
    qkv_module_entry *buffers;    /* own non-trainable state saved in checkpoints */
    qkv_module_entry *modules;    /* own submodules, in registration order */
    qkv_module_entry *generators; /* generators the module draws from (dropout masks) */
    int cap_params, cap_buffers, cap_modules, cap_generators;
    void (*destroy)(qkv_module *m); /* frees what the concrete struct adds; may be NULL */
    size_t size;                  /* sizeof the concrete struct, for freeing it */
    qkv_forward_fn forward;       /* its one-input forward, set by its constructor; NULL for a
                                     module whose forward takes more (attention) */
};

/* Initialises the base of a concrete module struct of `size` bytes (training mode on). The
 * struct must be zeroed memory from qkv_module_new, which calls this; qkv_module_free frees it.
 * `type` is not copied (a string literal). */
void qkv_module_init(qkv_module *m, const char *type, size_t size,
                     void (*destroy)(qkv_module *m));
/* Allocates a zeroed concrete module struct of `size` bytes (its first member a qkv_module)
 * and initialises its base. NULL on allocation failure. */
void *qkv_module_new(const char *type, size_t size, void (*destroy)(qkv_module *m));

/* A concrete module (a pointer to a struct whose first member is `qkv_module base`) as the
 * qkv_module * that the qkv_module_* functions take; NULL stays NULL. Anything without a
 * qkv_module base, a tensor say, does not compile. */
#ifdef __cplusplus
#define QKV_MODULE(m) (&(m)->base)
#else
#define QKV_MODULE(m)                                                                         \
    _Generic(&(m)->base, qkv_module *: (qkv_module *)(void *)(m),                             \
             const qkv_module *: (const qkv_module *)(const void *)(m))
#endif
/* Registers t as a parameter named `name` (the module takes a reference and makes t a leaf that
 * requires grad). Returns t, or NULL on error (duplicate name, NULL t). */
qkv_tensor *qkv_module_add_parameter(qkv_module *m, const char *name, qkv_tensor *t);
qkv_tensor *qkv_module_add_buffer(qkv_module *m, const char *name, qkv_tensor *t);
/* Registers child as a submodule; m now owns it and frees it. Returns child (as a pointer to
 * its concrete struct, for the caller's typed field), or NULL on error (duplicate name, NULL
 * child), having freed child: a constructor can pass QKV_MODULE(qkv_foo_new(...)) straight in
 * and check once. Names are non-empty and contain no '.'. */
void *qkv_module_add_module(qkv_module *m, const char *name, qkv_module *child);
/* Registers a generator that lives inside the module struct (a dropout layer's), so that a
 * training checkpoint (qkv_checkpoint_save) saves and restores where it stands. */
bool qkv_module_add_generator(qkv_module *m, const char *name, qkv_generator *g);
void qkv_module_free(qkv_module *m);                 /* NULL is ignored */
void qkv_module_train(qkv_module *m, bool training); /* reaches every submodule */
/* m->forward(m, x): the module's one-input forward, whatever its type (qkv_sequential calls
 * its entries so), as one call (QKV_CALL). An error when m has none; NULL m or x give NULL. */
qkv_tensor *qkv_module_forward(qkv_module *m, const qkv_tensor *x);

/* A module's forward runs as one call: in a scope of its own, which keeps only what the
 * forward returns (in the caller's scope), with the module on the thread's stack of running
 * calls. So a forward is written as plain expressions: its intermediates that no backward
 * reads are freed when it returns, and its own calls to submodules free theirs as they
 * return. Every built-in module's forward is one; a module of one's own makes its public
 * forward one the same way:
 *
 *     qkv_tensor *block_forward(block *m, const qkv_tensor *x) {
 *         return QKV_CALL(m, qkv_add(x, qkv_linear_forward(m->proj, qkv_relu(x))));
 *     }
 *
 * A second result leaves the call with qkv_keep (attention's weights do). begin and end must
 * pair, on the same thread; QKV_CALL pairs them around one expression. */
void qkv_module_call_begin(qkv_module *m);
qkv_tensor *qkv_module_call_end(qkv_module *m, qkv_tensor *out);
#define QKV_CALL(m, expr) \
    (qkv_module_call_begin(QKV_MODULE(m)), qkv_module_call_end(QKV_MODULE(m), (expr)))
/* The modules whose calls are running on this thread, outermost first: *n of them (at most
 * QKV_CALL_DEPTH are listed). */
#define QKV_CALL_DEPTH 64
qkv_module *const *qkv_module_calls(int *n);

/* All parameters (or, with buffers, parameters then buffers) in depth-first registration
 * order with full dotted names, as a qkv_named_list (io/io.h). The list is malloc'd; free it
 * with qkv_named_list_free. */
qkv_named_list *qkv_module_parameters(const qkv_module *m);
qkv_named_list *qkv_module_state(const qkv_module *m); /* parameters and buffers */
void qkv_named_list_free(qkv_named_list *list);
/* Every registered generator with its dotted name ("encoder.layers.0.dropout1.generator"). */
typedef struct qkv_named_generator {
    char *name;
    qkv_generator *generator;
} qkv_named_generator;
typedef struct qkv_generator_list {
    int n, cap;
    qkv_named_generator *items;
} qkv_generator_list;
qkv_generator_list *qkv_module_generators(const qkv_module *m);
void qkv_generator_list_free(qkv_generator_list *list);
int64_t qkv_module_num_parameters(const qkv_module *m); /* total elements */
/* Converts every parameter and buffer to dtype in place (e.g. F64 for gradient checks). */
bool qkv_module_to_dtype(qkv_module *m, qkv_dtype dtype);
void qkv_module_zero_grad(qkv_module *m);

/* ---- Initialisation ---------------------------------------------------------------------- */
/* In place on t (any float dtype), drawing from g in row-major order; nothing is recorded.
 * Fans follow PyTorch: fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive
 * field (receptive field = product of shape[2:]); the fan-based schemes need 2 or more dims. */

typedef enum qkv_fan_mode { QKV_FAN_IN, QKV_FAN_OUT } qkv_fan_mode;
typedef enum qkv_nonlinearity {
    QKV_NONLINEARITY_LINEAR,     /* gain 1 (also for conv and sigmoid) */
    QKV_NONLINEARITY_SIGMOID,    /* gain 1 */
    QKV_NONLINEARITY_TANH,       /* gain 5/3 */
    QKV_NONLINEARITY_RELU,       /* gain sqrt(2) */
    QKV_NONLINEARITY_LEAKY_RELU, /* gain sqrt(2 / (1 + a^2)) with a the negative slope */
} qkv_nonlinearity;

double qkv_init_calculate_gain(qkv_nonlinearity nonlinearity, double a);
bool qkv_init_uniform_(qkv_tensor *t, double low, double high, qkv_generator *g);
bool qkv_init_normal_(qkv_tensor *t, double mean, double std, qkv_generator *g);
/* Glorot: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out)); N(0, gain^2 * 2 / (fan_in +
 * fan_out)). */
bool qkv_init_xavier_uniform_(qkv_tensor *t, double gain, qkv_generator *g);
bool qkv_init_xavier_normal_(qkv_tensor *t, double gain, qkv_generator *g);
/* He: std = gain(nonlinearity, a) / sqrt(fan); uniform bound sqrt(3) * std. */
bool qkv_init_kaiming_uniform_(qkv_tensor *t, double a, qkv_fan_mode mode,
                               qkv_nonlinearity nonlinearity, qkv_generator *g);
bool qkv_init_kaiming_normal_(qkv_tensor *t, double a, qkv_fan_mode mode,
                              qkv_nonlinearity nonlinearity, qkv_generator *g);

/* ---- Layers ------------------------------------------------------------------------------ */
/* Parameters are created F32 (qkv_module_to_dtype converts them). Constructors return NULL
 * with qkv_error() set on bad arguments or allocation failure. */

/* y = x W^T + b over the last dim of x (any number of leading dims), as torch.nn.Linear:
 * weight [out, in] and bias [out] drawn from U(-1/sqrt(in), 1/sqrt(in)). */
typedef struct qkv_linear {
    qkv_module base;
    int64_t in_features, out_features;
    qkv_tensor *weight, *bias; /* bias NULL when made without one */
} qkv_linear;
qkv_linear *qkv_linear_new(int64_t in_features, int64_t out_features, bool bias,
                           qkv_generator *g);
qkv_tensor *qkv_linear_forward(qkv_linear *m, const qkv_tensor *x);

/* A lookup table, as torch.nn.Embedding: I64 ids of any shape -> ids.shape + [dim]. weight is
 * drawn from N(0, 1); the padding_idx row (-1 for none) starts at zero and gets no gradient. */
typedef struct qkv_embedding {
    qkv_module base;
    int64_t num_embeddings, embedding_dim, padding_idx;
    qkv_tensor *weight;
} qkv_embedding;
qkv_embedding *qkv_embedding_new(int64_t num_embeddings, int64_t embedding_dim,
                                 int64_t padding_idx, qkv_generator *g);
qkv_tensor *qkv_embedding_forward(qkv_embedding *m, const qkv_tensor *ids);

/* Dropout with probability p in training mode, the identity in eval mode. It draws masks
 * from its own generator, seeded from g at construction. */
typedef struct qkv_dropout_layer {
    qkv_module base;
    double p;
    qkv_generator generator;
} qkv_dropout_layer;
qkv_dropout_layer *qkv_dropout_layer_new(double p, qkv_generator *g);
qkv_tensor *qkv_dropout_layer_forward(qkv_dropout_layer *m, const qkv_tensor *x);

/* Normalises over the last ndim dims (normalized_shape), as torch.nn.LayerNorm: (x - mean) /
 * sqrt(var + eps) with the biased variance, then * weight + bias (ones and zeros at first)
 * when elementwise_affine. */
typedef struct qkv_layer_norm {
    qkv_module base;
    int ndim;
    int64_t normalized_shape[QKV_MAX_DIMS];
    double eps;
    qkv_tensor *weight, *bias; /* NULL without elementwise_affine */
} qkv_layer_norm;
qkv_layer_norm *qkv_layer_norm_new(int ndim, const int64_t *normalized_shape, double eps,
                                   bool elementwise_affine);
qkv_tensor *qkv_layer_norm_forward(qkv_layer_norm *m, const qkv_tensor *x);

/* Elementwise activations as modules (no parameters), and the same as a function. */
typedef enum qkv_activation_kind {
    QKV_ACT_RELU,
    QKV_ACT_GELU,      /* exact, with erf */
    QKV_ACT_GELU_TANH, /* PyTorch's approximate="tanh" */
    QKV_ACT_TANH,
    QKV_ACT_SIGMOID,
} qkv_activation_kind;
typedef struct qkv_activation {
    qkv_module base;
    qkv_activation_kind kind;
} qkv_activation;
qkv_activation *qkv_activation_new(qkv_activation_kind kind);
qkv_tensor *qkv_activation_forward(qkv_activation *m, const qkv_tensor *x);
qkv_tensor *qkv_activate(qkv_activation_kind kind, const qkv_tensor *x);

/* A chain of one-input modules, registered as "0", "1", ..., each called through its forward
 * (qkv_module_forward): the built-in layers set theirs, and so does a user's own module
 * (m->base.forward = its function). A sequential is itself a one-input module. */
typedef struct qkv_sequential {
    qkv_module base;
    int n;
} qkv_sequential;
qkv_sequential *qkv_sequential_new(void);
/* Appends module (owned from now on, freed on failure, an error when it has no one-input
 * forward); returns it or NULL. */
void *qkv_sequential_add(qkv_sequential *s, qkv_module *module);
qkv_tensor *qkv_sequential_forward(qkv_sequential *s, const qkv_tensor *x);

/* ---- Attention --------------------------------------------------------------------------- */

/* Multi-head attention composed from primitives, as torch.nn.MultiheadAttention with
 * batch_first=True: query [B,T,E], key [B,S,kdim], value [B,S,vdim] -> [B,T,E]. PyTorch's
 * packed in_proj_weight is split into the q_proj, k_proj and v_proj submodules (linear,
 * [E,E], [E,kdim], [E,vdim]); out_proj is [E,E]. Projection weights are xavier uniform (with
 * the fans of the packed [3E,E] matrix when kdim == vdim == E, as PyTorch), biases zero. */
typedef struct qkv_multi_head_attention {
    qkv_module base;
    int64_t embed_dim, num_heads, head_dim, kdim, vdim;
    int64_t num_kv_heads; /* num_heads, or fewer for grouped-query attention */
    double dropout; /* on the attention weights, training mode only */
    qkv_linear *q_proj, *k_proj, *v_proj, *out_proj;
    qkv_generator generator; /* for dropout */
} qkv_multi_head_attention;
/* kdim and vdim 0 mean embed_dim; embed_dim must be divisible by num_heads. */
qkv_multi_head_attention *qkv_multi_head_attention_new(int64_t embed_dim, int64_t num_heads,
                                                       double dropout, bool bias, int64_t kdim,
                                                       int64_t vdim, qkv_generator *g);

/* Grouped-query attention (as LLaMA 2/3): num_kv_heads (dividing num_heads) key and value
 * heads, each shared by num_heads / num_kv_heads query heads. k_proj and v_proj are [num_kv_heads
 * * head_dim, E]; the forward repeats each key/value head over its group. Self-attention
 * shapes only (kdim = vdim = E); every projection xavier uniform on its own. The forward is
 * qkv_multi_head_attention_forward. */
qkv_multi_head_attention *qkv_grouped_query_attention_new(int64_t embed_dim, int64_t num_heads,
                                                          int64_t num_kv_heads, double dropout,
                                                          bool bias, qkv_generator *g);

typedef struct qkv_kv_cache qkv_kv_cache;                 /* below, "Models of one's own" */
typedef struct qkv_rotary_embedding qkv_rotary_embedding; /* below, "Models of one's own" */

/* Forward arguments; a zeroed struct (or NULL) means no masks and no weights. Masks are BOOL
 * (true = not allowed) or float (added to the scores, -INFINITY to forbid). A query whose keys
 * are all masked gets all-zero attention weights, so its output is out_proj's bias (PyTorch
 * gives NaN there). The scores are computed by qkv_scaled_dot_product_attention.
 * With a cache, the keys and values of earlier calls come first: S counts them too (masks are
 * [T, past + S_new]), and is_causal lets query i see the keys up to position past + i, so
 * feeding tokens one at a time gives the outputs of the whole sequence under a causal mask.
 * With rope, q and k are rotated per head at positions past, past + 1, ... (before caching). */
typedef struct qkv_attention_options {
    const qkv_tensor *key_padding_mask; /* [B,S]: true = ignore that key */
    const qkv_tensor *attn_mask;        /* [T,S], [B*H,T,S] or [B,H,T,S] */
    bool is_causal;                     /* also forbid key j > query i */
    qkv_tensor **weights;       /* when non-NULL, receives the attention weights (after dropout,
                                   as PyTorch): [B,T,S] averaged over heads, or [B,H,T,S] */
    bool per_head_weights;
    qkv_kv_cache *cache;          /* this module's cache for incremental decoding, or NULL */
    qkv_rotary_embedding *rope;   /* rotary position embedding of q and k, or NULL */
} qkv_attention_options;
qkv_tensor *qkv_multi_head_attention_forward(qkv_multi_head_attention *m,
                                             const qkv_tensor *query, const qkv_tensor *key,
                                             const qkv_tensor *value,
                                             const qkv_attention_options *opts);

/* ---- Transformer ------------------------------------------------------------------------- */

/* The hyperparameters of torch.nn.TransformerEncoderLayer (batch first). */
typedef struct qkv_transformer_config {
    int64_t d_model, nhead, dim_feedforward;
    double dropout;
    qkv_activation_kind activation; /* QKV_ACT_RELU or QKV_ACT_GELU, as PyTorch allows */
    double layer_norm_eps;          /* 0 means PyTorch's 1e-5 */
    bool norm_first;                /* pre-norm when true, post-norm (PyTorch default) when not */
} qkv_transformer_config;

/* Self-attention then a feed-forward block, each with a residual connection and layer norm.
 * Submodule names match PyTorch's, so parameter names are its state_dict keys except that
 * self_attn.in_proj_* are self_attn.{q,k,v}_proj.*. */
typedef struct qkv_transformer_encoder_layer {
    qkv_module base;
    qkv_transformer_config config;
    qkv_multi_head_attention *self_attn;
    qkv_linear *linear1, *linear2;
    qkv_dropout_layer *dropout, *dropout1, *dropout2;
    qkv_layer_norm *norm1, *norm2;
} qkv_transformer_encoder_layer;

/* Masks for the encoder's self-attention, as PyTorch's src_mask, src_key_padding_mask and
 * is_causal (see qkv_attention_options for their shapes). A zeroed struct or NULL: none. */
typedef struct qkv_encoder_options {
    const qkv_tensor *src_mask;
    const qkv_tensor *src_key_padding_mask;
    bool is_causal;
} qkv_encoder_options;

qkv_transformer_encoder_layer *qkv_transformer_encoder_layer_new(
    const qkv_transformer_config *config, qkv_generator *g);
qkv_tensor *qkv_transformer_encoder_layer_forward(qkv_transformer_encoder_layer *m,
                                                  const qkv_tensor *src,
                                                  const qkv_encoder_options *opts);

/* num_layers encoder layers ("layers.0", "layers.1", ...) and, with final_norm, a layer norm
 * "norm" after them, as torch.nn.TransformerEncoder. */
typedef struct qkv_transformer_encoder {
    qkv_module base;
    int num_layers;
    qkv_transformer_encoder_layer **layers;
    qkv_layer_norm *norm; /* NULL without final_norm */
} qkv_transformer_encoder;
qkv_transformer_encoder *qkv_transformer_encoder_new(const qkv_transformer_config *config,
                                                     int num_layers, bool final_norm,
                                                     qkv_generator *g);
qkv_tensor *qkv_transformer_encoder_forward(qkv_transformer_encoder *m, const qkv_tensor *src,
                                            const qkv_encoder_options *opts);

/* Position information added to x [B,T,d_model] for T <= max_len. Learned: a parameter
 * "weight" [max_len, d_model] drawn from N(0, 1), row t added at position t (an embedding
 * over positions). Sinusoidal: a buffer "pe" [max_len, d_model] with PyTorch's tutorial
 * formula, pe[t, 2i] = sin(t / 10000^(2i/d)), pe[t, 2i+1] = cos(t / 10000^(2i/d)). */
typedef struct qkv_positional_encoding {
    qkv_module base;
    int64_t max_len, d_model;
    qkv_tensor *table; /* the weight or the pe buffer */
} qkv_positional_encoding;
qkv_positional_encoding *qkv_learned_positional_encoding_new(int64_t max_len, int64_t d_model,
                                                             qkv_generator *g);
qkv_positional_encoding *qkv_sinusoidal_positional_encoding_new(int64_t max_len,
                                                                int64_t d_model);
qkv_tensor *qkv_positional_encoding_forward(qkv_positional_encoding *m, const qkv_tensor *x);

/* ---- Losses ------------------------------------------------------------------------------ */
/* As torch.nn.functional. Mean reduction averages over the elements (over the targets that
 * are not ignored, for cross entropy and NLL: all ignored gives NaN, as PyTorch). */

typedef enum qkv_reduction {
    QKV_REDUCTION_MEAN,
    QKV_REDUCTION_SUM,
    QKV_REDUCTION_NONE, /* per element */
} qkv_reduction;

/* logits [N,C], targets I64 [N] in [0, C) or equal to ignore_index (PyTorch's default is
 * -100). With label smoothing e the target distribution is (1 - e) one-hot + e / C. */
qkv_tensor *qkv_cross_entropy(const qkv_tensor *logits, const qkv_tensor *targets,
                              qkv_reduction reduction, int64_t ignore_index,
                              double label_smoothing);
/* log_probs [N,C] (e.g. from qkv_log_softmax), targets as above: -log_probs[i, target_i]. */
qkv_tensor *qkv_nll_loss(const qkv_tensor *log_probs, const qkv_tensor *targets,
                         qkv_reduction reduction, int64_t ignore_index);
/* (input - target)^2; target broadcasts to input. */
qkv_tensor *qkv_mse_loss(const qkv_tensor *input, const qkv_tensor *target,
                         qkv_reduction reduction);
/* -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), computed without overflow for any x;
 * targets have the logits' shape, as torch requires. At an infinite logit the loss is its
 * limit (inf where y and sigmoid(x) disagree), where torch's formula gives NaN. */
qkv_tensor *qkv_binary_cross_entropy_with_logits(const qkv_tensor *logits,
                                                 const qkv_tensor *targets,
                                                 qkv_reduction reduction);

/* ---- Checkpoints ------------------------------------------------------------------------- */
/* A module's checkpoint is a safetensors file (io/io.h, which says what the format holds and
 * how a write stays atomic): its parameters and buffers under their dotted names. */

/* qkv_safetensors_write of the module's parameters and buffers (qkv_module_state) and extras. */
bool qkv_module_save(const qkv_module *m, const char *path,
                     const qkv_checkpoint_contents *extras);

/* What a load found: the module's entries the file lacks and the file's tensors the module
 * has no place for (extras saved with qkv_module_save are not counted), as PyTorch's
 * load_state_dict returns them. Names are malloc'd; qkv_load_report_free frees them. */
typedef struct qkv_load_report {
    int n_missing, n_unexpected;
    char **missing, **unexpected;
} qkv_load_report;
void qkv_load_report_free(qkv_load_report *report); /* frees the lists, zeroes the counts */

typedef struct qkv_load_options {
    bool partial;  /* load what matches by name; missing and unexpected names are no error */
    /* PyTorch's nn.MultiheadAttention packs q, k and v: "P.in_proj_weight" [3E, E] and
     * "P.in_proj_bias" [3E] in the file fill the module's P.q_proj, P.k_proj and P.v_proj
     * (rows [0,E), [E,2E), [2E,3E)), and "P.{q,k,v}_proj_weight" (kdim or vdim != E) fill
     * P.{q,k,v}_proj.weight, so a torch state_dict saved as safetensors loads as it is. */
    bool split_in_proj;
    /* When non-NULL, receives the missing and unexpected names, in partial mode and also when
     * a strict load fails for them (the caller frees it, and an earlier report first). */
    qkv_load_report *report;
} qkv_load_options;

/* Copies the file's tensors into the module's parameters and buffers of the same names
 * (converting between float dtypes). Every name, shape and dtype is checked before anything
 * changes. Unless opts->partial, a module entry missing from the file, or a file tensor that
 * is neither the module's nor one of the extras saved with it, is an error naming every one
 * of them at once (as many as the message holds; opts->report lists them all). */
bool qkv_module_load(qkv_module *m, const char *path, const qkv_load_options *opts);
bool qkv_module_load_safetensors(qkv_module *m, const qkv_safetensors *f,
                                 const qkv_load_options *opts);

/* ---- Models of one's own ----------------------------------------------------------------- */

/* Containers, as torch.nn.ModuleList and ModuleDict: they hold submodules under their index
 * ("0", "1", ...) or name, so a loop builds a stack named "blocks.0", "blocks.1", ... They have
 * no forward: the model holding them calls the children. */
typedef struct qkv_module_list {
    qkv_module base;
    int n;
} qkv_module_list;
qkv_module_list *qkv_module_list_new(void);
/* Appends module (owned from now on; freed on failure) as child "n"; returns it or NULL. */
void *qkv_module_list_append(qkv_module_list *l, qkv_module *module);
/* Child i (negative counts from the end, as Python), or NULL with an error out of range. */
qkv_module *qkv_module_list_get(const qkv_module_list *l, int index);

typedef struct qkv_module_dict {
    qkv_module base;
} qkv_module_dict;
qkv_module_dict *qkv_module_dict_new(void);
/* Adds module under name (non-empty, no '.', not taken; owned, freed on failure). */
void *qkv_module_dict_set(qkv_module_dict *d, const char *name, qkv_module *module);
qkv_module *qkv_module_dict_get(const qkv_module_dict *d, const char *name); /* NULL + error */
int qkv_module_dict_size(const qkv_module_dict *d);

/* torch.nn.functional.scaled_dot_product_attention (PyTorch 2.x), composed from baddbmm (the
 * scores with the scale and mask), softmax, dropout and matmul: softmax(q k^T * scale + mask) v
 * for q [..., L, E], k [..., S, E], v [..., S, Ev] -> [..., L, Ev] (leading dims broadcast). A
 * zeroed struct or NULL: no mask, scale 1/sqrt(E), no dropout. */
typedef struct qkv_sdpa_options {
    /* Broadcasts to [..., L, S]. BOOL: true = the key TAKES PART (torch's sdpa convention,
     * the opposite of nn.MultiheadAttention's and qkv_attention_options'); float: added. */
    const qkv_tensor *attn_mask;
    bool is_causal;          /* query i sees keys j <= i (top-left aligned); not with attn_mask */
    double scale;            /* 0 means 1/sqrt(E) */
    double dropout_p;        /* on the attention weights, only when training is true */
    bool training;
    qkv_generator *generator; /* the dropout's draws; required when it drops anything */
    qkv_tensor **weights;     /* when non-NULL, receives the weights [..., L, S] after dropout */
} qkv_sdpa_options;
/* A query whose keys are all masked gets zero weights and a zero output (torch gives NaN). */
qkv_tensor *qkv_scaled_dot_product_attention(const qkv_tensor *q, const qkv_tensor *k,
                                             const qkv_tensor *v, const qkv_sdpa_options *o);

/* RMSNorm, as torch.nn.RMSNorm (2.4) and LLaMA: x * rsqrt(mean(x^2) + eps) * weight over the
 * last dim (size dim); weight starts at ones. eps 0 means torch's default, the epsilon of x's
 * dtype. */
typedef struct qkv_rms_norm {
    qkv_module base;
    int64_t dim;
    double eps;
    qkv_tensor *weight;
} qkv_rms_norm;
qkv_rms_norm *qkv_rms_norm_new(int64_t dim, double eps);
qkv_tensor *qkv_rms_norm_forward(qkv_rms_norm *m, const qkv_tensor *x);

/* LLaMA's feed-forward block: w2(silu(w1 x) * w3 x), silu(x) = x * sigmoid(x); w1 and w3 are
 * [hidden_dim, dim], w2 [dim, hidden_dim], without biases, initialised as torch.nn.Linear. */
typedef struct qkv_swiglu {
    qkv_module base;
    int64_t dim, hidden_dim;
    qkv_linear *w1, *w2, *w3;
} qkv_swiglu;
qkv_swiglu *qkv_swiglu_new(int64_t dim, int64_t hidden_dim, qkv_generator *g);
qkv_tensor *qkv_swiglu_forward(qkv_swiglu *m, const qkv_tensor *x);

/* Rotary position embedding in the GPT-NeoX / LLaMA (Hugging Face) layout: the head dim is
 * split in halves, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], angle
 * pos * base^(-2i/dim) for pair i. The cos and sin tables [max_len, dim] are computed, not
 * parameters or buffers (as HF's non-persistent ones), so checkpoints hold nothing of it. */
struct qkv_rotary_embedding {
    qkv_module base;
    int64_t dim, max_len;
    double theta;             /* the base, 10000 in LLaMA */
    qkv_tensor *cos, *sin;    /* F64 [max_len, dim], converted to x's dtype when applied */
};
/* dim even and positive; base 0 means 10000. */
qkv_rotary_embedding *qkv_rotary_embedding_new(int64_t dim, int64_t max_len, double base);
/* x [..., T, dim] rotated at positions offset .. offset + T - 1 (all below max_len). */
qkv_tensor *qkv_rotary_embedding_forward(qkv_rotary_embedding *m, const qkv_tensor *x,
                                         int64_t offset);

/* Keys and values of one attention module kept across calls for incremental decoding (see
 * qkv_attention_options): up to max_len positions of [B, num_kv_heads, ., head_dim], held
 * detached (no gradient reaches earlier calls). A call that would go past max_len, or with
 * another batch or head shape, is an error and leaves the cache as it was. */
qkv_kv_cache *qkv_kv_cache_new(int64_t max_len);
void qkv_kv_cache_free(qkv_kv_cache *c);             /* NULL is ignored */
void qkv_kv_cache_reset(qkv_kv_cache *c);             /* empty again, for a new sequence */
int64_t qkv_kv_cache_length(const qkv_kv_cache *c);   /* positions held */

/* torch.nn.TransformerDecoderLayer (batch first): masked self-attention, cross-attention over
 * a memory, a feed-forward block, each with a residual, dropout and layer norm (norm1..3),
 * pre-LN with config->norm_first. Names are PyTorch's (self_attn, multihead_attn, linear1,
 * linear2, norm1, norm2, norm3) with in_proj split into q/k/v_proj; the one-input forward
 * (qkv_module_forward) is not defined, as it needs a memory. */
typedef struct qkv_transformer_decoder_layer {
    qkv_module base;
    qkv_transformer_config config;
    qkv_multi_head_attention *self_attn, *multihead_attn;
    qkv_linear *linear1, *linear2;
    qkv_dropout_layer *dropout, *dropout1, *dropout2, *dropout3;
    qkv_layer_norm *norm1, *norm2, *norm3;
} qkv_transformer_decoder_layer;

/* The masks of PyTorch's forward (shapes and meaning as qkv_attention_options: BOOL true =
 * not allowed, or float added). A zeroed struct or NULL: none. */
typedef struct qkv_decoder_options {
    const qkv_tensor *tgt_mask;                /* [T,T] */
    const qkv_tensor *memory_mask;             /* [T,S] */
    const qkv_tensor *tgt_key_padding_mask;    /* [B,T] */
    const qkv_tensor *memory_key_padding_mask; /* [B,S] */
    bool tgt_is_causal;
} qkv_decoder_options;
qkv_transformer_decoder_layer *qkv_transformer_decoder_layer_new(
    const qkv_transformer_config *config, qkv_generator *g);
/* tgt [B,T,d_model], memory [B,S,d_model] -> [B,T,d_model]. */
qkv_tensor *qkv_transformer_decoder_layer_forward(qkv_transformer_decoder_layer *m,
                                                  const qkv_tensor *tgt,
                                                  const qkv_tensor *memory,
                                                  const qkv_decoder_options *opts);

#ifdef __cplusplus
}
#endif
#endif
