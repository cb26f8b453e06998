/*
 * qkv tensors: dtypes, shapes, storage, lifetime, errors, creation and random numbers.
 *
 * Conventions, stated once and kept everywhere:
 *  - Ownership. A function that returns a new tensor hands it to the innermost open scope
 *    (qkv_scope_begin/qkv_scope_end). With no scope open, the caller owns the result and
 *    releases it with qkv_release. Use qkv_retain to hold a tensor beyond its scope and
 *    qkv_keep to pass a result out of the innermost scope to the enclosing one.
 *  - Errors. A user mistake or an allocation failure never aborts: the function returns NULL
 *    (or false / -1) and records a message naming the op and the shapes; qkv_error() returns the
 *    first message recorded since the last qkv_clear_error(). Every op accepts NULL inputs and
 *    returns NULL, so a chain of ops is checked once, at its end: a NULL records "qkv_add:
 *    tensor argument 1 is NULL" only when no error is pending, so the chain reports its first
 *    real failure and a NULL from nowhere is still named. The error state is per thread.
 *  - Threads. The error state and the scope stack are per thread. Reference counts are not
 *    atomic: a tensor, its views and its graph are used by one thread at a time (several
 *    threads may only read its elements at once, with qkv_data, qkv_get, qkv_item or
 *    qkv_copy_out, while none changes it), and so is a qkv_generator. The caching allocator and
 *    its statistics are shared and locked. qkv_set_num_threads and qkv_debug_fail_alloc_at act
 *    on the whole process. docs/threads.md has the details.
 *  - Integers. I64 arithmetic (add, sub, mul, neg, abs, pow, sum) wraps modulo 2^64 as in
 *    PyTorch: INT64_MAX + 1 is INT64_MIN, and -INT64_MIN and abs(INT64_MIN) are INT64_MIN.
 *    Division of integers is true division in f32, as torch's `/`. A float becomes an I64
 *    (qkv_to_dtype, qkv_copy_, qkv_copy_out, qkv_fill_, qkv_full) truncated toward zero, with
 *    NaN giving 0 and the ends saturating: +inf and values from 2^63 up give INT64_MAX, -inf
 *    and values below -2^63 give INT64_MIN. Any non-zero value, NaN too, becomes true as BOOL.
 *  - Shapes are given as (ndim, const int64_t *shape); QKV_SHAPE(2, 3) expands to both.
 *    Strides and offsets count elements, not bytes.
 *
 * The struct fields are public for reading; change them only through the API.
 */
#ifndef QKV_TENSOR_H
#define QKV_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Types ------------------------------------------------------------------------------- */

typedef enum qkv_dtype {
    QKV_F32 = 0, /* float, the default */
    QKV_F64,     /* double: gradient checks and users who want it */
    QKV_I64,     /* int64_t: token ids, labels, indices */
    QKV_BOOL,    /* bool: masks and comparison results */
    QKV_BF16,    /* bfloat16 (raw bits in a uint16_t): storage and products under autocast */
} qkv_dtype;

/* The triangle of a matrix product that qkv_matmul_tri keeps, over the last two dimensions,
 * diagonal included: of the result (as BLAS's GEMMT) or of the left operand (as TRMM). */
typedef enum qkv_tri {
    QKV_TRI_NONE = 0, /* a @ b, as qkv_matmul */
    QKV_TRIL_OUT,     /* tril(a @ b): C[i, j] for j <= i, zeros above */
    QKV_TRIU_OUT,     /* triu(a @ b): C[i, j] for j >= i, zeros below */
    QKV_TRIL_A,       /* tril(a) @ b: a[i, l] for l <= i, the rest taken as zero */
    QKV_TRIU_A,       /* triu(a) @ b: a[i, l] for l >= i, the rest taken as zero */
} qkv_tri;

#define QKV_MAX_DIMS 8

