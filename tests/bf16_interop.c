/* BF16 safetensors both ways with PyTorch (tests/bf16_interop.sh drives it):
 *   bf16_interop write OUT   every bf16 bit pattern as a [256,256] BF16 tensor "all", and
 *                            the same values as F32 "all_f32", for PyTorch to check;
 *   bf16_interop read IN     checks that IN's BF16 tensor "torch" (written by PyTorch) reads
 *                            as BF16 with the bits of its I64 twin "torch_bits". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkv.h"

static int write_file(const char *path) {
    uint16_t *bits = malloc(65536 * sizeof *bits);
    float *f = malloc(65536 * sizeof *f);
    if (!bits || !f) return 1;
    for (uint32_t i = 0; i < 65536; i++) {
        bits[i] = (uint16_t)i;
        f[i] = qkv_bf16_to_f32((uint16_t)i);
    }
    qkv_tensor *t[2] = {qkv_from_array(QKV_BF16, QKV_SHAPE(256, 256), bits),
                        qkv_from_array(QKV_F32, QKV_SHAPE(256, 256), f)};
    char *names[2] = {"all", "all_f32"};
    qkv_named_list list = {2, names, t};
    bool ok = t[0] && t[1] && qkv_safetensors_write(path, &list, NULL);
    qkv_release(t[0]);
    qkv_release(t[1]);
    free(bits);
    free(f);
    return ok ? 0 : 1;
}

static int read_file(const char *path) {
    qkv_safetensors *f = qkv_safetensors_read(path);
    qkv_tensor *t = f ? qkv_safetensors_tensor(f, "torch") : NULL;
    qkv_tensor *want = f ? qkv_safetensors_tensor(f, "torch_bits") : NULL;
    int bad = !t || !want || t->dtype != QKV_BF16 || t->numel != want->numel;
    for (int64_t i = 0; !bad && i < t->numel; i++)
        bad = ((const uint16_t *)qkv_data(t))[i] != (uint16_t)((const int64_t *)qkv_data(want))[i];
    printf("%s: PyTorch's BF16 tensor %s\n", path, bad ? "DIFFERS" : "reads with the same bits");
    qkv_release(t);
    qkv_release(want);
    qkv_safetensors_free(f);
    return bad;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "write")) return write_file(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "read")) return read_file(argv[2]);
    fprintf(stderr, "usage: bf16_interop write|read FILE\n");
    return 2;
}
