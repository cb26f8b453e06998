/*
 * Library-internal parts of the tensor layer shared with the layers above it: the allocator,
 * tensor construction, and the compute kernels. Never installed.
 */
#ifndef QKV_TENSOR_INTERNAL_H
#define QKV_TENSOR_INTERNAL_H

#include <stdatomic.h>
#include <string.h>

#include "tensor/tensor.h"

/* ---- Allocation (every allocation of the library goes through here) ---------------------- */

void *qkv__alloc(size_t nbytes);             /* cached, 64-byte aligned; NULL + error on failure */
void qkv__free(void *p, size_t nbytes);      /* nbytes as passed to qkv__alloc */
void *qkv__calloc(size_t nbytes);
/* Growable array helper: ensures *cap >= need elements of size elem, keeping contents. */
bool qkv__reserve(void **ptr, size_t *cap, size_t need, size_t elem);
void qkv__count_tensor(int delta);
/* Takes a block out of the allocator's accounts without caching it: the caller now owns it
 * and gives it back with free() (small blocks only). For the checked mode's quarantine. */
void qkv__forget(void *p, size_t nbytes);

/* ---- Construction ------------------------------------------------------------------------ */

/* A new storage of nbytes (uninitialised), refcount 1. */
qkv_storage *qkv__storage_new(size_t nbytes);
void qkv__storage_release(qkv_storage *s);
/* Records an in-place write of t's values (see qkv_version): every function that changes a
 * tensor the caller can still see, in place, calls it. */
static inline void qkv__bump_version(qkv_tensor *t) {
    if (t && t->storage) t->storage->version++;
}
/* Registers t (whose reference the caller holds) with the innermost scope, or hands that
 * reference to the caller (t->user_refs) when no scope is open. False when the scope cannot
 * grow; t is then released. */
bool qkv__scope_add(qkv_tensor *t);
/* Whether the innermost scope holds t's only reference: t was made inside it and handed to
 * no one. */
bool qkv__scope_sole(const qkv_tensor *t);
/* A new tensor object over storage (retained), registered with the innermost scope. */
qkv_tensor *qkv__make(qkv_dtype dtype, int ndim, const int64_t *shape, const int64_t *strides,
                      int64_t offset, qkv_storage *storage);
/* References the library holds for itself (graph nodes, modules, optimizers, gradients): they
 * are not the caller's, so qkv_release would refuse to drop them. */
qkv_tensor *qkv__retain(qkv_tensor *t);
void qkv__release(qkv_tensor *t);
/* A view of t with the given geometry, sharing its storage. */
qkv_tensor *qkv__view(const qkv_tensor *t, int ndim, const int64_t *shape,
                      const int64_t *strides, int64_t offset);
/* Whether t's elements fill a block of memory, without gaps or overlap, in some order of its
 * dimensions (a permutation of a contiguous tensor, as a transposed or head-split view of one
 * is); strides then gets t's strides. */
bool qkv__dense_layout(const qkv_tensor *t, int64_t *strides);
/* A new uninitialised tensor with these strides, which must be a dense layout of shape. */
qkv_tensor *qkv__empty_strided(qkv_dtype dtype, int ndim, const int64_t *shape,
                               const int64_t *strides);
/* Contiguous strides for a shape; returns numel. */
int64_t qkv__contiguous_strides(int ndim, const int64_t *shape, int64_t *strides);
int64_t qkv__numel(int ndim, const int64_t *shape);
bool qkv__check_shape(const char *op, int ndim, const int64_t *shape);
/* Checked shape arithmetic (tensor/shape.c): false with an error naming op on overflow. */
bool qkv__add_i64(const char *op, int64_t a, int64_t b, int64_t *out);
bool qkv__mul_i64(const char *op, int64_t a, int64_t b, int64_t *out);
/* Whether a view of base's storage with this geometry is valid: its shape passes
 * qkv__check_shape and every element it addresses lies inside the storage. False with an
 * error naming op otherwise. */
bool qkv__check_view(const char *op, const qkv_tensor *base, int ndim, const int64_t *shape,
                     const int64_t *strides, int64_t offset);
/* A contiguous tensor with t's values (t itself, retained into the scope, when already so). */
qkv_tensor *qkv__contiguous(const qkv_tensor *t);
qkv_tensor *qkv__to_dtype(const qkv_tensor *t, qkv_dtype dtype);
/* The tensor layer sees an autograd node only as something to release when the tensor that
 * points at it dies; autograd's node struct starts with this. */