typedef struct qkv_storage {
    void *data;
    size_t nbytes;
    int refcount;
    uint64_t version; /* in-place writes so far, shared by every view (see qkv_version) */
} qkv_storage;

struct qkv_node;
struct qkv__tensor_debug;
struct qkv__grad_hooks;

typedef struct qkv_tensor {
    qkv_dtype dtype;
    int ndim;
    int64_t shape[QKV_MAX_DIMS];
    int64_t strides[QKV_MAX_DIMS]; /* in elements; 0 for broadcast dims */
    int64_t offset;                /* first element, in elements from the storage start */
    int64_t numel;
    qkv_storage *storage;          /* shared by views */
    int refcount;                  /* every holder: scopes, the caller, the library */
    int user_refs;                 /* of those, the caller's: qkv_retain, a result made with
                                      no scope open, qkv_keep out of the outermost scope */
    int scope_refs;                /* of those, the scopes': one per scope that owns it */
    uint32_t magic;                /* internal: marks a live or a freed tensor */
    bool requires_grad;            /* leaf parameters, or any result of a recorded op */
    bool retains_grad;             /* a non-leaf whose gradient is kept (qkv_retain_grad) */
    struct qkv_tensor *grad;       /* accumulated gradient, owned by this tensor, or NULL */
    struct qkv_node *grad_fn;      /* the op that made this tensor, when recorded */
    struct qkv_tensor *dying_next; /* internal: the release worklist */
    struct qkv__tensor_debug *debug; /* internal: where it was made, in checked mode */
    struct qkv__grad_hooks *grad_hooks; /* internal: a leaf's gradient hooks (autograd.h) */
} qkv_tensor;

/* Expands to `ndim, shape` for the creation functions: qkv_zeros(QKV_F32, QKV_SHAPE(2, 3)). */
#define QKV_SHAPE(...) \
    (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]){__VA_ARGS__}

/* ---- Errors ------------------------------------------------------------------------------ */

const char *qkv_error(void);          /* first error since the last clear, or NULL */
void qkv_clear_error(void);
/* Records an error unless one is already recorded. printf-style. Returns NULL for chaining. */
void *qkv_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Writes "[2,3,4]" for a tensor's shape into buf; returns buf. */
char *qkv_shape_str(const qkv_tensor *t, char *buf, size_t size);

/* ---- Lifetime ---------------------------------------------------------------------------- */

/* A release drops one of the caller's references: one from qkv_retain, from a result made with
 * no scope open, or from qkv_keep out of the outermost scope. Releasing a tensor that a scope
 * owns (and that you did not retain), or one only the library holds (a module's parameter, a
 * gradient), is refused with an error and changes nothing. Lifetime mistakes are errors, never
 * aborts: qkv_scope_end or qkv_keep with no scope open, and more than 128 scopes open at once
 * (the tensors of deeper levels then go to the 128th). docs/robustness.md lists the messages. */
void qkv_scope_begin(void);
/* qkv_scope_begin(), recording the file and line that opened the scope: an unbalanced scope is
 * reported with them (see qkv_debug). */
void qkv_scope_begin_at(const char *file, int line);
#define qkv_scope_begin() qkv_scope_begin_at(__FILE__, __LINE__)
void qkv_scope_end(void);               /* releases every tensor the innermost scope still owns */
int qkv_scope_depth(void);
qkv_tensor *qkv_retain(qkv_tensor *t);  /* adds a reference the caller must release */
void qkv_release(qkv_tensor *t);        /* drops one of the caller's references; NULL is
                                           ignored */
qkv_tensor *qkv_keep(qkv_tensor *t);    /* moves t out of the innermost scope to the enclosing
                                           scope (or to the caller when there is none) */
qkv_tensor *qkv_scope_end_keep(qkv_tensor *t); /* qkv_keep(t), then qkv_scope_end(); t */

