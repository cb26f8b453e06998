#!/bin/sh
# make demo: builds the default dataset from this machine's Debian package index (once),
# trains the example classifier on it, and predicts a few sample descriptions.
set -e
build=${1:-build}
epochs=${DEMO_EPOCHS:-8}
threads=${THREADS:-2}
data=data/generated
if [ ! -s "$data/train.tsv" ] || [ ! -s "$data/test.tsv" ]; then
    sh tools/install-deps.sh python3
    if [ -z "$(apt-cache dumpavail 2>/dev/null | head -c 1)" ]; then
        echo "the package index is empty; running apt-get update"
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
    fi
    python3 data/make_dataset.py --out "$data"
fi
model="$build/demo-classifier.safetensors"
"$build/examples/qkv-classify" train --train "$data/train.tsv" --test "$data/test.tsv" \
    --epochs "$epochs" --threads "$threads" --save "$model"
echo
echo "predictions for a few package descriptions (label, probability):"
"$build/examples/qkv-classify" predict --load "$model" <<'TEXTS'
Python 3 bindings for the GTK graphical toolkit
command-line utility to convert images between formats
development files for the XML parsing library
documentation for the Rust standard library
font family with wide Unicode coverage
TEXTS