typedef struct qkv_node_base {
    void (*release)(struct qkv_node *node, qkv_tensor *owner);
} qkv_node_base;

/* Likewise a leaf's gradient hooks (autograd/hooks.c): freed when the leaf dies. */
typedef struct qkv__grad_hooks_base {
    void (*free_all)(qkv_tensor *leaf);
} qkv__grad_hooks_base;

/* ---- Lifetime checks --------------------------------------------------------------------- */

#define QKV__TENSOR_LIVE 0x7e450a11u
#define QKV__TENSOR_FREED 0xf4eed0d0u

extern atomic_bool qkv__checked_mode;
static inline bool qkv__checking(void) {
    return __builtin_expect(atomic_load_explicit(&qkv__checked_mode, memory_order_relaxed), 0);
}
/* In checked mode: false with an error naming op if one of the n tensors was freed. */
bool qkv__check_args(const char *op, int n, const qkv_tensor *const *ts);
/* At the entry of a public function taking tensors: false (with the error recorded) when one
 * was freed. One predictable branch when checked mode is off. */
#define QKV__CHECK(op, ...)                                                                 \
    (!qkv__checking() ||                                                                    \
     qkv__check_args(op, (int)(sizeof((const qkv_tensor *[]){__VA_ARGS__}) /                \
                               sizeof(const qkv_tensor *)),                                 \
                     (const qkv_tensor *const[]){__VA_ARGS__}))

/* At the entry of a public function: true when one of the tensors given (its tensor
 * arguments, in order) is NULL, after recording "<op>: tensor argument <i> is NULL" unless an
 * error is pending. A NULL usually means an earlier op failed and said why; that first error
 * stays, so a chain still reports its first failure, and a NULL passed with no error pending
 * is named instead of failing silently. */
bool qkv__null_args(const char *op, int n, const void *const *args);
/* The same for another object (a module, an optimizer, a file): "op: what is NULL". */
bool qkv__null_object(const char *op, const char *what, const void *p);
#define QKV__NULL_ARGS(op, ...)                                                             \
    qkv__null_args(op, (int)(sizeof((const void *[]){__VA_ARGS__}) / sizeof(const void *)), \
                   (const void *const[]){__VA_ARGS__})

/* QKV__OP("qkv_add"); at the top of an op names it, in checked mode, as the maker of every
 * tensor made until it returns, unless an op that called it already named itself: a tensor
 * is known by the outermost op of the library the caller called. */
const char *qkv__op_enter(const char *op);
void qkv__op_leave(void);
static inline const char *qkv__op_begin(const char *op) {
    return qkv__checking() ? qkv__op_enter(op) : NULL;
}
static inline void qkv__op_end(const char **entered) {
    if (*entered) qkv__op_leave();
}
#define QKV__OP(op) \
    const char *qkv__op_ __attribute__((cleanup(qkv__op_end), unused)) = qkv__op_begin(op)
/* An error of op about t, which was freed: names where it was made when that is known. */
void qkv__freed_error(const char *op, const qkv_tensor *t);
/* "[2,3]", followed in checked mode by " made by qkv_add (tensor #12)". */
char *qkv__describe(const qkv_tensor *t, char *buf, size_t size);
/* Checked mode's part of making and freeing a tensor: records its maker and links it into
 * the list of live tensors; unlinks it and keeps it, poisoned, out of reuse. */
void qkv__debug_track(qkv_tensor *t);
void qkv__debug_quarantine(qkv_tensor *t);
/* What is releasing tensors now ("qkv_release", "qkv_scope_end" with the scope's site), for
 * the freed tensors' records; NULL when the library is. */
void qkv__debug_releasing(const char *by, const char *file, int line);
/* Writes the scopes this thread has open (innermost last); returns how many. */
size_t qkv__scope_report(FILE *f);

/* g as it would be after n calls of qkv_generator_next_u32. */
void qkv__generator_advance(qkv_generator *g, uint64_t n);

/* ---- Integer arithmetic and conversion -------------------------------------------------- */

/* I64 arithmetic wraps modulo 2^64, as PyTorch's does: INT64_MAX + 1 is INT64_MIN. Signed
 * overflow is undefined in C, so the kernels add, subtract and multiply in uint64_t, whose
 * overflow is defined, and convert back (GCC and Clang define that as the two's complement). */
