#!/usr/bin/python3
"""PyTorch twin of the C example `qkv-classify`, for the accuracy comparison.

Data pipeline: bench/textdata.py (tokenizer, vocabulary, labels, truncation).
Model: token embedding + learned position embedding -> dropout -> `layers` pre-LN
nn.TransformerEncoderLayer (gelu, batch_first) with a key padding mask -> LayerNorm
-> mean over non-padding positions -> Linear to the classes. Cross-entropy, Adam.

Each batch is cut to its longest row before the forward: padding is masked out of
attention and pooling, so this changes no result, only the time.

Prints `epoch N train_loss=... test_acc=... seconds=...` per epoch (seconds include
the evaluation) and `test_acc=...` as the last line.
Example (from the repository root, after data/make_dataset.py):
  bench/classify_torch.py --threads 2
"""
import argparse
import os
import sys
import time

import threadenv

threadenv.apply(sys.argv)

import torch  # noqa: E402  (after the thread environment)
from torch import nn  # noqa: E402

import textdata  # noqa: E402


class Classifier(nn.Module):
    def __init__(self, vocab_size, n_classes, max_len, dim, heads, layers, ffn, dropout):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=ffn,
                                       dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids, key_padding_mask):
        """ids: [B, T] int64; key_padding_mask: [B, T] bool, True = padding."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.dropout(self.tok_embed(ids) + self.pos_embed(pos))
        for block in self.blocks:
            x = block(x, src_key_padding_mask=key_padding_mask)
        x = self.norm(x)
        keep = (~key_padding_mask).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1)
        return self.head(pooled)


def load(path, tokenize, limit=0):
    labels, texts = textdata.read_tsv(path)
    rows = textdata.subsample(len(texts), limit)
    return [labels[i] for i in rows], [tokenize(texts[i]) for i in rows]


def to_tensors(token_lists, label_names, vocab, label_index, max_len):
    """Pad to max_len: (ids [N, max_len], mask [N, max_len], labels [N]); unknown label -> -1."""
    index = {t: i for i, t in enumerate(vocab)}
    ids = torch.full((len(token_lists), max_len), textdata.PAD, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        seq = textdata.encode(tokens, index, max_len)
        ids[row, :len(seq)] = torch.tensor(seq)
    labels = torch.tensor([label_index.get(l, -1) for l in label_names], dtype=torch.long)
    return ids, ids == textdata.PAD, labels


def trimmed(ids, mask):
    """Cut a padded batch to its longest row."""
    width = int((~mask).sum(1).max())
    return ids[:, :width], mask[:, :width]


def accuracy(model, ids, mask, labels, batch=256):
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(labels), batch):
            logits = model(*trimmed(ids[s:s + batch], mask[s:s + batch]))
            correct += (logits.argmax(1) == labels[s:s + batch]).sum().item()
    return correct / len(labels)


def train_epoch(model, opt, ids, mask, labels, batch, gen):
    model.train()
    order = torch.randperm(len(labels), generator=gen)
    total, n = 0.0, 0
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(*trimmed(ids[idx], mask[idx])), labels[idx])
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        n += len(idx)
    return total / n


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", default="data/generated/train.tsv")
    ap.add_argument("--test", default="data/generated/test.tsv")
    ap.add_argument("--level", choices=sorted(textdata.TOKENIZERS), default="word")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--max-vocab", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, default=0,
                    help="train on N rows spread evenly over the file (0 = all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return ap.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    tokenize = textdata.TOKENIZERS[args.level]
    train_labels, train_tokens = load(args.train, tokenize, args.limit_train)
    test_labels, test_tokens = load(args.test, tokenize)
    vocab = textdata.build_vocab(train_tokens, args.min_count, args.max_vocab)
    label_names = sorted(set(train_labels))
    label_index = {l: i for i, l in enumerate(label_names)}
    train = to_tensors(train_tokens, train_labels, vocab, label_index, args.max_len)
    test = to_tensors(test_tokens, test_labels, vocab, label_index, args.max_len)

    model = Classifier(len(vocab), len(label_names), args.max_len, args.dim, args.heads,
                       args.layers, args.ffn, args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train={len(train_labels)} test={len(test_labels)} vocab={len(vocab)} "
          f"classes={len(label_names)} params={n_params} threads={args.threads}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, *train, args.batch, gen)
        acc = accuracy(model, *test)
        print(f"epoch {epoch} train_loss={loss:.4f} test_acc={acc:.4f} "
              f"seconds={time.perf_counter() - t0:.1f}", flush=True)
    print(f"total_seconds={time.perf_counter() - start:.1f}")
    print(f"test_acc={acc:.4f}")


if __name__ == "__main__":
    main()
