/* The data layer: TSV reading, tokenizers, vocabulary and label set, their serialization,
 * batching and shuffling. */
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

#define FFFD "\xEF\xBF\xBD"

/* ---- Helpers ----------------------------------------------------------------------------- */

static char tmp_dir[] = "/tmp/qkv_test_data_XXXXXX";
static char tmp_paths[64][512];
static int n_tmp_paths;

static int setup_dir(void **state) {
    (void)state;
    return mkdtemp(tmp_dir) ? 0 : -1;
}

static int remove_dir(void **state) {
    (void)state;
    for (int i = 0; i < n_tmp_paths; i++) unlink(tmp_paths[i]);
    return rmdir(tmp_dir);
}

/* Writes len bytes to a new file in the temporary directory; returns its path. */
static const char *write_file(const char *name, const char *bytes, size_t len) {
    assert_true(n_tmp_paths < 64);
    char *path = tmp_paths[n_tmp_paths++];
    snprintf(path, sizeof tmp_paths[0], "%s/%s", tmp_dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return path;
}

#define WRITE_TSV(name, literal) write_file(name, literal, sizeof literal - 1)

static void assert_tokens(const qkv_tokens *t, int64_t n, const char *const *expected) {
    assert_non_null(t);
    assert_int_equal(t->n, n);
    for (int64_t i = 0; i < n; i++) assert_string_equal(t->tokens[i], expected[i]);
}

static void assert_vocab(const qkv_vocab *v, int64_t n, const char *const *expected) {
    assert_non_null(v);
    assert_int_equal(qkv_vocab_size(v), n);
    for (int64_t i = 0; i < n; i++) assert_string_equal(qkv_vocab_token(v, i), expected[i]);
}

/* ---- TSV reading ------------------------------------------------------------------------- */

static void tsv_read_strips_crlf(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(WRITE_TSV("crlf.tsv", "pos\tgood movie\r\nneg\tbad\r\n"));
    assert_non_null(d);
    assert_int_equal(d->n, 2);
    assert_string_equal(d->labels[0], "pos");
    assert_string_equal(d->texts[0], "good movie");
    assert_string_equal(d->labels[1], "neg");
    assert_string_equal(d->texts[1], "bad");
    qkv_tsv_free(d);
}

static void tsv_read_skips_empty_lines(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(WRITE_TSV("empty.tsv", "\n\npos\ta\n\r\n\nneg\tb\n\n"));
    assert_non_null(d);
    assert_int_equal(d->n, 2);
    assert_string_equal(d->texts[0], "a");
    assert_string_equal(d->texts[1], "b");
    qkv_tsv_free(d);
}

static void tsv_read_accepts_missing_final_newline(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(WRITE_TSV("nofinal.tsv", "pos\ta\nneg\tlast line"));
    assert_non_null(d);
    assert_int_equal(d->n, 2);
    assert_string_equal(d->labels[1], "neg");
    assert_string_equal(d->texts[1], "last line");
    qkv_tsv_free(d);
}

static void tsv_read_of_empty_file_has_no_examples(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(write_file("zero.tsv", "", 0));
    assert_non_null(d);
    assert_int_equal(d->n, 0);
    qkv_tsv_free(d);
}

static void tsv_read_splits_at_first_tab_and_turns_later_tabs_into_spaces(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(WRITE_TSV("tabs.tsv", "pos\ta\tb\t\tc\nneg\t\n"));
    assert_non_null(d);
    assert_int_equal(d->n, 2);
    assert_string_equal(d->labels[0], "pos");
    assert_string_equal(d->texts[0], "a b  c");
    assert_string_equal(d->texts[1], "");
    qkv_tsv_free(d);
}

static void tsv_read_reports_line_without_tab(void **state) {
    (void)state;
    const char *path = WRITE_TSV("notab.tsv", "pos\ta\n\nno tab here\nneg\tb\n");
    assert_null(qkv_tsv_read(path));
    char expected[600];
    snprintf(expected, sizeof expected, "qkv_tsv_read: %s:3: no tab between label and text",
             path);
    assert_string_equal(qkv_error(), expected);
}

static void tsv_read_reports_empty_label(void **state) {
    (void)state;
    const char *path = WRITE_TSV("nolabel.tsv", "pos\ta\r\n\tb\r\n");
    assert_null(qkv_tsv_read(path));
    char expected[600];
    snprintf(expected, sizeof expected, "qkv_tsv_read: %s:2: empty label", path);
    assert_string_equal(qkv_error(), expected);
}

static void tsv_read_reports_missing_file(void **state) {
    (void)state;
    char path[600];
    snprintf(path, sizeof path, "%s/absent.tsv", tmp_dir);
    assert_null(qkv_tsv_read(path));
    char expected[700];
    snprintf(expected, sizeof expected, "qkv_tsv_read: %s: No such file or directory", path);
    assert_string_equal(qkv_error(), expected);
}

static void tsv_read_reports_directory(void **state) {
    (void)state;
    assert_null(qkv_tsv_read(tmp_dir));
    char expected[700];
    snprintf(expected, sizeof expected, "qkv_tsv_read: %s: Is a directory", tmp_dir);
    assert_string_equal(qkv_error(), expected);
}

/* /dev/zero never ends: it is refused, not read until memory runs out. */
static void tsv_read_refuses_a_device(void **state) {
    (void)state;
    assert_null(qkv_tsv_read("/dev/zero"));
    assert_string_equal(qkv_error(), "qkv_tsv_read: /dev/zero: not a regular file or a pipe");
}

/* A pipe is read (up to 256 MiB: example_cli feeds one /dev/zero). */
static void tsv_read_reads_a_pipe(void **state) {
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    const char text[] = "pos\tgood\nneg\tbad\n";
    assert_int_equal(write(fds[1], text, sizeof text - 1), (ssize_t)(sizeof text - 1));
    close(fds[1]);
    char p[64];
    snprintf(p, sizeof p, "/dev/fd/%d", fds[0]);
    qkv_tsv *d = qkv_tsv_read(p);
    close(fds[0]);
    assert_non_null(d);
    assert_int_equal(d->n, 2);
    assert_string_equal(d->texts[1], "bad");
    qkv_tsv_free(d);
}

/* Whichever allocation fails while a file is read, the message says which file. */
static void tsv_read_names_the_file_when_memory_runs_out(void **state) {
    (void)state;
    const char *p = WRITE_TSV("oom.tsv", "pos\tgood\nneg\tbad\n");
    char want[600];
    snprintf(want, sizeof want, "qkv_tsv_read: %s: qkv: out of memory allocating ", p);
    for (uint64_t n = 1;; n++) {
        qkv_clear_error();
        qkv_debug_fail_alloc_at(n);
        qkv_tsv *d = qkv_tsv_read(p);
        bool failed = qkv_debug_alloc_count() >= n;
        qkv_debug_fail_alloc_at(0);
        if (!failed) {
            assert_non_null(d);
            qkv_tsv_free(d);
            break;
        }
        assert_null(d);
        if (strncmp(qkv_error(), want, strlen(want)))
            fail_msg("allocation %llu: \"%s\"", (unsigned long long)n, qkv_error());
    }
    /* With an error already pending, that one stays first. */
    qkv_clear_error();
    qkv_set_error("earlier");
    qkv_debug_fail_alloc_at(1);
    assert_null(qkv_tsv_read(p));
    qkv_debug_fail_alloc_at(0);
    assert_string_equal(qkv_error(), "earlier");
}

static void tsv_read_replaces_each_invalid_byte_with_fffd(void **state) {
    (void)state;
    /* a bad byte in a label, a truncated sequence at the end of a text, an overlong '/', a
     * surrogate, a NUL, and valid multibyte text left alone */
    qkv_tsv *d = qkv_tsv_read(WRITE_TSV("utf8.tsv",
                                        "p\xffs\tcaf\xc3\n"
                                        "neg\t\xc0\xaf|\xed\xa0\x80|a\0b|\xc3\xa9\xe2\x82\xac\n"));
    assert_non_null(d);
    assert_int_equal(d->n, 2);
    assert_string_equal(d->labels[0], "p" FFFD "s");
    assert_string_equal(d->texts[0], "caf" FFFD);
    assert_string_equal(d->texts[1],
                        FFFD FFFD "|" FFFD FFFD FFFD "|a" FFFD "b|\xc3\xa9\xe2\x82\xac");
    qkv_tsv_free(d);
}

static void tsv_read_skips_byte_order_mark(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(WRITE_TSV("bom.tsv", "\xEF\xBB\xBFpos\ta\n"));
    assert_non_null(d);
    assert_int_equal(d->n, 1);
    assert_string_equal(d->labels[0], "pos");
    qkv_tsv_free(d);
}

static void tsv_read_handles_a_line_of_three_megabytes(void **state) {
    (void)state;
    size_t words = 1 << 20, len = 4 + 3 * words + 1;
    char *bytes = malloc(len);
    assert_non_null(bytes);
    memcpy(bytes, "pos\t", 4);
    for (size_t i = 0; i < words; i++) memcpy(bytes + 4 + 3 * i, "ab ", 3);
    bytes[len - 1] = '\n';
    qkv_tsv *d = qkv_tsv_read(write_file("long.tsv", bytes, len));
    free(bytes);
    assert_non_null(d);
    assert_int_equal(d->n, 1);
    assert_int_equal(strlen(d->texts[0]), 3 * words);
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_WORDS, d->texts[0]);
    assert_non_null(t);
    assert_int_equal(t->n, words);
    qkv_tokens_free(t);
    qkv_tsv_free(d);
}