static inline int64_t qkv__wrap_add(int64_t a, int64_t b) {
    return (int64_t)((uint64_t)a + (uint64_t)b);
}
static inline int64_t qkv__wrap_sub(int64_t a, int64_t b) {
    return (int64_t)((uint64_t)a - (uint64_t)b);
}
static inline int64_t qkv__wrap_mul(int64_t a, int64_t b) {
    return (int64_t)((uint64_t)a * (uint64_t)b);
}
static inline int64_t qkv__wrap_neg(int64_t a) {
    return (int64_t)(0 - (uint64_t)a);
}

/* A float as an I64: truncated toward zero, saturating at the ends (+inf and values from 2^63
 * up give INT64_MAX, -inf and values below -2^63 give INT64_MIN) and 0 for NaN. The C cast is
 * undefined outside the range; this is what AArch64's conversion and Rust's `as` give, so the
 * result is the same on every machine. */
static inline int64_t qkv__f64_to_i64(double v) {
    if (v != v) return 0;
    if (v >= 0x1p63) return INT64_MAX;
    if (v < -0x1p63) return INT64_MIN;
    return (int64_t)v;
}

/* bfloat16 conversions for kernels (qkv_f32_to_bf16 and qkv_bf16_to_f32 are these). */
static inline float qkv__bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}
static inline uint16_t qkv__f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    /* a select, not a branch, so that loops of it vectorize */
    uint32_t r = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0xFFFFu : r);
}
typedef float qkv__f32x8 __attribute__((vector_size(32)));
typedef uint32_t qkv__u32x8 __attribute__((vector_size(32)));
typedef uint16_t qkv__u16x8 __attribute__((vector_size(16)));
typedef float qkv__f32x16 __attribute__((vector_size(64)));
typedef uint32_t qkv__u32x16 __attribute__((vector_size(64)));
typedef uint16_t qkv__u16x16 __attribute__((vector_size(32)));
/* qkv__bf16_storeN(dst, src): dst[0:N] = src[0:N] rounded as qkv__f32_to_bf16, N lanes at a
 * time (through memory, not a vector argument, whose passing would depend on the ISA). Sixteen
 * lanes are one AVX-512 register, whose narrowing to 16 bits is one instruction where eight
 * take a shuffle of two halves. */
#define QKV__BF16_STORE(N)                                                                     \
    static inline void qkv__bf16_store##N(uint16_t *dst, const float *src) {                   \
        qkv__f32x##N v;                                                                        \
        qkv__u32x##N u;                                                                        \
        memcpy(&v, src, sizeof v);                                                             \
        memcpy(&u, src, sizeof u);                                                             \
        qkv__u32x##N nan = (qkv__u32x##N)(v != v);                                             \
        u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;                                            \
        u = (u & ~nan) | (nan & 0xFFFFu);                                                      \
        qkv__u16x##N h = __builtin_convertvector(u, qkv__u16x##N);                             \
        memcpy(dst, &h, sizeof h);                                                             \
    }
QKV__BF16_STORE(8)
QKV__BF16_STORE(16)
#undef QKV__BF16_STORE
/* dst[0:n] = src[0:n] rounded to bf16. */
static inline void qkv__bf16_round_n(uint16_t *restrict dst, const float *restrict src,
                                     int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) qkv__bf16_store16(dst + i, src + i);
    for (; i + 8 <= n; i += 8) {
        qkv__bf16_store8(dst + i, src + i);
    }
    for (; i < n; i++) dst[i] = qkv__f32_to_bf16(src[i]);
}
/* Whether dtype is a known one (QKV_F32 .. QKV_BF16). */
static inline bool qkv__dtype_valid(qkv_dtype dtype) {
    return (unsigned)dtype <= QKV_BF16;
}

/* Most kernels compute BF16 in F32, per element, and round on store, as PyTorch does on the
 * CPU: at their entry, `if (a->dtype == QKV_BF16) return QKV__IN_F32(kernel(QKV__F32(a)...))`
 * runs the F32 kernel on F32 copies in a scope of its own and rounds its F32 result (not an
 * I64 or BOOL one) to BF16. */
