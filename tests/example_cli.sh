#!/bin/sh
# qkv-classify as a user runs it: train on a small TSV, save, eval and predict from the
# checkpoint, and bad input refused with a message and exit status 2.
# Usage: example_cli.sh QKV_CLASSIFY SET_METADATA
set -u
bin=$1
set_metadata=$2
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

# Two classes a model separates from single words.
i=0
while [ $i -lt 120 ]; do
    echo "good	a great fine lovely film number $i" >>"$work/train.tsv"
    echo "bad	an awful dull boring film number $i" >>"$work/train.tsv"
    i=$((i + 1))
done
printf 'good\tgreat lovely\nbad\tawful boring\ngood\tfine great film\nbad\tdull awful film\n' \
    >"$work/test.tsv"

"$bin" train --train "$work/train.tsv" --test "$work/test.tsv" --epochs 4 --lr 1e-2 --dim 16 \
    --heads 2 --ffn 32 --save "$work/m.safetensors" >"$work/train.out" 2>&1
check "train exits 0" '[ $? -eq 0 ]'
epoch_line='^epoch [0-9]* train_loss=[0-9.]* test_acc=[0-9.]* seconds=[0-9.]*$'
check "one line per epoch" '[ "$(grep -c "$epoch_line" "$work/train.out")" -eq 4 ]'
check "majority-class line" 'grep -q "^majority class .*: test_acc=0.500$" "$work/train.out"'
check "per-class table" 'grep -q "^good  *1.000  *1.000  *2$" "$work/train.out"'
check "last line is test_acc=1.000" '[ "$(tail -1 "$work/train.out")" = "test_acc=1.000" ]'

"$bin" eval --load "$work/m.safetensors" --test "$work/test.tsv" >"$work/eval.out" 2>&1
check "eval prints test_acc=1.000" '[ "$(cat "$work/eval.out")" = "test_acc=1.000" ]'

printf 'what a lovely great film\nso dull and awful\n' |
    "$bin" predict --load "$work/m.safetensors" >"$work/predict.out" 2>&1
check "predict labels each line" \
    '[ "$(cut -f1 "$work/predict.out" | tr "\n" " ")" = "good bad " ]'
check "predict gives probabilities above one half" \
    '[ "$(grep -c "	0\.[5-9][0-9]*$\|	1\.0*$" "$work/predict.out")" -eq 2 ]'

expect_refusal() { # description, expected message fragment, then the command
    label=$1 message=$2
    shift 2
    "$@" >"$work/bad.out" 2>&1 </dev/null
    status=$?
    check "$label: exit status 2" '[ $status -eq 2 ]'
    check "$label: says \"$message\"" 'grep -qF -- "$message" "$work/bad.out"'
}
expect_refusal "missing file" "$work/nope.tsv: No such file or directory" \
    "$bin" train --train "$work/nope.tsv" --test "$work/test.tsv"
printf 'good\tfine\nno tab here\n' >"$work/malformed.tsv"
expect_refusal "malformed line" "malformed.tsv:2: no tab between label and text" \
    "$bin" train --train "$work/train.tsv" --test "$work/malformed.tsv"
printf 'good\tfine\nugly\tmeh\nugly\twhat\n' >"$work/unseen.tsv"
expect_refusal "unseen test labels" \
    "2 examples have labels not seen in training (the first is 'ugly')" \
    "$bin" train --train "$work/train.tsv" --test "$work/unseen.tsv"
expect_refusal "not a checkpoint" "header length" \
    "$bin" eval --load "$work/train.tsv" --test "$work/test.tsv"
expect_refusal "another program's safetensors" "not a qkv-classify checkpoint" \
    "$bin" eval --load "$(dirname "$0")/fixtures/data/torch_classifier.safetensors" \
    --test "$work/test.tsv"
head -c 300 "$work/m.safetensors" >"$work/truncated.safetensors"
expect_refusal "truncated checkpoint" "runs past the end of the file" \
    "$bin" eval --load "$work/truncated.safetensors" --test "$work/test.tsv"
# A checkpoint whose settings lie about its tensors is refused before the model is built:
# ffn=8388608 would cost 3 GB. Address space is limited to 600 MB (the allocator reserves
# 256 MB arenas), unless the binary cannot start so limited (AddressSanitizer's shadow).
"$set_metadata" "$work/m.safetensors" "$work/amplifying.safetensors" ffn=8388608
limit=
if (ulimit -v 600000 && "$bin" --help) >/dev/null 2>&1; then limit="ulimit -v 600000 &&"; fi
message="qkv-classify: $work/amplifying.safetensors: setting ffn=8388608 disagrees with"
message="$message \"encoder.layers.0.linear1.weight\", [32,16] in the file"
expect_refusal "settings that disagree with the tensors" "$message" \
    sh -c "$limit \"\$0\" \"\$@\"" "$bin" eval --load "$work/amplifying.safetensors" \
    --test "$work/test.tsv"
# Files that never end: a device is refused, a pipe is read up to 256 MiB.
expect_refusal "a device as training data" \
    "qkv-classify: qkv_tsv_read: /dev/zero: not a regular file or a pipe" \
    "$bin" train --train /dev/zero --test "$work/test.tsv"
cat /dev/zero 2>/dev/null | "$bin" train --train /dev/stdin --test "$work/test.tsv" \
    >"$work/bad.out" 2>&1
