#!/bin/sh
# make bench-lm: qkv-lm and its PyTorch twin (bench/lm_torch.py) trained from the same initial
# weights on the same windows in the same order (qkv-lm --export-init), at 1 and 2 threads;
# then generation with the key/value cache against recomputing the whole prefix, up to 256
# tokens of context. Prints both validation losses, both training times and their ratio, and
# both generation speeds. STEPS (default 150) may be set. The corpus is the licence texts
# every Debian system has (/usr/share/common-licenses).
build=${1:-build}
steps=${STEPS:-150}
set -e
bin="$build/examples/qkv-lm"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat /usr/share/common-licenses/* >"$out/corpus.txt"
model="--layers 2 --dim 128 --heads 4 --kv-heads 2 --ctx 256 --batch 8 --lr 3e-3"
echo "== qkv-lm vs PyTorch: $steps steps, $model, byte-level tokens"
echo "   corpus /usr/share/common-licenses/* ($(wc -c <"$out/corpus.txt") bytes)"
printf '%-8s %12s %12s %12s %12s %10s\n' threads qkv_loss torch_loss qkv_seconds \
    torch_seconds ratio
for threads in 1 2; do
    "$bin" train --text "$out/corpus.txt" --steps "$steps" $model --eval-every 0 \
        --threads "$threads" --save "$out/m.safetensors" --export-init "$out/init.safetensors" \
        >"$out/qkv.txt"
    # The reference runs at its best: no override holding OpenBLAS to older kernels.
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /usr/bin/python3 bench/lm_torch.py \
        --init "$out/init.safetensors" --threads "$threads" >"$out/torch.txt"
    q_loss=$(sed -n 's/^val_loss=//p' "$out/qkv.txt")
    p_loss=$(sed -n 's/^val_loss=//p' "$out/torch.txt")
    q_sec=$(sed -n 's/^train_seconds=\([0-9.]*\).*/\1/p' "$out/qkv.txt")
    p_sec=$(sed -n 's/^train_seconds=//p' "$out/torch.txt")
    ratio=$(awk -v a="$q_sec" -v b="$p_sec" 'BEGIN { printf "%.2f", a / b }')
    printf '%-8s %12s %12s %12s %12s %10s\n' "$threads" "$q_loss" "$p_loss" "$q_sec" "$p_sec" \
        "$ratio"
    awk -v a="$q_loss" -v b="$p_loss" -v r="$ratio" -v t="$threads" 'BEGIN {
        d = a - b; if (d < 0) d = -d
        printf "threads %s: loss difference %.4f nats/token (target <= 0.02: %s), ", t, d,
            (d <= 0.02) ? "met" : "NOT met"
        printf "time qkv/pytorch %.2f (target <= 0.5: %s)\n", r, (r <= 0.5) ? "met" : "NOT met" }'
done

# Generation up to 256 tokens of context (a 16-byte prompt and 240 new tokens), greedy.
echo "== generation, 240 tokens after a 16-byte prompt (context 256), 1 thread"
for mode in 0 1; do
    "$bin" generate --load "$out/m.safetensors" --prompt "Copyright (C) 19" --tokens 240 \
        --temperature 0 --no-cache $mode --threads 1 2>"$out/gen$mode.txt" >"$out/text$mode.txt"
    sed 's/^/   /' "$out/gen$mode.txt"
done
cmp -s "$out/text0.txt" "$out/text1.txt" && same=yes || same=no
cached=$(sed -n 's/.*s: \([0-9.]*\) tokens\/s.*/\1/p' "$out/gen0.txt")
recomputed=$(sed -n 's/.*s: \([0-9.]*\) tokens\/s.*/\1/p' "$out/gen1.txt")
awk -v a="$cached" -v b="$recomputed" -v s="$same" 'BEGIN {
    printf "kv cache speed-up: %.1fx per token (target >= 5: %s); same text: %s\n", a / b,
        (a / b >= 5) ? "met" : "NOT met", s }'
