/* Data for language models: the byte-level and BPE tokenizers (training, ties, round trips of
 * every byte string, their byte format) and the windowed language-model dataset with its
 * shuffled order and train/validation split. Every test runs in its own scope and must leave
 * no tensor alive behind it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qkv.h"

#include "harness.h"

static void assert_error_contains(const char *part) {
    const char *e = qkv_error();
    if (!e || !strstr(e, part)) fail_msg("expected an error containing \"%s\", got \"%s\"", part,
                                         e ? e : "(none)");
    qkv_clear_error();
}

/* encode then decode gives the bytes back, and the ids are within the vocabulary. */
static void assert_round_trip(const qkv_bpe *b, const unsigned char *s, size_t n) {
    int64_t ids[512];
    unsigned char back[512];
    int64_t k = qkv_bpe_encode(b, s, n, ids, 512);
    assert_true(k >= 0 && k <= (int64_t)n && k <= 512);
    for (int64_t i = 0; i < k; i++) assert_true(ids[i] >= 0 && ids[i] < qkv_bpe_vocab_size(b));
    assert_int_equal(qkv_bpe_decode(b, ids, k, back, sizeof back), (int64_t)n);
    if (n) assert_memory_equal(back, s, n);
}

/* ---- Byte-level tokenizer ---------------------------------------------------------------- */

static void byte_tokenizer_ids_are_the_bytes(void **state) {
    (void)state;
    qkv_bpe *b = qkv_bpe_new();
    assert_int_equal(qkv_bpe_vocab_size(b), 256);
    const unsigned char s[] = {'h', 0, 0xff, 0xc3, 0x28, '\n'};
    int64_t ids[6];
    assert_int_equal(qkv_bpe_encode(b, s, sizeof s, ids, 6), 6);
    for (int i = 0; i < 6; i++) assert_int_equal(ids[i], s[i]);
    assert_round_trip(b, s, sizeof s);
    assert_int_equal(qkv_bpe_encode(b, "", 0, ids, 6), 0);
    assert_int_equal(qkv_bpe_decode(b, ids, 0, NULL, 0), 0);
    assert_int_equal(qkv_bpe_decode(b, (int64_t[]){65, 256}, 2, NULL, 0), -1);
    assert_error_contains("qkv_bpe_decode: id 256 at 1 not in [0, 256)");
    qkv_bpe_free(b);
}

/* ---- BPE --------------------------------------------------------------------------------- */

/* Wikipedia's example: "aaabdaaabac" merges aa, then ab (tied at 2 with (aa)a, and (97, 98) is
 * the lower pair), then (aa)(ab); no pair occurs twice after that. */
static void bpe_learns_the_textbook_merges_with_ties_to_the_lowest_pair(void **state) {
    (void)state;
    const char *corpus = "aaabdaaabac";
    qkv_bpe *b = qkv_bpe_train(corpus, strlen(corpus), 10);
    assert_int_equal(qkv_bpe_vocab_size(b), 259);
    size_t n;
    const char *t = qkv_bpe_token(b, 256, &n);
    assert_int_equal(n, 2);
    assert_memory_equal(t, "aa", 2);
    t = qkv_bpe_token(b, 257, &n);
    assert_memory_equal(t, "ab", 2);
    t = qkv_bpe_token(b, 258, &n);
    assert_int_equal(n, 4);
    assert_memory_equal(t, "aaab", 4);
    int64_t ids[16];
    assert_int_equal(qkv_bpe_encode(b, corpus, strlen(corpus), ids, 16), 5);
    int64_t want[] = {258, 'd', 258, 'a', 'c'};
    assert_memory_equal(ids, want, sizeof want);
    /* the count is the whole text's even when cap is smaller */
    assert_int_equal(qkv_bpe_encode(b, corpus, strlen(corpus), ids, 2), 5);
    assert_null(qkv_bpe_token(b, 259, NULL));
    assert_error_contains("qkv_bpe_token: id 259 not in [0, 259)");
    qkv_bpe_free(b);
}