static void tsv_read_reads_the_fixture(void **state) {
    (void)state;
    qkv_tsv *d = qkv_tsv_read(QKV_FIXTURES "/data/reviews.tsv");
    assert_non_null(d);
    assert_int_equal(d->n, 4);
    assert_string_equal(d->texts[1], "Dull and far too long.");
    assert_string_equal(d->labels[3], "neg");
    assert_string_equal(d->texts[3], "Not good");
    qkv_tsv_free(d);
}

/* ---- Tokenizers -------------------------------------------------------------------------- */

static void word_tokenizer_lowercases_ascii_and_splits_on_punctuation(void **state) {
    (void)state;
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_WORDS, "Don't STOP-me now, café 42x");
    assert_tokens(t, 6, (const char *[]){"don't", "stop", "me", "now", "café", "42x"});
    qkv_tokens_free(t);
}

static void word_tokenizer_keeps_non_ascii_letters_and_splits_at_their_punctuation(
    void **state) {
    (void)state;
    /* dashes, typographic quotes, symbols and emoji separate; Latin, Greek and Cyrillic
     * capitals are lowercased; scripts without case stay as they are */
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_WORDS, "ÉCOLE naïve—really 'quoted' x_y "
                                 "GNOME’s Ømq™ ŁÓDŹ ΣΟΦΙΑ МОСКВА 日本語 5µs a\xF0\x9F\x98\x80" "b");
    assert_tokens(t, 16, (const char *[]){"école", "naïve", "really", "'quoted'", "x", "y",
                                          "gnome", "s", "ømq", "łódź", "σοφια", "москва",
                                          "日本語", "5µs", "a", "b"});
    qkv_tokens_free(t);
}

