#!/bin/sh
# BF16 safetensors both ways: qkv's BF16 tensor reads in PyTorch as torch.bfloat16 with the same
# bits, and PyTorch's reads in qkv. Skipped (exit 77) without Debian's python3-torch.
prog=$1
fixtures=$2
/usr/bin/python3 -c 'import torch, numpy' 2>/dev/null || { echo "no python3-torch: skipped"; exit 77; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$prog" write "$out/qkv.safetensors" || exit 1
/usr/bin/python3 "$fixtures/interop_bf16.py" check "$out/qkv.safetensors" || exit 1
/usr/bin/python3 "$fixtures/interop_bf16.py" write "$out/torch.safetensors" || exit 1
"$prog" read "$out/torch.safetensors"