static const char corpus[] =
    "the quick brown fox jumps over the lazy dog; the dog sleeps. "
    "über naïve café — the fox, the dog and the cat. 1234 1234 1234\n"
    "theory of the thing: then there were three the the the\n";

static void bpe_training_is_deterministic(void **state) {
    (void)state;
    qkv_bpe *a = qkv_bpe_train(corpus, sizeof corpus - 1, 40);
    qkv_bpe *b = qkv_bpe_train(corpus, sizeof corpus - 1, 40);
    size_t na = qkv_bpe_to_bytes(a, NULL, 0), nb = qkv_bpe_to_bytes(b, NULL, 0);
    assert_true(na > 24 + 8 * 10 && na <= 24 + 8 * 40); /* stops when no pair occurs twice */
    assert_int_equal(na, nb);
    unsigned char *ba = malloc(na), *bb = malloc(nb);
    assert_int_equal(qkv_bpe_to_bytes(a, ba, na), na);
    assert_int_equal(qkv_bpe_to_bytes(b, bb, nb), nb);
    assert_memory_equal(ba, bb, na);
    int64_t ids[256];
    int64_t k = qkv_bpe_encode(a, corpus, sizeof corpus - 1, ids, 256);
    /* each merge occurred at least twice in the corpus, so each saves at least two ids */
    assert_true(k <= (int64_t)(sizeof corpus - 1) - 2 * (qkv_bpe_vocab_size(a) - 256));
    free(ba);
    free(bb);
    qkv_bpe_free(a);
    qkv_bpe_free(b);
}

