/*
 * qkv ops and reverse-mode autodiff.
 *
 * Every function here that returns a tensor follows tensor.h's conventions: the result
 * belongs to the innermost scope, and errors return NULL with qkv_error() set. When grad
 * mode is on (the default) and an input requires grad, the op records a node so that
 * qkv_backward can compute gradients. Axes may be negative (counted from the end).
 * Binary ops broadcast as NumPy and PyTorch do. Results of views share their input's storage.
 * Grad mode and anomaly mode are per thread; a graph, like the tensors it links, is used by one
 * thread at a time (see tensor.h).
 */
#ifndef QKV_AUTOGRAD_H
#define QKV_AUTOGRAD_H

#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Autograd ---------------------------------------------------------------------------- */

/* Marks a leaf (a tensor made by a creation function) as a parameter to differentiate. */
qkv_tensor *qkv_requires_grad_(qkv_tensor *t, bool requires_grad);
/* Backpropagates from a one-element loss (seed 1). Leaves accumulate into t->grad. */
bool qkv_backward(qkv_tensor *loss);
/* Backpropagates from any tensor with an explicit seed gradient of its shape. With
 * retain_graph the graph stays usable for another backward; otherwise it is freed. */
bool qkv_backward_with(qkv_tensor *out, const qkv_tensor *grad, bool retain_graph);
void qkv_zero_grad(qkv_tensor *t);          /* drops t->grad (sets it to NULL) */
void qkv_retain_grad(qkv_tensor *t);        /* keep a non-leaf's gradient in t->grad */
qkv_tensor *qkv_detach(const qkv_tensor *t); /* a view that records nothing */

/* Gradient hooks, as torch's register_post_accumulate_grad_hook: fn(leaf, ctx) is called
 * during a backward once leaf's .grad is final for that backward, that is once every node of
 * the graph that can still add to it has run (the engine counts the pending contributions),
 * or at once for a backward started from the leaf itself. It is called on the backward's
 * thread with grad mode off, in the order the hooks were registered; it may read leaf->grad,
 * replace it or take it (qkv_retain it, then qkv_zero_grad), and must not start a backward.
 * A leaf the backward does not reach gets no call. Hooks are made on a leaf that requires
 * grad; they live until removed or until the leaf is freed, which frees them (a handle of a
 * freed leaf must not be removed). NULL with an error for a non-leaf or a NULL fn. */
typedef struct qkv_grad_hook qkv_grad_hook;
typedef void (*qkv_grad_hook_fn)(qkv_tensor *leaf, void *ctx);
qkv_grad_hook *qkv_register_grad_hook(qkv_tensor *leaf, qkv_grad_hook_fn fn, void *ctx);
void qkv_remove_grad_hook(qkv_grad_hook *hook); /* NULL is ignored */

/* Grad mode: while off (nested begin/end pairs), no op records a node. */
void qkv_no_grad_begin(void);
void qkv_no_grad_end(void);
bool qkv_is_grad_enabled(void);

/* Autocast (mixed precision), as torch.autocast("cpu", dtype=torch.bfloat16): between begin
 * and end (per thread, nestable), qkv_matmul, qkv_baddbmm and qkv_affine (so linear layers and
 * attention's products) take bf16 copies of F32 operands and return BF16, and the element-wise
 * ops after them run in BF16 too; qkv_softmax, qkv_log_softmax, layer norm, sum, mean, var and
 * the losses take F32 copies of BF16 inputs and return F32. Parameters stay F32 and get F32
 * gradients: a cast is recorded, and its gradient is a cast back; the backward's products run
 * in bf16 as the forward's. A parameter (a leaf that requires grad) is converted once per outermost
 * region, and again only after an in-place write (qkv_version). dtype must be QKV_BF16;
 * false with an error otherwise. An end with no region open is an error. */
bool qkv_autocast_begin(qkv_dtype dtype);
void qkv_autocast_end(void);
bool qkv_is_autocast_enabled(void);

/* Anomaly mode: every recorded op checks its forward result for NaN (an infinity is no error:
 * masks put -inf there on purpose), and backward checks each gradient for NaN or an
 * infinity; the first one found is an error naming the op and, when it ran inside a module
 * call, the module's path (`in encoder.layers.0.linear2`), and backward stops. Per
 * thread. */
void qkv_set_detect_anomaly(bool on);
bool qkv_is_anomaly_enabled(void);