static inline qkv_tensor *qkv__round_bf16(qkv_tensor *r) {
    return r && r->dtype == QKV_F32 ? qkv__to_dtype(r, QKV_BF16) : r;
}
#define QKV__F32(t) qkv__to_dtype(t, QKV_F32)
#define QKV__IN_F32(expr) (qkv_scope_begin(), qkv_scope_end_keep(qkv__round_bf16(expr)))

/* Element load/store by dtype, for slow paths. */
double qkv__load(const void *base, qkv_dtype dtype, int64_t i);
void qkv__store(void *base, qkv_dtype dtype, int64_t i, double v);
bool qkv__is_float(qkv_dtype dtype); /* F32, F64 or BF16 */

/* Broadcast shapes a and b into out (NumPy rules); false when they do not broadcast. */
bool qkv__broadcast_shape(int na, const int64_t *sa, int nb, const int64_t *sb,
                          int *nout, int64_t *out);
/* Strides of t seen as the broadcast shape (0 for broadcast dims). */
void qkv__broadcast_strides(const qkv_tensor *t, int ndim, const int64_t *shape,
                            int64_t *strides);
int qkv__norm_axis(const char *op, const qkv_tensor *t, int axis); /* -1 with error if bad */

/* ---- Strided loops ------------------------------------------------------------------------ */

/* Calls fn on each innermost run of a loop over shape, for up to 5 operands given by their base
 * pointers and byte strides (already broadcast to shape). Dimensions are coalesced first, so a
 * contiguous operand gives one long run. With parallel set, runs are split among threads
 * (only for elementwise work, where the order cannot change a result). */
#define QKV_MAX_OPERANDS 5
typedef void (*qkv__run_fn)(int64_t n, char **ptrs, const int64_t *strides, void *ctx);
void qkv__foreach(int nops, char *const *bases, int ndim, const int64_t *shape,
                  const int64_t (*strides)[QKV_MAX_DIMS], qkv__run_fn fn, void *ctx,
                  bool parallel);

/* ---- Threads ----------------------------------------------------------------------------- */

int qkv__threads_for(int64_t work);  /* 1 for small work, else up to qkv_get_num_threads() */
/* How many pieces to cut a loop over items into for threads threads, to be run with
 * schedule(static): each thread runs one contiguous run of pieces, so the same part of every
 * tensor from one op to the next, as the GEMM's threads take the same rows (gemm_plan.h), and
 * finds it in its own core's cache. Only for loops whose every item's result does not depend
 * on where the pieces are cut (elementwise work, whole rows or whole outputs per item). */
int64_t qkv__pieces(int64_t items, int threads);

/* ---- Kernels ----------------------------------------------------------------------------- */

typedef enum qkv_binary_op {
    QKV_OP_ADD, QKV_OP_SUB, QKV_OP_MUL, QKV_OP_DIV, QKV_OP_POW, QKV_OP_MAXIMUM, QKV_OP_MINIMUM,
    QKV_OP_EQ, QKV_OP_NE, QKV_OP_LT, QKV_OP_LE, QKV_OP_GT, QKV_OP_GE,
} qkv_binary_op;

typedef enum qkv_unary_op {
    QKV_OP_NEG, QKV_OP_EXP, QKV_OP_LOG, QKV_OP_SQRT, QKV_OP_RSQRT, QKV_OP_ABS, QKV_OP_TANH,
    QKV_OP_SIGMOID, QKV_OP_RELU, QKV_OP_GELU_ERF, QKV_OP_GELU_TANH, QKV_OP_SIGN,
    QKV_OP_STEP,        /* x > 0 ? 1 : 0 (relu's derivative) */
    QKV_OP_GELU_ERF_GRAD, QKV_OP_GELU_TANH_GRAD, /* derivatives of the two gelu forms */
} qkv_unary_op;

typedef enum qkv_reduce_op {
    QKV_RED_SUM, QKV_RED_MEAN, QKV_RED_VAR, QKV_RED_MAX, QKV_RED_MIN, QKV_RED_ARGMAX,
    QKV_RED_ARGMIN,
} qkv_reduce_op;