static uint32_t next_random(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

/* Random byte strings (any byte, NUL and invalid UTF-8 included, from empty to 300 bytes, some
 * built from pieces of the corpus so that merges apply) decode to themselves. */
static void bpe_round_trips_every_byte_string(void **state) {
    (void)state;
    qkv_bpe *b = qkv_bpe_train(corpus, sizeof corpus - 1, 60);
    uint64_t seed = 15;
    unsigned char s[300];
    for (int iter = 0; iter < 2000; iter++) {
        size_t n = next_random(&seed) % (iter < 10 ? 3 : 301);
        bool text = iter % 2;
        for (size_t i = 0; i < n; i++)
            s[i] = text ? (unsigned char)corpus[next_random(&seed) % 8 + (i % 17) * 8]
                        : (unsigned char)next_random(&seed);
        assert_round_trip(b, s, n);
    }
    qkv_bpe_free(b);
}

static void bpe_saves_and_loads_in_a_checkpoint(void **state) {
    (void)state;
    qkv_bpe *b = qkv_bpe_train(corpus, sizeof corpus - 1, 30);
    size_t n = qkv_bpe_to_bytes(b, NULL, 0);
    unsigned char *buf = malloc(n);
    assert_int_equal(qkv_bpe_to_bytes(b, buf, n), n);
    char path[] = "/tmp/qkv-bpe-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    qkv_named_list empty = {0, NULL, NULL};
    qkv_named_bytes extra = {"tokenizer.bpe", buf, n};
    assert_true(qkv_safetensors_write(path, &empty,
                                      &(qkv_checkpoint_contents){.n_bytes = 1, .bytes = &extra}));
    qkv_safetensors *f = qkv_safetensors_read(path);
    size_t size;
    const void *bytes = qkv_safetensors_bytes(f, "tokenizer.bpe", &size);
    qkv_bpe *c = qkv_bpe_from_bytes(bytes, size);
    assert_non_null(c);
    assert_int_equal(qkv_bpe_vocab_size(c), qkv_bpe_vocab_size(b));
    int64_t ib[256], ic[256];
    int64_t kb = qkv_bpe_encode(b, corpus, sizeof corpus - 1, ib, 256);
    assert_int_equal(qkv_bpe_encode(c, corpus, sizeof corpus - 1, ic, 256), kb);
    assert_memory_equal(ib, ic, (size_t)kb * sizeof *ib);
    qkv_safetensors_free(f);
    remove(path);
    free(buf);
    qkv_bpe_free(b);
    qkv_bpe_free(c);
}

static void bpe_reader_rejects_bad_bytes(void **state) {
    (void)state;
    qkv_bpe *b = qkv_bpe_train("abababab", 8, 2);
    assert_int_equal(qkv_bpe_vocab_size(b), 258); /* ab, then (ab)(ab) */
    unsigned char buf[40];
    assert_int_equal(qkv_bpe_to_bytes(b, buf, sizeof buf), 40);
    assert_null(qkv_bpe_from_bytes(buf, 39));
    assert_error_contains("2 merges need 40 bytes, the buffer has 39");
    assert_null(qkv_bpe_from_bytes(buf, 10));
    assert_error_contains("not a BPE tokenizer");
    unsigned char bad[40];
    memcpy(bad, buf, 40);
    bad[24] = 0x02; /* merge 0 joins token 258, which comes later */
    bad[25] = 0x01;
    assert_null(qkv_bpe_from_bytes(bad, 40));
    assert_error_contains("merge 0 joins 258 and 98, not both earlier than token 256");
    memcpy(bad, buf, 40);
    memcpy(bad + 32, bad + 24, 8); /* merge 1 repeats merge 0 */
    assert_null(qkv_bpe_from_bytes(bad, 40));
    assert_error_contains("merge 1 repeats the pair (97, 98)");
    qkv_bpe_free(b);
}

static void bpe_names_bad_arguments(void **state) {
    (void)state;
    assert_null(qkv_bpe_train("", 0, 10));
    assert_error_contains("qkv_bpe_train: empty corpus");
    assert_null(qkv_bpe_train("ab", 2, -1));
    assert_error_contains("n_merges -1 out of range");
    qkv_bpe *b = qkv_bpe_train("xyz", 3, 5);
    assert_int_equal(qkv_bpe_vocab_size(b), 256); /* no pair occurs twice */
    assert_int_equal(qkv_bpe_encode(b, NULL, 3, NULL, 0), -1);
    assert_error_contains("qkv_bpe_encode: 3 bytes at");
    qkv_bpe_free(b);
}

/* Each call frees what it made: the sweep wants every byte back after a clean run too. */
static bool train_and_free(void) {
    qkv_bpe *b = qkv_bpe_train(corpus, sizeof corpus - 1, 20);
    qkv_bpe_free(b);
    return b != NULL;
}

static bool read_and_free(const void *buf, size_t size) {
    qkv_bpe *b = qkv_bpe_from_bytes(buf, size);
    qkv_bpe_free(b);
    return b != NULL;
}

static void bpe_survives_every_allocation_failure(void **state) {
    (void)state;
    assert_every_allocation_failure_is_clean(train_and_free());
    qkv_bpe *b = qkv_bpe_train(corpus, sizeof corpus - 1, 20);
    unsigned char buf[24 + 8 * 20];
    assert_int_equal(qkv_bpe_to_bytes(b, buf, sizeof buf), sizeof buf);
    assert_every_allocation_failure_is_clean(read_and_free(buf, sizeof buf));
    int64_t ids[256];
    assert_every_allocation_failure_is_clean(qkv_bpe_encode(b, corpus, 40, ids, 256) > 0);
    qkv_bpe_free(b);
}

/* ---- Language-model dataset -------------------------------------------------------------- */

static void lm_dataset_cuts_windows_with_next_token_targets(void **state) {
    (void)state;
    int64_t tokens[21];
    for (int i = 0; i < 21; i++) tokens[i] = 100 + i;
    qkv_lm_dataset *ds = qkv_lm_dataset_new(tokens, 21, 4, 0.2);
    assert_int_equal(qkv_lm_dataset_size(ds, QKV_SPLIT_TRAIN), 4);
    assert_int_equal(qkv_lm_dataset_size(ds, QKV_SPLIT_VALID), 1);
    assert_int_equal(qkv_lm_dataset_context(ds), 4);
    qkv_lm_batch b = qkv_lm_dataset_batch(ds, QKV_SPLIT_TRAIN, (int64_t[]){1, 0}, 2);
    int64_t in[8], tg[8];
    assert_true(qkv_copy_out(b.inputs, QKV_I64, in));
    assert_true(qkv_copy_out(b.targets, QKV_I64, tg));
    int64_t want_in[] = {104, 105, 106, 107, 100, 101, 102, 103};
    int64_t want_tg[] = {105, 106, 107, 108, 101, 102, 103, 104};
    assert_memory_equal(in, want_in, sizeof in);
    assert_memory_equal(tg, want_tg, sizeof tg);
    b = qkv_lm_dataset_batch(ds, QKV_SPLIT_VALID, (int64_t[]){0}, 1);
    assert_true(qkv_copy_out(b.inputs, QKV_I64, in));
    assert_true(qkv_copy_out(b.targets, QKV_I64, tg));
    assert_int_equal(in[0], 116);
    assert_int_equal(tg[3], 120);
    b = qkv_lm_dataset_batch(ds, QKV_SPLIT_VALID, (int64_t[]){1}, 1);
    assert_null(b.inputs);
    assert_error_contains("window 1 not in [0, 1) of the validation split");
    qkv_lm_dataset_free(ds);
}

static void lm_dataset_order_is_a_seeded_permutation(void **state) {
    (void)state;
    int64_t tokens[401];
    for (int i = 0; i < 401; i++) tokens[i] = i % 7;
    qkv_lm_dataset *ds = qkv_lm_dataset_new(tokens, 401, 8, 0);
    assert_int_equal(qkv_lm_dataset_size(ds, QKV_SPLIT_TRAIN), 50);
    assert_int_equal(qkv_lm_dataset_size(ds, QKV_SPLIT_VALID), 0);
    int64_t a[50], b[50], plain[50];
    qkv_generator g1, g2;
    qkv_generator_init(&g1, 3);
    qkv_generator_init(&g2, 3);
    assert_true(qkv_lm_dataset_order(ds, QKV_SPLIT_TRAIN, a, &g1));
    assert_true(qkv_lm_dataset_order(ds, QKV_SPLIT_TRAIN, b, &g2));
    assert_true(qkv_lm_dataset_order(ds, QKV_SPLIT_TRAIN, plain, NULL));
    assert_memory_equal(a, b, sizeof a);
    bool seen[50] = {0}, moved = false;
    for (int i = 0; i < 50; i++) {
        assert_int_equal(plain[i], i);
        assert_false(seen[a[i]]);
        seen[a[i]] = true;
        moved |= a[i] != i;
    }
    assert_true(moved);
    qkv_lm_dataset_free(ds);
}

static void lm_dataset_names_bad_arguments(void **state) {
    (void)state;
    int64_t tokens[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    assert_null(qkv_lm_dataset_new(tokens, 4, 4, 0));
    assert_error_contains("a stream of 4 tokens has no window of context 4 + 1");
    assert_null(qkv_lm_dataset_new(tokens, 9, 0, 0));
    assert_error_contains("with context 0 (>= 1)");
    assert_null(qkv_lm_dataset_new(tokens, 9, 2, 1.0));
    assert_error_contains("valid_fraction 1 not in [0, 1)");
    assert_null(qkv_lm_dataset_new(tokens, 9, 4, 0.2));
    assert_error_contains("2 windows of 4 cannot be split 0.2");
    tokens[3] = -1;
    assert_null(qkv_lm_dataset_new(tokens, 9, 2, 0));
    assert_error_contains("token 3 is -1, negative");
}

int main(void) {
#define T(name) cmocka_unit_test_setup_teardown(name, open_scope, close_scope)
    const struct CMUnitTest tests[] = {
        T(byte_tokenizer_ids_are_the_bytes),
        T(bpe_learns_the_textbook_merges_with_ties_to_the_lowest_pair),
        T(bpe_training_is_deterministic),
        T(bpe_round_trips_every_byte_string),
        T(bpe_saves_and_loads_in_a_checkpoint),
        T(bpe_reader_rejects_bad_bytes),
        T(bpe_names_bad_arguments),
        T(bpe_survives_every_allocation_failure),
        T(lm_dataset_cuts_windows_with_next_token_targets),
        T(lm_dataset_order_is_a_seeded_permutation),
        T(lm_dataset_names_bad_arguments),
    };
    return cmocka_run_group_tests_name("lm_data", tests, NULL, NULL);
}
