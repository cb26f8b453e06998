/*
 * The caching allocator. Every allocation of the library comes here, so that
 *  - steady-state training reuses memory instead of going to the system (glibc serves large
 *    blocks with mmap, and the page faults of fresh mappings on every step would dominate
 *    small models);
 *  - the counters in qkv_memory_stats can prove it;
 *  - a test can make any single allocation fail (qkv_debug_fail_alloc_at).
 *
 * Small blocks (under LARGE_MIN) are rounded up to classes: multiples of 64 bytes up to 1 KiB,
 * then four classes per power of two (at most 25% slack). Freed ones wait in a stack per
 * class, kept outside the blocks so that a free block holds nothing the library reads (under
 * AddressSanitizer it is poisoned whole, and LeakSanitizer still sees it held).
 *
 * Large blocks (tensor storage, mostly) are cut from arenas: big regions reserved from the
 * system whose pages become resident only when first used. A request takes the smallest free
 * range that fits; freed ranges merge with free neighbours. So memory freed by one shape
 * serves another: a forward's [B,T,4D] activations and a backward's [B,H,T,T] gradients reuse
 * the same pages, where per-size free lists would each keep their own high-water mark.
 * Only a request served from pages never used before counts as a system allocation.
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* madvise */
#endif
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "tensor/tensor_internal.h"

/* Under AddressSanitizer, free memory (arena ranges and small blocks waiting in their free
 * lists) and the slack past a block's bytes are poisoned, so an overflow or a use after free
 * of memory the cache holds is still caught. */
#if defined(__SANITIZE_ADDRESS__)
#define QKV_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QKV_ASAN 1
#endif
#endif
#ifdef QKV_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define SMALL_LIMIT 1024
#define N_CLASSES (16 + 4 * 54)
#define LARGE_MIN ((size_t)64 << 10)    /* blocks this large and more come from arenas */
#define PAGE ((size_t)4096)             /* large blocks are whole pages */
#define ARENA_BYTES ((size_t)256 << 20) /* address space reserved per arena */
#define MAX_ARENAS 64

typedef struct block_stack {
    void **items;
    size_t n, cap;
} block_stack;

typedef struct arena {
    char *base, *top, *end;  /* [base, top) has been handed out at least once */
} arena;

typedef struct range {
    char *start;
    size_t size;
} range;

static block_stack free_lists[N_CLASSES];
static arena arenas[MAX_ARENAS];
static int n_arenas;
typedef struct range_list {
    range *items;            /* by address, never adjacent */
    size_t n, cap;
} range_list;

static range_list resident;  /* free ranges whose pages are in memory */
static range_list released;  /* free ranges whose pages qkv_memory_trim gave back */
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

/* ---- Large blocks ------------------------------------------------------------------------ */
/* All with the lock held. */

static size_t large_size(size_t nbytes) {
    return (nbytes + PAGE - 1) & ~(PAGE - 1);
}

static void remove_range(range_list *l, size_t i) {
    memmove(l->items + i, l->items + i + 1, (l->n - i - 1) * sizeof *l->items);
    l->n--;
}

/* Takes size bytes from the smallest range of l that holds them (the lowest on ties). */
static char *take_from(range_list *l, size_t size) {
    size_t best = l->n;
    for (size_t i = 0; i < l->n; i++)
        if (l->items[i].size >= size && (best == l->n || l->items[i].size < l->items[best].size))
            best = i;
    if (best == l->n) return NULL;
    range *r = &l->items[best];
    char *p = r->start;
    if (r->size == size) {
        remove_range(l, best);
    } else {
        r->start += size;
        r->size -= size;
    }
    return p;
}

/* Takes size bytes at the used end of an arena: from a free range that ends there, extended
 * into pages never used, or from those alone. */
static char *take_fresh(size_t size) {
    for (int a = 0; a < n_arenas; a++) {
        arena *ar = &arenas[a];
        size_t last = resident.n;
        for (size_t i = 0; i < resident.n && last == resident.n; i++)
            if (resident.items[i].start + resident.items[i].size == ar->top) last = i;
        size_t have = last < resident.n ? resident.items[last].size : 0;
        if ((size_t)(ar->end - ar->top) < size - have) continue;
        char *p = ar->top - have;
        ar->top = p + size;
        if (last < resident.n) {
            stats.cached_bytes -= have;
            remove_range(&resident, last);
        }
        return p;
    }
    if (n_arenas == MAX_ARENAS) return NULL;
    size_t bytes = size > ARENA_BYTES ? size : ARENA_BYTES;
    char *base = aligned_alloc(PAGE, bytes);
    if (!base) return NULL;
    POISON(base, bytes);
    arenas[n_arenas++] = (arena){base, base + size, base + bytes};
    return base;
}

/* fresh: whether the block's pages were not in memory (a system allocation, in the stats) */
static void *large_alloc(size_t size, bool *fresh) {
    char *p = take_from(&resident, size);
    *fresh = !p;
    if (p) stats.cached_bytes -= size;
    else if (!(p = take_from(&released, size))) p = take_fresh(size);
    return p;
}

/* Adds [p, p + size) to l, merged with its neighbours; false if l cannot grow. */
static bool add_range(range_list *l, char *p, size_t size) {
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (l->items[mid].start < p) lo = mid + 1;
        else hi = mid;
    }
    bool left = lo > 0 && l->items[lo - 1].start + l->items[lo - 1].size == p;
    bool right = lo < l->n && p + size == l->items[lo].start;
    if (left && right) {
        l->items[lo - 1].size += size + l->items[lo].size;
        remove_range(l, lo);
    } else if (left) {
        l->items[lo - 1].size += size;
    } else if (right) {
        l->items[lo].start = p;
        l->items[lo].size += size;
    } else {
        if (l->n == l->cap) {
            size_t cap = l->cap ? 2 * l->cap : 256;
            range *r = realloc(l->items, cap * sizeof *r);
            if (!r) return false;
            l->items = r;
            l->cap = cap;
        }
        memmove(l->items + lo + 1, l->items + lo, (l->n - lo) * sizeof *l->items);
        l->items[lo] = (range){p, size};
        l->n++;
    }
    return true;
}