/* Result dtype of a binary op between a and b (PyTorch promotion among our four dtypes). */
qkv_dtype qkv__promote(qkv_dtype a, qkv_dtype b);
/* The dtype of a binary op of a and b, as PyTorch's result_type for two tensors. */
qkv_dtype qkv__result_type(const qkv_tensor *a, const qkv_tensor *b);
/* acc += g in place, g broadcast to acc's shape: the same values as qkv__binary(ADD, acc, g).
 * Done, returning true, only where that is safe and exact: acc is a float (bf16 sums in f32
 * and rounds, as the op does), contiguous and held by its one owner alone (its storage too),
 * and g has its dtype; false leaves acc as it was. The backward's gradient accumulation: a fresh sum per contribution would cost a pass
 * of writes. */
bool qkv__add_into(qkv_tensor *acc, const qkv_tensor *g);
/* out = a op b with broadcasting; comparisons give BOOL. name is the op for messages. */
qkv_tensor *qkv__binary(qkv_binary_op op, const qkv_tensor *a, const qkv_tensor *b,
                        const char *name);
/* out = a op scalar (reverse: scalar op a). Keeps a's dtype for floats. */
qkv_tensor *qkv__binary_scalar(qkv_binary_op op, const qkv_tensor *a, double s, bool reverse,
                               const char *name);
qkv_tensor *qkv__unary(qkv_unary_op op, const qkv_tensor *a, const char *name);
/* g * op(x), x and g of one shape and dtype: a derivative times the output's gradient. */
qkv_tensor *qkv__unary_times(qkv_unary_op op, const qkv_tensor *x, const qkv_tensor *g,
                             const char *name);
qkv_tensor *qkv__where(const qkv_tensor *cond, const qkv_tensor *a, const qkv_tensor *b,
                       const char *name);
/* Reduces over the axes whose bit is set in mask (bit i = axis i). correction for VAR. */
qkv_tensor *qkv__reduce(qkv_reduce_op op, const qkv_tensor *a, uint32_t mask, bool keepdim,
                        double correction, const char *name);
qkv_tensor *qkv__softmax(const qkv_tensor *a, int axis, bool log, const char *name);
/* The same of a bf16 (or f32) a, computed and returned in f32: the bits of qkv__softmax on an
 * f32 copy of a, without the copy where the axis is the contiguous last one. */
qkv_tensor *qkv__softmax_f32(const qkv_tensor *a, int axis, bool log, const char *name);
/* The gradient of softmax (log: log_softmax) over the last axis, from its output y and the
 * output's gradient g. */
qkv_tensor *qkv__softmax_backward(const qkv_tensor *y, const qkv_tensor *g, bool log,
                                  const char *name);
/* Softmax over the last axis of scores [..., L, S] where query i sees keys j <= past + i
 * (past >= 0), the others exactly 0; and its gradient from the output y and its gradient g. */
qkv_tensor *qkv__softmax_causal(const qkv_tensor *a, int64_t past, const char *name);
qkv_tensor *qkv__softmax_causal_backward(const qkv_tensor *y, const qkv_tensor *g,
                                         int64_t past, const char *name);

/* Layer norm over rows of d contiguous values of dtype (tensor/norm.c): y = (x - mean) rstd
 * w + b (w, b: d values, or NULL), keeping each row's mean and rstd = 1 / sqrt(var + eps).
 * The backward writes gx (rows x d) and the sums over rows gw, gb (d values); any of the
 * three may be NULL when not wanted. False when its scratch memory cannot be had. mean NULL:
 * RMS norm, y = x rstd w + b with rstd = 1 / sqrt(mean(x^2) + eps). */
void qkv__layer_norm_rows(qkv_dtype dtype, int64_t rows, int64_t d, const void *x,
                          const void *w, const void *b, double eps, void *y, void *mean,
                          void *rstd);
bool qkv__layer_norm_backward_rows(qkv_dtype dtype, int64_t rows, int64_t d, const void *x,
                                   const void *g, const void *w, const void *mean,
                                   const void *rstd, void *gx, void *gw, void *gb);

/* Rotary embedding over the rows of x [..., T, d] (tensor/rope.c): its last axis, of d values
 * (d even), at stride 1, the other axes at any strides: y = x cos + rotate_half(x) sin,
 * contiguous, with contiguous tables [T, d] read at the row's position along axis -2; grad:
 * the gradient g cos + [g2 s2, -g1 s1] from g in x's place. All of x's dtype. */
void qkv__rope_rows(const qkv_tensor *x, const void *cos, const void *sin, bool grad, void *y);