static void word_tokenizer_splits_at_invalid_bytes(void **state) {
    (void)state;
    /* each invalid byte stands for U+FFFD, which separates */
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_WORDS, "ab\xff" "CD ef\xC3");
    assert_tokens(t, 3, (const char *[]){"ab", "cd", "ef"});
    qkv_tokens_free(t);
}

static void word_tokenizer_of_punctuation_only_gives_no_tokens(void **state) {
    (void)state;
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_WORDS, " ,.;!? \t-\n");
    assert_non_null(t);
    assert_int_equal(t->n, 0);
    qkv_tokens_free(t);
    t = qkv_tokenize(QKV_TOKENIZE_WORDS, "");
    assert_non_null(t);
    assert_int_equal(t->n, 0);
    qkv_tokens_free(t);
}

static void char_tokenizer_gives_one_token_per_code_point(void **state) {
    (void)state;
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_CHARS, "Aé €\xF0\x9F\x98\x80");
    assert_tokens(t, 5, (const char *[]){"A", "\xC3\xA9", " ", "\xE2\x82\xAC",
                                         "\xF0\x9F\x98\x80"});
    qkv_tokens_free(t);
}

static void char_tokenizer_replaces_each_invalid_byte(void **state) {
    (void)state;
    /* a stray byte, a truncated three-byte sequence, an overlong two-byte '/' */
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_CHARS, "a\xff\xE2\x82x\xC0\xAF");
    assert_tokens(t, 7, (const char *[]){"a", FFFD, FFFD, FFFD, "x", FFFD, FFFD});
    qkv_tokens_free(t);
}

static void tokenize_rejects_unknown_tokenizer(void **state) {
    (void)state;
    assert_null(qkv_tokenize((qkv_tokenizer)7, "x"));
    assert_string_equal(qkv_error(), "qkv_tokenize: unknown tokenizer 7");
}

/* ---- Vocabulary -------------------------------------------------------------------------- */

/* zz three times; 9, a, ab, b and é twice each */
static const char *const tie_texts[] = {"b ab é a 9", "é 9 A ab B", "zz zz ZZ"};

static void vocab_orders_by_count_then_by_bytes(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    assert_vocab(v, 8, (const char *[]){"<pad>", "<unk>", "zz", "9", "a", "ab", "b", "é"});
    assert_int_equal(qkv_vocab_tokenizer(v), QKV_TOKENIZE_WORDS);
    qkv_vocab_free(v);
}

static void vocab_min_count_drops_rarer_tokens(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 3, 0);
    assert_vocab(v, 3, (const char *[]){"<pad>", "<unk>", "zz"});
    qkv_vocab_free(v);
}

static void vocab_max_size_counts_the_two_specials(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 4);
    assert_vocab(v, 4, (const char *[]){"<pad>", "<unk>", "zz", "9"});
    qkv_vocab_free(v);
    v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 2);
    assert_vocab(v, 2, (const char *[]){"<pad>", "<unk>"});
    qkv_vocab_free(v);
}

static void vocab_of_characters_counts_code_points(void **state) {
    (void)state;
    const char *texts[] = {"aéa", "é a"};
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_CHARS, texts, 2, 1, 0);
    assert_vocab(v, 5, (const char *[]){"<pad>", "<unk>", "a", "é", " "});
    assert_int_equal(qkv_vocab_tokenizer(v), QKV_TOKENIZE_CHARS);
    qkv_vocab_free(v);
}

