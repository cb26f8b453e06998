#!/bin/sh
# make demo-lm: builds a corpus from text every Debian system has (the licence texts under
# /usr/share/common-licenses, and the English manual pages as plain text when man-db is
# there), trains the example language model on it for a few minutes, prints its validation
# bits per byte, and generates a sample. DEMO_STEPS and THREADS may be set.
set -e
build=${1:-build}
steps=${DEMO_STEPS:-1200}
threads=${THREADS:-2}
corpus="$build/demo-lm-corpus.txt"
if [ ! -s "$corpus" ]; then
    cat /usr/share/common-licenses/* >"$corpus.tmp"
    # Manual pages are gzip'd troff: lines starting with '.' are requests, the rest is text
    # (with \f font escapes). A megabyte of them is plenty beside the licences.
    if [ -d /usr/share/man/man1 ]; then
        find /usr/share/man/man1 -name '*.gz' | sort | head -n 600 | while read -r page; do
            zcat "$page" 2>/dev/null || true
        done | grep -v "^[.']" | sed 's/\\f[BIRP]//g; s/\\-/-/g; s/\\(em/--/g' |
            head -c 1000000 >>"$corpus.tmp" || true
    fi
    mv "$corpus.tmp" "$corpus"
fi
model="$build/demo-lm.safetensors"
echo "corpus: $corpus ($(wc -c <"$corpus") bytes)"
"$build/examples/qkv-lm" train --text "$corpus" --bpe 256 --steps "$steps" --layers 4 --dim 128 \
    --heads 4 --kv-heads 2 --ctx 128 --batch 16 --lr 3e-3 --threads "$threads" --save "$model"
echo
echo "a sample (temperature 0.8, top-k 40, top-p 0.95):"
"$build/examples/qkv-lm" generate --load "$model" --prompt "This program is free software" \
    --tokens 200 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1 --threads "$threads"
