#!/bin/sh
# `meson install` of a build, into a scratch directory, gives the public headers, the library
# and qkv.pc; the README's first program then builds against them with pkg-config, as a
# program outside the tree does, and runs. Arguments: build dir, source dir, C compiler, and
# the build's b_sanitize ("none" or e.g. "address,undefined"), which the program must share.
set -e
build=$1
source=$2
cc=$3
sanitize=$4
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
meson install -C "$build" --no-rebuild --destdir "$dest" >"$dest.log" 2>&1 || {
    cat "$dest.log"
    rm -f "$dest.log"
    exit 1
}
rm -f "$dest.log"
pc=$(find "$dest" -name qkv.pc)
if [ -z "$pc" ]; then
    echo "meson install gave no qkv.pc"
    exit 1
fi
for header in qkv.h tensor/tensor.h autograd/autograd.h io/io.h nn/nn.h optim/optim.h data/data.h \
    dist/dist.h; do
    if ! find "$dest" -path "*/include/qkv/$header" | grep -q .; then
        echo "meson install gave no $header"
        exit 1
    fi
done
pkgconfig_dir=$(dirname "$pc")
flags=""
[ "$sanitize" = none ] || flags="-fsanitize=$sanitize"
# shellcheck disable=SC2046
$cc $flags "$source/examples/first.c" $(PKG_CONFIG_PATH="$pkgconfig_dir" \
    PKG_CONFIG_SYSROOT_DIR="$dest" pkg-config --cflags --libs qkv) -o "$dest/first"
LD_LIBRARY_PATH="$(dirname "$pkgconfig_dir")" "$dest/first" >/dev/null