/* Evaluates expr in a scope of its own that keeps only expr's result: whatever expr made on
 * the way is freed at once rather than at the end of the enclosing scope (a graph node still
 * holds what its backward reads). For forwards whose intermediates are large:
 *     h = QKV_SCOPED(qkv_gelu(qkv_linear_forward(l1, x), false));  */
#define QKV_SCOPED(expr) (qkv_scope_begin(), qkv_scope_end_keep(expr))

/* ---- Memory ------------------------------------------------------------------------------ */

typedef struct qkv_memory_stats {
    size_t bytes_in_use;     /* tensor storage and graph bookkeeping handed out */
    size_t peak_bytes;       /* the largest bytes_in_use seen */
    size_t cached_bytes;     /* freed blocks kept for reuse */
    uint64_t allocs;         /* requests served */
    uint64_t cache_hits;     /* requests served from the cache */
    uint64_t system_allocs;  /* requests that went to the system allocator */
    uint64_t live_tensors;   /* tensor objects not yet freed */
} qkv_memory_stats;

qkv_memory_stats qkv_memory_stats_get(void);
void qkv_memory_reset_peak(void);
void qkv_memory_trim(void);  /* returns cached blocks to the system */

/* Test switch: the n-th allocation from now on (1-based) fails; 0 turns it off. */
void qkv_debug_fail_alloc_at(uint64_t n);
uint64_t qkv_debug_alloc_count(void); /* allocations requested since the switch was set */

/* ---- Checked mode ------------------------------------------------------------------------ */

/* Off by default; on with QKV_DEBUG=1 in the environment or qkv_debug(true), best before the
 * first tensor is made. Every tensor made while it is on records the op that made it and a
 * serial number; a freed one is filled with a pattern, marked freed and kept out of reuse
 * (the last 65536 of them), so that an op handed it fails with an error naming where it was
 * made and what freed it, instead of reading another tensor's values. At exit the tensors
 * still alive and the scopes still open are listed on stderr. docs/guide.md has its cost. */
void qkv_debug(bool on);
bool qkv_is_debug(void);
/* Writes the tensors alive (made in checked mode) and the scopes this thread has open, as the
 * exit report does; returns how many of both. Writes nothing when there are none. */
size_t qkv_debug_report(FILE *f);

/* ---- Creation ---------------------------------------------------------------------------- */

const char *qkv_dtype_name(qkv_dtype dtype);   /* "f32", "f64", "i64", "bool", "bf16" */
size_t qkv_dtype_size(qkv_dtype dtype);

/* bfloat16 is the top half of a float32. To it: rounded to nearest, ties to even; subnormals
 * kept; values past the largest finite bf16 (after rounding) become inf; every NaN becomes
 * 0xFFFF, a quiet NaN, as PyTorch's tensor conversion (`.to(torch.bfloat16)`) gives. From it:
 * exact. Other dtypes convert to and from BF16 through F32 (an F64 is first rounded to F32). */
uint16_t qkv_f32_to_bf16(float value);
float qkv_bf16_to_f32(uint16_t bits);

qkv_tensor *qkv_empty(qkv_dtype dtype, int ndim, const int64_t *shape);
qkv_tensor *qkv_zeros(qkv_dtype dtype, int ndim, const int64_t *shape);
qkv_tensor *qkv_ones(qkv_dtype dtype, int ndim, const int64_t *shape);
qkv_tensor *qkv_full(qkv_dtype dtype, int ndim, const int64_t *shape, double value);
qkv_tensor *qkv_scalar(qkv_dtype dtype, double value);            /* 0-d tensor */
/* [start, end) by step, like torch.arange; length ceil((end - start) / step). */
qkv_tensor *qkv_arange(qkv_dtype dtype, double start, double end, double step);
/* Copies numel elements of the given dtype from data (row-major). */
qkv_tensor *qkv_from_array(qkv_dtype dtype, int ndim, const int64_t *shape, const void *data);
qkv_tensor *qkv_empty_like(const qkv_tensor *t);
qkv_tensor *qkv_zeros_like(const qkv_tensor *t);
qkv_tensor *qkv_ones_like(const qkv_tensor *t);