static void vocab_maps_unknown_tokens_to_unk_and_pad_to_zero(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    assert_int_equal(qkv_vocab_id(v, "<pad>"), QKV_PAD_ID);
    assert_int_equal(qkv_vocab_id(v, "<unk>"), QKV_UNK_ID);
    assert_int_equal(qkv_vocab_id(v, "zz"), 2);
    assert_int_equal(qkv_vocab_id(v, "é"), 7);
    assert_int_equal(qkv_vocab_id(v, "never seen"), QKV_UNK_ID);
    assert_int_equal(qkv_vocab_id(v, "ZZ"), QKV_UNK_ID); /* lookup is exact */
    assert_null(qkv_vocab_token(v, 8));
    assert_string_equal(qkv_error(), "qkv_vocab_token: id 8 out of range for 8 tokens");
    qkv_vocab_free(v);
}

static void vocab_encode_gives_ids_with_unknowns_as_unk(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    int64_t ids[8];
    assert_int_equal(qkv_vocab_encode(v, "A zz, unknown É!", ids, 8), 4);
    assert_int_equal(ids[0], 4);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], QKV_UNK_ID);
    assert_int_equal(ids[3], 7); /* É lowercases to é */
    qkv_vocab_free(v);
}

static void vocab_encode_of_a_text_without_tokens_is_one_unk(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    int64_t ids[2] = {-7, -7};
    assert_int_equal(qkv_vocab_encode(v, "", ids, 2), 1);
    assert_int_equal(ids[0], QKV_UNK_ID);
    assert_int_equal(ids[1], -7);
    assert_int_equal(qkv_vocab_encode(v, " ?! ", ids, 2), 1);
    assert_int_equal(ids[0], QKV_UNK_ID);
    qkv_vocab_free(v);
}

static void vocab_encode_writes_at_most_cap_ids_and_returns_the_full_count(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    int64_t ids[3] = {-7, -7, -7};
    assert_int_equal(qkv_vocab_encode(v, "zz 9 a ab b", ids, 2), 5);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 3);
    assert_int_equal(ids[2], -7);
    assert_int_equal(qkv_vocab_encode(v, "zz 9 a ab b", NULL, 0), 5);
    qkv_vocab_free(v);
}

static void vocab_build_rejects_bad_limits(void **state) {
    (void)state;
    assert_null(qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 0, 0));
    assert_string_equal(qkv_error(), "qkv_vocab_build: min_count must be at least 1, got 0");
    qkv_clear_error();
    assert_null(qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 1));
    assert_string_equal(qkv_error(),
                        "qkv_vocab_build: max_size must be 0 (no limit) or at least 2, got 1");
}

/* ---- Label set --------------------------------------------------------------------------- */

static void labels_are_distinct_in_byte_order_and_unseen_is_minus_one(void **state) {
    (void)state;
    const char *labels[] = {"pos", "neg", "Neutral", "pos", "émotion", "neg"};
    qkv_labels *set = qkv_labels_build(labels, 6);
    assert_non_null(set);
    assert_int_equal(qkv_labels_size(set), 4);
    assert_string_equal(qkv_labels_name(set, 0), "Neutral");
    assert_string_equal(qkv_labels_name(set, 1), "neg");
    assert_string_equal(qkv_labels_name(set, 2), "pos");
    assert_string_equal(qkv_labels_name(set, 3), "émotion");
    assert_int_equal(qkv_labels_id(set, "pos"), 2);
    assert_int_equal(qkv_labels_id(set, "positive"), -1);
    assert_null(qkv_error()); /* a miss is not an error */
    assert_null(qkv_labels_name(set, 4));
    assert_string_equal(qkv_error(), "qkv_labels_name: id 4 out of range for 4 labels");
    qkv_labels_free(set);
}

static void labels_build_rejects_empty_label(void **state) {
    (void)state;
    const char *labels[] = {"pos", ""};
    assert_null(qkv_labels_build(labels, 2));
    assert_string_equal(qkv_error(), "qkv_labels_build: label 1 is empty");
}

/* ---- Serialization ----------------------------------------------------------------------- */

static const unsigned char neg_pos_bytes[] = {
    'q', 'k', 'v', 'l', 'a', 'b', 'e', 'l', 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,
    3, 0, 0, 0, 'n', 'e', 'g', 3, 0, 0, 0, 'p', 'o', 's'};

static void labels_serialize_to_the_documented_bytes(void **state) {
    (void)state;
    const char *labels[] = {"pos", "neg", "pos"};
    qkv_labels *set = qkv_labels_build(labels, 3);
    unsigned char buf[64];
    assert_int_equal(qkv_labels_to_bytes(set, NULL, 0), sizeof neg_pos_bytes);
    assert_int_equal(qkv_labels_to_bytes(set, buf, sizeof buf), sizeof neg_pos_bytes);
    assert_memory_equal(buf, neg_pos_bytes, sizeof neg_pos_bytes);
    qkv_labels_free(set);
}

static void labels_round_trip_through_bytes(void **state) {
    (void)state;
    qkv_labels *set = qkv_labels_from_bytes(neg_pos_bytes, sizeof neg_pos_bytes);
    assert_non_null(set);
    assert_int_equal(qkv_labels_size(set), 2);
    assert_int_equal(qkv_labels_id(set, "neg"), 0);
    assert_int_equal(qkv_labels_id(set, "pos"), 1);
    qkv_labels_free(set);
}

