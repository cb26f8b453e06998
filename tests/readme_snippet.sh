#!/bin/sh
# The C program in README.md must be examples/first.c, which the build compiles.
sed -n '/^```c$/,/^```$/p' "$1/README.md" | sed '1d;$d' | diff - "$1/examples/first.c"
