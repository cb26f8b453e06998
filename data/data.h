/*
 * qkv data: reading labelled texts, tokenizing them, vocabularies and label sets, and batches of
 * token ids for training.
 *
 * The conventions of tensor/tensor.h hold here: errors return NULL (or -1 / 0 / false where
 * stated) and record a message read with qkv_error(); batch tensors belong to the innermost open
 * scope. The objects of this header (qkv_tsv, qkv_tokens, qkv_vocab, qkv_labels, qkv_dataset,
 * qkv_bpe, qkv_lm_dataset) are not tensors: the caller owns each one and frees it with its
 * _free function (NULL is ignored). Once built they are never modified, so several threads
 * may read them at once.
 *
 * Text is UTF-8. Wherever text enters (qkv_tsv_read, the word and char tokenizers), each byte
 * that does not start a valid UTF-8 sequence (overlong forms, surrogates, code points beyond
 * U+10FFFF, truncated sequences, stray continuation bytes) is replaced by U+FFFD, one per byte;
 * so is a NUL byte, which a C string cannot hold. The BPE tokenizer takes raw bytes instead.
 */
#ifndef QKV_DATA_H
#define QKV_DATA_H

#include "tensor/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Types ------------------------------------------------------------------------------- */

/* Labelled texts as read from a file. Fields are for reading. */
typedef struct qkv_tsv {
    int64_t n;                  /* examples, in file order */
    const char *const *labels;  /* labels[i]: non-empty UTF-8 */
    const char *const *texts;   /* texts[i]: UTF-8, possibly empty */
} qkv_tsv;

typedef enum qkv_tokenizer {
    QKV_TOKENIZE_WORDS = 0, /* maximal runs of word characters, lowercased */
    QKV_TOKENIZE_CHARS = 1, /* one token per code point, unchanged */
} qkv_tokenizer;

/* The tokens of one text. Fields are for reading. */
typedef struct qkv_tokens {
    int64_t n;
    const char *const *tokens;  /* tokens[i]: NUL-terminated UTF-8 */
} qkv_tokens;

typedef struct qkv_vocab qkv_vocab;     /* token <-> id */
typedef struct qkv_labels qkv_labels;   /* label <-> class id */
typedef struct qkv_dataset qkv_dataset; /* texts encoded once as ids, with class ids */

/* One training batch; see qkv_dataset_batch. */
typedef struct qkv_batch {
    qkv_tensor *ids;              /* I64 [n, max_len]: token ids, padded with QKV_PAD_ID */
    qkv_tensor *key_padding_mask; /* BOOL [n, max_len]: true at padding */
    qkv_tensor *labels;           /* I64 [n]: class ids; NULL for a dataset without labels */
} qkv_batch;

#define QKV_PAD_ID 0 /* "<pad>" */
#define QKV_UNK_ID 1 /* "<unk>" */

/* ---- Reading ----------------------------------------------------------------------------- */

/* Reads lines `label<TAB>text`. The first tab separates; later tabs in the text become spaces.
 * A "\r" before "\n" is dropped, empty lines are skipped, a final newline is optional, a UTF-8
 * byte order mark at the start is skipped. A line without a tab or with an empty label is an
 * error naming the file and line: "qkv_tsv_read: x.tsv:17: no tab between label and text".
 * Regular files and pipes are read (a pipe up to 256 MiB); devices and sockets are refused,
 * since nothing says they end. Every error, running out of memory too, names the file. */
qkv_tsv *qkv_tsv_read(const char *path);
void qkv_tsv_free(qkv_tsv *tsv);

/* ---- Tokenizing -------------------------------------------------------------------------- */

/* Splits text into tokens. QKV_TOKENIZE_WORDS: a token is a maximal run of word characters,
 * which are ASCII letters and digits, the apostrophe, and the non-ASCII code points other than
 * punctuation, symbols, specials (U+FFFD, so invalid bytes separate) and emoji, so "café" and
 * "naïve" stay whole and "a—b" is two words. Letters are lowercased where case pairs are one to
 * one: ASCII, Latin-1, Latin Extended-A, Greek, Cyrillic. Everything else separates.
 * "Don't STOP-me, ÉCOLE" -> "don't", "stop", "me", "école".
 * QKV_TOKENIZE_CHARS: every code point, spaces included, is a token. */
qkv_tokens *qkv_tokenize(qkv_tokenizer kind, const char *text);
void qkv_tokens_free(qkv_tokens *tokens);

/* ---- Vocabulary -------------------------------------------------------------------------- */

/* Counts the tokens of n texts and keeps those seen at least min_count (>= 1) times, most
 * frequent first, equal counts in byte order of the token, after ids 0 "<pad>" and 1 "<unk>";
 * at most max_size ids in all (>= 2, or 0 for no limit). */
qkv_vocab *qkv_vocab_build(qkv_tokenizer kind, const char *const *texts, int64_t n,
                           int64_t min_count, int64_t max_size);