/* Dropout (tensor/dropout.c), over F32 or F64: out = a * mask / (1 - p) (0 where p = 1), the
 * mask drawn from g, which advances by a->numel draws whatever the thread count; in_place
 * writes over a's values (a contiguous, held by nothing else). With mask_out, also the mask as
 * bits: an I64 tensor of ceil(numel / 64) words, bit i of it for element i. NULL on failure. */
qkv_tensor *qkv__dropout(const qkv_tensor *a, double p, qkv_generator *g, qkv_tensor **mask_out,
                         bool in_place);
/* g * (bit set ? scale : 0) for each element of g, from such a bit mask: the product the
 * forward formed, for the backward and for a recomputed output. */
qkv_tensor *qkv__dropout_apply_mask(const qkv_tensor *g, const qkv_tensor *mask, double scale,
                                    bool in_place);

/* Indexing (tensor/index.c). name is the op for messages; indices are I64 and checked. */
/* a.shape[:axis] + index.shape + a.shape[axis+1:]: the slices of a at the indices. */
qkv_tensor *qkv__index_select(const qkv_tensor *a, int axis, const qkv_tensor *index,
                              const char *name);
/* Zeros of (ndim, shape) and src's slices added at the indices along axis (the backward of
 * index_select: repeated indices accumulate in index order). axis must be non-negative. */
qkv_tensor *qkv__index_add(const qkv_tensor *src, int axis, const qkv_tensor *index, int ndim,
                           const int64_t *shape, const char *name);
/* torch.gather, and its backward: zeros of (ndim, shape) with src's elements added at the
 * gathered positions (axis non-negative; src has the index's shape). */
qkv_tensor *qkv__gather(const qkv_tensor *a, int axis, const qkv_tensor *index,
                        const char *name);
qkv_tensor *qkv__scatter_add(const qkv_tensor *src, int axis, const qkv_tensor *index, int ndim,
                             const int64_t *shape, const char *name);
/* n tensors of one dtype, equal except along axis, copied into slices of one result. */
qkv_tensor *qkv__concat(int n, const qkv_tensor *const *ts, int axis, const char *name);
/* I64 index -> I64 index.shape + [n_classes] with a 1 at each index. */
qkv_tensor *qkv__one_hot(const qkv_tensor *index, int64_t n_classes, const char *name);

/* torch.matmul semantics over F32 or F64, reading transposed and strided operands in place. */
qkv_tensor *qkv__matmul(const qkv_tensor *a, const qkv_tensor *b, const char *name);
/* alpha (a @ b) laid out in memory as like is, when like has the product's shape and fills
 * a block of memory in some order of its dimensions with the last or the second last
 * innermost (a gradient laid out as the operand it is for); contiguous otherwise. */
qkv_tensor *qkv__matmul_like(const qkv_tensor *a, const qkv_tensor *b, double alpha,
                             const qkv_tensor *like, const char *name);
/* a @ b for two matrices, and *rowsum the sums of a's rows, each added in order in double and
 * rounded once, read in the product's own pass over a. For a weight gradient g^T x these are
 * its bias's gradient, with the bits of qkv_sum over g's rows. Only where
 * qkv__matmul_rowsum_fits: non-empty f32 or f64 matrices of one dtype whose shapes
 * multiply. */
bool qkv__matmul_rowsum_fits(const qkv_tensor *a, const qkv_tensor *b);
qkv_tensor *qkv__matmul_rowsum(const qkv_tensor *a, const qkv_tensor *b, qkv_tensor **rowsum,
                               const char *name);
/* The same with one triangle kept (qkv_matmul_tri); both operands at least 2-D. */
qkv_tensor *qkv__matmul_tri(const qkv_tensor *a, const qkv_tensor *b, qkv_tri tri,
                            const char *name);
/* input + alpha (a @ b) (qkv_baddbmm): input broadcasts to the product's shape, or is NULL. */
qkv_tensor *qkv__baddbmm(const qkv_tensor *input, const qkv_tensor *a, const qkv_tensor *b,
                         double alpha, const char *name);
/* x W^T + b over the last dimension of x (w is [out, in], b is [out] or NULL). */
qkv_tensor *qkv__affine(const qkv_tensor *x, const qkv_tensor *w, const qkv_tensor *b,
                        const char *name);