/* Name of the op that produced t ("mul", "matmul", ...), or NULL for a leaf. */
const char *qkv_grad_fn_name(const qkv_tensor *t);

/* ---- Functions with a backward of their own ---------------------------------------------- */

/* An op with its own backward, as torch.autograd.Function. Every built-in op is defined this
 * way too. The forward is ordinary code between qkv_function_begin and qkv_function_end:
 *
 *     qkv_ctx *ctx = qkv_function_begin(&fn, 2, (const qkv_tensor *[]){a, b}, &args);
 *     if (qkv_ctx_needs_grad(ctx, 0)) qkv_save(ctx, 1, b);   // what the backward reads
 *     if (qkv_ctx_needs_grad(ctx, 1)) qkv_save(ctx, 0, a);
 *     return qkv_function_end(ctx, qkv_mul(a, b));
 *
 * begin returns NULL when no input requires grad or grad mode is off: then nothing is
 * recorded, every call below takes a NULL ctx and does nothing, and end returns its tensor.
 * Otherwise grad mode is off until end, which links the output to a graph node (the ctx).
 * The node holds nothing but what was saved: whether a saved value is kept or, when its
 * maker is a cheap op, dropped and recomputed for the backward is decided by the engine.
 * A backward that reads a saved value changed in place since the forward fails. One output
 * is linked; other results a function hands back (indices, masks, as qkv_sort and qkv_topk
 * do) are made while grad mode is off, so they carry no graph: non-differentiable, as
 * torch's ctx.mark_non_differentiable makes them. */
typedef struct qkv_node qkv_ctx;

typedef struct qkv_function {
    const char *name; /* in errors and qkv_grad_fn_name */
    /* grads has one slot per input, all NULL on entry; leave a slot NULL for no gradient.
     * Gradients may have a broadcast shape: the engine sums them to each input's shape.
     * Grad mode is off while it runs. */
    void (*backward)(qkv_ctx *ctx, const qkv_tensor *grad, qkv_tensor **grads);
    /* Optional: the output again, bit for bit, from what the forward saved. A function with
     * one is cheap to recompute, so the ops that read its output hold no copy of it. */
    qkv_tensor *(*recompute)(qkv_ctx *ctx);
    size_t args_size; /* bytes of the arguments struct copied into each node, or 0 */
} qkv_function;

#define QKV_SAVED_SLOTS 6

/* args (fn->args_size bytes; NULL for none) is copied into the node: qkv_ctx_args. n_inputs
 * are the tensors gradients flow to (NULL entries allowed). On an allocation failure the
 * error is set and end returns NULL. */
qkv_ctx *qkv_function_begin(const qkv_function *fn, int n_inputs,
                            const qkv_tensor *const *inputs, const void *args);
/* Links out to the node and returns it; NULL (out released) if out is NULL or anything
 * since begin failed. */
qkv_tensor *qkv_function_end(qkv_ctx *ctx, qkv_tensor *out);
/* Saves t for the backward in slot (0 <= slot < QKV_SAVED_SLOTS). t may be the output. */
bool qkv_save(qkv_ctx *ctx, int slot, const qkv_tensor *t);
/* In the backward: the values saved in slot (recomputed if the engine dropped them), or NULL
 * with an error if they were changed in place since the forward. */
qkv_tensor *qkv_saved(qkv_ctx *ctx, int slot);
void *qkv_ctx_args(qkv_ctx *ctx); /* NULL for a NULL ctx or one whose node could not be made */
bool qkv_ctx_needs_grad(const qkv_ctx *ctx, int input); /* whether input i wants a gradient */
/* Input i's shape, dtype and requires_grad (no values: save what the backward reads). */
const qkv_tensor *qkv_ctx_input(const qkv_ctx *ctx, int input);

/* ---- Gradient check ---------------------------------------------------------------------- */

/* A function of n inputs returning one tensor (any shape); ctx is passed through. */
typedef qkv_tensor *(*qkv_gradcheck_fn)(qkv_tensor *const *inputs, int n, void *ctx);

/* Compares the analytic gradient of sum(fn(inputs) * w) (w a fixed pseudo-random weight)
 * with central differences of step eps, for every element of every input that requires
 * grad. Inputs must be F64. An element passes when |analytic - numeric| <= atol + rtol *
 * |numeric|. An input whose elements share memory (an expanded view) is checked once per
 * memory location, against the summed gradient of the elements sharing it. On failure the
 * error (qkv_error) names the input, the element, both values and the difference, and the
 * result is false. Never aborts. */
