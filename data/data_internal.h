/*
 * Parts of the data layer shared between its files: a growable byte buffer, UTF-8 decoding with
 * U+FFFD replacement, the tokenizer's iterator, a hashed string table, and the byte format of
 * serialized string lists. Never installed.
 */
#ifndef QKV_DATA_INTERNAL_H
#define QKV_DATA_INTERNAL_H

#include "data/data.h"
#include "tensor/tensor_internal.h"

/* ---- Byte buffer ------------------------------------------------------------------------- */

typedef struct qkv__buf {
    char *data;
    size_t len;
    size_t cap;
} qkv__buf;

bool qkv__buf_append(qkv__buf *b, const void *src, size_t n); /* false + error on failure */
void qkv__buf_free(qkv__buf *b);

/* ---- UTF-8 ------------------------------------------------------------------------------- */

/* Decodes the code point at p (p < end) into *cp. Returns its length in bytes (1 to 4), or 0
 * when the byte at p does not start a valid sequence (overlong, surrogate, beyond U+10FFFF,
 * truncated, a stray continuation byte, or NUL): *cp is then U+FFFD and the caller skips one
 * byte. */
int qkv__utf8_decode(const unsigned char *p, const unsigned char *end, uint32_t *cp);
/* Appends the n bytes at p as decoded by qkv__utf8_decode (n == 0 appends U+FFFD). */
bool qkv__utf8_append(qkv__buf *b, const unsigned char *p, int n);
/* True when the n bytes at p are valid UTF-8 without NUL. */
bool qkv__utf8_valid(const unsigned char *p, size_t n);

/* ---- Tokenizer iterator ------------------------------------------------------------------ */

typedef struct qkv__token_iter {
    qkv_tokenizer kind;
    const unsigned char *p;
    const unsigned char *end;
} qkv__token_iter;

void qkv__token_iter_init(qkv__token_iter *it, qkv_tokenizer kind, const char *text);
/* Writes the next token into tok (replacing its contents, no NUL). Returns 1 for a token, 0 at
 * the end, -1 on allocation failure (error recorded). */
int qkv__token_next(qkv__token_iter *it, qkv__buf *tok);
/* False, with an error prefixed by op, unless kind is a qkv_tokenizer. */
bool qkv__check_tokenizer(const char *op, qkv_tokenizer kind);

/* ---- Vocabulary ------------------------------------------------------------------------- */

/* Appends the ids of text at (*ids)[at...], growing *ids (capacity *cap elements); tok is
 * scratch space. Returns the number of ids (at least 1) or -1 on allocation failure. */
int64_t qkv__vocab_encode_append(const qkv_vocab *vocab, const char *text, qkv__buf *tok,
                                 int64_t **ids, size_t *cap, size_t at);

/* ---- String table: strings with ids 0..n-1 in insertion order, found by hash ------------- */

typedef struct qkv__strentry {
    int64_t offset;        /* start of the string in bytes */
    int64_t length;        /* without the NUL */
    int64_t count;         /* occurrences, for callers that count */
    uint64_t hash;
} qkv__strentry;

typedef struct qkv__strtab {
    qkv__buf bytes;        /* the strings back to back, each NUL-terminated */
    int64_t n;
    qkv__strentry *entries;
    size_t entries_cap;
    int64_t *slots;        /* open addressing with linear probing, -1 for an empty slot */
    size_t n_slots;        /* a power of two, more than twice n */
} qkv__strtab;

uint64_t qkv__hash(const void *s, size_t len);
int64_t qkv__strtab_find(const qkv__strtab *t, const void *s, size_t len, uint64_t hash);
/* Adds a string known to be absent; returns its id, or -1 on allocation failure. */
int64_t qkv__strtab_add(qkv__strtab *t, const void *s, size_t len, uint64_t hash);
const char *qkv__strtab_str(const qkv__strtab *t, int64_t id);
void qkv__strtab_free(qkv__strtab *t);

/* ---- Serialized string lists ------------------------------------------------------------- */

/* Layout (all integers little-endian):
 *   8 bytes magic, u32 version (1), u32 kind, u64 count, then count entries of
 *   u32 length + that many bytes of UTF-8 (no NUL); nothing after the last entry. */
#define QKV__SER_HEADER 24

/* Writes the header and the strings ids 0..t->n-1 of t into buf when cap is large enough;
 * returns the size needed. */
size_t qkv__strings_to_bytes(const char magic[8], uint32_t kind, const qkv__strtab *t,
                             void *buf, size_t cap);
/* Checks the whole buffer, then fills t (empty on entry) with its strings in order. Rejects,
 * with an error prefixed by op: a bad magic or version, a count or length beyond the buffer,
 * an empty string, invalid UTF-8 or NUL, duplicates, and trailing bytes. */
bool qkv__strings_from_bytes(const char *op, const char magic[8], const void *buf, size_t size,
                             uint32_t *kind, qkv__strtab *t);

#endif