static void vocab_round_trips_through_bytes(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    size_t size = qkv_vocab_to_bytes(v, NULL, 0);
    /* header, then a length and the bytes of each of the 8 tokens */
    assert_int_equal(size, 24 + 8 * 4 + (5 + 5 + 2 + 1 + 1 + 2 + 1 + 2));
    unsigned char *buf = malloc(size);
    assert_int_equal(qkv_vocab_to_bytes(v, buf, size), size);
    qkv_vocab *w = qkv_vocab_from_bytes(buf, size);
    free(buf);
    assert_vocab(w, 8, (const char *[]){"<pad>", "<unk>", "zz", "9", "a", "ab", "b", "é"});
    assert_int_equal(qkv_vocab_tokenizer(w), QKV_TOKENIZE_WORDS);
    assert_int_equal(qkv_vocab_id(w, "ab"), 5);
    qkv_vocab_free(w);
    qkv_vocab_free(v);
}

/* Each prefix goes into a buffer of exactly its size, so a read past it is caught by ASan. */
static void vocab_from_bytes_rejects_every_truncation(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_CHARS, (const char *[]){"héllo"}, 1, 1, 0);
    size_t size = qkv_vocab_to_bytes(v, NULL, 0);
    unsigned char *full = malloc(size);
    qkv_vocab_to_bytes(v, full, size);
    for (size_t len = 0; len < size; len++) {
        unsigned char *prefix = malloc(len ? len : 1);
        memcpy(prefix, full, len);
        qkv_clear_error();
        assert_null(qkv_vocab_from_bytes(prefix, len));
        assert_non_null(qkv_error());
        free(prefix);
    }
    free(full);
    qkv_vocab_free(v);
}

static void labels_from_bytes_rejects_every_truncation(void **state) {
    (void)state;
    for (size_t len = 0; len < sizeof neg_pos_bytes; len++) {
        unsigned char *prefix = malloc(len ? len : 1);
        memcpy(prefix, neg_pos_bytes, len);
        qkv_clear_error();
        assert_null(qkv_labels_from_bytes(prefix, len));
        assert_non_null(qkv_error());
        free(prefix);
    }
}

/* neg_pos_bytes with one byte changed */
static void assert_labels_rejected(size_t at, unsigned char value, const char *message) {
    unsigned char buf[sizeof neg_pos_bytes];
    memcpy(buf, neg_pos_bytes, sizeof buf);
    buf[at] = value;
    qkv_clear_error();
    assert_null(qkv_labels_from_bytes(buf, sizeof buf));
    assert_string_equal(qkv_error(), message);
}

static void labels_from_bytes_rejects_hostile_fields(void **state) {
    (void)state;
    assert_labels_rejected(0, 'Q', "qkv_labels_from_bytes: bad magic, expected \"qkvlabel\"");
    assert_labels_rejected(8, 2, "qkv_labels_from_bytes: unsupported version 2");
    assert_labels_rejected(12, 1, "qkv_labels_from_bytes: kind 1, expected 0");
    assert_labels_rejected(23, 0xff, "qkv_labels_from_bytes: count 18374686479671623682 "
                                     "exceeds the buffer of 38 bytes");
    assert_labels_rejected(16, 3, "qkv_labels_from_bytes: truncated at entry 2 of 3");
    assert_labels_rejected(27, 0xff, "qkv_labels_from_bytes: entry 0: length 4278190083 "
                                     "exceeds the 10 bytes left");
    assert_labels_rejected(24, 0, "qkv_labels_from_bytes: entry 0 is empty");
    assert_labels_rejected(29, 0xC0, "qkv_labels_from_bytes: entry 0 is not valid UTF-8");
    assert_labels_rejected(30, 0, "qkv_labels_from_bytes: entry 0 is not valid UTF-8");
    assert_labels_rejected(16, 1, "qkv_labels_from_bytes: 7 trailing bytes after 1 entries");
    assert_labels_rejected(35, 'a', "qkv_labels_from_bytes: labels 0 and 1 are not in byte "
                                    "order");
}

static void labels_from_bytes_rejects_duplicates(void **state) {
    (void)state;
    unsigned char buf[sizeof neg_pos_bytes];
    memcpy(buf, neg_pos_bytes, sizeof buf);
    memcpy(buf + 35, "neg", 3);
    assert_null(qkv_labels_from_bytes(buf, sizeof buf));
    assert_string_equal(qkv_error(), "qkv_labels_from_bytes: entry 1 \"neg\" is a duplicate");
}

static void vocab_from_bytes_rejects_missing_specials_and_labels_magic(void **state) {
    (void)state;
    assert_null(qkv_vocab_from_bytes(neg_pos_bytes, sizeof neg_pos_bytes));
    assert_string_equal(qkv_error(), "qkv_vocab_from_bytes: bad magic, expected \"qkvvocab\"");
    qkv_clear_error();
    unsigned char buf[sizeof neg_pos_bytes];
    memcpy(buf, neg_pos_bytes, sizeof buf);
    memcpy(buf, "qkvvocab", 8);
    assert_null(qkv_vocab_from_bytes(buf, sizeof buf));
    assert_string_equal(qkv_error(),
                        "qkv_vocab_from_bytes: ids 0 and 1 are not \"<pad>\" and \"<unk>\"");
}

