/* Thread-count control shared by the kernels; OpenMP when the build has it, else one thread. */
#include "tensor/tensor_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef _OPENMP
static int max_threads = 0; /* 0: not set, use what OpenMP reports */
#endif

void qkv_set_num_threads(int n) {
#ifdef _OPENMP
    max_threads = n > 0 ? n : omp_get_num_procs();
    omp_set_num_threads(max_threads);
#else
    (void)n;
#endif
}

int qkv_get_num_threads(void) {
#ifdef _OPENMP
    return max_threads > 0 ? max_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

/* Below this many element operations a kernel stays on the calling thread: starting a team
 * costs a few microseconds. */
#define QKV_PARALLEL_GRAIN 32768

/* One piece per thread, run with schedule(static): thread t always takes the t-th run of
 * items, the same part of every tensor from one op to the next (docs/internals.md, section
 * 9). */
int64_t qkv__pieces(int64_t items, int threads) {
    if (threads <= 1) return items < 1 ? items : 1;
    return items < threads ? items : threads;
}

int qkv__threads_for(int64_t work) {
    if (work < QKV_PARALLEL_GRAIN) return 1;
    int n = qkv_get_num_threads();
    int64_t useful = work / QKV_PARALLEL_GRAIN;
    return useful < n ? (int)useful : n;
}