/* Batched strided GEMM: for each p < batch,
 *   C_p[i,j] = alpha * sum_l A_p[i,l] * B_p[l,j] + beta * C_p[i,j]
 * with A_p[i,l] = a[a_off[p] + i*rsa + l*csa] (a_off NULL means 0), and likewise B and C.
 * Every C element is computed by one thread in a fixed order of l, so results do not depend
 * on the thread count. beta == 0 ignores C's old contents (NaN included). */
void qkv__gemm_f32(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                   const float *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                   const float *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                   float beta, float *c, const int64_t *c_off, int64_t rsc, int64_t csc);
void qkv__gemm_f64(int64_t batch, int64_t m, int64_t n, int64_t k, double alpha,
                   const double *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                   const double *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                   double beta, double *c, const int64_t *c_off, int64_t rsc, int64_t csc);
/* C = alpha A B (beta 0) of the triangular kind tri (QKV_TRIL_OUT: C[i, j] for j <= i and
 * zeros above; QKV_TRIL_A: A[i, l] for l <= i only; likewise the upper ones), computing only
 * the tiles the triangle reaches. Each kept element is the sum of the same products, in the
 * same order, as the full product of the masked operands. With QKV_TRI_NONE, bias (n
 * contiguous values, or NULL; at bias + bias_off[p] for batch entry p when bias_off is not
 * NULL) is added to every row of C as it is stored. */
void qkv__gemm_tri_f32(qkv_tri tri, int64_t batch, int64_t m, int64_t n, int64_t k,
                       float alpha, const float *a, const int64_t *a_off, int64_t rsa,
                       int64_t csa, const float *b, const int64_t *b_off, int64_t rsb,
                       int64_t csb, const float *bias, const int64_t *bias_off, float *c,
                       const int64_t *c_off, int64_t rsc, int64_t csc);
void qkv__gemm_tri_f64(qkv_tri tri, int64_t batch, int64_t m, int64_t n, int64_t k,
                       double alpha, const double *a, const int64_t *a_off, int64_t rsa,
                       int64_t csa, const double *b, const int64_t *b_off, int64_t rsb,
                       int64_t csb, const double *bias, const int64_t *bias_off, double *c,
                       const int64_t *c_off, int64_t rsc, int64_t csc);
/* C = A B for one product (m, n, k >= 1, columns of C contiguous), and asum[i] = the sum of
 * A's row i over k, added in order of l in double and rounded once, from the pass the
 * product makes over A (a weight gradient and its bias's). */
void qkv__gemm_rowsum_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                          int64_t csa, const float *b, int64_t rsb, int64_t csb, float *c,
                          int64_t rsc, float *asum);
void qkv__gemm_rowsum_f64(int64_t m, int64_t n, int64_t k, const double *a, int64_t rsa,
                          int64_t csa, const double *b, int64_t rsb, int64_t csb, double *c,
                          int64_t rsc, double *asum);
/* C = A B + bias for one product, bias being n contiguous values added to every row of C
 * (columns of C contiguous): the bias costs no pass over C of its own. */
void qkv__gemm_bias_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                        int64_t csa, const float *b, int64_t rsb, int64_t csb,
                        const float *bias, float *c, int64_t rsc);
void qkv__gemm_bias_f64(int64_t m, int64_t n, int64_t k, const double *a, int64_t rsa,
                        int64_t csa, const double *b, int64_t rsb, int64_t csb,
                        const double *bias, double *c, int64_t rsc);

/* bf16 x bf16 products with float32 accumulation (tensor/gemm_bf16.c); A, B hold raw bf16 bits
 * (uint16_t); same strides/offset/batch conventions as qkv__gemm_f32. */
void qkv__gemm_bf16(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                    const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                    const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                    float beta, float *c, const int64_t *c_off, int64_t rsc, int64_t csc);
/* The same, C written as bf16 (rounded to nearest even from the f32 accumulator; beta 0). */
void qkv__gemm_bf16_out(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                        const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                        const uint16_t *b, const int64_t *b_off, int64_t rsb, int64_t csb,
                        uint16_t *c, const int64_t *c_off, int64_t rsc, int64_t csc);
/* The same with bias (n float32 values, or NULL) added to every row of alpha A B before the
 * one rounding: the sums of bf16 addmm, with no float32 copy of C. */
