/*
 * The caching allocator. Every allocation of the library comes here, so that
 *  - steady-state training reuses blocks instead of going to the system (glibc serves large
 *    blocks with mmap, and the page faults of fresh mappings on every step would dominate
 *    small models);
 *  - the counters in qkv_memory_stats can prove it;
 *  - a test can make any single allocation fail (qkv_debug_fail_alloc_at).
 * Sizes are rounded up to classes: multiples of 64 bytes up to 1 KiB, then four classes per
 * power of two (at most 25% slack). Freed blocks wait in a free list per class.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "tensor/tensor_internal.h"

#define SMALL_LIMIT 1024
#define N_CLASSES (16 + 4 * 54)

typedef struct free_block {
    struct free_block *next;
} free_block;

static free_block *free_lists[N_CLASSES];
static qkv_memory_stats stats;
static uint64_t fail_at;
static uint64_t alloc_count;
static atomic_flag lock = ATOMIC_FLAG_INIT;

static void lock_acquire(void) {
    while (atomic_flag_test_and_set_explicit(&lock, memory_order_acquire)) {
    }
}

static void lock_release(void) {
    atomic_flag_clear_explicit(&lock, memory_order_release);
}

static int size_class(size_t n, size_t *class_size) {
    if (n <= SMALL_LIMIT) {
        size_t c = n <= 64 ? 1 : (n + 63) / 64;
        *class_size = c * 64;
        return (int)c - 1;
    }
    int e = 63 - __builtin_clzll((unsigned long long)(n - 1)); /* 2^e < n <= 2^(e+1) */
    size_t base = (size_t)1 << e, step = base >> 2;
    size_t q = (n - base + step - 1) / step; /* 1..4 */
    *class_size = base + q * step;
    return 16 + (e - 10) * 4 + (int)q - 1;
}

void *qkv__alloc(size_t nbytes) {
    size_t csize;
    int c = size_class(nbytes ? nbytes : 1, &csize);
    lock_acquire();
    alloc_count++;
    if (fail_at && alloc_count == fail_at) {
        lock_release();
        return qkv_set_error("qkv: out of memory allocating %zu bytes", nbytes);
    }
    stats.allocs++;
    free_block *b = c < N_CLASSES ? free_lists[c] : NULL;
    if (b) {
        free_lists[c] = b->next;
        stats.cache_hits++;
        stats.cached_bytes -= csize;
    }
    lock_release();
    if (!b) {
        b = aligned_alloc(64, csize);
        if (!b) return qkv_set_error("qkv: out of memory allocating %zu bytes", nbytes);
        lock_acquire();
        stats.system_allocs++;
        lock_release();
    }
    lock_acquire();
    stats.bytes_in_use += csize;
    if (stats.bytes_in_use > stats.peak_bytes) stats.peak_bytes = stats.bytes_in_use;
    lock_release();
    return b;
}

void *qkv__calloc(size_t nbytes) {
    void *p = qkv__alloc(nbytes);
    if (p) memset(p, 0, nbytes);
    return p;
}

void qkv__free(void *p, size_t nbytes) {
    if (!p) return;
    size_t csize;
    int c = size_class(nbytes ? nbytes : 1, &csize);
    lock_acquire();
    stats.bytes_in_use -= csize;
    if (c < N_CLASSES) {
        free_block *b = p;
        b->next = free_lists[c];
        free_lists[c] = b;
        stats.cached_bytes += csize;
        p = NULL;
    }
    lock_release();
    free(p);
}

bool qkv__reserve(void **ptr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t ncap = *cap ? *cap : 16;
    while (ncap < need) ncap *= 2;
    void *np = qkv__alloc(ncap * elem);
    if (!np) return false;
    if (*ptr) {
        memcpy(np, *ptr, *cap * elem);
        qkv__free(*ptr, *cap * elem);
    }
    *ptr = np;
    *cap = ncap;
    return true;
}

qkv_memory_stats qkv_memory_stats_get(void) {
    lock_acquire();
    qkv_memory_stats s = stats;
    lock_release();
    return s;
}

void qkv__count_tensor(int delta) {
    lock_acquire();
    stats.live_tensors += (uint64_t)(int64_t)delta;
    lock_release();
}

void qkv_memory_reset_peak(void) {
    lock_acquire();
    stats.peak_bytes = stats.bytes_in_use;
    lock_release();
}

void qkv_memory_trim(void) {
    lock_acquire();
    for (int c = 0; c < N_CLASSES; c++) {
        free_block *b = free_lists[c];
        free_lists[c] = NULL;
        while (b) {
            free_block *next = b->next;
            free(b);
            b = next;
        }
    }
    stats.cached_bytes = 0;
    lock_release();
}

void qkv_debug_fail_alloc_at(uint64_t n) {
    lock_acquire();
    fail_at = n;
    alloc_count = 0;
    lock_release();
}

uint64_t qkv_debug_alloc_count(void) {
    lock_acquire();
    uint64_t n = alloc_count;
    lock_release();
    return n;
}
