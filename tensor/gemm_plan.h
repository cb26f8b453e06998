/*
 * How a GEMM's work is cut for threads, shared by the F32/F64 GEMM (tensor/gemm.c) and the
 * BF16 one (tensor/gemm_bf16.c) so that both split the same way: whole batch entries, then
 * ranges of rows or columns on panel boundaries, never k.
 */
#ifndef QKV_GEMM_PLAN_H
#define QKV_GEMM_PLAN_H

#include <stdbool.h>
#include <stdint.h>

#include "tensor/tensor_internal.h"

/* How the work is cut for threads: tasks = batch * parts, each part a range of rows (or
 * columns) of one batch entry. Only the cut depends on the thread count; the arithmetic
 * for one element does not. Tasks are handed to threads in contiguous runs (schedule(static))
 * unless `dynamic`: see gemm_plan_make. */
typedef struct gemm_plan {
    int threads;
    int64_t parts, tasks;
    bool split_m;
    bool dynamic; /* hand tasks out as threads free up (schedule(dynamic, 1)) */
} gemm_plan;

static inline int64_t gemm_gcd(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* A part smaller than this many rows (or columns) is not worth its own task unless the
 * threads need it: every part packs all of the other operand again, one packed element per
 * row (or column) of the part's multiply-adds. Parts of 128 columns made a weight gradient
 * (256 x 768, k = 4096) a tenth slower on 2 threads than parts of 384. */
#define GEMM_MIN_PART 256

static inline gemm_plan gemm_plan_make(int64_t batch, int64_t m, int64_t n, int64_t k,
                                       int mr, int nr, bool uneven) {
    gemm_plan plan = {.threads = 1, .parts = 1, .tasks = batch, .split_m = true};
    /* A GEMM does about 16 multiply-adds per cycle against a few for element-wise kernels,
     * so scale its work down before asking how many threads it is worth. */
    double fmas = (double)batch * (double)m * (double)n * (double)k;
    int threads = qkv__threads_for(fmas / 16 > 1e15 ? (int64_t)1e15 : (int64_t)(fmas / 16));
    if (threads <= 1) return plan;
    /* Splitting rows repacks all of B in every part, splitting columns all of A: split the
     * larger side. */
    int64_t m_panels = (m + mr - 1) / mr, n_panels = (n + nr - 1) / nr;
    plan.split_m = m >= n;
    int64_t len = plan.split_m ? m : n, panels = plan.split_m ? m_panels : n_panels;
    /* Parts per entry: enough that the tasks divide evenly among the threads. Each thread
     * then runs one contiguous run of tasks, and so the same rows of every product, as the
     * element-wise kernels (qkv__pieces) do: what one op writes, the next reads from the same
     * core's cache, not the other's. Handing out smaller tasks as threads free up made the
     * 2-thread enc2 step up to 8% slower on Zen 4. Only a triangular product (uneven), whose
     * parts of one entry differ in work, is cut into a few tasks per thread handed out so. */
    int64_t even = threads / gemm_gcd(batch, threads), parts = even;
    while (uneven && batch * parts < 4 * threads) parts *= 2;
    /* The cap keeps the parts a multiple of even: of 3 tasks on 2 threads, one thread
     * idles while the other runs the third. */
    int64_t most = len / GEMM_MIN_PART / even * even;
    if (parts > most) parts = most;
    if (parts < even) parts = even;
    if (parts > panels) {
        int64_t other = plan.split_m ? n_panels : m_panels;
        if (other > panels) {
            plan.split_m = !plan.split_m;
            panels = other;
        }
        if (parts > panels) parts = panels;
    }
    plan.parts = parts;
    plan.tasks = batch * parts;
    plan.dynamic = uneven && parts > 1;
    plan.threads = plan.tasks < threads ? (int)plan.tasks : threads;
    return plan;
}

/* Rows (or columns) of part `part` of `parts`, cut on panel boundaries of `step`. */
static inline void gemm_part_range(int64_t len, int64_t step, int64_t parts, int64_t part,
                            int64_t *lo, int64_t *hi) {
    int64_t panels = (len + step - 1) / step;
    int64_t p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
    *lo = p0 * step;
    *hi = p1 * step < len ? p1 * step : len;
}

/* Task t of the plan: batch entry *p, and the rows m0..m1 and columns n0..n1 of its C that the
 * task computes (a range of one of the two, the whole of the other). */
static inline void gemm_plan_task(const gemm_plan *plan, int64_t t, int64_t m, int64_t n,
                                  int mr, int nr, int64_t *p, int64_t *m0, int64_t *m1,
                                  int64_t *n0, int64_t *n1) {
    int64_t part = t % plan->parts;
    *p = t / plan->parts;
    *m0 = 0;
    *m1 = m;
    *n0 = 0;
    *n1 = n;
    if (plan->split_m)
        gemm_part_range(m, mr, plan->parts, part, m0, m1);
    else
        gemm_part_range(n, nr, plan->parts, part, n0, n1);
}

#endif
