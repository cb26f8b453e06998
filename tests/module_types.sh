#!/bin/sh
# The module functions take a qkv_module *, so that the compiler catches a tensor passed where
# a module belongs: each snippet below must fail to compile, while the same calls on a module
# compile. Incompatible pointer types are an error by default from GCC 14 and Clang 16; the
# flag makes older compilers agree. Arguments: source dir, C compiler.
set -u
source=$1
cc=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
status=0

compiles() { # name, body of a function given qkv_linear *lin and qkv_tensor *t
    printf '#include "qkv.h"\nvoid f(qkv_linear *lin, qkv_tensor *t);\n' >"$dir/$1.c"
    printf 'void f(qkv_linear *lin, qkv_tensor *t) { (void)lin; (void)t; %s }\n' "$2" \
        >>"$dir/$1.c"
    $cc -std=c11 -Werror=incompatible-pointer-types -I"$source" -c "$dir/$1.c" \
        -o "$dir/$1.o" >"$dir/$1.log" 2>&1
}

expect_ok() {
    if ! compiles "$1" "$2"; then
        echo "does not compile, but should: $2"
        cat "$dir/$1.log"
        status=1
    fi
}

expect_refused() {
    if compiles "$1" "$2"; then
        echo "compiles, but a tensor is no module: $2"
        status=1
    fi
}

expect_ok module_free 'qkv_module_free(QKV_MODULE(lin));'
expect_ok module_base 'qkv_module_train(&lin->base, false);'
expect_ok module_list 'qkv_named_list_free(qkv_module_parameters(QKV_MODULE(lin)));'
expect_ok module_forward 'qkv_module_forward(QKV_MODULE(lin), t);'
expect_refused tensor_free 'qkv_module_free(t);'
expect_refused tensor_train 'qkv_module_train(t, false);'
expect_refused tensor_parameters 'qkv_module_parameters(t);'
expect_refused tensor_save 'qkv_module_save(t, "x", NULL);'
expect_refused tensor_forward 'qkv_module_forward(t, t);'
expect_refused tensor_cast 'qkv_module_free(QKV_MODULE(t));'
expect_refused concrete_without_cast 'qkv_module_free(lin);'
exit $status