/* A range that cannot be recorded stays unused until its arena is freed. */
static void large_free(char *p, size_t size) {
    POISON(p, size);
    if (add_range(&resident, p, size)) stats.cached_bytes += size;
}

/* Frees every arena nothing is cut from any more, and gives the pages of the other free
 * ranges back to the system (they stay reserved, to be used again). */
static void trim_arenas(void) {
    for (int a = n_arenas - 1; a >= 0; a--) {
        arena ar = arenas[a];
        size_t used = (size_t)(ar.top - ar.base), free_bytes = 0;
        range_list *lists[2] = {&resident, &released};
        for (int k = 0; k < 2; k++)
            for (size_t i = 0; i < lists[k]->n; i++)
                if (lists[k]->items[i].start >= ar.base && lists[k]->items[i].start < ar.end)
                    free_bytes += lists[k]->items[i].size;
        if (free_bytes != used) continue;
        for (int k = 0; k < 2; k++)
            for (size_t i = lists[k]->n; i > 0; i--)
                if (lists[k]->items[i - 1].start >= ar.base &&
                    lists[k]->items[i - 1].start < ar.end)
                    remove_range(lists[k], i - 1);
        UNPOISON(ar.base, (size_t)(ar.end - ar.base));
        free(ar.base);
        arenas[a] = arenas[--n_arenas];
    }
#ifdef MADV_DONTNEED
    while (resident.n) {
        range r = resident.items[resident.n - 1];
        if (!add_range(&released, r.start, r.size)) break;
        madvise(r.start, r.size, MADV_DONTNEED);
        resident.n--;
    }
#endif
}

/* ---- Small blocks ------------------------------------------------------------------------ */

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

/* The size of class c's blocks: size_class's inverse. */
static size_t class_bytes(int c) {
    if (c < 16) return (size_t)(c + 1) * 64;
    size_t base = (size_t)1 << ((c - 16) / 4 + 10);
    return base + (size_t)((c - 16) % 4 + 1) * (base >> 2);
}

void *qkv__alloc(size_t nbytes) {
    size_t csize;
    int c = size_class(nbytes ? nbytes : 1, &csize);
    bool large = csize >= LARGE_MIN;
    if (large) csize = large_size(nbytes);
    lock_acquire();
    alloc_count++;
    if (fail_at && alloc_count == fail_at) {
        lock_release();
        return qkv_set_error("qkv: out of memory allocating %zu bytes", nbytes);
    }
    stats.allocs++;
    void *b = NULL;
    bool fresh = true;
    if (large) {
        b = large_alloc(csize, &fresh);
    } else if (c < N_CLASSES && free_lists[c].n) {
        b = free_lists[c].items[--free_lists[c].n];
        stats.cached_bytes -= csize;
        fresh = false;
    }
    if (b) {
        stats.bytes_in_use += csize;
        if (stats.bytes_in_use > stats.peak_bytes) stats.peak_bytes = stats.bytes_in_use;
        if (fresh) stats.system_allocs++;
        else stats.cache_hits++;
    }
    lock_release();
    if (b) UNPOISON(b, nbytes);
    if (b || large) return b ? b : qkv_set_error("qkv: out of memory allocating %zu bytes",
                                                 nbytes);
    b = aligned_alloc(64, csize);
    if (!b) return qkv_set_error("qkv: out of memory allocating %zu bytes", nbytes);
    POISON((char *)b + nbytes, csize - nbytes);
    lock_acquire();
    stats.system_allocs++;
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

/* False when the stack cannot grow: the block then goes back to the system. */
static bool push_block(block_stack *s, void *p) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        void **items = realloc(s->items, cap * sizeof *items);
        if (!items) return false;
        s->items = items;
        s->cap = cap;
    }
    s->items[s->n++] = p;
    return true;
}

void qkv__free(void *p, size_t nbytes) {
    if (!p) return;
    size_t csize;
    int c = size_class(nbytes ? nbytes : 1, &csize);
    lock_acquire();
    if (csize >= LARGE_MIN) {
        csize = large_size(nbytes);
        stats.bytes_in_use -= csize;
        large_free(p, csize);
        lock_release();
        return;
    }
    stats.bytes_in_use -= csize;
    if (c < N_CLASSES && push_block(&free_lists[c], p)) {
        stats.cached_bytes += csize;
        POISON(p, csize);
        p = NULL;
    }
    lock_release();
    if (p) UNPOISON(p, csize);
    free(p);
}

void qkv__forget(void *p, size_t nbytes) {
    size_t csize;
    size_class(nbytes ? nbytes : 1, &csize);
    lock_acquire();
    stats.bytes_in_use -= csize;
    lock_release();
    UNPOISON(p, csize);
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
        block_stack *st = &free_lists[c];
        for (size_t i = 0; i < st->n; i++) {
            UNPOISON(st->items[i], class_bytes(c));
            free(st->items[i]);
        }
        st->n = 0;
    }
    trim_arenas();
    stats.cached_bytes = 0;
    for (size_t i = 0; i < resident.n; i++) stats.cached_bytes += resident.items[i].size;
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
