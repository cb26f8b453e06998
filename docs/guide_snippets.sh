#!/bin/sh
# Every ```c block of docs/guide.md must appear, line for line, in one file of docs/guide/,
# which the build compiles: the guide cannot show code that no longer builds.
root=$1
status=0
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
awk -v dir="$dir" '
    /^```c$/ { n++; file = dir "/" n; inside = 1; next }
    /^```$/ && inside { inside = 0; close(file); next }
    inside { print > file }
' "$root/docs/guide.md"
count=0
for block in "$dir"/*; do
    [ -f "$block" ] || continue
    count=$((count + 1))
    found=0
    for src in "$root"/docs/guide/*.c "$root"/docs/guide/*.h; do
        if awk 'FNR == NR { b[++nb] = $0; next } { f[++nf] = $0 }
                END {
                    for (i = 1; i + nb - 1 <= nf; i++) {
                        for (j = 1; j <= nb && f[i + j - 1] == b[j]; j++) {}
                        if (j > nb) exit 0
                    }
                    exit 1
                }' "$block" "$src"; then
            found=1
            break
        fi
    done
    if [ $found -eq 0 ]; then
        echo "docs/guide.md: snippet $(basename "$block") is in no file of docs/guide/:"
        cat "$block"
        status=1
    fi
done
if [ $count -eq 0 ]; then
    echo "docs/guide.md has no C snippets"
    status=1
fi
exit $status