/* ---- Random numbers ----------------------------------------------------------------------- */

/* PCG32 (O'Neill, XSH-RR output, 64-bit LCG state, multiplier 6364136223846793005) seeded by
 * SplitMix64 of the seed. Uniform floats take the top 24 (F32) or 53 (F64) bits; normals use
 * Box-Muller in double precision. Numbers are drawn serially in row-major order, so they are
 * the same on every platform and for every thread count. */
typedef struct qkv_generator {
    uint64_t state;
    uint64_t inc;
} qkv_generator;

void qkv_generator_init(qkv_generator *g, uint64_t seed);
uint32_t qkv_generator_next_u32(qkv_generator *g);
double qkv_generator_uniform(qkv_generator *g);            /* [0, 1), 53 bits */
double qkv_generator_normal(qkv_generator *g);             /* N(0, 1) */
uint64_t qkv_generator_below(qkv_generator *g, uint64_t n); /* uniform in [0, n), unbiased */

qkv_tensor *qkv_rand(qkv_dtype dtype, int ndim, const int64_t *shape, qkv_generator *g);
qkv_tensor *qkv_randn(qkv_dtype dtype, int ndim, const int64_t *shape, qkv_generator *g);
/* Uniform in [low, high) over the given range; result is I64. */
qkv_tensor *qkv_randint(int64_t low, int64_t high, int ndim, const int64_t *shape,
                        qkv_generator *g);

/* ---- Access ------------------------------------------------------------------------------ */

bool qkv_is_contiguous(const qkv_tensor *t);
/* Pointer to the first element (storage data + offset); valid while the tensor lives. */
void *qkv_data(const qkv_tensor *t);
/* The value of a one-element tensor as a double; NAN and an error otherwise. */
double qkv_item(const qkv_tensor *t);
/* The element at a full index (negative indices count from the end). */
double qkv_get(const qkv_tensor *t, const int64_t *index);
/* Copies the elements in row-major order to dst, converted to dtype. Returns false on error. */
bool qkv_copy_out(const qkv_tensor *t, qkv_dtype dtype, void *dst);
/* Fills every element of t (through its strides) with value; in place, not recorded. Both
 * refuse a destination of which two elements share memory (an expanded view, with stride 0 on
 * an axis longer than 1), as torch does: clone it first. */
bool qkv_fill_(qkv_tensor *t, double value);
/* Copies src into dst elementwise (same shape; src may broadcast); in place, not recorded. */
bool qkv_copy_(qkv_tensor *dst, const qkv_tensor *src);
/* How many times t's storage has been written in place: every function of the library that
 * changes values in place (qkv_fill_, qkv_copy_, qkv_dropout_, the init schemes, optimizer
 * steps, module dtype conversions, checkpoint loads) adds one, for t and every view sharing
 * its storage. A backward that reads a value saved by its forward fails when the value's
 * version has moved since; a cache computed from t can compare versions to know it is stale.
 * Writes through qkv_data() are not counted. 0 for NULL. */
uint64_t qkv_version(const qkv_tensor *t);

/* ---- Printing ---------------------------------------------------------------------------- */

/* Like PyTorch's repr: "tensor([[1., 2.], [3., 4.]], dtype=f32, shape=[2,2])". A tensor of
 * more than 1000 elements shows 3 items at each end of every dimension longer than 6. The
 * string is malloc'd; free it with free(). */
char *qkv_to_string(const qkv_tensor *t);
void qkv_print(const qkv_tensor *t);
void qkv_fprint(FILE *f, const qkv_tensor *t);

/* ---- Threads ----------------------------------------------------------------------------- */

void qkv_set_num_threads(int n); /* kernels use up to n threads (OpenMP builds); n <= 0: all */
int qkv_get_num_threads(void);

#ifdef __cplusplus
}
#endif
#endif