status=$?
check "an endless pipe: exit status 2" '[ $status -eq 2 ]'
message="qkv-classify: qkv_tsv_read: /dev/stdin: a pipe is read up to 256 MiB, and this one"
message="$message gave more (save it to a file)"
check "an endless pipe: says \"$message\"" '[ "$(cat "$work/bad.out")" = "$message" ]'
: >"$work/empty.tsv"
expect_refusal "eval of an empty test file" "qkv-classify: $work/empty.tsv has no examples" \
    "$bin" eval --load "$work/m.safetensors" --test "$work/empty.tsv"

# A destination that cannot be saved to is refused before training, with status 2.
expect_refusal "a save into a missing directory" "qkv-classify: qkv_safetensors_writable: \
$work/missing/m.safetensors: No such file or directory" \
    "$bin" train --train "$work/train.tsv" --test "$work/test.tsv" \
    --save "$work/missing/m.safetensors"
check "a save into a missing directory: refused before training" \
    '! grep -q "^epoch" "$work/bad.out"'
if [ "$(id -u)" != 0 ]; then # root writes into read-only directories
    mkdir "$work/readonly" && chmod 555 "$work/readonly"
    expect_refusal "a save into a read-only directory" "qkv-classify: \
qkv_safetensors_writable: $work/readonly/m.safetensors: Permission denied" \
        "$bin" train --train "$work/train.tsv" --test "$work/test.tsv" \
        --save "$work/readonly/m.safetensors"
fi

# A save through a symbolic link replaces the target and keeps the link; it also removes the
# temporary file a killed save left (its pid gone, an hour old).
mkdir "$work/saves"
ln -s real.safetensors "$work/saves/link.safetensors"
dead=$(sh -c 'echo $$')
touch -d '1 hour ago' "$work/saves/link.safetensors.tmp-$dead-0" \
    "$work/saves/real.safetensors.tmp-$dead-3"
"$bin" train --train "$work/train.tsv" --test "$work/test.tsv" --epochs 1 --dim 16 --heads 2 \
    --ffn 32 --save "$work/saves/link.safetensors" >"$work/link.out" 2>&1
check "a save through a link exits 0" '[ $? -eq 0 ]'
check "the link stays a link" '[ -L "$work/saves/link.safetensors" ]'
check "its target is the checkpoint" \
    '"$bin" eval --load "$work/saves/real.safetensors" --test "$work/test.tsv" >/dev/null'
check "a killed save's temporary files are removed" \
    '[ "$(ls -A "$work/saves" | tr "\n" " ")" = "link.safetensors real.safetensors " ]'

# --save is rewritten after every epoch and train --load continues it to the bit, in the
# single-process loop and with micro-batches; a resume with other settings is refused.
short="--train $work/train.tsv --test $work/test.tsv --dim 16 --heads 2 --ffn 32 --batch 64"
for micro in "" "--micro-batches 4"; do
    what="resumed${micro:+ with $micro}"
    "$bin" train $short $micro --epochs 2 --save "$work/straight.safetensors" >/dev/null 2>&1
    "$bin" train $short $micro --epochs 1 --save "$work/first.safetensors" >/dev/null 2>&1
    "$bin" train $short $micro --epochs 2 --load "$work/first.safetensors" \
        --save "$work/resumed.safetensors" >"$work/resumed.out" 2>&1
    check "$what: exits 0" '[ $? -eq 0 ]'
    check "$what: byte-identical to the run that did not stop" \
        'cmp -s "$work/straight.safetensors" "$work/resumed.safetensors"'
    check "$what: trains epoch 2 alone" \
        '[ "$(grep "^epoch " "$work/resumed.out" | cut -d" " -f1-2)" = "epoch 2" ]'
done
expect_refusal "a resume with another seed" "the run was trained with --seed 0, not 7" \
    "$bin" train $short --micro-batches 4 --epochs 2 --seed 7 --load "$work/first.safetensors"
expect_refusal "a resume with nothing left to train" \
    "it has trained 1 epochs, and --epochs 1 asks for no more" \
    "$bin" train $short --micro-batches 4 --epochs 1 --load "$work/first.safetensors"
expect_refusal "a resume on other data" "its vocabulary or labels differ from those of --train" \
    "$bin" train --train "$work/test.tsv" --test "$work/test.tsv" --dim 16 --heads 2 --ffn 32 \
    --batch 64 --micro-batches 4 --epochs 2 --min-count 1 --load "$work/first.safetensors"
expect_refusal "a model file as a resume" "not a training checkpoint of qkv-classify" \
    "$bin" train $short --epochs 2 --load \
    "$(dirname "$0")/fixtures/data/torch_classifier.safetensors"

# Arguments: a stray word, and --help after a command.
expect_refusal "a stray argument" \
    "qkv-classify: unexpected argument 'train.tsv' (flags are --name value)" \
    "$bin" train train.tsv
for command in train eval predict; do
    "$bin" $command --help >"$work/help.out" 2>&1
    status=$?
    check "$command --help exits 0" '[ $status -eq 0 ]'
    check "$command --help gives its usage" \
        'grep -q "^  qkv-classify $command " "$work/help.out" &&
         [ "$(grep -c "^  qkv-classify" "$work/help.out")" -eq 1 ]'
done
"$bin" eval -h >"$work/help.out" 2>&1
check "eval -h gives its usage" 'grep -q "^  qkv-classify eval --load" "$work/help.out"'

expect_refusal "bad option value" "--epochs takes a whole number" \
    "$bin" train --train "$work/train.tsv" --test "$work/test.tsv" --epochs many
expect_refusal "unknown option" "unknown option --colour" \
    "$bin" train --train "$work/train.tsv" --test "$work/test.tsv" --colour red

[ $failures -eq 0 ]
