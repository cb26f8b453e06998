#!/usr/bin/python3
"""Baselines for the text classifier: majority class and multinomial naive Bayes.

Naive Bayes over bag-of-words counts from the word tokenizer of bench/textdata.py,
with Laplace smoothing (alpha = 1) over the training vocabulary; test tokens never
seen in training are ignored. Ties go to the lowest label id (sorted labels).
Prints `majority_acc=...` and then `test_acc=...` as the last line.
"""
import argparse
import collections
import math

import textdata


def train(labels, token_lists, alpha):
    """Return (log prior, log likelihood per label and token, default log likelihood)."""
    label_names = sorted(set(labels))
    n_docs = collections.Counter(labels)
    counts = {l: collections.Counter() for l in label_names}
    for label, tokens in zip(labels, token_lists):
        counts[label].update(tokens)
    vocab = set().union(*counts.values())
    log_prior, log_lik, log_unseen = {}, {}, {}
    for l in label_names:
        denom = math.log(sum(counts[l].values()) + alpha * len(vocab))
        log_prior[l] = math.log(n_docs[l] / len(labels))
        log_lik[l] = {t: math.log(c + alpha) - denom for t, c in counts[l].items()}
        log_unseen[l] = math.log(alpha) - denom
    return label_names, vocab, log_prior, log_lik, log_unseen


def predict(model, tokens):
    label_names, vocab, log_prior, log_lik, log_unseen = model
    tokens = [t for t in tokens if t in vocab]
    best, best_score = None, -math.inf
    for l in label_names:
        lik, unseen = log_lik[l], log_unseen[l]
        score = log_prior[l] + sum(lik.get(t, unseen) for t in tokens)
        if score > best_score:
            best, best_score = l, score
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", default="data/generated/train.tsv")
    ap.add_argument("--test", default="data/generated/test.tsv")
    ap.add_argument("--alpha", type=float, default=1.0, help="additive smoothing")
    args = ap.parse_args()

    train_labels, train_texts = textdata.read_tsv(args.train)
    test_labels, test_texts = textdata.read_tsv(args.test)
    model = train(train_labels, [textdata.word_tokens(t) for t in train_texts], args.alpha)

    n_docs = collections.Counter(train_labels)
    majority = min(model[0], key=lambda l: (-n_docs[l], l))
    majority_acc = sum(l == majority for l in test_labels) / len(test_labels)
    correct = sum(predict(model, textdata.word_tokens(t)) == l
                  for l, t in zip(test_labels, test_texts))
    print(f"train={len(train_labels)} test={len(test_labels)} classes={len(model[0])} "
          f"vocab={len(model[1])} majority_label={majority}")
    print(f"majority_acc={majority_acc:.4f}")
    print(f"test_acc={correct / len(test_labels):.4f}")


if __name__ == "__main__":
    main()
