/*
 * The dropout kernel (tensor/dropout.c) alone: the forward, which draws the mask and applies
 * it, saving the mask as autograd does, and the backward's product of a gradient with the
 * saved mask. Sizes: 64K elements (in L2: the kernel's arithmetic) and 4M (the FFN dropout of
 * bench/enc2, 16 MB in f32: memory traffic), in f32, bf16 and f64, out of place and in place.
 * Each figure is the median of --reps timed calls, in nanoseconds per element, at the thread
 * count given (default 1).
 *
 * Usage: bench/dropout [--threads N] [--reps R]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tensor/tensor_internal.h"
#include "timing.h"

/* Median ns per element of the forward (with its mask saved) and of the mask's product. */
static void time_kernel(qkv_dtype dtype, int64_t n, bool in_place, int reps) {
    qkv_generator g;
    qkv_generator_init(&g, 1);
    qkv_tensor *x = qkv_retain(qkv_randn(dtype, QKV_SHAPE(n), &g));
    double fwd[reps], bwd[reps];
    for (int r = 0; r < reps; r++) {
        qkv_scope_begin();
        qkv_tensor *mask = NULL;
        double t0 = bench_now();
        qkv_tensor *y = qkv__dropout(x, 0.1, &g, &mask, in_place);
        double t1 = bench_now();
        qkv_tensor *d = qkv__dropout_apply_mask(y, mask, 1 / 0.9, in_place);
        double t2 = bench_now();
        if (!y || !d) {
            fprintf(stderr, "dropout failed: %s\n", qkv_error());
            exit(1);
        }
        fwd[r] = (t1 - t0) * 1e9 / (double)n;
        bwd[r] = (t2 - t1) * 1e9 / (double)n;
        qkv_scope_end();
    }
    static const char *names[] = {[QKV_F32] = "f32", [QKV_F64] = "f64", [QKV_BF16] = "bf16"};
    printf("%-5s n=%-8lld %-12s forward %6.3f ns/elem   apply_mask %6.3f ns/elem\n",
           names[dtype], (long long)n, in_place ? "in place" : "out of place",
           bench_median(fwd, reps), bench_median(bwd, reps));
    qkv_release(x);
}

int main(int argc, char **argv) {
    int threads = 1, reps = 21;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--reps") == 0) reps = atoi(argv[i + 1]);
    }
    if (reps < 1) reps = 1;
    qkv_set_num_threads(threads);
    printf("threads=%d reps=%d\n", threads, reps);
    const qkv_dtype dtypes[] = {QKV_F32, QKV_BF16, QKV_F64};
    const int64_t sizes[] = {1 << 16, 1 << 22};
    for (int s = 0; s < 2; s++)
        for (int d = 0; d < 3; d++)
            for (int ip = 0; ip < 2; ip++) time_kernel(dtypes[d], sizes[s], ip, reps);
    return 0;
}
