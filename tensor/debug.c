/*
 * The checked mode (QKV_DEBUG=1 or qkv_debug(true)). Every tensor made while it is on gets a
 * record: the op that made it (the outermost op of the library running on this thread, see
 * QKV__OP), a serial number, and a place in the list of live tensors. A freed one is filled
 * with a pattern, marked freed and kept in a quarantine instead of going back to the
 * allocator, so that an op handed it sees the mark and names where it was made and what freed
 * it; only the oldest of QUARANTINE freed tensors are given back. At exit the live tensors and
 * the open scopes are listed on stderr.
 *
 * With the mode off, all of this costs one predictable branch per op.
 */
#include <stdlib.h>
#include <string.h>

#include "tensor/tensor_internal.h"

#define QUARANTINE 65536
#define REPORT_MAX 50 /* tensors listed by name in a report */

struct qkv__tensor_debug {
    const char *made_by;     /* an op's name, or NULL */
    uint64_t serial;         /* 1 for the first tensor made in checked mode */
    const char *freed_by;    /* "qkv_release", "qkv_scope_end", or NULL: the library */
    const char *scope_file;  /* for qkv_scope_end: where that scope was opened */
    int scope_line;
    qkv_tensor *prev, *next; /* the list of live tensors, oldest first */
};

atomic_bool qkv__checked_mode;
static atomic_uint_fast64_t serials;
static _Thread_local const char *maker;
static _Thread_local int op_depth;
static _Thread_local const char *releasing_by;
static _Thread_local const char *releasing_file;
static _Thread_local int releasing_line;

/* The live list and the quarantine, shared by every thread. */
static atomic_flag lock = ATOMIC_FLAG_INIT;
static qkv_tensor *oldest, *newest;
static qkv_tensor **quarantine;
static size_t quarantined, next_slot;

static void lock_acquire(void) {
    while (atomic_flag_test_and_set_explicit(&lock, memory_order_acquire)) {
    }
}

static void lock_release(void) {
    atomic_flag_clear_explicit(&lock, memory_order_release);
}

static void report_at_exit(void) {
    qkv_debug_report(stderr);
}

void qkv_debug(bool on) {
    static atomic_flag registered = ATOMIC_FLAG_INIT;
    if (on && !atomic_flag_test_and_set(&registered)) atexit(report_at_exit);
    atomic_store(&qkv__checked_mode, on);
}

bool qkv_is_debug(void) {
    return qkv__checking();
}

__attribute__((constructor)) static void debug_from_environment(void) {
    const char *v = getenv("QKV_DEBUG");
    if (v && *v && strcmp(v, "0") != 0) qkv_debug(true);
}

const char *qkv__op_enter(const char *op) {
    if (op_depth++ == 0) maker = op;
    return op;
}

void qkv__op_leave(void) {
    if (--op_depth == 0) maker = NULL;
}

void qkv__debug_releasing(const char *by, const char *file, int line) {
    releasing_by = by;
    releasing_file = file;
    releasing_line = line;
}

/* " (made by qkv_add, tensor #12; freed by ...)" for what is known of t. */
static void history(const qkv_tensor *t, bool freed, char *buf, size_t size) {
    const struct qkv__tensor_debug *d = t->debug;
    buf[0] = '\0';
    if (!d) return;
    int n = snprintf(buf, size, " made by %s (tensor #%llu)",
                     d->made_by ? d->made_by : "the library", (unsigned long long)d->serial);
    if (!freed || n < 0 || (size_t)n >= size) return;
    if (d->freed_by && d->scope_file)
        snprintf(buf + n, size - (size_t)n, ", freed by the qkv_scope_end of the scope opened "
                 "at %s:%d", d->scope_file, d->scope_line);
    else if (d->freed_by)
        snprintf(buf + n, size - (size_t)n, ", freed by %s", d->freed_by);
    else
        snprintf(buf + n, size - (size_t)n, ", freed when the library let go of it");
}

char *qkv__describe(const qkv_tensor *t, char *buf, size_t size) {
    char shape[128], more[256];
    qkv_shape_str(t, shape, sizeof shape);
    history(t, false, more, sizeof more);
    snprintf(buf, size, "%s%s", shape, more);
    return buf;
}

void qkv__freed_error(const char *op, const qkv_tensor *t) {
    char more[384];
    history(t, true, more, sizeof more);
    if (more[0])
        qkv_set_error("%s: a freed tensor was passed: it was%s; a tensor lives until its "
                      "scope ends or its last reference is released", op, more);
    else
        qkv_set_error("%s: a freed tensor was passed (QKV_DEBUG=1 names where it was made)",
                      op);
}

