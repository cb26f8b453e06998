/*
 * The element-wise part of a qkv-lm training step, op by op, at the shapes of `make bench-lm`
 * (batch 8, context 256, dim 128, 4 heads, ffn 344): the causal softmax kernels over the
 * attention scores [8,4,256,256] against the full-row ones, forward and backward, and SwiGLU's
 * gate silu(a) * b [8,256,344], forward and forward + backward, as the one op qkv_silu_mul
 * against the composition qkv_mul(qkv_silu(a), b). Each figure is the median of repetitions,
 * the two variants of a pair alternating, in milliseconds per call.
 *
 * Usage: bench/lm_ops [threads]   (default: 1)
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "qkv.h"
#include "tensor/tensor_internal.h"
#include "timing.h"

enum { REPS = 21 };

/* The operands of a timed call; a call returns false on error. */
typedef struct operands {
    qkv_tensor *x, *y, *g;
} operands;
typedef bool (*call_fn)(const operands *o);

/* Seconds of one call in a scope of its own; the inputs' gradients are dropped after it, so
 * that each call makes them anew. */
static double run_once(call_fn f, const operands *o) {
    qkv_scope_begin();
    double t0 = bench_now();
    bool ok = f(o);
    double t = bench_now() - t0;
    qkv_scope_end();
    qkv_zero_grad(o->x);
    qkv_zero_grad(o->y);
    if (!ok) {
        fprintf(stderr, "lm_ops: %s\n", qkv_error() ? qkv_error() : "failed");
        exit(1);
    }
    return t;
}

/* Median milliseconds of two variants over REPS rounds, alternating. */
static void time_pair(const char *what, const char *const names[2], const call_fn f[2],
                      const operands *o) {
    double t[2][REPS];
    for (int v = 0; v < 2; v++) run_once(f[v], o); /* warm the allocator's cache */
    for (int r = 0; r < REPS; r++)
        for (int v = 0; v < 2; v++) t[v][r] = run_once(f[v], o);
    for (int v = 0; v < 2; v++) {
        qsort(t[v], REPS, sizeof t[v][0], bench_by_value);
        printf("  %-30s %-24s %8.3f ms\n", what, names[v], 1e3 * t[v][REPS / 2]);
    }
}

static bool causal(const operands *o) {
    return qkv__softmax_causal(o->x, 0, "causal") != NULL;
}
static bool full(const operands *o) {
    return qkv__softmax(o->x, -1, false, "full") != NULL;
}
static bool causal_backward(const operands *o) {
    return qkv__softmax_causal_backward(o->y, o->g, 0, "causal backward") != NULL;
}
static bool full_backward(const operands *o) {
    return qkv__softmax_backward(o->y, o->g, false, "full backward") != NULL;
}
static bool fused_gate(const operands *o) {
    return qkv_silu_mul(o->x, o->y) != NULL;
}
static bool composed_gate(const operands *o) {
    return qkv_mul(qkv_silu(o->x), o->y) != NULL;
}
static bool fused_gate_backward(const operands *o) {
    return qkv_backward_with(qkv_silu_mul(o->x, o->y), o->g, false);
}
static bool composed_gate_backward(const operands *o) {
    return qkv_backward_with(qkv_mul(qkv_silu(o->x), o->y), o->g, false);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    qkv_set_num_threads(threads);
    qkv_generator g;
    qkv_generator_init(&g, 1);
    printf("== element-wise ops of a qkv-lm step, %d thread(s), median of %d\n", threads, REPS);
    operands s = {.x = qkv_randn(QKV_F32, QKV_SHAPE(8, 4, 256, 256), &g),
                  .g = qkv_randn(QKV_F32, QKV_SHAPE(8, 4, 256, 256), &g)};
    s.y = qkv__softmax_causal(s.x, 0, "causal");
    const char *const softmax_names[] = {"causal", "full row"};
    time_pair("softmax [8,4,256,256]", softmax_names, (const call_fn[]){causal, full}, &s);
    time_pair("softmax backward", softmax_names,
              (const call_fn[]){causal_backward, full_backward}, &s);
    operands ab = {
        .x = qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(8, 256, 344), &g), true),
        .y = qkv_requires_grad_(qkv_randn(QKV_F32, QKV_SHAPE(8, 256, 344), &g), true),
        .g = qkv_randn(QKV_F32, QKV_SHAPE(8, 256, 344), &g),
    };
    const char *const gate_names[] = {"qkv_silu_mul", "qkv_mul(qkv_silu(a), b)"};
    time_pair("silu(a) * b [8,256,344]", gate_names,
              (const call_fn[]){fused_gate, composed_gate}, &ab);
    time_pair("silu(a) * b + backward", gate_names,
              (const call_fn[]){fused_gate_backward, composed_gate_backward}, &ab);
    qkv_tensor *all[] = {s.x, s.y, s.g, ab.x, ab.y, ab.g};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++) qkv_release(all[k]);
    return 0;
}
