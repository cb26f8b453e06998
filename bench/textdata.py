"""Text pipeline shared by the reference scripts; qkv's data/ must match it exactly.

- A dataset file has one `label<TAB>text` per line (UTF-8).
- Word level: a token is a maximal run of word characters: ASCII letters, digits and the
  apostrophe, and every non-ASCII code point outside SEPARATORS (punctuation, symbols,
  specials, emoji). Letters are lowercased by lower() below: ASCII, Latin-1, Latin
  Extended-A, Greek and Cyrillic case pairs (data/text.c holds the same rules).
- Char level: one token per Unicode code point of the text as it is (no lowercasing).
- Vocabulary from the training texts: id 0 = <pad>, id 1 = <unk>, then the tokens with
  count >= min_count, most frequent first, ties by the token's UTF-8 bytes ascending,
  capped at max_size entries including the two specials.
- Labels: the sorted set of training labels (byte order); id = position.
- Encoding: unknown tokens -> 1, keep the first max_len tokens, pad with 0; a text with
  no tokens becomes the single token <unk>.
"""
import collections

PAD, UNK = 0, 1


def read_tsv(path):
    """Return (labels, texts) from a `label<TAB>text` file."""
    labels, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            label, sep, text = line.partition("\t")
            if not sep:
                raise SystemExit(f"{path}:{n}: no tab between label and text")
            labels.append(label)
            texts.append(text)
    return labels, texts


SEPARATORS = [
    (0x80, 0xB4), (0xB6, 0xBF), (0xD7, 0xD7), (0xF7, 0xF7), (0x2000, 0x2BFF),
    (0x2E00, 0x2E7F), (0x3000, 0x303F), (0xE000, 0xF8FF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F),
    (0xFF00, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF65), (0xFFF0, 0xFFFF),
    (0x1F000, 0x1FAFF),
]


def is_word_char(c):
    o = ord(c)
    if o < 0x80:
        return c.isalnum() or c == "'"
    return not any(lo <= o <= hi for lo, hi in SEPARATORS)


def lower(c):
    o = ord(c)
    if 0x41 <= o <= 0x5A or (0xC0 <= o <= 0xDE and o != 0xD7):
        o += 0x20
    elif 0x100 <= o <= 0x137 or 0x14A <= o <= 0x177:
        o |= 1
    elif 0x139 <= o <= 0x148 or 0x179 <= o <= 0x17E:
        o += o & 1
    elif o == 0x178:
        o = 0xFF
    elif (0x391 <= o <= 0x3A9 and o != 0x3A2) or 0x410 <= o <= 0x42F:
        o += 0x20
    elif 0x400 <= o <= 0x40F:
        o += 0x50
    return chr(o)


def word_tokens(text):
    tokens, run = [], []
    for c in text:
        if is_word_char(c):
            run.append(lower(c))
        elif run:
            tokens.append("".join(run))
            run = []
    if run:
        tokens.append("".join(run))
    return tokens


def char_tokens(text):
    return list(text)


TOKENIZERS = {"word": word_tokens, "char": char_tokens}


def build_vocab(token_lists, min_count=2, max_size=30000):
    """Return the list of vocabulary entries; an entry's index is its id."""
    counts = collections.Counter(t for tokens in token_lists for t in tokens)
    kept = [t for t, c in counts.items() if c >= min_count]
    kept.sort(key=lambda t: (-counts[t], t.encode("utf-8")))
    return ["<pad>", "<unk>"] + kept[:max(0, max_size - 2)]


def encode(tokens, index, max_len):
    """Return token ids: truncated to max_len, never empty, not padded."""
    ids = [index.get(t, UNK) for t in tokens[:max_len]]
    return ids or [UNK]


def subsample(n_rows, limit):
    """Indices of `limit` rows spread evenly over n_rows: floor(k * n_rows / limit)."""
    if not limit or limit >= n_rows:
        return list(range(n_rows))
    return [k * n_rows // limit for k in range(limit)]
