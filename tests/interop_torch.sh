#!/bin/sh
# A qkv checkpoint loads in PyTorch and gives the logits qkv computed. Skipped (exit 77) where
# Debian's python3-torch is not installed: the suite itself never needs Python.
writer=$1
fixtures=$2
/usr/bin/python3 -c 'import torch, numpy' 2>/dev/null || { echo "no python3-torch: skipped"; exit 77; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$writer" "$out/qkv.safetensors" || exit 1
/usr/bin/python3 "$fixtures/interop_checkpoint.py" check "$out/qkv.safetensors"
