/* Text primitives of the data layer: a growable byte buffer, UTF-8 decoding with U+FFFD
 * replacement, and the word and character tokenizers. */
#include "data/data_internal.h"

#include <string.h>

bool qkv__buf_append(qkv__buf *b, const void *src, size_t n) {
    if (n == 0) return true; /* b->data may still be NULL */
    if (!qkv__reserve((void **)&b->data, &b->cap, b->len + n, 1)) return false;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return true;
}

void qkv__buf_free(qkv__buf *b) {
    qkv__free(b->data, b->cap);
    *b = (qkv__buf){0};
}

/* ---- UTF-8 ------------------------------------------------------------------------------- */

int qkv__utf8_decode(const unsigned char *p, const unsigned char *end, uint32_t *cp) {
    unsigned c = p[0];
    *cp = 0xFFFD;
    if (c < 0x80) {
        if (c == 0) return 0;
        *cp = c;
        return 1;
    }
    int n;
    uint32_t v;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2, v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, v = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, v = c & 0x07;
    } else {
        return 0; /* continuation byte, C0/C1 (always overlong) or F5..FF */
    }
    if (end - p < n) return 0;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (p[i] & 0x3F);
    }
    if (n == 3 && (v < 0x800 || (v >= 0xD800 && v <= 0xDFFF))) return 0;
    if (n == 4 && (v < 0x10000 || v > 0x10FFFF)) return 0;
    *cp = v;
    return n;
}

bool qkv__utf8_append(qkv__buf *b, const unsigned char *p, int n) {
    static const unsigned char replacement[3] = {0xEF, 0xBF, 0xBD};
    return n ? qkv__buf_append(b, p, (size_t)n) : qkv__buf_append(b, replacement, 3);
}

bool qkv__utf8_valid(const unsigned char *p, size_t n) {
    const unsigned char *end = p + n;
    uint32_t cp;
    while (p < end) {
        int len = qkv__utf8_decode(p, end, &cp);
        if (len == 0) return false;
        p += len;
    }
    return true;
}

/* ---- Tokenizers -------------------------------------------------------------------------- */

void qkv__token_iter_init(qkv__token_iter *it, qkv_tokenizer kind, const char *text) {
    it->kind = kind;
    it->p = (const unsigned char *)text;
    it->end = it->p + strlen(text);
}

/* The non-ASCII code points that separate words, as closed ranges: Latin-1 punctuation and
 * symbols (but the micro sign), the multiplication and division signs, General Punctuation
 * through Miscellaneous Symbols and Arrows (dashes, quotes, currency, letterlike symbols, math,
 * box drawing, dingbats), Supplemental Punctuation, CJK punctuation, private use, vertical and
 * small forms, full-width ASCII punctuation, Specials (U+FFFD included) and the emoji planes.
 * bench/textdata.py holds the same table. */
static const uint32_t separators[][2] = {
    {0x80, 0xB4},     {0xB6, 0xBF},     {0xD7, 0xD7},     {0xF7, 0xF7},     {0x2000, 0x2BFF},
    {0x2E00, 0x2E7F}, {0x3000, 0x303F}, {0xE000, 0xF8FF}, {0xFE10, 0xFE1F}, {0xFE30, 0xFE4F},
    {0xFF00, 0xFF0F}, {0xFF1A, 0xFF20}, {0xFF3B, 0xFF40}, {0xFF5B, 0xFF65}, {0xFFF0, 0xFFFF},
    {0x1F000, 0x1FAFF},
};

static bool is_word_char(uint32_t c) {
    if (c < 0x80)
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               c == '\'';
    for (size_t i = 0; i < sizeof separators / sizeof separators[0]; i++)
        if (c >= separators[i][0] && c <= separators[i][1]) return false;
    return true;
}

/* Simple lowercasing of the alphabets with one-to-one case pairs: ASCII, Latin-1, Latin
 * Extended-A, Greek and Cyrillic. Other code points are kept as they are. */
static uint32_t to_lower(uint32_t c) {
    if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7)) return c + 0x20;
    if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return c | 1;
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return c + (c & 1);
    if (c == 0x178) return 0xFF;
    if ((c >= 0x391 && c <= 0x3A9 && c != 0x3A2) || (c >= 0x410 && c <= 0x42F)) return c + 0x20;
    if (c >= 0x400 && c <= 0x40F) return c + 0x50;
    return c;
}

