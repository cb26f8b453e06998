/*
 * The measured F32 FMA peak and BF16 dot-product (VDPBF16PS) peak of this machine, at 1 and 2
 * threads (bench/peak.h says how), and their ratio r: the bf16 GEMM's target is 1.7 x the F32
 * GEMM's GFLOP/s, or 0.85 r where r is below 2.
 *
 * Usage: bench/peak [threads...]   (default: 1 2)
 */
#include <stdio.h>

#include "peak.h"

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, n_threads = 2;
    if (argc > 1) {
        n_threads = 0;
        for (int i = 1; i < argc && n_threads < 8; i++) threads[n_threads++] = atoi(argv[i]);
    }
    printf("%-34s %3s %9s\n", "peak (GFLOP/s)", "thr", "measured");
    for (int t = 0; t < n_threads; t++) {
        double f32 = peak_gflops(PEAK_F32, threads[t]);
        double bf16 = peak_gflops(PEAK_BF16, threads[t]);
        printf("%-34s %3d %9.1f\n", "F32 FMA", threads[t], f32);
        if (bf16 > 0) {
            printf("%-34s %3d %9.1f\n", "BF16 VDPBF16PS (lane = 4 flops)", threads[t], bf16);
            printf("%-34s %3d %9.2f\n", "BF16/F32 peak ratio r", threads[t],
                   f32 > 0 ? bf16 / f32 : 0);
        } else {
            printf("%-34s %3d %9s\n", "BF16 VDPBF16PS", threads[t], "none");
        }
        fflush(stdout);
    }
    return 0;
}