static void vocab_from_bytes_names_a_short_header_and_an_unknown_tokenizer(void **state) {
    (void)state;
    assert_null(qkv_vocab_from_bytes("qkvvoca", 7));
    assert_string_equal(qkv_error(),
                        "qkv_vocab_from_bytes: 7 bytes, shorter than the 24-byte header");
    qkv_clear_error();
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_CHARS, (const char *[]){"ab"}, 1, 1, 0);
    size_t size = qkv_vocab_to_bytes(v, NULL, 0);
    unsigned char *buf = malloc(size);
    assert_int_equal(qkv_vocab_to_bytes(v, buf, size), size);
    buf[12] = 9; /* the tokenizer kind */
    assert_null(qkv_vocab_from_bytes(buf, size));
    assert_string_equal(qkv_error(), "qkv_vocab_from_bytes: unknown tokenizer 9");
    free(buf);
    qkv_vocab_free(v);
}

/* ---- Batching ---------------------------------------------------------------------------- */

/* a: id 2, b: id 3, c: id 4; labels neg: 0, pos: 1 */
static const char *const batch_train[] = {"a b c", "a b", "a"};
static const char *const batch_texts[] = {"a b c", "", "B A x"};
static const char *const batch_labels[] = {"pos", "neg", "pos"};

static void assert_i64_values(const qkv_tensor *t, int64_t n, const int64_t *expected) {
    assert_int_equal(t->dtype, QKV_I64);
    assert_int_equal(t->numel, n);
    const int64_t *data = qkv_data(t);
    for (int64_t i = 0; i < n; i++) assert_int_equal(data[i], expected[i]);
}

static void assert_bool_values(const qkv_tensor *t, int64_t n, const bool *expected) {
    assert_int_equal(t->dtype, QKV_BOOL);
    assert_int_equal(t->numel, n);
    const bool *data = qkv_data(t);
    for (int64_t i = 0; i < n; i++) assert_int_equal(data[i], expected[i]);
}

static void dataset_batch_truncates_pads_and_masks(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, batch_train, 3, 1, 0);
    qkv_labels *set = qkv_labels_build(batch_labels, 3);
    qkv_dataset *ds = qkv_dataset_new(v, batch_texts, set, batch_labels, 3);
    assert_non_null(ds);
    assert_int_equal(qkv_dataset_size(ds), 3);
    qkv_scope_begin();
    qkv_batch b = qkv_dataset_batch(ds, (const int64_t[]){2, 0, 1}, 3, 2);
    assert_int_equal(b.ids->ndim, 2);
    assert_int_equal(b.ids->shape[0], 3);
    assert_int_equal(b.ids->shape[1], 2);
    assert_i64_values(b.ids, 6, (const int64_t[]){3, 2, 2, 3, 1, 0});
    assert_bool_values(b.key_padding_mask, 6, (const bool[]){0, 0, 0, 0, 0, 1});
    assert_int_equal(b.labels->ndim, 1);
    assert_i64_values(b.labels, 3, (const int64_t[]){1, 1, 0});

    b = qkv_dataset_batch(ds, (const int64_t[]){2, 0, 1}, 3, 4);
    assert_i64_values(b.ids, 12, (const int64_t[]){3, 2, 1, 0, 2, 3, 4, 0, 1, 0, 0, 0});
    assert_bool_values(b.key_padding_mask, 12,
                       (const bool[]){0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1, 1});
    qkv_scope_end();
    qkv_dataset_free(ds);
    qkv_labels_free(set);
    qkv_vocab_free(v);
}

/* A micro-batch is padded to its own longest example, so its shape depends on its samples
 * alone, never on the batch around it. */
static void padded_batch_is_as_long_as_its_longest_example(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, batch_train, 3, 1, 0);
    qkv_dataset *ds = qkv_dataset_new(v, batch_texts, NULL, NULL, 3);
    qkv_scope_begin();
    qkv_batch b = qkv_dataset_batch_padded(ds, (const int64_t[]){1}, 1, 10);
    assert_int_equal(b.ids->shape[1], 1);
    assert_i64_values(b.ids, 1, (const int64_t[]){1});
    b = qkv_dataset_batch_padded(ds, (const int64_t[]){2, 1}, 2, 10);
    assert_int_equal(b.ids->shape[1], 3);
    assert_i64_values(b.ids, 6, (const int64_t[]){3, 2, 1, 1, 0, 0});
    assert_bool_values(b.key_padding_mask, 6, (const bool[]){0, 0, 0, 0, 1, 1});
    b = qkv_dataset_batch_padded(ds, (const int64_t[]){2, 1}, 2, 2); /* max_len truncates */
    assert_int_equal(b.ids->shape[1], 2);
    b = qkv_dataset_batch_padded(ds, (const int64_t[]){5}, 1, 2);
    assert_null(b.ids);
    assert_non_null(strstr(qkv_error(), "idx[0] = 5 out of range"));
    qkv_scope_end();
    qkv_dataset_free(ds);
    qkv_vocab_free(v);
}

