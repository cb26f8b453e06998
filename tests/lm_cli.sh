#!/bin/sh
# qkv-lm as a user runs it: train a tiny model for a few steps, check its report and that it
# learned, generate from the checkpoint (one seed gives one text; greedy decoding with the
# key/value cache gives the tokens of recomputing the whole prefix), and bad input refused
# with a message and exit status 2.
# Usage: lm_cli.sh QKV_LM
set -u
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
check() { # description, then a shell condition
    what=$1
    shift
    if eval "$@"; then
        echo "ok: $what"
    else
        echo "FAILED: $what"
        failures=$((failures + 1))
    fi
}

# A small text with plenty to learn: a few sentences, repeated with variations.
i=0
while [ $i -lt 60 ]; do
    echo "the cat sat on the mat number $i. a dog ran to the park and back again."
    i=$((i + 1))
done >"$work/corpus.txt"

tiny="--layers 1 --dim 32 --heads 4 --kv-heads 2 --ctx 32 --batch 8 --lr 1e-2 --threads 2"
"$bin" train --text "$work/corpus.txt" --steps 40 $tiny --save "$work/m.safetensors" \
    >"$work/train.out" 2>&1
check "train exits 0" '[ $? -eq 0 ]'
check "the last line is val_bpb=X.XXX" \
    'tail -1 "$work/train.out" | grep -qx "val_bpb=[0-9]*\.[0-9][0-9][0-9]"'
start=$(sed -n 's/^step 0\/40 val_loss=[0-9.]* val_bpb=\([0-9.]*\)$/\1/p' "$work/train.out")
end=$(tail -1 "$work/train.out" | sed 's/val_bpb=//')
check "bits per byte fall from step 0 ($start -> $end)" \
    '[ -n "$start" ] && awk -v a="$start" -v b="$end" "BEGIN { exit !(b < a - 0.5) }"'
check "the loss curve is written" \
    '[ "$(head -1 "$work/m.safetensors.loss.csv")" = "step,train_loss,val_loss" ] &&
     grep -q "<polyline" "$work/m.safetensors.loss.svg"'

gen() {
    "$bin" generate --load "$work/m.safetensors" --prompt "the cat" --tokens 24 "$@" 2>/dev/null
}
check "generate exits 0" 'gen --seed 1 >"$work/a.out"'
gen --seed 1 >"$work/b.out"
check "one seed gives one text" 'cmp -s "$work/a.out" "$work/b.out"'
check "the text starts with the prompt" 'head -c 7 "$work/a.out" | grep -qx "the cat"'
gen --temperature 0 >"$work/cached.out"
gen --temperature 0 --no-cache 1 >"$work/recomputed.out"
check "greedy with the kv cache equals recomputing the prefix" \
    'cmp -s "$work/cached.out" "$work/recomputed.out" && [ -s "$work/cached.out" ]'
gen --seed 2 --top-k 5 --top-p 0.9 >"$work/nucleus.out"
check "top-k and top-p sampling gives 24 more bytes" \
    '[ $(wc -c <"$work/nucleus.out") -eq 32 ]'
"$bin" generate --load "$work/m.safetensors" --prompt "the cat" --tokens 8 \
    >/dev/null 2>"$work/speed.out"
check "tokens/s on stderr" 'grep -q "tokens/s (kv cache)" "$work/speed.out"'

# A BPE tokenizer trained on the corpus, saved with the model and used to generate.
"$bin" train --text "$work/corpus.txt" --bpe 40 --steps 5 $tiny \
    --save "$work/bpe.safetensors" >"$work/bpe.out" 2>&1
check "train with --bpe exits 0" '[ $? -eq 0 ] && grep -q "vocabulary 296" "$work/bpe.out"'
check "generate with the checkpoint's BPE" \
    '"$bin" generate --load "$work/bpe.safetensors" --prompt "the dog" --tokens 5 \
     >/dev/null 2>&1'

expect_refusal() { # description, expected message fragment, then the command
    label=$1 message=$2
    shift 2
    "$@" >"$work/bad.out" 2>&1 </dev/null
    status=$?
    check "$label: exit status 2" '[ $status -eq 2 ]'
    check "$label: says \"$message\"" 'grep -qF -- "$message" "$work/bad.out"'
}
m="$work/m.safetensors"
expect_refusal "a prompt longer than the context" \
    "the prompt is 40 tokens, longer than the model's context of 32" \
    "$bin" generate --load "$m" --prompt "$(printf '%040d' 0)"
expect_refusal "negative top-k" "--top-k -1 is not in [0, 256]" \
    "$bin" generate --load "$m" --prompt "the" --top-k -1
expect_refusal "top-k beyond the vocabulary" "--top-k 257 is not in [0, 256]" \
    "$bin" generate --load "$m" --prompt "the" --top-k 257
expect_refusal "top-p 0" "--top-p 0 is not in (0, 1]" \
    "$bin" generate --load "$m" --prompt "the" --top-p 0
expect_refusal "top-p above 1" "--top-p 1.5 is not in (0, 1]" \
    "$bin" generate --load "$m" --prompt "the" --top-p 1.5
expect_refusal "a missing checkpoint" "$work/nope.safetensors: No such file or directory" \
    "$bin" generate --load "$work/nope.safetensors" --prompt "the"
expect_refusal "a text file as a checkpoint" "header length" \
    "$bin" generate --load "$work/corpus.txt" --prompt "the"
expect_refusal "a missing corpus" "$work/nope.txt: No such file or directory" \
    "$bin" train --text "$work/nope.txt" --save "$work/x.safetensors"
: >"$work/empty.txt"
expect_refusal "an empty corpus" "qkv-lm: the corpus is empty" \
    "$bin" train --text "$work/empty.txt" --save "$work/x.safetensors"
head -c 50 "$work/corpus.txt" >"$work/short.txt"
expect_refusal "a corpus shorter than two windows" \
    "the corpus gives 50 tokens, 1 windows of --ctx 32 + 1; training needs at least two" \
    "$bin" train --text "$work/short.txt" $tiny --save "$work/x.safetensors"
expect_refusal "a save into a missing directory" "$work/missing/m.safetensors" \
    "$bin" train --text "$work/corpus.txt" $tiny --save "$work/missing/m.safetensors"
expect_refusal "heads that do not divide dim" "--dim is not divisible by --heads" \
    "$bin" train --text "$work/corpus.txt" --dim 30 --heads 4 --save "$work/x.safetensors"
expect_refusal "an unknown option" "unknown option --colour" \
    "$bin" generate --load "$m" --prompt "the" --colour red

[ $failures -eq 0 ]
