"""Text pipeline shared by the reference scripts; qkv's data/ must match it exactly.

- A dataset file has one `label<TAB>text` per line (UTF-8).
- Word level: the text is lowercased with str.lower() (ASCII and Unicode), then a token
  is a maximal run of characters c with c.isalnum() or c == "'".
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


def word_tokens(text):
    tokens, run = [], []
    for c in text.lower():
        if c.isalnum() or c == "'":
            run.append(c)
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