bool qkv_gradcheck(qkv_gradcheck_fn fn, qkv_tensor *const *inputs, int n, void *ctx,
                   double eps, double atol, double rtol);

/* ---- Elementwise ------------------------------------------------------------------------- */

qkv_tensor *qkv_add(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_sub(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_mul(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_div(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_pow(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_maximum(const qkv_tensor *a, const qkv_tensor *b); /* ties split the grad */
qkv_tensor *qkv_minimum(const qkv_tensor *a, const qkv_tensor *b);

qkv_tensor *qkv_add_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_sub_scalar(const qkv_tensor *a, double s);  /* a - s */
qkv_tensor *qkv_rsub_scalar(double s, const qkv_tensor *a); /* s - a */
qkv_tensor *qkv_mul_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_div_scalar(const qkv_tensor *a, double s);  /* a / s */
qkv_tensor *qkv_rdiv_scalar(double s, const qkv_tensor *a); /* s / a */
qkv_tensor *qkv_pow_scalar(const qkv_tensor *a, double s);  /* a ^ s */
/* Elements equal to s get half the gradient, as ties of qkv_maximum do (torch.clamp gives
 * them all of it). */
qkv_tensor *qkv_maximum_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_minimum_scalar(const qkv_tensor *a, double s);

qkv_tensor *qkv_neg(const qkv_tensor *a);
qkv_tensor *qkv_exp(const qkv_tensor *a);
qkv_tensor *qkv_log(const qkv_tensor *a);
qkv_tensor *qkv_sqrt(const qkv_tensor *a);
qkv_tensor *qkv_rsqrt(const qkv_tensor *a);
qkv_tensor *qkv_abs(const qkv_tensor *a);     /* grad sign(a): 0 at 0 */
qkv_tensor *qkv_tanh(const qkv_tensor *a);
qkv_tensor *qkv_sigmoid(const qkv_tensor *a);
qkv_tensor *qkv_relu(const qkv_tensor *a);    /* grad 0 at 0 */
/* GELU: x * Phi(x) with the exact erf form, or PyTorch's approximate="tanh" form. */
qkv_tensor *qkv_gelu(const qkv_tensor *a, bool tanh_approximation);

/* Comparisons give BOOL tensors and record nothing. */
qkv_tensor *qkv_eq(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_ne(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_lt(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_le(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_gt(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_ge(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv_eq_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_ne_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_lt_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_le_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_gt_scalar(const qkv_tensor *a, double s);
qkv_tensor *qkv_ge_scalar(const qkv_tensor *a, double s);

/* cond ? a : b elementwise, all three broadcast; cond is BOOL. */
qkv_tensor *qkv_where(const qkv_tensor *cond, const qkv_tensor *a, const qkv_tensor *b);
/* a with value where mask (BOOL, broadcast to a) is true. */
qkv_tensor *qkv_masked_fill(const qkv_tensor *a, const qkv_tensor *mask, double value);

/* ---- Reductions -------------------------------------------------------------------------- */
/* One axis; several axes (naxes entries of axes; naxes 0 reduces nothing, where torch's
 * dim=[] would reduce everything: use the _all form for that); or all elements (a 0-d
 * result). */

qkv_tensor *qkv_sum(const qkv_tensor *a, int axis, bool keepdim);
qkv_tensor *qkv_sum_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim);
qkv_tensor *qkv_sum_all(const qkv_tensor *a);
qkv_tensor *qkv_mean(const qkv_tensor *a, int axis, bool keepdim);
qkv_tensor *qkv_mean_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim);
qkv_tensor *qkv_mean_all(const qkv_tensor *a);
/* Variance with Bessel-style correction (1 = unbiased, as torch.var's default; 0 = biased). */
qkv_tensor *qkv_var(const qkv_tensor *a, int axis, double correction, bool keepdim);
qkv_tensor *qkv_var_axes(const qkv_tensor *a, int naxes, const int *axes, double correction,
                         bool keepdim);
/* max/min over one axis: the gradient goes to the first element that attains the extreme;
 * over all elements likewise (row-major first). NaN propagates. */
qkv_tensor *qkv_max(const qkv_tensor *a, int axis, bool keepdim);
qkv_tensor *qkv_max_all(const qkv_tensor *a);
qkv_tensor *qkv_min(const qkv_tensor *a, int axis, bool keepdim);
qkv_tensor *qkv_min_all(const qkv_tensor *a);
/* Over several axes, as torch.amax/amin (values only); the gradient goes to the first
 * extreme element in row-major order, as above. */
qkv_tensor *qkv_max_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim);
qkv_tensor *qkv_min_axes(const qkv_tensor *a, int naxes, const int *axes, bool keepdim);
qkv_tensor *qkv_argmax(const qkv_tensor *a, int axis, bool keepdim); /* I64, first index */
qkv_tensor *qkv_argmin(const qkv_tensor *a, int axis, bool keepdim);

/* Softmax along axis, computed stably (the row maximum is subtracted). A row that is all -inf
 * (every position masked) gives all zeros; log_softmax gives all -inf there, and passes no
 * gradient back through such a row. */
qkv_tensor *qkv_softmax(const qkv_tensor *a, int axis);
qkv_tensor *qkv_log_softmax(const qkv_tensor *a, int axis);
/* Causal softmax over the last axis of scores [..., L, S]: query i sees keys j <= past + i
 * (past >= 0; the positions cached before), as softmax(scores.masked_fill(j > past + i, -inf),
 * -1). Masked entries are exactly 0 and get no gradient, and their scores (NaN included)
 * change nothing; no mask is made. A bf16 input gives bf16, and f32 under autocast, as
 * qkv_softmax does. */
qkv_tensor *qkv_causal_softmax(const qkv_tensor *scores, int64_t past);

/* ---- Linear algebra ---------------------------------------------------------------------- */

/* torch.matmul: 1-D x 1-D dot product; 2-D matrix product; 1-D operands gain and lose a
 * dimension; batch dimensions broadcast. Transposed and strided operands are read in place. */
qkv_tensor *qkv_matmul(const qkv_tensor *a, const qkv_tensor *b);
/* qkv_matmul keeping one triangle (tensor.h's qkv_tri, over the last two dimensions, the
 * diagonal included, top-left aligned as torch.tril): tril(a @ b), triu(a @ b), tril(a) @ b or
 * triu(a) @ b. Only the tiles the triangle reaches are computed, so causal attention's two
 * products cost half: QKV_TRIL_OUT for the scores, QKV_TRIL_A for weights @ v. Both operands
 * must be at least 2-D; the gradients are triangular products too. */
qkv_tensor *qkv_matmul_tri(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri);
/* torch.baddbmm(input, a, b, alpha=alpha) over qkv_matmul's operands (any rank, batch
 * dimensions broadcast): input + alpha * (a @ b), with input broadcast to the product's shape
 * (and not widening it), or NULL for alpha * (a @ b). alpha scales the sums inside the
 * product, and an input that is one row per matrix ([..., 1, n] or [n], the same dtype: a key
 * mask over attention scores) is added as the product is stored, so neither costs a pass of
 * its own; any other input is added after. Under autocast all three run in bf16, as torch's
 * baddbmm. */
qkv_tensor *qkv_baddbmm(const qkv_tensor *input, const qkv_tensor *a, const qkv_tensor *b,
                        double alpha);
/* x weight^T + bias over the last dimension of x, as torch.nn.functional.linear: weight is
 * [out, in], bias [out], one element ([1] or 0-d, broadcast as in torch) or NULL. The bias is
 * fused into the product. */
qkv_tensor *qkv_affine(const qkv_tensor *x, const qkv_tensor *weight, const qkv_tensor *bias);

/* ---- Views and copies -------------------------------------------------------------------- */

/* New shape with the same number of elements; one entry may be -1. A view when the strides
 * allow it, a copy otherwise (as torch.reshape). */
qkv_tensor *qkv_reshape(const qkv_tensor *a, int ndim, const int64_t *shape);
qkv_tensor *qkv_flatten(const qkv_tensor *a, int start_axis, int end_axis);
qkv_tensor *qkv_transpose(const qkv_tensor *a, int axis0, int axis1);
qkv_tensor *qkv_permute(const qkv_tensor *a, const int *axes); /* a->ndim entries */
/* Elements start, start+step, ... below end along axis (end clamps, as Python slices with a
 * positive step; negative start/end count from the end). */
qkv_tensor *qkv_slice(const qkv_tensor *a, int axis, int64_t start, int64_t end, int64_t step);
qkv_tensor *qkv_narrow(const qkv_tensor *a, int axis, int64_t start, int64_t length);
qkv_tensor *qkv_select(const qkv_tensor *a, int axis, int64_t index); /* drops the axis */
qkv_tensor *qkv_squeeze(const qkv_tensor *a, int axis);  /* no-op when that size is not 1 */
qkv_tensor *qkv_squeeze_all(const qkv_tensor *a);
qkv_tensor *qkv_unsqueeze(const qkv_tensor *a, int axis);
/* Broadcast to shape without copying (stride 0); -1 keeps a size; new leading dims allowed. */
qkv_tensor *qkv_expand(const qkv_tensor *a, int ndim, const int64_t *shape);
qkv_tensor *qkv_contiguous(const qkv_tensor *a);  /* a itself (as a view) if already so */
qkv_tensor *qkv_clone(const qkv_tensor *a);       /* always a fresh copy */
qkv_tensor *qkv_to_dtype(const qkv_tensor *a, qkv_dtype dtype);

/* ---- Indexing ---------------------------------------------------------------------------- */

/* Picks entries of a along axis by an I64 index of any shape: the result's shape is
 * a.shape[:axis] + index.shape + a.shape[axis+1:] (torch.index_select for a 1-D index; an
 * embedding lookup for a 2-D one). The gradient scatter-adds, so repeated indices accumulate. */
qkv_tensor *qkv_index_select(const qkv_tensor *a, int axis, const qkv_tensor *index);
/* torch.gather: out[i][j][k] = a[i][index[i][j][k]][k] for axis 1; index has a's ndim. */
qkv_tensor *qkv_gather(const qkv_tensor *a, int axis, const qkv_tensor *index);
qkv_tensor *qkv_concat(int n, qkv_tensor *const *tensors, int axis);
qkv_tensor *qkv_stack(int n, qkv_tensor *const *tensors, int axis);
qkv_tensor *qkv_one_hot(const qkv_tensor *index, int64_t n_classes); /* I64 -> I64 [..., n] */

/* ---- Random ------------------------------------------------------------------------------ */

/* Zeroes each element with probability p and scales the rest by 1/(1-p); the identity when
 * training is false or p is 0. The mask is drawn from g in row-major order. */
qkv_tensor *qkv_dropout(const qkv_tensor *a, double p, bool training, qkv_generator *g);
/* qkv_dropout written over a's own values, as torch's dropout(inplace=True), when nothing else
 * can read them: a is held once (by its scope), shares its storage with no other tensor (so no
 * graph node holds it) and is not a leaf that requires grad. Otherwise it is qkv_dropout. The
 * result is a new tensor; a's values are not to be read after the call. For an activation
 * nobody reads again, this saves a buffer of its size. */
qkv_tensor *qkv_dropout_(qkv_tensor *a, double p, bool training, qkv_generator *g);

/* ---- Activations and more math ---------------------------------------------------------- */
/* Element-wise, with torch's formulas and gradients. Integer inputs compute in F32, except in
 * floor, ceil, round, sign, square and a clamp with whole-number bounds, which keep I64. */

qkv_tensor *qkv_silu(const qkv_tensor *a);                /* x * sigmoid(x) */
/* silu(a) * b, a and b broadcast: the gate of LLaMA's SwiGLU, as one op whose forward and
 * backward each take one pass (the composition's take two and four). Its values and gradients
 * are qkv_mul(qkv_silu(a), b)'s (bit for bit over contiguous f32 and bf16 operands); it
 * computes in a and b's promoted float dtype. */
qkv_tensor *qkv_silu_mul(const qkv_tensor *a, const qkv_tensor *b);
/* Rotary position embedding as one op: x cos + rotate_half(x) sin for x [..., T, d] (d even),
 * tables cos and sin [T, d] (converted to x's dtype) that do not require grad, and
 * rotate_half([x1, x2]) = [-x2, x1] over the last dim (LLaMA's apply_rotary_pos_emb). */
qkv_tensor *qkv_rotary(const qkv_tensor *x, const qkv_tensor *cos, const qkv_tensor *sin);
/* log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (torch: 1, 20). */
qkv_tensor *qkv_softplus(const qkv_tensor *a, double beta, double threshold);
qkv_tensor *qkv_leaky_relu(const qkv_tensor *a, double negative_slope); /* grad slope at 0 */
qkv_tensor *qkv_elu(const qkv_tensor *a, double alpha);   /* alpha (exp(x) - 1) for x <= 0 */
qkv_tensor *qkv_sin(const qkv_tensor *a);
qkv_tensor *qkv_cos(const qkv_tensor *a);
qkv_tensor *qkv_erf(const qkv_tensor *a);
qkv_tensor *qkv_log1p(const qkv_tensor *a);               /* log(1 + x), exact near 0 */
qkv_tensor *qkv_expm1(const qkv_tensor *a);               /* exp(x) - 1, exact near 0 */
qkv_tensor *qkv_square(const qkv_tensor *a);
/* min(max(x, min), max); NAN for a bound means none (torch's None), and NAN for both is an
 * error. min > max gives max everywhere; NaN stays NaN. The gradient passes (selected, not
 * multiplied) where min <= x <= max, ends included, as in torch. */
qkv_tensor *qkv_clamp(const qkv_tensor *a, double min, double max);
/* Piecewise constant, with a zero gradient as in torch. round is half to even (2.5 -> 2);
 * sign is -1, 0 or 1, and 0 at NaN (as torch 1.13). */
qkv_tensor *qkv_floor(const qkv_tensor *a);
qkv_tensor *qkv_ceil(const qkv_tensor *a);
qkv_tensor *qkv_round(const qkv_tensor *a);
qkv_tensor *qkv_sign(const qkv_tensor *a);

/* ---- Along an axis ----------------------------------------------------------------------- */

/* Inclusive running sum along axis; BOOL and I64 give I64 (wrapping). Grad: reverse cumsum. */
qkv_tensor *qkv_cumsum(const qkv_tensor *a, int axis);
/* Sorted values along axis, stable (equal values keep their order; NaN counts as larger than
 * everything, so it comes last ascending and first descending, as in torch). *indices, when
 * indices is not NULL, gets the I64 positions (NULL on error). The gradient goes back to
 * each value's position. argsort gives the positions alone. */
qkv_tensor *qkv_sort(const qkv_tensor *a, int axis, bool descending, qkv_tensor **indices);
qkv_tensor *qkv_argsort(const qkv_tensor *a, int axis, bool descending);
/* The k largest (or smallest) values along axis in sorted order, as qkv_sort's first k:
 * among equal values the lower index comes first. 0 <= k <= the axis's size. */
qkv_tensor *qkv_topk(const qkv_tensor *a, int64_t k, int axis, bool largest,
                     qkv_tensor **indices);
/* n_samples I64 category indices per row of probs (1-D [n] or 2-D [rows, n]; F32 or F64;
 * entries finite and >= 0, each row with a positive sum, not necessarily 1). Without
 * replacement, n_samples may not exceed a row's nonzero entries. One uniform is drawn from g
 * per sample, in row-major order; nothing is drawn if an argument is refused. Records
 * nothing. */
qkv_tensor *qkv_multinomial(const qkv_tensor *probs, int64_t n_samples, bool replacement,
                            qkv_generator *g);

/* ---- Triangles and products -------------------------------------------------------------- */

/* a with the elements above (tril) or below (triu) the diagonal-th diagonal of its last two
 * dims set to 0 (0: the main diagonal, > 0 above it, < 0 below). a has >= 2 dims. */
qkv_tensor *qkv_tril(const qkv_tensor *a, int64_t diagonal);
qkv_tensor *qkv_triu(const qkv_tensor *a, int64_t diagonal);
qkv_tensor *qkv_outer(const qkv_tensor *a, const qkv_tensor *b); /* 1-D a, b -> [na, nb] */
/* torch.einsum over n float operands: "bhtd,bhsd->bhts", "ij,jk,kl->il", "ij->ji", "ij->",
 * and the implicit form without "->" (the output is the letters used once, sorted). Letters
 * are a-z and A-Z; a size-1 dimension broadcasts against its letter's size elsewhere.
 * Operands are contracted left to right, each pair as one batched qkv_matmul (with permutes,
 * reshapes and sums, which give the gradients). Not supported, with an error naming the
 * subscripts: ellipsis ("..."), and a letter repeated within one operand (diagonals). */
qkv_tensor *qkv_einsum(const char *subscripts, int n, qkv_tensor *const *operands);

#ifdef __cplusplus
}
#endif
#endif