void qkv__gemm_bf16_bias_out(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                             const uint16_t *a, const int64_t *a_off, int64_t rsa, int64_t csa,
                             const uint16_t *b, const int64_t *b_off, int64_t rsb,
                             int64_t csb, const float *bias, uint16_t *c,
                             const int64_t *c_off, int64_t rsc, int64_t csc);
/* Which way the bf16 GEMM computes: VDPBF16PS (AVX512_BF16) or widening to float32 for the
 * F32 GEMM. Native where the CPU has the instruction, unless the environment variable
 * QKV_BF16_GEMM=convert (read once) or qkv__gemm_bf16_use says otherwise. The native path
 * flushes subnormal inputs, products and sums to zero (the instruction ignores MXCSR); the
 * converting path keeps them. */
typedef enum qkv_bf16_gemm_path { QKV_BF16_GEMM_CONVERT, QKV_BF16_GEMM_NATIVE } qkv_bf16_gemm_path;
qkv_bf16_gemm_path qkv__gemm_bf16_path(void);
/* Forces a path (for tests and benchmarks); false, changing nothing, if the CPU cannot run it. */
bool qkv__gemm_bf16_use(qkv_bf16_gemm_path path);

/* ---- More element-wise math, and ops along an axis (tensor/math.c, tensor/sort.c) -------- */

typedef enum qkv_math_op {
    QKV_MATH_SILU, QKV_MATH_SOFTPLUS, QKV_MATH_LEAKY_RELU, QKV_MATH_ELU, QKV_MATH_SIN,
    QKV_MATH_COS, QKV_MATH_ERF, QKV_MATH_LOG1P, QKV_MATH_EXPM1, QKV_MATH_SQUARE, QKV_MATH_CLAMP,
    QKV_MATH_FLOOR, QKV_MATH_CEIL, QKV_MATH_ROUND, QKV_MATH_SIGN,
} qkv_math_op;

/* op(a) elementwise with its parameters p0, p1: softplus's beta and threshold, leaky ReLU's
 * slope, ELU's alpha, clamp's bounds (-inf and inf for none). Floats keep their dtype;
 * integers stay I64 through the ops that map integers to integers, and compute in F32
 * otherwise. */
qkv_tensor *qkv__math(qkv_math_op op, const qkv_tensor *a, double p0, double p1,
                      const char *name);
/* g * op'(x) in one pass (x float, g broadcast to it): the backward of op, selected where
 * torch selects; expm1's takes its output as x; the rounding family's is 0. */
qkv_tensor *qkv__math_backward(qkv_math_op op, const qkv_tensor *x, const qkv_tensor *g,
                               double p0, double p1, const char *name);

/* silu(a) * b in one pass, a and b broadcast, in their promoted float dtype (F32 for
 * integers); the values of qkv__binary(MUL, qkv__math(SILU, a), b) (bf16 rounds the gate as it
 * does). Its backward: ga = g b silu'(a) and gb = g silu(a) in one pass, each of the broadcast
 * shape and only where its pointer is not NULL; false on error, both NULL. */
qkv_tensor *qkv__silu_mul(const qkv_tensor *a, const qkv_tensor *b, const char *name);
bool qkv__silu_mul_backward(const qkv_tensor *a, const qkv_tensor *b, const qkv_tensor *g,
                            qkv_tensor **ga, qkv_tensor **gb, const char *name);

/* Inclusive cumulative sum along axis (reverse: from the end, the backward's sum). F32
 * accumulates in double as torch's CPU kernel does; integer sums wrap; BOOL counts as I64. */
qkv_tensor *qkv__cumsum(const qkv_tensor *a, int axis, bool reverse, const char *name);
/* I64 positions along axis of the first k elements of each row in sorted order (the axis
 * becomes size k): stable, equal elements in their order, NaN above everything. */
qkv_tensor *qkv__sort_indices(const qkv_tensor *a, int axis, bool descending, int64_t k,
                              const char *name);
/* torch.multinomial over a 1-D or 2-D float probs, drawing one uniform per sample from g in
 * row-major order; every argument and row is checked before the first draw. */
qkv_tensor *qkv__multinomial(const qkv_tensor *probs, int64_t n, bool replacement,
                             qkv_generator *g, const char *name);
/* BOOL [n_rows, n_cols], true where j - i <= diagonal (upper: j - i >= diagonal). */
qkv_tensor *qkv__tri_mask(int64_t n_rows, int64_t n_cols, int64_t diagonal, bool upper);

#endif