void qkv_vocab_free(qkv_vocab *vocab);
int64_t qkv_vocab_size(const qkv_vocab *vocab);             /* ids, the two specials included */
qkv_tokenizer qkv_vocab_tokenizer(const qkv_vocab *vocab);  /* the kind it was built with */
/* The id of a token, QKV_UNK_ID when it is not in the vocabulary. */
int64_t qkv_vocab_id(const qkv_vocab *vocab, const char *token);
/* The token of an id, or NULL (with an error) when the id is out of range. */
const char *qkv_vocab_token(const qkv_vocab *vocab, int64_t id);
/* Tokenizes text with the vocabulary's tokenizer and writes the first cap ids to ids (unknown
 * tokens give QKV_UNK_ID; a text without tokens gives one QKV_UNK_ID). Returns the number of
 * ids of the whole text, which may exceed cap, or -1 on error. */
int64_t qkv_vocab_encode(const qkv_vocab *vocab, const char *text, int64_t *ids, int64_t cap);

/* ---- Label set --------------------------------------------------------------------------- */

/* The distinct labels among n, in byte order; class ids count from 0 in that order. */
qkv_labels *qkv_labels_build(const char *const *labels, int64_t n);
void qkv_labels_free(qkv_labels *set);
int64_t qkv_labels_size(const qkv_labels *set);
/* The class id of a label, or -1 (no error recorded) for a label not in the set. */
int64_t qkv_labels_id(const qkv_labels *set, const char *label);
/* The label of a class id, or NULL (with an error) when the id is out of range. */
const char *qkv_labels_name(const qkv_labels *set, int64_t id);

/* ---- Serialization (for checkpoints) ----------------------------------------------------- */

/* Byte format, integers little-endian: 8 bytes magic ("qkvvocab" or "qkvlabel"), u32 version
 * (1), u32 tokenizer kind (0 for labels), u64 count, then count entries of u32 length + that
 * many bytes of UTF-8. A vocabulary lists every token by id, "<pad>" and "<unk>" first; a label
 * set lists its labels in byte order.
 * The writers fill buf when cap is at least the size they return (call with cap 0 to learn the
 * size); they return 0 on error. The readers check every count, length and string against the
 * buffer before use, and reject a bad buffer (truncated, trailing bytes, empty or invalid UTF-8
 * strings, duplicates, ...) with an error. */
size_t qkv_vocab_to_bytes(const qkv_vocab *vocab, void *buf, size_t cap);
qkv_vocab *qkv_vocab_from_bytes(const void *buf, size_t size);
size_t qkv_labels_to_bytes(const qkv_labels *set, void *buf, size_t cap);
qkv_labels *qkv_labels_from_bytes(const void *buf, size_t size);

/* ---- Batching ---------------------------------------------------------------------------- */

/* Encodes n texts once (see qkv_vocab_encode), with the class ids of their labels in set;
 * a label not in set is an error. set and labels may both be NULL for unlabelled texts. */
qkv_dataset *qkv_dataset_new(const qkv_vocab *vocab, const char *const *texts,
                             const qkv_labels *set, const char *const *labels, int64_t n);
void qkv_dataset_free(qkv_dataset *ds);
int64_t qkv_dataset_size(const qkv_dataset *ds);
/* Token count of example i before truncation (at least 1), or -1 with an error. */
int64_t qkv_dataset_length(const qkv_dataset *ds, int64_t i);
/* Class id of example i, or -1 (no labels, or i out of range). */
int64_t qkv_dataset_label(const qkv_dataset *ds, int64_t i);
/* The batch of examples idx[0..n): row i holds the first max_len ids of example idx[i],
 * padded with QKV_PAD_ID. On error every field is NULL. */
qkv_batch qkv_dataset_batch(const qkv_dataset *ds, const int64_t *idx, int64_t n,
                            int64_t max_len);

/* Micro-batches: global batch `batch` (from 0) of an epoch of n samples in batches of
 * batch_size holds the positions [batch * batch_size, min((batch + 1) * batch_size, n)) of the
 * epoch's order, the last one possibly partial; it splits into micro_batches parts, part m
 * holding positions [start + m * len / M, start + (m + 1) * len / M) (len the batch's size,
 * rounded down): defined by sample position alone, so the same for every rank count. A part
 * may be empty when len < M. Sets *first (a position in the order) and *count. */
bool qkv_micro_batch_range(int64_t n, int64_t batch_size, int64_t batch, int micro_batches,
                           int micro, int64_t *first, int64_t *count);
/* The number of global batches of an epoch: ceil(n / batch_size). */
int64_t qkv_num_batches(int64_t n, int64_t batch_size);
/* The samples in global batch `batch`: batch_size, or fewer in the last one; -1 with an error
 * out of range. What a loss averaged over the global batch divides by. */
int64_t qkv_batch_count(int64_t n, int64_t batch_size, int64_t batch);
/* The examples idx[0..n) as a batch padded to its own longest example (at most max_len): a
 * micro-batch's shapes then depend on its samples alone. */
