#!/usr/bin/python3
"""Build the default text-classification dataset from Debian's package index.

Each binary package in `apt-cache dumpavail` becomes one example:
  text  = its Description (short line plus long description; continuation lines
          with the leading space stripped, lines that are a single '.' dropped,
          all whitespace folded to single spaces),
  label = its Section with any `area/` prefix dropped (`contrib/net` -> `net`).

Identical (label, text) pairs are kept once, sections with fewer than
MIN_PER_LABEL packages are dropped, and the rest is split 80/20 by a stable
hash of the text, so one text never lands in both splits. Output:
OUT_DIR/train.tsv and OUT_DIR/test.tsv, one `label<TAB>text` per line, sorted.

Standard library only. Usage:
  data/make_dataset.py [--out DIR] [--input SAVED_DUMPAVAIL]
"""
import argparse
import collections
import hashlib
import os
import subprocess
import sys

MIN_PER_LABEL = 100


def read_index(path):
    """Return the dumpavail text, from PATH or from apt-cache."""
    if path:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], check=True,
                             stdout=subprocess.PIPE).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"make_dataset: cannot run apt-cache dumpavail: {e}")
    return out.decode("utf-8", errors="replace")


def stanzas(text):
    """Yield each stanza as a dict field -> list of lines (first line is the value)."""
    fields, last = {}, None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, None
        elif line[0] in " \t":
            if last is not None:
                fields[last].append(line[1:])
        elif ":" in line:
            name, value = line.split(":", 1)
            last = name.strip()
            fields[last] = [value.strip()]
    if fields:
        yield fields


def example(fields):
    """Return (label, text) for one stanza, or None if it lacks either."""
    if "Description" not in fields or "Section" not in fields:
        return None
    label = fields["Section"][0].split("/")[-1].strip()
    lines = [l for l in fields["Description"] if l.strip() != "."]
    text = " ".join(" ".join(lines).split())
    if not label or not text:
        return None
    return label, text


def is_test(text):
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 5 == 0


def write_tsv(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for label, text in rows:
            f.write(f"{label}\t{text}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/generated", help="output directory")
    ap.add_argument("--input", help="saved `apt-cache dumpavail` output to read instead")
    args = ap.parse_args()

    pairs = {ex for ex in map(example, stanzas(read_index(args.input))) if ex}
    if not pairs:
        print("make_dataset: the package index is empty; run `apt-get update` "
              "(as root) to download the package lists, then try again.", file=sys.stderr)
        sys.exit(2)

    per_label = collections.Counter(label for label, _ in pairs)
    kept = sorted(p for p in pairs if per_label[p[0]] >= MIN_PER_LABEL)
    splits = {"train": [], "test": []}
    for label, text in kept:
        splits["test" if is_test(text) else "train"].append((label, text))

    os.makedirs(args.out, exist_ok=True)
    for name, rows in splits.items():
        write_tsv(os.path.join(args.out, name + ".tsv"), rows)

    labels = sorted({label for label, _ in kept})
    dropped = sorted(l for l in per_label if per_label[l] < MIN_PER_LABEL)
    print(f"labels={len(labels)} train={len(splits['train'])} test={len(splits['test'])} "
          f"dropped_labels={len(dropped)} out={args.out}", file=sys.stderr)
    counts = {n: collections.Counter(l for l, _ in rows) for n, rows in splits.items()}
    for label in labels:
        print(f"  {label:<16} train={counts['train'][label]:<6} test={counts['test'][label]}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