static void dataset_without_labels_gives_no_label_tensor(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, batch_train, 3, 1, 0);
    qkv_dataset *ds = qkv_dataset_new(v, batch_texts, NULL, NULL, 3);
    qkv_scope_begin();
    qkv_batch b = qkv_dataset_batch(ds, (const int64_t[]){1}, 1, 3);
    assert_i64_values(b.ids, 3, (const int64_t[]){1, 0, 0});
    assert_null(b.labels);
    qkv_scope_end();
    qkv_dataset_free(ds);
    qkv_vocab_free(v);
}

static void batch_tensors_belong_to_the_scope(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, batch_train, 3, 1, 0);
    qkv_labels *set = qkv_labels_build(batch_labels, 3);
    qkv_dataset *ds = qkv_dataset_new(v, batch_texts, set, batch_labels, 3);
    uint64_t live = qkv_memory_stats_get().live_tensors;
    qkv_scope_begin();
    qkv_dataset_batch(ds, (const int64_t[]){0, 1}, 2, 8);
    assert_int_equal(qkv_memory_stats_get().live_tensors, live + 3);
    qkv_scope_end();
    assert_int_equal(qkv_memory_stats_get().live_tensors, live);
    qkv_dataset_free(ds);
    qkv_labels_free(set);
    qkv_vocab_free(v);
}

static void dataset_rejects_label_outside_the_set(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, batch_train, 3, 1, 0);
    qkv_labels *set = qkv_labels_build(batch_labels, 2);
    assert_null(qkv_dataset_new(v, batch_texts, set, (const char *[]){"neg", "pos", "meh"}, 3));
    assert_string_equal(qkv_error(),
                        "qkv_dataset_new: example 2 has label \"meh\", not in the label set");
    qkv_labels_free(set);
    qkv_vocab_free(v);
}

static void dataset_batch_rejects_index_out_of_range(void **state) {
    (void)state;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, batch_train, 3, 1, 0);
    qkv_dataset *ds = qkv_dataset_new(v, batch_texts, NULL, NULL, 3);
    qkv_batch b = qkv_dataset_batch(ds, (const int64_t[]){0, 3}, 2, 4);
    assert_null(b.ids);
    assert_null(b.key_padding_mask);
    assert_string_equal(qkv_error(),
                        "qkv_dataset_batch: idx[1] = 3 out of range for 3 examples");
    qkv_dataset_free(ds);
    qkv_vocab_free(v);
}

static void shuffle_is_the_documented_fisher_yates_for_a_seed(void **state) {
    (void)state;
    int64_t idx[100], again[100], expected[100];
    for (int i = 0; i < 100; i++) idx[i] = again[i] = expected[i] = i;
    qkv_generator g, h, r;
    qkv_generator_init(&g, 42);
    qkv_generator_init(&h, 42);
    qkv_generator_init(&r, 42);
    qkv_shuffle(idx, 100, &g);
    qkv_shuffle(again, 100, &h);
    for (int64_t i = 99; i > 0; i--) {
        int64_t j = (int64_t)qkv_generator_below(&r, (uint64_t)i + 1);
        int64_t t = expected[i];
        expected[i] = expected[j];
        expected[j] = t;
    }
    assert_memory_equal(idx, expected, sizeof idx);
    assert_memory_equal(again, expected, sizeof idx);
    bool seen[100] = {0};
    int moved = 0;
    for (int i = 0; i < 100; i++) {
        assert_false(seen[idx[i]]);
        seen[idx[i]] = true;
        moved += idx[i] != i;
    }
    assert_true(moved > 50);
}

static void shuffle_with_another_seed_gives_another_order(void **state) {
    (void)state;
    int64_t a[20], b[20];
    for (int i = 0; i < 20; i++) a[i] = b[i] = i;
    qkv_generator g, h;
    qkv_generator_init(&g, 1);
    qkv_generator_init(&h, 2);
    qkv_shuffle(a, 20, &g);
    qkv_shuffle(b, 20, &h);
    assert_true(memcmp(a, b, sizeof a) != 0);
}

/* ---- Allocation failure ------------------------------------------------------------------ */

static bool read_fixture(void) {
    qkv_tsv *d = qkv_tsv_read(QKV_FIXTURES "/data/reviews.tsv");
    qkv_tsv_free(d);
    return d != NULL;
}

static bool tokenize_text(void) {
    qkv_tokens *t = qkv_tokenize(QKV_TOKENIZE_WORDS, "one two three four five");
    qkv_tokens_free(t);
    return t != NULL;
}