static bool append_code_point(qkv__buf *b, uint32_t c) {
    unsigned char out[4];
    int n = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
    if (n == 1) out[0] = (unsigned char)c;
    else {
        for (int i = n - 1; i > 0; i--, c >>= 6) out[i] = (unsigned char)(0x80 | (c & 0x3F));
        out[0] = (unsigned char)((0xF00 >> n) | c);
    }
    return qkv__buf_append(b, out, (size_t)n);
}

/* Invalid bytes decode to U+FFFD, a separator, one byte at a time. */
static int decode(qkv__token_iter *it, uint32_t *cp) {
    int n = qkv__utf8_decode(it->p, it->end, cp);
    return n ? n : 1;
}

static int next_word(qkv__token_iter *it, qkv__buf *tok) {
    uint32_t cp = 0;
    int n = 0;
    while (it->p < it->end && !is_word_char((n = decode(it, &cp), cp))) it->p += n;
    if (it->p == it->end) return 0;
    while (it->p < it->end && is_word_char((n = decode(it, &cp), cp))) {
        if (!append_code_point(tok, to_lower(cp))) return -1;
        it->p += n;
    }
    return 1;
}

static int next_char(qkv__token_iter *it, qkv__buf *tok) {
    if (it->p == it->end) return 0;
    uint32_t cp;
    int n = qkv__utf8_decode(it->p, it->end, &cp);
    if (!qkv__utf8_append(tok, it->p, n)) return -1;
    it->p += n ? n : 1;
    return 1;
}

int qkv__token_next(qkv__token_iter *it, qkv__buf *tok) {
    tok->len = 0;
    return it->kind == QKV_TOKENIZE_CHARS ? next_char(it, tok) : next_word(it, tok);
}

/* ---- Public tokenizer -------------------------------------------------------------------- */

typedef struct tokens_impl {
    qkv_tokens pub;
    qkv__buf bytes;     /* the tokens back to back, each NUL-terminated */
    const char **ptrs;
    size_t ptrs_size;
} tokens_impl;

void qkv_tokens_free(qkv_tokens *tokens) {
    if (!tokens) return;
    tokens_impl *t = (tokens_impl *)tokens;
    qkv__buf_free(&t->bytes);
    qkv__free(t->ptrs, t->ptrs_size);
    qkv__free(t, sizeof *t);
}

bool qkv__check_tokenizer(const char *op, qkv_tokenizer kind) {
    if (kind == QKV_TOKENIZE_WORDS || kind == QKV_TOKENIZE_CHARS) return true;
    qkv_set_error("%s: unknown tokenizer %d", op, (int)kind);
    return false;
}

qkv_tokens *qkv_tokenize(qkv_tokenizer kind, const char *text) {
    if (!text) return qkv_set_error("qkv_tokenize: text is NULL");
    if (!qkv__check_tokenizer("qkv_tokenize", kind)) return NULL;
    tokens_impl *t = qkv__calloc(sizeof *t);
    qkv__buf tok = {0};
    if (!t) return NULL;
    qkv__token_iter it;
    qkv__token_iter_init(&it, kind, text);
    int64_t n = 0;
    int r;
    while ((r = qkv__token_next(&it, &tok)) == 1) {
        if (!qkv__buf_append(&t->bytes, tok.data, tok.len)) goto fail;
        if (!qkv__buf_append(&t->bytes, "", 1)) goto fail;
        n++;
    }
    if (r < 0) goto fail;
    t->ptrs_size = (size_t)(n ? n : 1) * sizeof *t->ptrs;
    t->ptrs = qkv__alloc(t->ptrs_size);
    if (!t->ptrs) goto fail;
    const char *s = t->bytes.data;
    for (int64_t i = 0; i < n; i++) {
        t->ptrs[i] = s;
        s += strlen(s) + 1;
    }
    t->pub.n = n;
    t->pub.tokens = t->ptrs;
    qkv__buf_free(&tok);
    return &t->pub;
fail:
    qkv__buf_free(&tok);
    qkv_tokens_free(&t->pub);
    return NULL;
}