bool qkv__check_args(const char *op, int n, const qkv_tensor *const *ts) {
    for (int i = 0; i < n; i++)
        if (ts[i] && ts[i]->magic == QKV__TENSOR_FREED) {
            qkv__freed_error(op, ts[i]);
            return false;
        }
    return true;
}

void qkv__debug_track(qkv_tensor *t) {
    struct qkv__tensor_debug *d = calloc(1, sizeof *d);
    if (!d) return; /* the tensor goes unchecked, nothing worse */
    d->made_by = maker;
    d->serial = atomic_fetch_add(&serials, 1) + 1;
    t->debug = d;
    lock_acquire();
    d->prev = newest;
    if (newest) newest->debug->next = t;
    else oldest = t;
    newest = t;
    lock_release();
}

static void unlink_live(qkv_tensor *t) {
    struct qkv__tensor_debug *d = t->debug;
    if (d->prev) d->prev->debug->next = d->next;
    else oldest = d->next;
    if (d->next) d->next->debug->prev = d->prev;
    else newest = d->prev;
    d->prev = d->next = NULL;
}

/* The tensor object is filled with a pattern but for its geometry (which code ahead of an
 * op's check may read), the mark and its record; its storage, gradient and node are already
 * released. */
void qkv__debug_quarantine(qkv_tensor *t) {
    struct qkv__tensor_debug *d = t->debug;
    /* Out of the live list before the pattern goes in: another thread that links a tensor of
     * its own reads its neighbour's record through the neighbour's debug field. */
    lock_acquire();
    unlink_live(t);
    lock_release();
    d->freed_by = releasing_by;
    d->scope_file = releasing_file;
    d->scope_line = releasing_line;
    qkv_tensor keep = *t;
    memset(t, 0xdb, sizeof *t);
    t->magic = QKV__TENSOR_FREED;
    t->debug = d;
    t->dtype = keep.dtype;
    t->ndim = keep.ndim;
    memcpy(t->shape, keep.shape, sizeof t->shape);
    memcpy(t->strides, keep.strides, sizeof t->strides);
    t->offset = keep.offset;
    t->numel = keep.numel;
    t->storage = NULL;
    t->grad = NULL;
    t->grad_fn = NULL;
    t->requires_grad = false;
    t->retains_grad = false;
    qkv__forget(t, sizeof *t);
    qkv_tensor *evicted = NULL;
    lock_acquire();
    if (!quarantine) quarantine = calloc(QUARANTINE, sizeof *quarantine);
    if (quarantine) {
        evicted = quarantine[next_slot];
        quarantine[next_slot] = t;
        next_slot = (next_slot + 1) % QUARANTINE;
        if (quarantined < QUARANTINE) quarantined++;
    } else {
        evicted = t; /* no room to keep it: given back at once */
    }
    lock_release();
    if (evicted) {
        free(evicted->debug);
        free(evicted);
    }
}

/* "held by you (1), a scope (1), the library (2)" */
static void holders(const qkv_tensor *t, char *buf, size_t size) {
    int lib = t->refcount - t->user_refs - t->scope_refs;
    const char *names[3] = {"you", "a scope", "the library"};
    int counts[3] = {t->user_refs, t->scope_refs, lib};
    size_t used = (size_t)snprintf(buf, size, "held by");
    const char *sep = " ";
    for (int i = 0; i < 3 && used < size; i++) {
        if (counts[i] <= 0) continue;
        used += (size_t)snprintf(buf + used, size - used, "%s%s (%d)", sep, names[i],
                                 counts[i]);
        sep = ", ";
    }
}

size_t qkv_debug_report(FILE *f) {
    size_t scopes = qkv__scope_report(f);
    lock_acquire();
    size_t n = 0;
    for (qkv_tensor *t = oldest; t; t = t->debug->next) n++;
    if (n) fprintf(f, "qkv: %zu tensor%s alive (made in checked mode):\n", n, n == 1 ? "" : "s");
    size_t listed = 0;
    for (qkv_tensor *t = oldest; t && listed < REPORT_MAX; t = t->debug->next, listed++) {
        char what[256], who[128];
        qkv__describe(t, what, sizeof what);
        holders(t, who, sizeof who);
        fprintf(f, "  %s %s, %s\n", qkv_dtype_name(t->dtype), what, who);
    }
    if (n > listed) fprintf(f, "  and %zu more\n", n - listed);
    lock_release();
    return scopes + n;
}