static bool build_encode_and_batch(void) {
    bool ok = false;
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_CHARS, batch_train, 3, 1, 0);
    qkv_labels *set = qkv_labels_build(batch_labels, 3);
    qkv_dataset *ds = qkv_dataset_new(v, batch_texts, set, batch_labels, 3);
    if (ds) {
        qkv_batch b = qkv_dataset_batch(ds, (const int64_t[]){0, 2}, 2, 3);
        ok = b.ids != NULL;
        qkv_release(b.ids);
        qkv_release(b.key_padding_mask);
        qkv_release(b.labels);
    }
    int64_t ids[4];
    ok = ok && qkv_vocab_encode(v, "abc", ids, 4) == 3;
    qkv_dataset_free(ds);
    qkv_labels_free(set);
    qkv_vocab_free(v);
    return ok;
}

static bool serialize_round_trip(void) {
    qkv_vocab *v = qkv_vocab_build(QKV_TOKENIZE_WORDS, tie_texts, 3, 1, 0);
    unsigned char buf[256];
    size_t size = qkv_vocab_to_bytes(v, buf, sizeof buf);
    qkv_vocab *w = v ? qkv_vocab_from_bytes(buf, size) : NULL;
    qkv_labels *set = qkv_labels_from_bytes(neg_pos_bytes, sizeof neg_pos_bytes);
    bool ok = w && set;
    qkv_labels_free(set);
    qkv_vocab_free(w);
    qkv_vocab_free(v);
    return ok;
}

static void every_allocation_failure_is_reported_and_leaks_nothing(void **state) {
    (void)state;
    assert_every_allocation_failure_is_clean(read_fixture());
    assert_every_allocation_failure_is_clean(tokenize_text());
    assert_every_allocation_failure_is_clean(build_encode_and_batch());
    assert_every_allocation_failure_is_clean(serialize_round_trip());
}

#define T(name) cmocka_unit_test_setup(name, clear_error)

int main(void) {
    const struct CMUnitTest tests[] = {
        T(tsv_read_strips_crlf),
        T(tsv_read_skips_empty_lines),
        T(tsv_read_accepts_missing_final_newline),
        T(tsv_read_of_empty_file_has_no_examples),
        T(tsv_read_splits_at_first_tab_and_turns_later_tabs_into_spaces),
        T(tsv_read_reports_line_without_tab),
        T(tsv_read_reports_empty_label),
        T(tsv_read_reports_missing_file),
        T(tsv_read_reports_directory),
        T(tsv_read_refuses_a_device),
        T(tsv_read_reads_a_pipe),
        T(tsv_read_names_the_file_when_memory_runs_out),
        T(tsv_read_replaces_each_invalid_byte_with_fffd),
        T(tsv_read_skips_byte_order_mark),
        T(tsv_read_handles_a_line_of_three_megabytes),
        T(tsv_read_reads_the_fixture),
        T(word_tokenizer_lowercases_ascii_and_splits_on_punctuation),
        T(word_tokenizer_keeps_non_ascii_letters_and_splits_at_their_punctuation),
        T(word_tokenizer_splits_at_invalid_bytes),
        T(word_tokenizer_of_punctuation_only_gives_no_tokens),
        T(char_tokenizer_gives_one_token_per_code_point),
        T(char_tokenizer_replaces_each_invalid_byte),
        T(tokenize_rejects_unknown_tokenizer),
        T(vocab_orders_by_count_then_by_bytes),
        T(vocab_min_count_drops_rarer_tokens),
        T(vocab_max_size_counts_the_two_specials),
        T(vocab_of_characters_counts_code_points),
        T(vocab_maps_unknown_tokens_to_unk_and_pad_to_zero),
        T(vocab_encode_gives_ids_with_unknowns_as_unk),
        T(vocab_encode_of_a_text_without_tokens_is_one_unk),
        T(vocab_encode_writes_at_most_cap_ids_and_returns_the_full_count),
        T(vocab_build_rejects_bad_limits),
        T(labels_are_distinct_in_byte_order_and_unseen_is_minus_one),
        T(labels_build_rejects_empty_label),
        T(labels_serialize_to_the_documented_bytes),
        T(labels_round_trip_through_bytes),
        T(vocab_round_trips_through_bytes),
        T(vocab_from_bytes_rejects_every_truncation),
        T(labels_from_bytes_rejects_every_truncation),
        T(labels_from_bytes_rejects_hostile_fields),
        T(labels_from_bytes_rejects_duplicates),
        T(vocab_from_bytes_rejects_missing_specials_and_labels_magic),
        T(vocab_from_bytes_names_a_short_header_and_an_unknown_tokenizer),
        T(dataset_batch_truncates_pads_and_masks),
        T(padded_batch_is_as_long_as_its_longest_example),
        T(dataset_without_labels_gives_no_label_tensor),
        T(batch_tensors_belong_to_the_scope),
        T(dataset_rejects_label_outside_the_set),
        T(dataset_batch_rejects_index_out_of_range),
        T(shuffle_is_the_documented_fisher_yates_for_a_seed),
        T(shuffle_with_another_seed_gives_another_order),
        T(every_allocation_failure_is_reported_and_leaks_nothing),
    };
    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