qkv_batch qkv_dataset_batch_padded(const qkv_dataset *ds, const int64_t *idx, int64_t n,
                                   int64_t max_len);

/* Shuffles idx[0..n) in place by Fisher-Yates: for i from n-1 down to 1, swap idx[i] with
 * idx[qkv_generator_below(g, i + 1)]. One seed gives one order on every platform. */
void qkv_shuffle(int64_t *idx, int64_t n, qkv_generator *g);

/* ---- Byte-level and BPE tokenizers ------------------------------------------------------- */

/* Byte-pair encoding over raw bytes (not text: no UTF-8 replacement here): ids 0..255 are the
 * bytes, id 256 + i is merge i, the concatenation of two earlier tokens. Every byte string,
 * invalid UTF-8, NUL bytes and the empty string included, encodes and decodes back to itself.
 * Special ids (an end-of-text, say) are the caller's, from qkv_bpe_vocab_size up; decode
 * refuses them. */
typedef struct qkv_bpe qkv_bpe;

/* The byte-level tokenizer: no merges, one id per byte. */
qkv_bpe *qkv_bpe_new(void);
/* Learns up to n_merges merges from size bytes of corpus: each merges every occurrence (left
 * to right) of the most frequent adjacent pair, ties to the lowest (left, right) ids; training
 * stops early when no pair occurs twice. One corpus gives one tokenizer. An empty corpus is an
 * error. */
qkv_bpe *qkv_bpe_train(const void *corpus, size_t size, int64_t n_merges);
void qkv_bpe_free(qkv_bpe *bpe);
int64_t qkv_bpe_vocab_size(const qkv_bpe *bpe); /* 256 + merges */
/* The bytes of token id (valid while bpe lives) and their count in *size; NULL out of range. */
const void *qkv_bpe_token(const qkv_bpe *bpe, int64_t id, size_t *size);
/* Encodes size bytes, applying the merges earliest first, and writes the first cap ids to ids.
 * Returns the number of ids of the whole text, which may exceed cap, or -1 on error. */
int64_t qkv_bpe_encode(const qkv_bpe *bpe, const void *text, size_t size, int64_t *ids,
                       int64_t cap);
/* Writes the bytes of n ids to buf when they fit in cap; returns their count (which may exceed
 * cap), or -1 for an id outside the vocabulary. */
int64_t qkv_bpe_decode(const qkv_bpe *bpe, const int64_t *ids, int64_t n, void *buf, size_t cap);
/* Byte format, little-endian: 8 bytes magic "qkvbpe\0\0", u32 version (1), u32 0, u64 merge
 * count, then per merge u32 left id, u32 right id; saved in a checkpoint as a byte extra
 * (qkv_named_bytes). Writer and reader follow the vocabulary's conventions above; the reader
 * rejects a merge of ids not below its own, a repeated pair, and any size mismatch. */
size_t qkv_bpe_to_bytes(const qkv_bpe *bpe, void *buf, size_t cap);
qkv_bpe *qkv_bpe_from_bytes(const void *buf, size_t size);

/* ---- Language-model dataset -------------------------------------------------------------- */

/* One token stream cut into (n - 1) / context windows of context + 1 tokens that do not
 * overlap; window w gives inputs tokens[w*context ..][0..context) and targets the same shifted
 * by one (the next token at each position). The last round(windows * valid_fraction) windows
 * are the validation split, the rest the training split; a split fraction that leaves either
 * empty (with valid_fraction > 0) is an error, as is a stream shorter than one window. */
typedef struct qkv_lm_dataset qkv_lm_dataset;
typedef enum qkv_split { QKV_SPLIT_TRAIN = 0, QKV_SPLIT_VALID = 1 } qkv_split;
typedef struct qkv_lm_batch {
    qkv_tensor *inputs;  /* I64 [n, context] */
    qkv_tensor *targets; /* I64 [n, context]: inputs shifted left by one token */
} qkv_lm_batch;

qkv_lm_dataset *qkv_lm_dataset_new(const int64_t *tokens, int64_t n, int64_t context,
                                   double valid_fraction);
void qkv_lm_dataset_free(qkv_lm_dataset *ds);
int64_t qkv_lm_dataset_size(const qkv_lm_dataset *ds, qkv_split split); /* windows */
int64_t qkv_lm_dataset_context(const qkv_lm_dataset *ds);
/* Fills idx[0..size) with the split's window indices, shuffled by g (qkv_shuffle) unless g is
 * NULL: one seed gives one epoch order. */
bool qkv_lm_dataset_order(const qkv_lm_dataset *ds, qkv_split split, int64_t *idx,
                          qkv_generator *g);
/* The windows idx[0..n) of split as a batch (in the innermost scope); on error both NULL. */
qkv_lm_batch qkv_lm_dataset_batch(const qkv_lm_dataset *ds, qkv_split split,
                                  const int64_t *idx, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
